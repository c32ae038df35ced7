"""Data on disk and in batches: text sources, corpus shards, the soft-label store, tokenization, masking,
batch orders, labeled tasks and their metrics."""
