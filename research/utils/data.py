"""Datasets and loaders through timm, plus the offline ``digits`` data set.

``--dataset digits`` writes scikit-learn's 1,797 real 8x8 handwritten digits once as an
ImageFolder tree (``train/<class>/*.png``, ``val/<class>/*.png``; 32x32 RGB; stratified 80/20
split with a fixed seed) and from then on reads it like any other folder data set through
``timm.data.create_dataset``. Every other name goes to timm unchanged (an ImageFolder or tar root,
``torch/<name>`` with local files, ...). ``--dataset fashion_mnist`` reads the original idx files
(``utils.fmnist``: ``--data-dir``, else ``$FMNIST_DIR``, else the Debian package). Call
``compat.ensure_torchvision()`` before importing.

Labels: one class map for every split (``utils.class_map``): folder splits are scanned there
(symlink loops refused) and numbered by the classes of all splits together.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import ImageDataset, create_dataset

from . import fmnist
from .class_map import FolderReader, class_names, is_folder_name, scan_image_folder, split_folder
from .errors import SetupError

DIGITS = "digits"
DIGITS_SIZE = 32
DIGITS_SEED = 0
DIGITS_VAL_FRACTION = 0.2
# Names timm reads from the network or a remote store rather than from a local root folder.
_REMOTE_PREFIXES = ("hfds/", "hfids/", "tfds/", "wds/")


def default_digits_dir() -> Path:
    """``$CAP_DATA_DIR`` when set, else ``~/.cache/cap_sparse/digits``."""
    env = os.environ.get("CAP_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cap_sparse" / DIGITS


def _digits_complete(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def _write_digits_tree(dest: Path) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        idx, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SEED
    )
    counts = {}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(indices):
            folder = dest / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize(
                (DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR
            )
            img.convert("RGB").save(folder / f"{i:04d}.png")
        counts[split] = len(indices)
    return counts


def prepare_digits(root: str | Path | None = None) -> Path:
    """Write the digits ImageFolder tree under ``root`` unless it is already there; return it.

    The tree is written to a temporary sibling folder and renamed into place, so concurrent
    writers (several ranks) and interrupted runs never leave a half-written data set behind.
    """
    root = Path(root).expanduser() if root else default_digits_dir()
    if _digits_complete(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise SetupError(
            f"data dir {root} exists but holds no digits tree (train/ and val/ folders); "
            "point --data-dir at an empty or missing folder to create it there"
        )
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as err:
        raise SetupError(
            f"--data-dir {root}: cannot create the digits data set there ({err.strerror}); "
            "point --data-dir at a writable folder or one that already holds it"
        ) from err
    try:
        counts = _write_digits_tree(tmp)
        meta = {"source": "sklearn.datasets.load_digits", "size": DIGITS_SIZE, **counts}
        (tmp / "digits.json").write_text(json.dumps(meta, indent=2))
        if root.exists():
            root.rmdir()  # empty by the check above; rename cannot replace a folder
        os.rename(tmp, root)
    except OSError:
        if not _digits_complete(root):  # lost a race only if the winner finished
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data_dir(dataset: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """Return ``(timm dataset name, root)`` after checking the data is where it should be.

    Raises :class:`SetupError` before any training starts when a local root is missing.
    """
    name = dataset or ""
    if name.lower() == DIGITS:
        return "", str(prepare_digits(data_dir))
    if name.lower() == fmnist.FMNIST:
        return fmnist.FMNIST, str(fmnist.check_dir(data_dir))
    if name.lower().startswith(_REMOTE_PREFIXES):
        return name, data_dir
    if not data_dir:
        raise SetupError(
            f"dataset {name!r} needs a local root folder: pass it as DATA_DIR or --data-dir "
            "(or use --dataset digits for the built-in offline data)"
        )
    if not Path(data_dir).exists():
        raise SetupError(f"data dir {data_dir} does not exist (dataset {name!r})")
    return name, data_dir


def check_splits(name: str, root: str | None, splits: dict[str, str]) -> None:
    """Refuse a split (``{option: split}``) that names no folder of a folder data set's root.

    timm reads a split from ``root/<split>`` (or a synonym: ``val`` for ``validation``) and
    falls back to the root itself when there is none: a misspelled split would then read every
    split's images, their folders taken for classes. The fallback stays allowed for a flat
    root (class folders only, no split folders), where every split reads the same images.
    """
    if not root or not is_folder_name(name) or not Path(root).is_dir():
        return
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM, _search_split

    base = Path(root)
    found = {option: Path(_search_split(root, split)) for option, split in splits.items()}
    folders = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=True))
    synonyms = {*_TRAIN_SYNONYM, *_EVAL_SYNONYM}
    if all(f == base for f in found.values()) and not synonyms.intersection(folders):
        return  # a flat root
    for option, split in splits.items():
        if found[option] == base:
            raise SetupError(
                f"{option} {split!r}: {root} has no split folder of that name; allowed: one "
                f"of its split folders ({', '.join(folders) or 'none'}; timm's synonyms such as "
                "validation for val/ also work)"
            )


def check_split_options(args: Any) -> None:
    """:func:`check_splits` for ``--train-split`` / ``--val-split`` of a root that is already
    there (before the model and any work; a digits tree not yet written is checked once it
    is, in :func:`create_datasets`)."""
    name, root = args.dataset or "", args.data_dir
    if name.lower() == DIGITS:
        folder = Path(root).expanduser() if root else default_digits_dir()
        if not _digits_complete(folder):
            return
        name, root = "", str(folder)
    check_splits(name, root, {"--train-split": args.train_split, "--val-split": args.val_split})


class _RGBDataset(torch.utils.data.Dataset):
    """Convert the PIL images of a torchvision data set (e.g. MNIST, mode 'L') to RGB.

    timm's loader assigns ``dataset.transform``; the conversion is kept in front of it.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.transform = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        img, target = self.base[i]
        img = img.convert("RGB") if hasattr(img, "convert") else img
        return (self.transform(img) if self.transform else img), target


def open_split(
    name: str, root: str | None, split: str, classes: list[str] | None = None, **kwargs: Any
) -> Any:
    """One split of a data set. Folder splits are scanned here and numbered by ``classes``
    (default: :func:`class_names` of this split alone; pass the map of all splits)."""
    if name == fmnist.FMNIST:  # in memory from the idx files (resolve_data_dir checked them)
        return fmnist.FashionMNIST(root, split)
    folder = split_folder(root or "", split) if not kwargs.get("class_map") else None
    if folder is not None and is_folder_name(name):
        classes = classes or class_names(name, root, [split]) or []
        index = {c: i for i, c in enumerate(classes)}
        samples = [(p, index[c]) for p, c in scan_image_folder(folder) if c in index]
        if not samples:
            raise SetupError(f"split {split!r} of {root}: found no images in {folder}")
        return ImageDataset(str(folder), reader=FolderReader(folder, samples, classes))
    try:
        ds = create_dataset(name, root=root, split=split, **kwargs)
    except (FileNotFoundError, RuntimeError) as err:  # timm: "Found 0 images in subfolders"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SetupError(f"cannot read split {split!r} of {root or name}: {first}") from err
    if len(ds) == 0:
        raise SetupError(f"split {split!r} of {root or name} holds no samples")
    return ds


def create_datasets(args: Any) -> tuple[Any, Any]:
    """Train and eval datasets for ``args.dataset`` / ``args.data_dir`` (checked first), with
    one class map for both (see the module docstring)."""
    name, root = resolve_data_dir(args.dataset, args.data_dir)
    check_splits(name, root, {"--train-split": args.train_split, "--val-split": args.val_split})
    common = dict(
        class_map=args.class_map or None,
        download=args.dataset_download,
        batch_size=args.batch_size,
    )
    classes = None
    if not args.class_map:
        classes = class_names(name, root, [args.train_split, args.val_split])
    train = open_split(
        name,
        root,
        args.train_split,
        classes,
        is_training=True,
        seed=args.seed,
        repeats=args.epoch_repeats,
        **common,
    )
    evals = open_split(name, root, args.val_split, classes, is_training=False, **common)
    if name.lower().startswith("torch/"):
        train, evals = _RGBDataset(train), _RGBDataset(evals)
    return train, evals


def check_batch_fits(option: str, batch_size: int, samples: int) -> None:
    """A loader that drops the last partial batch must still yield one: else it yields nothing."""
    if batch_size > samples:
        raise SetupError(
            f"{option} {batch_size} exceeds the {samples} training samples each process reads; "
            f"allowed: 1..{samples}"
        )


def require_batches(loader: Any, option: str, batch_size: int) -> None:
    """Fail clearly when a training ``loader`` (``drop_last``) would yield no batch at all."""
    if len(loader) > 0:
        return
    sampler = getattr(loader, "sampler", None)
    samples = len(sampler) if sampler is not None else len(loader.dataset)
    check_batch_fits(option, batch_size, samples)
    raise SetupError(f"{option} {batch_size}: the loader yields no batch")


def loader_kwargs(args: Any, data_config: dict, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``timm.data.create_loader`` shared by every loader of a run."""
    return dict(
        input_size=data_config["input_size"],
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        num_workers=args.workers,
        # Workers started anew each epoch are seeded from the (checkpointed) global RNG, so a
        # resumed run loads and augments exactly as the uninterrupted one; persistent workers
        # would carry their RNG state across epochs and break that (at a small start-up cost).
        persistent_workers=False,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=args.prefetcher,
    )


class SamplerBatches:
    """One pass over ``loader`` per iteration, as ``([input], {}, target)`` on ``device``.

    It has a length, and the grad sampler starts (and seeds) each pass itself, so a resumed
    run draws the same gradient samples as an uninterrupted one.
    """

    def __init__(self, loader: Any, device: torch.device | str) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list, dict, torch.Tensor]]:
        for inputs, target in self.loader:
            yield [inputs.to(self.device)], {}, target.to(self.device)


def sampler_batches(loader: Any, device: torch.device) -> Callable[..., SamplerBatches]:
    """Grad-sampler ``data_loader_builder`` over ``loader`` (see `SamplerBatches`)."""

    def builder(device: torch.device | str = device, **_ignored: Any) -> SamplerBatches:
        return SamplerBatches(loader, device)

    return builder


def configure_grad_sampler(args: Any, modifiers: list) -> None:
    """Recipes with a sampling second-order pruner get a grad-sampler loader by themselves
    (both scripts; ``modifiers``: the recipe's pruning modifiers).

    Its batch size is ``-gb`` if given, else the recipe's ``grad_sampler_kwargs.batch_size``,
    else the training batch size ``-b``. M-FAC left to buffer training gradients needs none.
    """
    sampling = [m for m in modifiers if getattr(m, "gradient_source", None) == "sampler"]
    if not sampling or args.gs_loader:
        return
    recipe_size = next(
        (
            m.grad_sampler_kwargs["batch_size"]
            for m in sampling
            if "batch_size" in m.grad_sampler_kwargs
        ),
        None,
    )
    size = args.gs_batch_size or recipe_size or args.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SetupError(
            f"grad_sampler_kwargs.batch_size in {args.sparseml_recipe} is {size!r}; "
            "it must be an integer >= 1 (or pass -gb N)"
        )
    args.gs_batch_size = size
    args.gs_loader = True
    logging.getLogger(__name__).info(
        "%s samples gradients: grad-sampler loader over the training data, batch size %d "
        "(-gb, else the recipe's grad_sampler_kwargs.batch_size, else -b)",
        type(sampling[0]).__name__,
        args.gs_batch_size,
    )
