"""Model: GPT-2 itself, its weight files, and Hugging Face interop."""
