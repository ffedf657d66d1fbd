"""Option groups both research scripts share, under timm's ``train.py`` names.

Each option is defined once here; ``sparse_training.py`` and ``one_shot_pruning.py`` add only
their own. CAP's spellings keep working as hidden aliases: every dashed long option also takes
its underscored form (``--data_dir``), and a few CAP names map onto timm's (``--checkpoint_path``
-> ``--initial-checkpoint``, ``--grad_sampler_batch_size`` -> ``--gs-batch-size``,
``--val_batch_size`` -> ``--validation-batch-size``). ``--output_dir DIR`` (CAP: the exact
results folder) means ``--output <parent of DIR> --experiment <name of DIR>`` in both scripts.
Aliases parse like the option they stand for but ``--help`` lists only timm's names.

No torch or timm import here: ``--help`` and usage errors are answered before they load.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sparseml.recipe_source import yaml_error_line

from .errors import SetupError

# CAP spelling -> the timm option it stands for (underscored forms are added automatically).
CAP_ALIASES: dict[str, str] = {
    "--checkpoint_path": "--initial-checkpoint",
    "--checkpoint-path": "--initial-checkpoint",
    "--grad_sampler_batch_size": "--gs-batch-size",
    "--grad-sampler-batch-size": "--gs-batch-size",
    "--val_batch_size": "--validation-batch-size",
    "--val-batch-size": "--validation-batch-size",
}  # --output_dir is the underscored form of the hidden --output-dir (see resolve_output)


class ParseKwargs(argparse.Action):
    """``k=v`` pairs into a dict; values are Python literals when they parse as one (timm's)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} {item!r}: expected key=value")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


class HelpFormatter(argparse.HelpFormatter):
    """Lists each option once (aliases hidden) and appends its default to the help text."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_aliases", ())
        every = action.option_strings
        action.option_strings = [s for s in every if s not in hidden]
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = every

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            return f"{text} (default: off)".strip()
        if action.default in (None, "", [], {}):
            return f"{text} (default: none)".strip()
        return f"{text} (default: %(default)s)".strip()


class Adder:
    """``add("--gs-batch-size", ...)`` on an argparse group, with the hidden CAP spellings."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, *names: str, help: str = "", **kwargs: Any) -> argparse.Action:  # noqa: A002
        hidden = []
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                hidden.append("--" + name[2:].replace("-", "_"))
            hidden += [cap for cap, timm in CAP_ALIASES.items() if timm == name]
        hidden = [h for h in dict.fromkeys(hidden) if h not in names]
        # Every option gets a help line: argparse hides the default of an option without one.
        action = self.group.add_argument(*names, *hidden, help=help or " ", **kwargs)
        action.hidden_aliases = tuple(hidden)
        return action


def new_parser(description: str, usage: str = "%(prog)s [options]") -> argparse.ArgumentParser:
    """A parser whose ``--help`` lists each option once, with its default."""
    return argparse.ArgumentParser(
        description=description, usage=usage, formatter_class=HelpFormatter
    )


def add_config(p: argparse.ArgumentParser) -> None:
    Adder(p)("-c", "--config", default="", metavar="FILE", help="YAML of option defaults")


def add_model_options(p: argparse.ArgumentParser, default_model: str = "vit_digits") -> Adder:
    a = Adder(p.add_argument_group("model"))
    a("--model", default=default_model, help="timm model name")
    a("--pretrained", action="store_true", help="timm pretrained weights (cached or downloaded)")
    a("--initial-checkpoint", default="", help="weights to start from (state dict or checkpoint)")
    a("--num-classes", type=int, default=None, help="classifier classes (default: the model's)")
    a(
        "--img-size",
        type=int,
        default=None,
        help="input size (default: the model's; ViTs: also img_size)",
    )
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="k=v for create_model")
    return a


def default_workers() -> int:
    """timm's 4 loader processes, but no more than the cores this process may use: beyond them
    PyTorch warns at every loader (train, eval) and the workers only compete for the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def add_data_options(p: argparse.ArgumentParser) -> Adder:
    a = Adder(p.add_argument_group("dataset"))
    a("--data-dir", default=None, help="dataset root (digits: where to cache it)")
    a(
        "--dataset",
        default="",
        help="'digits', 'fashion_mnist' (idx files), '' (an ImageFolder tree at --data-dir), "
        "torch/<name>, ... (default: '', the ImageFolder tree)",
    )
    a("--train-split", default="train", help="training split (grad sampler, training)")
    a("--val-split", default="validation", help="evaluation split")
    a("-b", "--batch-size", type=int, default=128, help="training batch size per process")
    a(
        "-vb",
        "--validation-batch-size",
        type=int,
        default=None,
        help="eval batch size (default: -b)",
    )
    workers = default_workers()
    a(
        "-j",
        "--workers",
        type=int,
        default=workers,
        help=f"data loader processes (default: timm's 4, at most this machine's cores: {workers})",
    )
    a("--pin-mem", action="store_true", help="pin loader memory (CUDA)")
    a("--no-prefetcher", action="store_true", help="timm's CUDA prefetcher off")
    return a


def add_run_options(p: argparse.ArgumentParser, kind: str, experiment: str, project: str) -> Adder:
    """Output folder ``<--output or output/KIND>/<--experiment>``, logging and processes."""
    a = Adder(p.add_argument_group("run"))
    a("--output", default="", help=f"parent of the run folder (default: output/{kind})")
    a("--experiment", default="", help=f"run folder name (default: {experiment})")
    a("--output-dir", default=None, help=argparse.SUPPRESS)  # CAP: the exact folder
    a("--log-wandb", action="store_true", help="log to Weights & Biases")
    a("--wandb-project", default="", help=f"W&B project (default: {project})")
    a("--seed", type=int, default=42, help="random seed")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--timeout", type=int, default=1800, help="process group timeout in seconds")
    a("--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # legacy launcher
    return a


def add_sparsification_options(p: argparse.ArgumentParser, recipe_help: str) -> Adder:
    a = Adder(p.add_argument_group("sparsification"))
    a("--sparseml-recipe", default="", help=f"recipe YAML/markdown ({recipe_help})")
    a("--recipe-variables", default="", help="override recipe variables: JSON or k=v,k2=v2")
    a("--gs-loader", action="store_true", help="grad-sampler loader over the training data")
    a("-gb", "--gs-batch-size", type=int, default=None, help="grad sampler batch size")
    a("--gs-no-aug", action="store_true", help="grad sampler without train augmentation")
    return a


def resolve_output(args: argparse.Namespace, kind: str) -> None:
    """Fold CAP's ``--output_dir DIR`` into ``--output``/``--experiment``; fill the root."""
    if args.output_dir:
        if args.output or args.experiment:
            raise SetupError(
                "--output_dir is the exact run folder; give it or --output/--experiment"
            )
        folder = Path(args.output_dir)
        args.output, args.experiment = str(folder.parent), folder.name
    del args.output_dir
    args.output = args.output or os.path.join("output", kind)


def answer_usage_early(build_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """For a script's ``__main__``: ``--help`` and usage errors (exit 2) before torch loads.

    The scripts parse again in ``main`` (with ``--config`` defaults and validation); this
    first pass only spares a user the seconds torch and timm take to import.
    """
    build_parser().parse_args(sys.argv[1:])


def _config_keys(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each spelling of each option (``val_batch_size``, ``checkpoint_path``) -> its dest."""
    keys = {}
    for action in parser._actions:  # noqa: SLF001  (argparse has no public list)
        for name in action.option_strings:
            keys[name.lstrip("-").replace("-", "_")] = action.dest
    return keys


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A ``--config`` YAML as argparse defaults; CAP's key spellings map onto timm's."""
    if not Path(path).is_file():
        raise SetupError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise SetupError(f"config file {path} is not valid YAML: {yaml_error_line(err)}") from err
    if not isinstance(cfg, dict):
        raise SetupError(f"config file {path} must hold a mapping of option: value")
    keys = _config_keys(parser)
    actions = {a.dest: a for a in parser._actions}  # noqa: SLF001
    out = {}
    for key, value in cfg.items():
        name = str(key).replace("-", "_")
        dest = keys.get(name, name)  # unknown keys are kept as attributes
        if dest in actions:
            _check_config_value(path, key, actions[dest], value)
        out[dest] = value
    return out


def _config_value_problem(action: argparse.Action, value: Any) -> str:
    """What a ``--config`` value lacks for ``action`` ('' when it fits).

    argparse converts only string defaults, so a YAML number, list or mapping reaches the
    scripts as it is: each is checked here against the kind of value the option parses to.
    """
    if value is None or isinstance(value, str) and action.nargs is None:
        return ""  # None: the option's own "not given"; a string parses like the command line
    if isinstance(action, ParseKwargs):
        return "" if isinstance(value, dict) else "give a mapping of keyword: value"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):  # noqa: SLF001
        return "" if isinstance(value, bool) else "give true or false"
    if action.type in (int, float):
        kinds = (int,) if action.type is int else (int, float)
        items = value if action.nargs is not None else [value]
        if action.nargs is not None and not isinstance(value, list):
            return f"give a list of {action.type.__name__} values"
        if any(isinstance(v, bool) or not isinstance(v, kinds + (str,)) for v in items):
            return (
                f"give {'a list of ' if action.nargs is not None else 'an '}{action.type.__name__}"
            )
    return ""


def _check_config_value(path: str, key: Any, action: argparse.Action, value: Any) -> None:
    problem = _config_value_problem(action, value)
    if problem:
        raise SetupError(f"config file {path}: {key}: {value!r} is not allowed for "
                         f"{option_name(action)}: {problem}")  # fmt: skip


def option_name(action: argparse.Action) -> str:
    """The spellings ``--help`` shows for ``action`` (``-b/--batch-size``), aliases left out."""
    hidden = getattr(action, "hidden_aliases", ())
    return "/".join(s for s in action.option_strings if s not in hidden) or action.dest


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Any:
    """Command line > ``--config`` YAML > the parser's defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("-c", "--config", default="")
    known, _ = first.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    check_finite_numbers(parser, args)
    return args


# ----- validation: one place, one line per problem (the scripts exit with status 2) ------------
def check_at_least(option: str, value: int | float | None, low: int, what: str) -> None:
    """``value`` (None: option not given) must be >= ``low``."""
    if value is not None and value < low:
        raise SetupError(f"{option} {value} is not allowed: {what} must be >= {low}")


def check_between(
    option: str, value: float | None, low: float, high: float, what: str, *, high_open: bool = False
) -> None:
    """``value`` (None: option not given) must lie in ``[low, high]`` (``[low, high)``)."""
    if value is None or low <= value < high or value == high and not high_open:
        return
    bound = f"{high})" if high_open else f"{high}]"
    raise SetupError(f"{option} {value} is not allowed: {what} must be in [{low}, {bound}")


def check_finite_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every number option (command line or ``--config``) is finite: ``inf`` and ``nan``
    parse as floats but no learning rate, probability or size means them."""
    for action in parser._actions:  # noqa: SLF001
        value = getattr(args, action.dest, None)
        if action.type is not float or value is None or getattr(action, "checks_finite", False):
            continue  # checks_finite: a script's own check refuses them with the allowed range
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int | float) and not math.isfinite(v):
                raise SetupError(f"{option_name(action)} {v} is not allowed: give a finite number")


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
