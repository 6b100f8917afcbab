"""Evaluation: HellaSwag for our checkpoints and for OpenAI's GPT-2."""
