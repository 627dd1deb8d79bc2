"""Fixtures shared across test modules."""
from slurm_cluster import slurm_cluster  # noqa: F401  (a real SLURM cluster on this machine, session-wide)
