"""Recipe-compatible sparsification for PyTorch: CAP, FastCAP, OBS, M-FAC and magnitude pruning.

Importing the package first runs :func:`sparseml.compat.ensure_torchvision`, so that a user's
script can ``import sparseml`` and then ``import timm`` / ``import torchvision`` where the
torchvision wheel cannot load its native ops (CPU torch); elsewhere it changes nothing.
"""

from sparseml.compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
