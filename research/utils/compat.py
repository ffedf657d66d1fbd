"""Environment fixes that must run before timm is imported.

The torchvision fix itself lives in the package (:mod:`sparseml.compat`, run by ``import
sparseml``); it is re-exported here because the scripts and tests call
``utils.compat.ensure_torchvision()`` before importing timm. This module adds what only the
scripts need: the W&B mode and timm's posterize under Pillow 13.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from sparseml.compat import ensure_torchvision as _ensure_torchvision

__all__ = ["ensure_torchvision", "patch_timm_posterize", "set_wandb_mode", "wandb_has_credentials"]


def wandb_has_credentials() -> bool:
    """True when W&B could log online: ``WANDB_API_KEY`` set, or ``wandb login`` ran.

    ``wandb login`` stores the key in the netrc file (``NETRC`` or ``~/.netrc``) under the host of
    ``WANDB_BASE_URL`` (default api.wandb.ai); reading it needs neither wandb nor the network.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def set_wandb_mode() -> str:
    """Choose W&B's mode as timm leaves it: the user's ``WANDB_MODE`` wins; else online when the
    user has credentials, offline otherwise (online without credentials would prompt or fail, and
    offline runs sync later with ``wandb sync``). Returns the mode.
    """
    if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


# HF_HUB_OFFLINE is deliberately left alone: it would stop --pretrained from downloading weights
# (tests, CI and offline launchers set it themselves; see utils/pretrained.py for the fast
# failure without network).
set_offline_defaults = set_wandb_mode


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` (hence ``import timm``) work; return True if a fix was needed.

    Also chooses the W&B mode (:func:`set_wandb_mode`). Safe to call any number of times.
    """
    set_wandb_mode()
    return _ensure_torchvision()


def patch_timm_posterize() -> bool:
    """Let timm's RandAugment posterize to 0 bits under Pillow >= 13; return True if patched.

    timm's increasing-posterize op (``rand-...-inc1``, used by the DeiT/AugReg configs) asks for
    0 bits at high magnitudes. Older Pillow returned a black image; Pillow 13 raises ValueError,
    which would stop training at a random batch. Call after timm is importable.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    if getattr(auto_augment.posterize, "_zero_bits_ok", False):
        return True
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return False
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:  # what Pillow < 13 returned: every channel value masked to 0
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    posterize._zero_bits_ok = True
    auto_augment.posterize = posterize
    auto_augment.NAME_TO_OP["Posterize"] = posterize
    auto_augment.NAME_TO_OP["PosterizeIncreasing"] = posterize
    auto_augment.NAME_TO_OP["PosterizeOriginal"] = posterize
    return True
