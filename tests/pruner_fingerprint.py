"""Fingerprints of what every built-in pruner writes on the contract cases.

A fingerprint is the sha256 of a run's final keep-masks and weights (their exact bytes), for
each pruner x variant (mask type and method options) x {one-shot, gradual} x {float32, float64}.
``tests/fixtures/pruner_fingerprints.json`` holds the fingerprints recorded before the pruners
were rebuilt as compositions (estimator x selector x update); `test_pruner_fingerprints`
checks that every case still writes exactly those bytes. Regenerate the file only for a
deliberate change of behaviour, and say which cases changed and why:

    python tests/pruner_fingerprint.py --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "pruner_fingerprints.json"

# Options tried on top of the contract recipe; a pruner that refuses one (RecipeError at load
# or initialize) simply has no such case.
VARIANTS: dict[str, str] = {
    "default": "",
    "layer": "global_sparsity: false",
    "2:4": 'mask_type: "2:4"\ninit_sparsity: 0.5\nfinal_sparsity: 0.5',
    "block4": "mask_type: block4",
    "independent": "obs_update: independent",
    "dynamic": "dynamic_blocks: true",
    "obd_half": "scale_prune_update: 0.5",
    "recompute3": "num_recomputations: 3",
    "full_fisher": "fisher_block_size: -1",
    "cap_small_batch": "blocks_in_parallel: 1",
    "fastcap_cols4": "block_size: 4",
    "hgp": "normalize_hgp: true",
    "gwprod_abs": "score: abs",
    "hutchinson": "hessian_method: hutchinson",
}


def _recipe(name: str, gradual: bool, variant: str) -> str:
    from test_pruner_contract import LAYER_WISE, extra_fields

    schedule = {
        "init_sparsity": 0.2 if gradual else 0.6,
        "final_sparsity": 0.6,
        "start_epoch": 0,
        "end_epoch": 1 if gradual else 0,
    }
    if gradual:
        schedule["update_frequency"] = 0.5
    lines = [f"{k}: {v}" for k, v in schedule.items()]
    extra = VARIANTS[variant]
    overridden = {line.split(":")[0].strip() for line in extra.splitlines() if line.strip()}
    lines = [line for line in lines if line.split(":")[0] not in overridden]
    given = [
        line for line in extra_fields(name).split("\n    ") if line.split(":")[0] not in overridden
    ]
    if name not in LAYER_WISE and "global_sparsity" not in overridden:
        given.append("global_sparsity: true")
    body = "\n    ".join(['params: ["re:.*weight"]', *lines, *given, *extra.splitlines()])
    return f"modifiers:\n  - !{name}\n    {body}\n"


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(
            t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()
        )
    return h.hexdigest()[:20]


def run_case(name: str, variant: str, gradual: bool, dtype: torch.dtype) -> dict | None:
    from sparseml.errors import RecipeError
    from sparseml.pytorch.optim import ScheduledModifierManager
    from test_pruner_contract import FixedGrads, grad_table, model32

    text = _recipe(name, gradual, variant)
    try:
        manager = ScheduledModifierManager.from_yaml(text)
    except RecipeError:
        return None
    model = model32().to(dtype)
    sampler = FixedGrads(grad_table())
    try:
        if gradual:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            wrapped = manager.modify(model, opt, steps_per_epoch=2, grad_sampler=sampler)
            for i in range(3):
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + i))
                model(x.to(dtype)).square().mean().backward()
                wrapped.step()
                wrapped.zero_grad()
            manager.finalize(model)
        else:
            manager.apply(model, grad_sampler=sampler)
    except RecipeError:
        return None
    params = list(model.parameters())
    return {"masks": _digest([p != 0 for p in params]), "weights": _digest(params)}


def all_cases() -> dict[str, dict]:
    from test_pruner_contract import PRUNERS

    torch.set_num_threads(1)
    out = {}
    for name in PRUNERS:
        for variant in VARIANTS:
            for gradual in (False, True):
                for dtype in (torch.float32, torch.float64):
                    key = (
                        f"{name}/{variant}/{'gradual' if gradual else 'one_shot'}/{str(dtype)[6:]}"
                    )
                    result = run_case(name, variant, gradual, dtype)
                    if result is not None:
                        out[key] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the fixture")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "research"))
    cases = all_cases()
    if args.write:
        FIXTURE.write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(cases)} cases to {FIXTURE}")
    else:
        recorded = json.loads(FIXTURE.read_text())
        bad = [k for k in sorted(set(recorded) | set(cases)) if recorded.get(k) != cases.get(k)]
        print(f"{len(cases)} cases, {len(bad)} differ: {bad}")


if __name__ == "__main__":
    main()
