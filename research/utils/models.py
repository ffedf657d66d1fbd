"""Tiny timm models for the offline digits data (32x32 RGB, 10 classes) and Fashion-MNIST
(28x28, given as RGB by ``utils.fmnist``; 10 classes).

Importing this module registers them with timm, so ``--model vit_digits`` works like any timm
name. They train to high accuracy in a minute or two on a laptop CPU, which makes them the
default for demos and end-to-end tests. It also loads weights into any model with errors that
name the mismatching keys and shapes (and ``--num-classes`` when the classifier differs), and
holds :func:`build_model`, the one place every script (training, one-shot sweeps, export, the
benchmarks through them) turns its model options into a model. Call
``compat.ensure_torchvision()`` before importing.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import typing
from pathlib import Path
from typing import Any

import torch
from timm.models import (
    build_model_with_cfg,
    create_model,
    generate_default_cfgs,
    is_model,
    list_models,
    model_entrypoint,
    register_model,
)
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import CheckpointError, SetupError
from .pretrained import PRETRAINED_HINT, pretrained_kwargs
from .weights import read_state_dict

_logger = logging.getLogger(__name__)

DIGITS_CFG = {
    "num_classes": 10,
    "input_size": (3, 32, 32),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "first_conv": "",
    "classifier": "head",
}


def _cfg(**overrides: Any) -> dict:
    return {**DIGITS_CFG, **overrides}


# Fashion-MNIST: 28x28; the pixel mean / std of its training set (grayscale repeated to RGB).
FMNIST_CFG = {"input_size": (3, 28, 28), "mean": (0.286,) * 3, "std": (0.353,) * 3}


# timm's @register_model reads this module-level table (it must exist before the decorators run).
default_cfgs = generate_default_cfgs(
    {
        "vit_digits": _cfg(first_conv="patch_embed.proj"),
        "resnet_digits": _cfg(first_conv="conv1", classifier="fc"),
        "vit_fmnist": _cfg(first_conv="patch_embed.proj", **FMNIST_CFG),
        "resnet_fmnist": _cfg(first_conv="conv1", classifier="fc", **FMNIST_CFG),
    }
)


# The small models' shapes, shared by their digits (32x32) and Fashion-MNIST (28x28) versions.
SMALL_VIT = dict(
    patch_size=4,
    embed_dim=96,
    depth=4,
    num_heads=3,
    mlp_ratio=2.0,
    class_token=False,
    global_pool="avg",
    num_classes=10,
)
SMALL_RESNET = dict(
    block=BasicBlock,
    layers=(1, 1, 1, 1),
    channels=(16, 32, 64, 128),
    stem_width=16,
    replace_stem_pool=True,
    num_classes=10,
)


@register_model
def vit_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 4 blocks of width 96 (3 heads) on 4x4 patches of a 32x32 image (~0.31M params).

    Average pooling of the patch tokens instead of a class token: on 1.4k training images it
    converges in about half the epochs.
    """
    args = {**SMALL_VIT, "img_size": 32, **kwargs}
    return build_model_with_cfg(VisionTransformer, "vit_digits", pretrained, **args)


@register_model
def resnet_digits(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet with one basic block per stage, widths 16-128, no stem pooling (~0.36M params)."""
    return build_model_with_cfg(ResNet, "resnet_digits", pretrained, **{**SMALL_RESNET, **kwargs})


@register_model
def vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """``vit_digits``' shape on 28x28: 4 blocks of width 96 (3 heads), 49 patch tokens of 4x4
    pixels, average pooling (~0.31M params: an epoch of 60,000 images stays a few minutes on CPU).
    """
    args = {**SMALL_VIT, "img_size": 28, **kwargs}
    return build_model_with_cfg(VisionTransformer, "vit_fmnist", pretrained, **args)


@register_model
def resnet_fmnist(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """``resnet_digits``' shape on 28x28: one basic block per stage, widths 16-128, no stem
    pooling (~0.36M params)."""
    return build_model_with_cfg(ResNet, "resnet_fmnist", pretrained, **{**SMALL_RESNET, **kwargs})


# ----- building a model from command-line options --------------------------------------------
# timm.create_model keyword <- option attribute. A script without the option (one-shot sweeps
# have no --drop) passes None, which timm.create_model drops: the model's own default holds.
_TIMM_OPTIONS = {
    "in_chans": "in_chans",
    "num_classes": "num_classes",
    "drop_rate": "drop",
    "drop_path_rate": "drop_path",
    "drop_block_rate": "drop_block",
    "global_pool": "gp",
    "bn_momentum": "bn_momentum",
    "bn_eps": "bn_eps",
}


def build_model(args: Any, checkpoint_option: str = "--initial-checkpoint") -> nn.Module:
    """``timm.create_model`` from a script's options, then ``--initial-checkpoint`` loaded.

    Options: ``--model`` (unknown names fail with timm's closest names), ``--pretrained``
    (cached weights, else a download, else one clear error), ``--num-classes``,
    ``--model-kwargs`` / ``--img-size`` (:func:`model_kwargs`) and, where the script has them,
    timm's regularisation options (``--drop``, ``--drop-path``, ...). The weights load strictly
    (:func:`load_weights`: a mismatch names keys, shapes and ``--num-classes``).
    """
    check_model_name(args.model)
    kwargs = {k: getattr(args, name, None) for k, name in _TIMM_OPTIONS.items()}
    kwargs.update(model_kwargs(args))
    pretrained = bool(getattr(args, "pretrained", False))
    if pretrained:  # decided before timm would retry a download for ~45 s
        kwargs.update(pretrained_kwargs(args.model, checkpoint_option))
    try:
        model = create_model(args.model, pretrained=pretrained, **kwargs)
    except AssertionError as err:  # timm checks its keywords by assert (e.g. a --gp it lacks)
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)
        raise SetupError(
            f"cannot build model {args.model!r}: timm refused the options given ({given}): {err}"
        ) from err
    except (RuntimeError, OSError, ValueError, TypeError) as err:
        user_error = pretrained or "Unknown model" in str(err) or isinstance(err, ValueError)
        if not user_error and not (isinstance(err, TypeError) and "argument" in str(err)):
            raise  # a bug: keep the traceback
        hint = PRETRAINED_HINT if pretrained else ""
        raise SetupError(f"cannot build model {args.model!r}: {err}{hint}") from err
    if getattr(args, "initial_checkpoint", ""):
        load_weights(model, args.initial_checkpoint, checkpoint_option)
    return model


# ----- loading weights ----------------------------------------------------------------------------
def check_model_name(name: str) -> None:
    """Unknown ``--model`` names stop here with timm's closest names, not deep in timm."""
    if is_model(name):
        return
    close = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no similar name"
    raise SetupError(
        f"--model {name!r} is not a timm model: {hint} (python -c 'import timm; "
        'print(timm.list_models("*vit*"))\' lists them)'
    )


def takes_img_size(name: str) -> bool:
    """Whether timm's model class for ``name`` has an ``img_size`` argument (ViT, DeiT, Swin).

    timm's entrypoints annotate the class they return; without an annotation, any class
    defined in the entrypoint's module counts.
    """
    entry = model_entrypoint(name)
    try:
        returned = typing.get_type_hints(entry).get("return")
    except (NameError, TypeError):
        returned = None
    if inspect.isclass(returned):
        classes = [returned]
    else:
        module = inspect.getmodule(entry)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)]
        classes = [c for c in classes if c.__module__ == entry.__module__]
    return any(
        issubclass(c, nn.Module) and "img_size" in inspect.signature(c.__init__).parameters
        for c in classes
    )


def model_kwargs(args: Any) -> dict[str, Any]:
    """``--model-kwargs``, plus ``img_size`` from ``--img-size`` for models that take one.

    Without it a ViT keeps its native size and timm's patch embedding refuses the resized
    input deep inside the first forward pass. An ``img_size`` in ``--model-kwargs`` wins.
    """
    kwargs = dict(args.model_kwargs)
    if args.img_size and "img_size" not in kwargs and takes_img_size(args.model):
        kwargs["img_size"] = args.img_size
    return kwargs


def _listing(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not load strictly into ``model`` ('' when it does), in one line."""
    own = model.state_dict()
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shapes:
        parts.append(f"shapes differ for {_listing(shapes)}")
    if missing:
        parts.append(f"{len(missing)} model keys missing from it ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys the model lacks ({_listing(unexpected)})")
    if not parts:
        return ""
    hint = "check --model and --model-kwargs"
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    head_key = f"{head}.weight" if head else ""
    if head_key in state and head_key in own and state[head_key].shape[0] != own[head_key].shape[0]:
        hint = (
            f"--num-classes is {own[head_key].shape[0]} but the checkpoint has "
            f"{state[head_key].shape[0]} classes; set --num-classes {state[head_key].shape[0]}"
        )
    return "; ".join(parts) + f" ({hint})"


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], option: str, path: Any) -> None:
    """Raise a :class:`CheckpointError` naming keys, shapes and the option when ``state`` misfits."""
    problem = state_dict_mismatch(model, {k.removeprefix("module."): v for k, v in state.items()})
    if problem:
        raise CheckpointError(f"{option} {path} does not match the model: {problem}")


def load_weights(model: nn.Module, path: str | Path, option: str) -> None:
    """Load the weights in ``path`` strictly; a mismatch names keys, shapes and the option."""
    state = read_state_dict(path, option)
    check_fits(model, state, option, path)
    warn_rounding(model, state, option, path)
    model.load_state_dict(state, strict=True)


def warn_rounding(model: nn.Module, state: dict[str, Any], option: str, path: str | Path) -> None:
    """Loading copies each tensor into the model's dtype: say so when that rounds values (a
    float64 checkpoint into a float32 model), with the largest change, instead of silently."""
    own = model.state_dict()
    rounded = [(k, v) for k, v in state.items() if v.is_floating_point() and k in own
               and v.dtype.itemsize > own[k].dtype.itemsize]  # fmt: skip
    if not rounded:
        return
    change = max(float((v - v.to(own[k].dtype).to(v.dtype)).abs().max()) for k, v in rounded)
    _logger.warning(
        "%s %s: %d tensors are %s, the model holds %s: loading rounds them (largest change %.3g)",
        option, path, len(rounded), rounded[0][1].dtype, own[rounded[0][0]].dtype, change,
    )  # fmt: skip


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or Inf values."""
    return [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
