"""Recipe-compatible sparsification for PyTorch: CAP, FastCAP, OBS, M-FAC and magnitude pruning.

Importing the package installs :func:`sparseml.compat.install_import_hook`, so that a user's
script can ``import sparseml`` and then ``import timm`` / ``import torchvision`` where the
torchvision wheel cannot load its native ops (CPU torch); elsewhere it changes nothing. The
import stays light: torch is not imported here.
"""

from sparseml.compat import install_import_hook

install_import_hook()

__version__ = "0.1.0"
