"""Labels: one class map for every split of a folder data set, and a scan that survives loops.

timm numbers the classes of each folder split on its own from the folders that hold images, so
a class folder that is empty in one split renumbers every class after it in that split
(accuracy against wrong labels, exit 0). Here the classes are the union of every split's class
folders (empty ones included), sorted as timm sorts them (:func:`class_names`); the names are
saved in every checkpoint (``class_map``) and checked by :func:`check_class_map` on resume,
evaluation and export. :func:`scan_image_folder` replaces timm's folder walk, which follows
symlink loops (see its docstring for the rule).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

from . import fmnist
from .errors import SetupError


def scan_image_folder(root: str | Path) -> list[tuple[str, str]]:
    """``(image path, class name)`` of every image under ``root``, sorted like timm's reader.

    The class name is the image's folder name (timm's ``leaf_name_only``). Folders are followed
    through symlinks, but a link to a folder on its own path (a symlink loop: a link to itself
    or an ancestor, or two folders linking to each other) is a :class:`SetupError` naming the
    link: timm's ``os.walk(followlinks=True)`` would read such a tree up to 40 times over or
    recurse until the path is too long. A folder reached twice without a loop is read twice.
    """
    root = Path(root)
    types = get_img_extensions(as_set=True)
    found: list[tuple[str, str]] = []

    def walk(folder: Path, label: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise SetupError(f"data folder {root}: cannot list {folder}: {err.strerror}") from err
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise SetupError(
                        f"data folder {root}: {path} links back to {os.path.realpath(path)}, a "
                        "folder on its own path (a symlink loop); remove the link or point it "
                        "outside the tree (links to folders elsewhere are allowed)"
                    )
                walk(path, entry.name, ancestors | {key})
            elif os.path.splitext(entry.name)[1].lower() in types and entry.is_file():
                found.append((str(path), label))

    st = os.stat(root)
    walk(root, "", frozenset({(st.st_dev, st.st_ino)}))
    return sorted(found, key=lambda item: natural_key(item[0]))


def is_folder_name(name: str) -> bool:
    """Whether timm reads ``--dataset name`` from a folder tree (its reader without a prefix)."""
    return "/" not in name or name.lower().startswith("folder/")


def split_folder(root: str, split: str) -> Path | None:
    """The folder timm reads for ``split`` of a folder data set, or None (tar, remote...)."""
    from timm.data.dataset_factory import _search_split

    folder = Path(_search_split(root, split)) if root and Path(root).is_dir() else None
    return folder if folder is not None and folder.is_dir() else None


def _class_folders(folder: Path) -> set[str]:
    """Names of the class folders of a split, empty ones included (leaf names of image
    folders, plus the split's own subfolders)."""
    own = {e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=True)}
    return own | {label for _, label in scan_image_folder(folder)}


def class_names(name: str, root: str | None, splits: list[str]) -> list[str] | None:
    """The class names of the data set in label order, one map for every split in ``splits``;
    None where the names are not known here (timm's remote and ``torch/`` data sets)."""
    if name == fmnist.FMNIST:
        return list(fmnist.CLASSES)
    if not is_folder_name(name):
        return None
    folders = [f for f in (split_folder(root or "", s) for s in splits) if f is not None]
    if not folders:
        return None
    names: set[str] = set()
    for folder in dict.fromkeys(folders):
        names |= _class_folders(folder)
    return sorted(names, key=natural_key)


class FolderReader(ReaderImageFolder):
    """timm's folder reader over samples scanned here (loop-safe) with a given class map."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str]) -> None:
        super(ReaderImageFolder, self).__init__()  # timm's Reader; skip its own folder walk
        self.root = str(root)
        self.samples = samples
        self.class_to_idx = {c: i for i, c in enumerate(classes)}


def dataset_class_names(ds: Any) -> list[str] | None:
    """The class names of an opened data set in label order (None when unknown)."""
    base = getattr(ds, "base", ds)  # _RGBDataset, one_shot_data.ShardedDataset
    if isinstance(base, fmnist.FashionMNIST):
        return list(fmnist.CLASSES)
    mapping = getattr(getattr(base, "reader", None), "class_to_idx", None)
    if not mapping:
        return None
    return [c for c, _ in sorted(mapping.items(), key=lambda item: item[1])]


def check_class_map(saved: list[str] | None, current: list[str] | None, source: str) -> None:
    """Refuse data whose labels mean other classes than those ``source`` was trained with."""
    if not saved or not current or list(saved) == list(current):
        return
    diff = next(
        (i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current))
    )
    got = current[diff] if diff < len(current) else "nothing"
    want = saved[diff] if diff < len(saved) else "nothing"
    raise SetupError(
        f"{source} was trained with {len(saved)} classes and the data has {len(current)}: "
        f"label {diff} means {want!r} there and {got!r} here, so accuracy would be measured "
        "against wrong labels; use the data (and --class-map) it was trained with"
    )
