"""Base models: loading (local directories, GGUF conversion, zero.Init) and per-family adapter targets."""
