"""Every estimator's memory figure (what the preflight adds up) is within 1.3x of the peak
memory a one-shot prune adds, measured in a fresh process at two sizes.

Each probe runs `memory_probe` in a subprocess: an MLP of square Linear layers, pruned to 50%
one-shot; it reports the figure and the peak resident memory added during the prune. The
sizes keep every figure above ~200 MB, so the process's own constant overhead (thread pools,
allocator arenas: ~50 MB) stays inside the tolerance. Two probes run at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
TOLERANCE = 1.3

# estimator: the pruner that uses it, two (width, layers) sizes, the pruner's fields
CASES = {
    "BlockFisher": (
        "OBSPruningModifier",
        [(256, 2), (256, 4)],
        {"fisher_block_size": 128, "num_grads": 128},
    ),
    "BlockFisherAndMean": (
        "WoodTaylorPruningModifier",
        [(256, 2), (256, 4)],
        {"fisher_block_size": 128},
    ),
    "CAPElimination": ("CAPruningModifier", [(256, 2), (256, 4)], {"fisher_block_size": 128}),
    "CAPElimination (padded blocks)": (
        "CAPruningModifier",
        [(200, 3), (200, 6)],
        {"fisher_block_size": 128},  # 40,000 weights per layer: a padded block each
    ),
    "CAPElimination (large blocks)": (
        "CAPruningModifier",
        [(64, 1), (72, 1)],
        {"fisher_block_size": 16384},  # clamped to the whole layer: one block of 4096 / 5184
    ),
    "CAPElimination (large blocks, 90%)": (
        "CAPruningModifier",
        [(64, 1), (72, 1)],
        {"fisher_block_size": 16384, "sparsity": 0.9},
    ),
    "SharedFisher": (
        "FastCAPruningModifier",
        [(1024, 1), (1024, 2)],
        {"fisher_block_size": 1024, "num_grads": 64},
    ),
    "SharedFisher (loss curves)": (
        "FastCAPruningModifier",
        [(1024, 2), (1024, 3)],
        {
            "fisher_block_size": 256,  # 4,096 rows a layer: curves on 128 of them, 11 copies
            "num_grads": 64,
            "global_sparsity": True,
            "global_allocation": "losses",
        },
    ),
    "SharedFisher (row groups, sweeps)": (
        "FastCAPruningModifier",
        [(512, 1), (512, 2)],
        {
            "fisher_layout": "rows",  # 256 Fishers of 512 x 512 a layer, factored per group
            "fisher_block_size": 512,
            "fisher_rows": 2,
            "sweeps": 3,
            "num_grads": 64,
        },
    ),
    "SharedFisher (one block a layer)": (
        "FastCAPruningModifier",
        [(64, 1), (64, 2)],
        {"fisher_block_size": 4096, "num_grads": 64},  # B = the whole layer: factoring dominates
    ),
    "FullFisher": ("WoodFisherPruningModifier", [(768, 1), (768, 2)], {"num_grads": 64}),
    "MFACFisher": (
        "MFACPruningModifier",
        [(512, 2), (512, 4)],
        {"num_grads": 64, "fisher_block_size": 512},
    ),
    "KFAC": ("KFACPruningModifier", [(2048, 1), (2048, 2)], {"num_grads": 8}),
    "DiagonalFisher": ("DiagFisherPruningModifier", [(1024, 1), (1024, 2)], {"num_grads": 64}),
    "GradientSums": ("GWProdPruningModifier", [(1024, 1), (1024, 2)], {"num_grads": 64}),
    "HessianDiagonal": ("HessianDiagPruningModifier", [(2048, 1), (2048, 2)], {"num_grads": 2}),
}
DEFAULTS = {"num_grads": 256, "damp": 0.001}


def probe(name: str, width: int, layers: int, fields: dict) -> dict:
    fields = {**DEFAULTS, **fields}
    if name == "GWProdPruningModifier":
        fields.pop("damp")
    out = subprocess.run(
        [sys.executable, str(PROBE), name, str(width), str(layers), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, int], dict]:
    jobs = [(case, i) for case in CASES for i in range(2)]

    def run(job: tuple[str, int]) -> dict:
        name, sizes, fields = CASES[job[0]]
        return probe(name, *sizes[job[1]], fields)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(run, jobs)))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_figure_is_within_tolerance_of_the_measured_peak(case: str, measured) -> None:
    for i, (width, layers) in enumerate(CASES[case][1]):
        got = measured[case, i]
        ratio = got["added"] / got["figure"]
        assert 1 / TOLERANCE <= ratio <= TOLERANCE, (
            f"{case} at {layers} x {width}^2 weights: figure {got['figure'] >> 20} MiB, "
            f"measured {got['added'] >> 20} MiB (x{ratio:.2f})"
        )
