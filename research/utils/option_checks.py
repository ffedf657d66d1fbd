"""Command-line options checked against the libraries' own names and signatures: torch devices,
timm models' and optimizers' keyword arguments and types, timm's interpolation names and
auto-augment policies. torch and timm load only inside these functions, so ``--help`` and usage
errors stay fast.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import types
import typing
from typing import Any

from .errors import SetupError


def check_device(device: str | None) -> None:
    """``--device`` parses as a torch device (the types torch lists in its error)."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SetupError(f"--device {device!r} is not allowed: {err}") from err


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a Python literal from the command line) matches the type ``hint``.

    Plain types, unions, ``Literal`` and tuples/lists are checked; any other hint (callables,
    layer types, tensors) is left to the constructor.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool) or value in (0, 1)
    if hint in (int, float):
        kinds = (int,) if hint is int else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        return isinstance(value, tuple | list)
    return True


def _type_hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except (NameError, TypeError, AttributeError):  # unresolvable annotations: nothing to check
        return {}


def _hint_text(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_kwarg_types(option: str, owner: str, kwargs: dict[str, Any], hints: dict) -> None:
    """Each value of ``kwargs`` fits the annotation of its parameter in ``hints``."""
    for key, value in kwargs.items():
        if key in hints and not fits(value, hints[key]):
            shown = f"{key}={value!r}" if option.endswith("kwargs") else repr(value)
            raise SetupError(
                f"{option} {shown} is not allowed: {owner} takes {_hint_text(hints[key])} for {key}"
            )


def check_model_kwargs(args: argparse.Namespace) -> None:
    """``--model-kwargs`` (and ``--gp``) values against the annotations of the model's class.

    Unknown keywords are left to ``models.build_model``, which names them; an unknown model to
    ``models.check_model_name``.
    """
    from timm.models import is_model, model_entrypoint

    from . import models  # noqa: F401  (registers vit_digits, resnet_digits)

    if not is_model(args.model):
        return
    cls = _type_hints(model_entrypoint(args.model)).get("return")
    if not inspect.isclass(cls):
        return
    hints = _type_hints(cls)
    owner = f"{args.model} ({cls.__name__})"
    check_kwarg_types("--model-kwargs", owner, args.model_kwargs, hints)
    if getattr(args, "gp", None) is not None:
        check_kwarg_types("--gp", owner, {"global_pool": args.gp}, hints)


# The options behind timm's optimizer_kwargs: --opt-kwargs must not repeat one that is set.
_OPTIMIZER_OPTIONS = {"opt": "--opt", "lr": "--lr", "weight_decay": "--weight-decay",
                      "momentum": "--momentum", "eps": "--opt-eps", "betas": "--opt-betas",
                      "layer_decay": "--layer-decay"}  # fmt: skip


def check_optimizer(args: argparse.Namespace) -> None:
    """``--opt`` in timm's optimizer registry (or ``mfac``); ``--opt-kwargs`` names and value
    types against ``create_optimizer_v2`` and the optimizer class's signature."""
    import timm.optim
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    if args.opt.lower() == "mfac":  # training.create_optimizer checks its keywords
        return
    name = args.opt.lower().removeprefix("lookahead_")  # timm's Lookahead wrapper prefix
    names = timm.optim.list_optimizers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.optim.list_optimizers()"
        raise SetupError(f"--opt {args.opt!r} is not a timm optimizer (nor mfac): {hint}")
    passed = optimizer_kwargs(cfg=args)  # what the script hands timm itself
    for key in args.opt_kwargs:
        if key in passed:
            option = _OPTIMIZER_OPTIONS.get(key, key)
            raise SetupError(f"--opt-kwargs {key} is not allowed: {option} sets it (give one)")
    cls = timm.optim.get_optimizer_class(name, bind_defaults=False)
    factory = inspect.signature(create_optimizer_v2).parameters
    own = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in own.values())
    allowed = sorted({*factory, *own} - {"model_or_params", "params", "kwargs", "self"})
    unknown = [k for k in args.opt_kwargs if k not in allowed]
    if unknown and not takes_any:
        raise SetupError(
            f"--opt-kwargs {unknown[0]} is not allowed for --opt {args.opt}: "
            f"{cls.__name__} takes {', '.join(a for a in allowed if a not in _OPTIMIZER_OPTIONS)}"
        )
    hints = {**_type_hints(create_optimizer_v2), **_type_hints(cls)}
    check_kwarg_types("--opt-kwargs", f"--opt {args.opt} ({cls.__name__})", args.opt_kwargs, hints)


def check_auto_augment(policy: str | None) -> None:
    """``--aa`` parses with the timm function its prefix selects (as timm's transforms do)."""
    if not policy:
        return
    from timm.data import auto_augment as aa

    if policy.startswith("rand"):
        parse = aa.rand_augment_transform
    elif policy.startswith("augmix"):
        parse = aa.augment_and_mix_transform
    else:
        parse = aa.auto_augment_transform
    try:
        parse(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as err:  # timm's parser refusing
        raise SetupError(
            f"--aa {policy!r} is not an auto-augment policy timm reads ({err or type(err).__name__})"
            "; allowed: rand-..., augmix-..., original, originalr, v0, v0r, 3a"
        ) from err


def check_timm_training_options(args: argparse.Namespace) -> None:
    """``sparse_training.py``'s names checked against timm: optimizer, interpolations, ``--aa``."""
    from timm.data.transforms import _str_to_pil_interpolation

    check_optimizer(args)
    names = sorted(_str_to_pil_interpolation)  # the names timm's str_to_interp_mode reads
    for option, value, extra in (("--interpolation", args.interpolation, []),
                                 ("--train-interpolation", args.train_interpolation, ["random"])):  # fmt: skip
        if value and value not in names + extra:
            raise SetupError(
                f"{option} {value!r} is not allowed: one of {', '.join(names + extra)} "
                "(or '': the model's)"
            )
    check_auto_augment(args.aa)
