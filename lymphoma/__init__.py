"""Lymphoma sub-type classification library: images and whole slides, tiling into HDF5 shards, case-level
splits and cross-validation folds, stain handling and augmentation, the DenseNet and its training loop with
epoch selection, tile-vote prediction, ensembles of fold models, a reference feature baseline, metrics and
plots, the data download.

It knows nothing of SLURM or submitit; ``jobs/`` wires it to ``hpc/``.
"""

__version__ = "0.1.0"
