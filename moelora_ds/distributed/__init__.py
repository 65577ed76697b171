"""Ranks and their process group: the launch environment (rendezvous), SLURM node lists, the process group, hostfiles."""
