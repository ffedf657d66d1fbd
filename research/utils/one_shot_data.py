"""Data of a one-shot sweep: a rank's shard of a split, and the grad sampler's batch stream.

Loader options are ``data.loader_kwargs`` (shared with training). Call
``compat.ensure_torchvision()`` before importing (timm is imported here).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import create_loader

from .data import check_batch_fits, check_split_options, open_split, resolve_data_dir
from .errors import SetupError


class ShardedDataset(torch.utils.data.Dataset):
    """Every ``parts``-th sample of ``base`` starting at ``index`` (one rank's share).

    ``transform`` is forwarded to the base data set, where timm's ``create_loader`` sets it.
    """

    def __init__(self, base: Any, index: int, parts: int) -> None:
        self.base, self.index, self.parts = base, index, parts

    @property
    def transform(self) -> Any:
        return self.base.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(range(self.index, len(self.base), self.parts))

    def __getitem__(self, i: int) -> Any:
        return self.base[self.index + i * self.parts]


def open_dataset(
    name: str,
    root: str | None,
    split: str,
    training: bool,
    rank: int,
    world: int,
    classes: list[str] | None = None,
) -> Any:
    """This rank's shard of ``split``, labelled by ``classes`` (one map for every split)."""
    ds = open_split(name, root, split, classes, is_training=training)
    return ShardedDataset(ds, rank, world) if world > 1 else ds


class GradSamplerData:
    """``data_loader_builder`` for the grad sampler: an endless stream of training batches.

    Yields ``([inputs], {}, target)`` on ``device``. A recipe's ``grad_sampler_kwargs`` may set
    ``batch_size``; other keys are ignored (as in CAP).
    """

    def __init__(self, dataset: Any, options: dict, batch_size: int, augment: bool) -> None:
        self.dataset, self.options, self.batch_size, self.augment = (
            dataset,
            options,
            batch_size,
            augment,
        )
        self._loaders: dict[int, Any] = {}

    def loader(self, batch_size: int) -> Any:
        check_batch_fits("-gb/--grad_sampler_batch_size", batch_size, len(self.dataset))
        if batch_size not in self._loaders:
            self._loaders[batch_size] = create_loader(
                self.dataset,
                batch_size=batch_size,
                is_training=True,
                no_aug=not self.augment,
                **self.options,
            )
        return self._loaders[batch_size]

    def __call__(
        self, device: Any = None, batch_size: int | None = None, **_ignored: Any
    ) -> EndlessBatches:
        loader = self.loader(batch_size or self.batch_size)
        device = torch.device(device) if device is not None else self.options["device"]
        return EndlessBatches(loader, device)


class EndlessBatches:
    """The loader's batches as ``([inputs], {}, target)`` on ``device``, pass after pass.

    Endless, so the grad sampler never restarts it, yet ``len`` is one pass: the sampler warns
    when ``num_grads`` exceeds the batches it holds (samples repeat), as it does for a loader.
    """

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        while True:
            empty = True
            for inputs, target in self.loader:
                empty = False
                yield [inputs.to(self.device)], {}, target.to(self.device)
            if empty:  # an endless loop over nothing would hang the run
                raise SetupError("the grad sampler loader yields no batch; lower -gb")


def check_data(args: Any) -> None:
    """The data set is there (the digits tree written if needed) and each split names a folder
    of it (checked again here: a digits tree written just now could not be checked earlier)."""
    resolve_data_dir(args.dataset, args.data_dir)
    check_split_options(args)


def check_bn_batches(loader: Any, args: Any) -> None:
    """``--bn-recalibration-batches`` within the batches the training split holds (else fewer
    would be read while the rows record the number asked)."""
    if len(loader) < args.bn_recalibration_batches:
        raise SetupError(
            f"--bn-recalibration-batches {args.bn_recalibration_batches} exceeds the "
            f"{len(loader)} batches of -b {args.batch_size} in --train-split "
            f"{args.train_split!r}; allowed: 1 to {len(loader)}"
        )
