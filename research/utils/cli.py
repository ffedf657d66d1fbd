"""Command lines of both research scripts: the shared groups of ``options`` plus each one's own.

``sparse_training.py`` takes timm's ``train.py`` options, ``one_shot_pruning.py`` the sweep's.
Precedence is command line > ``--config`` YAML > defaults below. Config keys are argparse
destinations (``batch_size``) or any spelling of an option; unknown keys are kept as
attributes. CAP's spellings (``--checkpoint_path``, ``--output_dir``, ``--gs_batch_size``...)
are hidden aliases, see ``options``. No torch or timm import: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import options as opt
from .errors import SetupError
from .option_checks import check_device, check_model_kwargs, check_timm_training_options


def build_parser() -> argparse.ArgumentParser:
    """``sparse_training.py``: the shared groups plus timm's training options."""
    p = opt.new_parser(
        "Gradual sparse training of timm models with recipes", "%(prog)s [options] [DIR]"
    )
    opt.add_config(p)
    p.add_argument("data", nargs="?", metavar="DIR", help="same as --data-dir")
    a = opt.add_sparsification_options(p, "default: none, dense training")
    a("--gs-no-training", action="store_true", help="grad sampler uses eval transforms")
    a("--gs-aa", action="store_true", help="grad sampler uses --aa auto-augment")
    a("--gs-distributed", action="store_true", help="shard the grad sampler data over ranks")
    a("--stop-epoch", type=int, default=None, help="end this run before this epoch (resumable)")
    a = opt.add_data_options(p)
    a("--dataset-download", action="store_true", help="download torch/<name> datasets")
    a("--class-map", default="", help="file mapping folder names to class indices")
    a = opt.add_model_options(p)
    a("--resume", default="", help="checkpoint to continue from (masks, optimizer, epoch)")
    a("--no-resume-opt", action="store_true", help="--resume without the optimizer state")
    a("--no-resume-epoch", action="store_true", help="--resume weights only, from epoch 0")
    a("--gp", default=None, help="global pool type (default: the model's)")
    a("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    a("--input-size", type=int, nargs=3, default=None, help="C H W (default: the model's)")
    a("--crop-pct", type=float, default=None, help="eval center crop (default: the model's)")
    a("--mean", type=float, nargs="+", default=None, help="pixel mean (default: the model's)")
    a("--std", type=float, nargs="+", default=None, help="pixel std (default: the model's)")
    a("--interpolation", default="", help="resize interpolation (default: the model's)")
    a("--channels-last", action="store_true", help="channels-last memory layout")
    a("--grad-accum-steps", type=int, default=1, help="batches per optimizer step")
    a("--grad-checkpointing", action="store_true", help="timm gradient checkpointing")
    a = opt.Adder(p.add_argument_group("optimizer (timm)"))
    a("--opt", default="sgd", help="timm optimizer name, or mfac")
    a("--opt-eps", type=float, default=None, help="optimizer epsilon")
    a("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=2e-5, help="weight decay")
    a("--clip-grad", type=float, default=None, help="gradient clipping value")
    a("--clip-mode", default="norm", help="'norm', 'value' or 'agc'")
    a("--layer-decay", type=float, default=None, help="layer-wise LR decay")
    a("--opt-kwargs", nargs="*", default={}, action=opt.ParseKwargs, help="k=v for the optimizer")
    a = opt.Adder(p.add_argument_group("learning rate schedule (timm; off when a recipe sets LR)"))
    a("--sched", default="cosine", help="timm LR scheduler")
    a("--sched-on-updates", action="store_true", help="step the scheduler every update")
    a("--lr", type=float, default=None, help="learning rate (default: from --lr-base)")
    a("--lr-base", type=float, default=0.1, help="LR for a global batch of --lr-base-size")
    a("--lr-base-size", type=int, default=256, help="batch size of --lr-base")
    a("--lr-base-scale", default="", help="'linear' or 'sqrt' (default: by optimizer)")
    a("--lr-noise", type=float, nargs="+", default=None, help="LR noise epoch range")
    a("--lr-noise-pct", type=float, default=0.67, help="LR noise limit")
    a("--lr-noise-std", type=float, default=1.0, help="LR noise std")
    a("--lr-cycle-mul", type=float, default=1.0, help="cycle length multiplier")
    a("--lr-cycle-decay", type=float, default=0.5, help="LR decay per cycle")
    a("--lr-cycle-limit", type=int, default=1, help="number of cycles")
    a("--lr-k-decay", type=float, default=1.0, help="cosine k-decay")
    a("--warmup-lr", type=float, default=1e-5, help="warmup start LR")
    a("--min-lr", type=float, default=0.0, help="lowest LR")
    a("--epochs", type=int, default=300, help="epochs (a recipe's epoch range overrides it)")
    a("--epoch-repeats", type=float, default=0.0, help="repeat each epoch's data")
    a("--start-epoch", type=int, default=None, help="first epoch (default: 0 or --resume's)")
    a("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep")
    a("--decay-epochs", type=float, default=None,
      help="step: the period (default 90); wsd / rsqrt: the decay phase, epochs or a fraction "
           "in (0, 1) of the schedule (default 0.2)")  # fmt: skip
    a("--warmup-epochs", type=int, default=5, help="warmup epochs")
    a("--warmup-prefix", action="store_true", help="warmup outside the schedule")
    a("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    a("--patience-epochs", type=int, default=10, help="plateau patience")
    a("--decay-rate", "--dr", type=float, default=0.1, help="LR decay rate")
    a = opt.Adder(p.add_argument_group("augmentation and regularisation (timm)"))
    a("--no-aug", action="store_true", help="no training augmentation")
    a("--scale", type=float, nargs="+", default=[0.08, 1.0], help="random resized crop scale")
    a("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], help="crop ratio")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability")
    a("--vflip", type=float, default=0.0, help="vertical flip probability")
    a("--color-jitter", type=float, default=0.4, help="color jitter factor")
    a("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5")
    a("--aug-repeats", type=float, default=0, help="repeated augmentation count")
    a("--reprob", type=float, default=0.0, help="random erase probability")
    a("--remode", default="pixel", help="random erase mode")
    a("--recount", type=int, default=1, help="random erase count")
    a("--resplit", action="store_true", help="no random erase on the first split")
    a("--mixup", type=float, default=0.0, help="mixup alpha")
    a("--cutmix", type=float, default=0.0, help="cutmix alpha")
    a("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    a("--mixup-prob", type=float, default=1.0, help="mixup/cutmix probability")
    a("--mixup-switch-prob", type=float, default=0.5, help="cutmix instead of mixup")
    a("--mixup-mode", default="batch", help="'batch', 'pair' or 'elem'")
    a("--mixup-off-epoch", type=int, default=0, help="mixup off from this epoch (0: never)")
    a("--smoothing", type=float, default=0.1, help="label smoothing")
    a("--bce-loss", action="store_true", help="binary cross-entropy loss")
    a("--train-interpolation", default="random", help="training resize interpolation")
    a("--drop", type=float, default=0.0, help="dropout rate")
    a("--drop-path", type=float, default=None, help="drop path rate")
    a("--drop-block", type=float, default=None, help="drop block rate")
    a("--bn-momentum", type=float, default=None, help="batch norm momentum")
    a("--bn-eps", type=float, default=None, help="batch norm epsilon")
    a("--sync-bn", action="store_true", help="synchronized batch norm (CUDA)")
    a("--dist-bn", default="reduce", help="'broadcast', 'reduce' or '' (off)")
    a("--model-ema", action="store_true", help="keep an EMA of the weights")
    a("--model-ema-force-cpu", action="store_true", help="EMA on the CPU")
    a("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    a = opt.add_run_options(
        p, "train", "<date>-<model>-<img size>", "--experiment, else cap_sparse"
    )
    a("--log-interval", type=int, default=50, help="log every N updates")
    a("--checkpoint-freq", type=int, default=-1, help="save every N epochs (-1: never)")
    a("--save-last", action="store_true", help="keep <model>_last.pth updated every epoch")
    a(
        "--save-compressed",
        action="store_true",
        help="also write <model>_best / _last.sparse.safetensors: the weights of those checkpoints "
        "(EMA when kept), compressed (sparseml.compressed)",
    )
    a("--amp", action="store_true", help="mixed precision")
    a("--amp-dtype", default=None, choices=["float16", "bfloat16"],
      help="AMP dtype (default: float16 on CUDA, bfloat16 on CPU)")  # fmt: skip
    a("--no-ddp-bb", action="store_true", help="DDP without broadcast_buffers")
    a("--eval-metric", default="top1", help="metric of the best checkpoints")
    a(
        "--checkpoint-hist",
        type=int,
        default=10,
        help="keep the N best checkpoints, sparsest first, then by the eval metric (default 10; "
        "0: none); the best is also copied to <model>_best.pth",
    )
    a("--log-sparsity", action="store_true", help="write sparsity_distribution_epoch=N.json")
    a("--log-param-histogram", action="store_true", help="W&B histograms of weights")
    a(
        "--skip-nonfinite-steps",
        action="store_true",
        help="skip updates whose loss or gradients are NaN/Inf (default: stop with an error)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` values as defaults; normalise a few CAP conventions."""
    args = opt.parse_with_config(build_parser(), argv)
    if args.data and not args.data_dir:
        args.data_dir = args.data
    args.dataset = args.dataset or ""  # CAP configs carry `dataset: null`
    opt.resolve_output(args, "train")
    if "LOCAL_RANK" in os.environ:  # torchrun; wins over the legacy --local-rank
        args.local_rank = int(os.environ["LOCAL_RANK"])
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    validate_args(args)
    return args


# numpy seeds its generator with seed + rank, which must stay below 2**32.
SEED_MAX = 2**31 - 1
# The metrics engine.validate reports (a test checks they match); --eval-metric picks one.
EVAL_METRICS = ("top1", "top5", "loss")
# The names timm.scheduler.create_scheduler_v2 builds (timm keeps no list; a test builds each).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "wsd", "rsqrt",
              "none")  # fmt: skip


def check_shared_args(args: argparse.Namespace) -> None:
    """Checks of the options both scripts share (``options.py``)."""
    opt.check_between("--seed", args.seed, 0, SEED_MAX, "the random seed")
    opt.check_at_least("--img-size", args.img_size, 1, "the input size in pixels")
    opt.check_at_least(
        "-vb/--validation-batch-size", args.validation_batch_size, 1, "the batch size"
    )
    opt.check_at_least("-gb/--gs-batch-size", args.gs_batch_size, 1, "the grad sampler batch size")
    opt.check_at_least("--num-classes", args.num_classes, 1, "the number of classes")
    opt.check_at_least("-j/--workers", args.workers, 0, "the number of loader processes")
    opt.check_at_least("--timeout", args.timeout, 1, "the process group timeout in seconds")
    opt.check_file("--initial-checkpoint", args.initial_checkpoint)
    check_device(args.device)
    check_model_kwargs(args)
    from .data import check_split_options  # torch and timm: after --help and usage errors

    check_split_options(args)


def check_training_numbers(args: argparse.Namespace) -> None:
    """Ranges of ``sparse_training.py``'s data, loss and schedule options."""
    opt.check_at_least("--in-chans", args.in_chans, 1, "the number of input channels")
    if args.input_size is not None and min(args.input_size) < 1:
        size = " ".join(map(str, args.input_size))
        raise SetupError(f"--input-size {size} is not allowed: C, H and W must be >= 1")
    if args.crop_pct is not None and not args.crop_pct > 0:
        raise SetupError(f"--crop-pct {args.crop_pct} is not allowed: the crop must be > 0")
    opt.check_between("--smoothing", args.smoothing, 0, 1, "label smoothing", high_open=True)
    opt.check_at_least("--lr-base-size", args.lr_base_size, 1, "the batch size of --lr-base")
    opt.check_at_least("--aug-repeats", args.aug_repeats, 0, "the number of repeats")
    minmax = args.cutmix_minmax
    if minmax is not None and (len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1):
        raise SetupError(
            f"--cutmix-minmax {' '.join(map(str, minmax))} is not allowed: give MIN MAX "
            "with 0 <= MIN < MAX <= 1 (fractions of the image side)"
        )
    if args.eval_metric not in EVAL_METRICS:
        raise SetupError(
            f"--eval-metric {args.eval_metric!r} is not allowed: one of {', '.join(EVAL_METRICS)}"
        )
    if args.sched not in SCHEDULERS:
        raise SetupError(f"--sched {args.sched!r} is not a timm scheduler: one of "
                         f"{', '.join(SCHEDULERS)}")  # fmt: skip
    opt.check_file("--class-map", args.class_map)


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later with a traceback, an endless loop or a hang."""
    check_shared_args(args)
    check_training_numbers(args)
    check_timm_training_options(args)
    opt.check_at_least("--epochs", args.epochs, 1, "the number of epochs")
    opt.check_at_least("-b/--batch-size", args.batch_size, 1, "the batch size")
    opt.check_at_least("--log-interval", args.log_interval, 1, "the logging interval in updates")
    opt.check_at_least("--start-epoch", args.start_epoch, 0, "the first epoch")
    opt.check_at_least("--stop-epoch", args.stop_epoch, 1, "the epoch to stop before")
    opt.check_file("--resume", args.resume)
    if args.save_compressed and not args.save_last and args.checkpoint_hist < 1:
        raise SetupError(
            "--save-compressed writes next to the best and last checkpoints, and this run keeps "
            "neither: add --save-last or --checkpoint-hist N (N >= 1)"
        )
    opt.check_at_least(
        "--checkpoint-hist", args.checkpoint_hist, 0, "the number of best checkpoints"
    )
    for name, value in (("--lr", args.lr), ("--momentum", args.momentum),
                        ("--weight-decay", args.weight_decay), ("--clip-grad", args.clip_grad),
                        ("--min-lr", args.min_lr), ("--warmup-lr", args.warmup_lr)):  # fmt: skip
        if value is not None and not value >= 0:
            raise SetupError(f"{name} {value}: must be a number >= 0")
    if args.gs_loader and not args.gs_batch_size:
        raise SetupError("--gs-loader needs -gb/--gs-batch-size N (N >= 1)")
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; other nodes may lack it
        opt.check_writable_dir("--output", args.output)


def args_to_yaml(args: argparse.Namespace) -> str:
    """The resolved arguments as YAML (tuples as lists), reloadable with ``--config``."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v if isinstance(v, str | int | float | bool | type(None)) else str(v)

    return yaml.safe_dump({k: plain(v) for k, v in sorted(vars(args).items())}, sort_keys=False)


def build_one_shot_parser() -> argparse.ArgumentParser:
    """``one_shot_pruning.py``: the shared groups plus the sweep's own options."""
    p = opt.new_parser("One-shot pruning sweeps: prune a timm model to several sparsities")
    opt.add_config(p)
    a = opt.add_sparsification_options(p, "required; one pruning modifier")
    p.set_defaults(gs_batch_size=128)
    sparsities = a(
        "--sparsities", type=float, nargs="+", default=[], help="default: recipe final_sparsity"
    )
    sparsities.checks_finite = True  # one_shot.check_sparsities: NaN/Inf named with the range
    a(
        "--method",
        default="",
        help="name in the results (default: the pruner's: gm, obs, cap, fast_cap, ..., cap_2:4)",
    )
    a("--no-sweep-cache", action="store_true", help="rebuild gradients/Fisher for every sparsity")
    a(
        "--bn-recalibration-batches",
        type=int,
        default=0,
        metavar="N",
        help="after each prune, re-estimate BatchNorm statistics over N training batches of -b "
        "images (no augmentation, no gradient; default 0: off)",
    )
    opt.add_model_options(p)
    opt.add_data_options(p)
    a = opt.add_run_options(p, "one_shot", "<model>_<dataset>", "cap_one_shot")
    a("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a("--save-model", action="store_true", help="save each pruned state dict")
    a(
        "--save-compressed",
        action="store_true",
        help="save each pruned model as <model>_<method>_sparsity=S.sparse.safetensors",
    )
    a("--no-report", action="store_true", help="no table and plot at the end")
    a("--overwrite", action="store_true", help="recompute rows made with other settings")
    return p


def parse_one_shot_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_one_shot_parser()
    args = opt.parse_with_config(parser, argv)
    if not args.sparseml_recipe:
        parser.error("the following arguments are required: --sparseml-recipe")
    args.dataset = args.dataset or ""
    # Errors about the folder name the spelling the user gave.
    args.output_option = "--output_dir" if args.output_dir else "--output/--experiment"
    if not args.experiment and not args.output_dir:
        dataset = args.dataset.replace("/", "_") or "folder"
        args.experiment = f"{args.model.replace('/', '_')}_{dataset}"
    opt.resolve_output(args, "one_shot")
    if args.validation_batch_size is None:
        args.validation_batch_size = args.batch_size
    if "LOCAL_RANK" in os.environ:
        args.local_rank = int(os.environ["LOCAL_RANK"])
    args.prefetcher = not args.no_prefetcher  # as in parse_args: data.loader_kwargs reads it
    validate_one_shot_args(args)
    # The results folder, read by the sweep: --output/--experiment (or CAP's --output_dir).
    args.output_dir = str(Path(args.output) / args.experiment)
    return args


def validate_one_shot_args(args: argparse.Namespace) -> None:
    """The same checks for ``one_shot_pruning.py``."""
    check_shared_args(args)
    opt.check_at_least("--threads", args.threads, 0, "the number of threads")
    opt.check_at_least(
        "--bn-recalibration-batches", args.bn_recalibration_batches, 0, "the number of batches"
    )
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes; other nodes may lack it
        opt.check_writable_dir(args.output_option, Path(args.output) / args.experiment)
