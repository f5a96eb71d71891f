"""Entry points of the pipeline; the only place that wires ``lymphoma`` to ``hpc``."""
