"""Fashion-MNIST from its original idx files, as an in-memory data set (``--dataset fashion_mnist``).

The four files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` are read from
``--data-dir``, else ``$FMNIST_DIR``, else the Debian package's folder
(``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).
The 60,000 training images are the ``train`` split; the 10,000 test images are the validation
split (``validation``, ``val``, ``test`` or ``t10k``). Images are 28x28 grayscale, returned as
RGB PIL images so that every timm model and transform takes them unchanged (the models of
``utils.models`` expect 3 channels, as with the digits data).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SetupError

FMNIST = "fashion_mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Split names that mean the 10,000-image test set (timm's default --val-split is "validation").
_SPLITS = {"train": "train", "validation": "t10k", "val": "t10k", "test": "t10k", "t10k": "t10k"}
# idx type code 0x08 = unsigned byte; the last byte of the magic number is the number of dims.
_UBYTE = 0x08


def default_dir() -> Path:
    """``$FMNIST_DIR`` when set, else the Debian package's folder."""
    env = os.environ.get("FMNIST_DIR")
    return Path(env).expanduser() if env else DEBIAN_DIR


def idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    """``root/<prefix>-<kind>-ubyte.gz`` or its uncompressed form, whichever exists."""
    for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
        if (root / name).is_file():
            return root / name
    return None


def _kinds(split: str) -> list[tuple[str, str]]:
    return [(split, "images-idx3"), (split, "labels-idx1")]


def check_dir(root: str | Path | None) -> Path:
    """The folder holding all four idx files; a :class:`SetupError` that says how to get them."""
    path = Path(root).expanduser() if root else default_dir()
    missing = [
        f"{p}-{k}-ubyte.gz"
        for split in ("train", "t10k")
        for p, k in _kinds(split)
        if idx_file(path, p, k) is None
    ]
    if missing:
        raise SetupError(
            f"--dataset {FMNIST}: {path} lacks {', '.join(missing)}; install the data with "
            f"`{INSTALL_HINT}` (Debian/Ubuntu, files in {DEBIAN_DIR}) or point --data-dir "
            "(or FMNIST_DIR) at a folder holding the four Fashion-MNIST idx files"
        )
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzip or plain) of unsigned bytes as a numpy array of its shape.

    Format: 2 zero bytes, the type code (0x08), the number of dimensions n, n big-endian
    uint32 sizes, then the data in row-major order. Anything else is a :class:`SetupError`.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise SetupError(f"cannot read idx file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] == 0:
        raise SetupError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SetupError(f"{path}: idx header cut short")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise SetupError(
            f"{path}: idx header announces shape {shape} ({size} bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(root: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, h, w) uint8, labels (n,) int64) of ``split`` under ``root``."""
    if split not in _SPLITS:
        allowed = ", ".join(sorted(_SPLITS))
        raise SetupError(f"--dataset {FMNIST}: split {split!r} unknown; allowed: {allowed}")
    path = check_dir(root)
    prefix = _SPLITS[split]
    images = read_idx(idx_file(path, prefix, "images-idx3"))
    labels = read_idx(idx_file(path, prefix, "labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SetupError(
            f"{path}: {prefix} images {images.shape} and labels {labels.shape} do not match "
            "(expected (n, h, w) images and n labels)"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise SetupError(f"{path}: {prefix} labels reach {int(labels.max())}; allowed 0..9")
    return images, labels.astype(np.int64)


class FashionMNIST:
    """One split in memory: ``(RGB PIL image, label)`` items; timm sets ``transform``.

    A map-style data set for ``torch.utils.data.DataLoader`` (length and indexing); it does not
    subclass torch's ``Dataset`` so that checking for the data never imports torch.
    """

    def __init__(self, root: str | Path | None, split: str) -> None:
        self.images, self.labels = load_split(root, split)
        self.transform = None
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        from PIL import Image

        img = Image.fromarray(self.images[i]).convert("RGB")  # uint8 (h, w): mode L
        target = int(self.labels[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file, gzip-compressed when the name ends in .gz.

    For tests and small synthetic data sets in the original format.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
