"""Make ``import torchvision`` (hence ``import timm``) work next to a CPU build of torch.

The torchvision wheel that pip pairs with the CPU build of torch here is a CUDA build: its native
ops library cannot load, so ``import torchvision`` stops with "operator torchvision::nms does not
exist" while registering fake kernels for ops it never got. Defining the two op schemas it
registers first lets the pure-Python part of torchvision (the transforms and datasets timm uses)
import; the detection ops themselves stay unusable, which classification code never needs.

``import sparseml`` runs :func:`ensure_torchvision`, so a user's own script can ``import sparseml``
and then ``import timm`` with nothing else. Where torchvision loads normally, or is not
installed, nothing is changed. This module never imports timm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept at module level: a torch.library.Library deregisters its definitions when collected.
_TORCHVISION_LIB: torch.library.Library | None = None


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _is_missing_op_error(err: BaseException) -> bool:
    text = str(err)
    return "torchvision::" in text and "does not exist" in text


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work; return True if the op schemas had to be defined.

    Safe to call any number of times. Any other import failure of torchvision is left for the
    user's own ``import torchvision`` to report: ``import sparseml`` must not fail because of a
    package it does not need.
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # noqa: BLE001 - only the known failure is handled below
        _forget_torchvision()
        if not _is_missing_op_error(err):
            return False
    else:
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # already defined by another shim
            lib.define(schema)
    _TORCHVISION_LIB = lib
    import torchvision  # noqa: F401, F811

    return True
