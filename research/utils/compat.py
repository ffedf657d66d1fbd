"""Environment fixes that must run before timm is imported.

The torchvision wheel that pip pairs with the CPU build of torch here is a CUDA build: its native
ops library cannot load, so ``import torchvision`` (and therefore ``import timm``) stops with
"operator torchvision::nms does not exist" while registering fake kernels for ops it never got.
Defining the two op schemas it registers first lets the pure-Python part of torchvision (the
transforms and datasets timm uses) import; the detection ops themselves stay unusable, which timm's
classification code never needs. Where torchvision loads normally nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept at module level: a torch.library.Library deregisters its definitions when collected.
_TORCHVISION_LIB: torch.library.Library | None = None

# Without network, online W&B hangs ~100 s; offline runs sync later with `wandb sync`.
# HF_HUB_OFFLINE is deliberately absent: it would stop --pretrained from downloading weights
# (tests, CI and offline launchers set it themselves; see utils/pretrained.py for the fast
# failure without network).
OFFLINE_DEFAULTS = {
    "WANDB_MODE": "offline",
}


def set_offline_defaults() -> None:
    """Set ``WANDB_MODE=offline`` unless the user already chose."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` (hence ``import timm``) work; return True if a fix was needed.

    Also applies :func:`set_offline_defaults`. Safe to call any number of times.
    """
    global _TORCHVISION_LIB
    set_offline_defaults()
    if _TORCHVISION_LIB is not None:
        return True
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err) or "does not exist" not in str(err):
            raise
    else:
        return False
    _forget_torchvision()
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # already defined by another shim
            lib.define(schema)
    _TORCHVISION_LIB = lib
    import torchvision  # noqa: F401, F811

    return True


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
