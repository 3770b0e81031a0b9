"""Thin per-party entry points for mpirun: ``mpirun -n 2 python -m parties generate ...``."""
