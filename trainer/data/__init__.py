"""Data on disk and in batches: text sources, corpus shards and the soft-label store (one binfile format),
tokenization, encoding, masking, batch orders (every sampler), tasks and their metrics, transfer sets."""
