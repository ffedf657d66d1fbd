"""Every built-in pruner writes, bit for bit, the masks and weights recorded in
``tests/fixtures/pruner_fingerprints.json`` (see `pruner_fingerprint`)."""

from __future__ import annotations

import json

import pytest
import torch

from pruner_fingerprint import FIXTURE, VARIANTS, run_case

RECORDED: dict[str, dict] = json.loads(FIXTURE.read_text())
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def test_the_fixture_covers_every_pruner_and_variant_kind() -> None:
    from test_pruner_contract import PRUNERS

    names = {key.split("/")[0] for key in RECORDED}
    assert names == set(PRUNERS)
    assert {key.split("/")[1] for key in RECORDED} == set(VARIANTS)


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_pruner_fingerprints(key: str, one_thread) -> None:
    name, variant, mode, dtype = key.split("/")
    got = run_case(name, variant, mode == "gradual", DTYPES[dtype])
    assert got is not None, f"{key}: the recipe is now refused"
    assert got["masks"] == RECORDED[key]["masks"], f"{key}: masks changed"
    assert got["weights"] == RECORDED[key]["weights"], f"{key}: weights changed"
