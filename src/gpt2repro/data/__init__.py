"""Data: the GPT-2 tokenizer, corpora, token shards and the distributed loader."""
