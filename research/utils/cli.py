"""Command line of ``sparse_training.py``: timm's ``train.py`` options plus CAP's additions.

Precedence is command line > ``--config`` YAML > defaults below. Config keys are argparse
destinations (``batch_size``); unknown keys are kept as attributes. Every dashed long option
also accepts its underscored spelling (``--gs-batch-size`` / ``--gs_batch_size``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from timm.utils import ParseKwargs

from .errors import SetupError


def _spellings(names: Sequence[str]) -> list[str]:
    out = list(names)
    for name in names:
        if name.startswith("--") and "-" in name[2:]:
            alt = "--" + name[2:].replace("-", "_")
            if alt not in out:
                out.append(alt)
    return out


class _Group:
    """Adds the underscored spelling of each dashed option of an argparse group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, *names: str, **kwargs: Any) -> None:
        self.group.add_argument(*_spellings(names), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradual sparse training of timm models with recipes")
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML of defaults")
    a = _Group(p.add_argument_group("sparsification"))
    a("--sparseml-recipe", default="", help="recipe YAML/markdown; without it, dense training")
    a("--gs-loader", action="store_true", help="build a loader for the grad sampler")
    a("-gb", "--gs-batch-size", type=int, default=None, help="grad sampler batch size")
    a("--gs-no-training", action="store_true", help="grad sampler uses eval transforms")
    a("--gs-no-aug", action="store_true", help="grad sampler without augmentation")
    a("--gs-aa", action="store_true", help="grad sampler uses --aa auto-augment")
    a("--gs-distributed", action="store_true", help="shard the grad sampler data over ranks")
    a("--stop-epoch", type=int, default=None, help="end this run before this epoch (resumable)")
    a = _Group(p.add_argument_group("dataset"))
    p.add_argument("data", nargs="?", metavar="DIR", help="same as --data-dir")
    a("--data-dir", default=None, help="dataset root (digits: where to cache it)")
    a("--dataset", default="", help="'digits', '' (ImageFolder), torch/<name>, ...")
    a("--train-split", default="train")
    a("--val-split", default="validation")
    a("--dataset-download", action="store_true")
    a("--class-map", default="")
    a = _Group(p.add_argument_group("model"))
    a("--model", default="vit_digits")
    a("--pretrained", action="store_true")
    a("--initial-checkpoint", default="")
    a("--resume", default="", help="checkpoint to continue from (masks, optimizer, epoch)")
    a("--no-resume-opt", action="store_true")
    a("--no-resume-epoch", action="store_true")
    a("--num-classes", type=int, default=None)
    a("--gp", default=None)
    a("--img-size", type=int, default=None)
    a("--in-chans", type=int, default=None)
    a("--input-size", type=int, nargs=3, default=None)
    a("--crop-pct", type=float, default=None)
    a("--mean", type=float, nargs="+", default=None)
    a("--std", type=float, nargs="+", default=None)
    a("--interpolation", default="")
    a("-b", "--batch-size", type=int, default=128)
    a("-vb", "--validation-batch-size", type=int, default=None)
    a("--channels-last", action="store_true")
    a("--grad-accum-steps", type=int, default=1)
    a("--grad-checkpointing", action="store_true")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    a = _Group(p.add_argument_group("optimizer"))
    a("--opt", default="sgd")
    a("--opt-eps", type=float, default=None)
    a("--opt-betas", type=float, nargs="+", default=None)
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=2e-5)
    a("--clip-grad", type=float, default=None)
    a("--clip-mode", default="norm")
    a("--layer-decay", type=float, default=None)
    a("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
    a = _Group(p.add_argument_group("learning rate schedule (timm; off when a recipe sets LR)"))
    a("--sched", default="cosine")
    a("--sched-on-updates", action="store_true")
    a("--lr", type=float, default=None)
    a("--lr-base", type=float, default=0.1)
    a("--lr-base-size", type=int, default=256)
    a("--lr-base-scale", default="")
    a("--lr-noise", type=float, nargs="+", default=None)
    a("--lr-noise-pct", type=float, default=0.67)
    a("--lr-noise-std", type=float, default=1.0)
    a("--lr-cycle-mul", type=float, default=1.0)
    a("--lr-cycle-decay", type=float, default=0.5)
    a("--lr-cycle-limit", type=int, default=1)
    a("--lr-k-decay", type=float, default=1.0)
    a("--warmup-lr", type=float, default=1e-5)
    a("--min-lr", type=float, default=0.0)
    a("--epochs", type=int, default=300)
    a("--epoch-repeats", type=float, default=0.0)
    a("--start-epoch", type=int, default=None)
    a("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    a("--decay-epochs", type=float, default=90)
    a("--warmup-epochs", type=int, default=5)
    a("--warmup-prefix", action="store_true")
    a("--cooldown-epochs", type=int, default=0)
    a("--patience-epochs", type=int, default=10)
    a("--decay-rate", "--dr", type=float, default=0.1)
    a = _Group(p.add_argument_group("augmentation and regularisation"))
    a("--no-aug", action="store_true")
    a("--scale", type=float, nargs="+", default=[0.08, 1.0])
    a("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0])
    a("--hflip", type=float, default=0.5)
    a("--vflip", type=float, default=0.0)
    a("--color-jitter", type=float, default=0.4)
    a("--aa", default=None)
    a("--aug-repeats", type=float, default=0)
    a("--reprob", type=float, default=0.0)
    a("--remode", default="pixel")
    a("--recount", type=int, default=1)
    a("--resplit", action="store_true")
    a("--mixup", type=float, default=0.0)
    a("--cutmix", type=float, default=0.0)
    a("--cutmix-minmax", type=float, nargs="+", default=None)
    a("--mixup-prob", type=float, default=1.0)
    a("--mixup-switch-prob", type=float, default=0.5)
    a("--mixup-mode", default="batch")
    a("--mixup-off-epoch", type=int, default=0)
    a("--smoothing", type=float, default=0.1)
    a("--bce-loss", action="store_true")
    a("--train-interpolation", default="random")
    a("--drop", type=float, default=0.0)
    a("--drop-path", type=float, default=None)
    a("--drop-block", type=float, default=None)
    a("--bn-momentum", type=float, default=None)
    a("--bn-eps", type=float, default=None)
    a("--sync-bn", action="store_true")
    a("--dist-bn", default="reduce", help="'broadcast', 'reduce' or '' (off)")
    a("--model-ema", action="store_true")
    a("--model-ema-force-cpu", action="store_true")
    a("--model-ema-decay", type=float, default=0.9998)
    a = _Group(p.add_argument_group("misc"))
    a("--seed", type=int, default=42)
    a("--log-interval", type=int, default=50)
    a("--checkpoint-freq", type=int, default=-1, help="save every N epochs (-1: never)")
    a("--save-last", action="store_true", help="keep <model>_last.pth updated every epoch")
    a(
        "--checkpoint-hist",
        type=int,
        default=10,
        help="keep the N best checkpoints, sparsest first, then by --eval-metric (default 10; "
        "0: none); the best is also copied to <model>_best.pth",
    )
    a("-j", "--workers", type=int, default=4)
    a("--amp", action="store_true")
    a("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    a("--no-ddp-bb", action="store_true")
    a("--pin-mem", action="store_true")
    a("--no-prefetcher", action="store_true")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--output", default="", help="parent of the run folder (default ./output/train)")
    a("--experiment", default="", help="run folder name and W&B project")
    a("--eval-metric", default="top1")
    a("--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    a("--log-wandb", action="store_true")
    a("--log-sparsity", action="store_true", help="write sparsity_distribution_epoch=N.json")
    a("--log-param-histogram", action="store_true", help="W&B histograms of weights")
    a("--timeout", type=int, default=1800, help="process group timeout in seconds")
    a(
        "--skip-nonfinite-steps",
        action="store_true",
        help="skip updates whose loss or gradients are NaN/Inf (default: stop with an error)",
    )
    return p


def _load_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise SetupError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise SetupError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise SetupError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` values as defaults; normalise a few CAP conventions."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("-c", "--config", default="")
    known, _ = first.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**_load_config(known.config))
    args = parser.parse_args(argv)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    args.dataset = args.dataset or ""  # CAP configs carry `dataset: null`
    if "LOCAL_RANK" in os.environ:  # torchrun; wins over the legacy --local-rank
        args.local_rank = int(os.environ["LOCAL_RANK"])
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    validate_args(args)
    return args


# ----- validation: one place, one line per problem (the scripts exit with status 2) ------------
def check_at_least(option: str, value: int | float | None, low: int, what: str) -> None:
    """``value`` (None: option not given) must be >= ``low``."""
    if value is not None and value < low:
        raise SetupError(f"{option} {value} is not allowed: {what} must be >= {low}")


def check_file(option: str, path: str | None) -> None:
    if path and not Path(path).expanduser().is_file():
        state = "is a folder" if Path(path).expanduser().is_dir() else "does not exist"
        raise SetupError(f"{option} {path} {state}; give the path of an existing file")


def check_writable_dir(option: str, path: str | Path) -> None:
    """New files can be created in ``path`` (or, if missing, in its nearest existing parent).

    A real probe file rather than ``os.access``: permission bits say nothing about read-only
    mounts, full quotas or running as root.
    """
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SetupError(f"{option} {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise SetupError(
            f"{option} {path} is not writable ({probe}: {err.strerror}); "
            "choose a folder where new files can be created"
        ) from err


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later with a traceback, an endless loop or a hang."""
    check_at_least("--epochs", args.epochs, 1, "the number of epochs")
    check_at_least("-b/--batch-size", args.batch_size, 1, "the batch size")
    check_at_least("-vb/--validation-batch-size", args.validation_batch_size, 1, "the batch size")
    check_at_least("-gb/--gs-batch-size", args.gs_batch_size, 1, "the grad sampler batch size")
    check_at_least("--num-classes", args.num_classes, 1, "the number of classes")
    check_at_least("-j/--workers", args.workers, 0, "the number of loader processes")
    check_at_least("--log-interval", args.log_interval, 1, "the logging interval in updates")
    check_at_least("--checkpoint-hist", args.checkpoint_hist, 0, "the number of best checkpoints")
    check_at_least("--timeout", args.timeout, 1, "the process group timeout in seconds")
    check_at_least("--start-epoch", args.start_epoch, 0, "the first epoch")
    check_at_least("--stop-epoch", args.stop_epoch, 1, "the epoch to stop before")
    check_file("--initial-checkpoint", args.initial_checkpoint)
    check_file("--resume", args.resume)
    if args.gs_loader and not args.gs_batch_size:
        raise SetupError("--gs-loader needs -gb/--gs-batch-size N (N >= 1)")
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; other nodes may lack it
        check_writable_dir("--output", args.output or "./output/train")


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved arguments as YAML (tuples as lists), reloadable with ``--config``."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v if isinstance(v, str | int | float | bool | type(None)) else str(v)

    return yaml.safe_dump({k: plain(v) for k, v in sorted(vars(args).items())}, sort_keys=False)


def validate_one_shot_args(args: argparse.Namespace) -> None:
    """The same checks for ``one_shot_pruning.py`` (its parser lives in the script)."""
    check_at_least("-vb/--val_batch_size", args.val_batch_size, 1, "the batch size")
    check_at_least(
        "-gb/--grad_sampler_batch_size", args.grad_sampler_batch_size, 1, "the batch size"
    )
    check_at_least("--num-classes", args.num_classes, 1, "the number of classes")
    check_at_least("--workers", args.workers, 0, "the number of loader processes")
    check_at_least("--threads", args.threads, 0, "the number of threads")
    check_at_least("--timeout", args.timeout, 1, "the process group timeout in seconds")
    check_file("--checkpoint_path", args.checkpoint_path)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; other nodes may lack it
        check_writable_dir("--output_dir", args.output_dir)
