"""asv benchmark suite of fastnorm: one module per op family, shared pieces in ``common.py``."""
