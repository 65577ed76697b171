"""Training data: records on disk -> token ids with loss labels -> padded or packed per-rank micro-batches."""
