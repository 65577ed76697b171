"""Training checkpoints: where they are (locate), writing and restoring them (save_load), reading their adapters
(adapters), and resuming them on another number of ranks (reshard)."""
