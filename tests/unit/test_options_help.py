"""--help says what the data options really default to."""

from __future__ import annotations

import os

from conftest import ensure_research

ensure_research()
from utils import options  # noqa: E402


def help_text() -> str:
    parser = options.new_parser("test")
    options.add_data_options(parser)
    return " ".join(parser.format_help().split())


def test_dataset_default_is_the_image_folder_not_none() -> None:
    text = help_text()
    dataset = text[text.index("--dataset DATASET") : text.index("--train-split")]
    assert "(default: none)" not in dataset
    assert "(default: '', the ImageFolder tree)" in dataset


def test_workers_default_never_exceeds_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert options.default_workers() == min(4, cores)
    parser = options.new_parser("test")
    options.add_data_options(parser)
    assert parser.parse_args([]).workers == min(4, cores)
    assert f"at most this machine's cores: {min(4, cores)})" in help_text()
