"""Interop with transformers: the name map, reading folders, export, import, loading, tokenizers."""
