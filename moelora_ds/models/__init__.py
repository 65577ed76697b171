"""Base models: loading from a local directory or a GGUF file (converted once), partitioned under ZeRO-3."""
