"""Lymphoma sub-type classification library: tiling, tile stores, splits, data download.

It knows nothing of SLURM or submitit; ``jobs/`` wires it to ``hpc/``.
"""

__version__ = "0.1.0"
