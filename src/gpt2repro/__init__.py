"""gpt2repro: pretrain GPT-2 from scratch and show it matches OpenAI's checkpoint."""

__version__ = "0.1.0"
