"""Ranks: the launch environment (rendezvous), SLURM node lists, the process group, DeepSpeed hostfiles."""
