"""transformers integration (placeholder until written)."""
