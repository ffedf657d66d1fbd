"""Recipe-compatible sparsification for PyTorch: CAP, FastCAP, OBS, M-FAC and magnitude pruning."""

__version__ = "0.1.0"
