"""Errors by origin: a kernel's bad argument is a bug (traceback, exit 1), bad user input is a
one-line error (exit 2). The rule is stated in ``sparseml.errors``."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

from sparseml import curvature
from sparseml.errors import NumericalError, RecipeError, SparsificationError
from sparseml.kernels import (
    cap,
    cap_prefix,
    fast_cap,
    fast_cap_sweep,
    fisher,
    fisher_build,
    mfac,
    native_fast_cap,
    obs,
    packed,
)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sparseml"
F64 = torch.float64


def _problem(n_b: int = 2, B: int = 4):
    """W (n_b, B), H (n_b, B, B) identity blocks, an all-False (n_b, B) mask."""
    W = torch.randn(n_b, B, dtype=F64)
    H = torch.eye(B, dtype=F64).expand(n_b, B, B).clone()
    return W, H, torch.zeros(n_b, B, dtype=torch.bool)


def _flat(d: int = 8, B: int = 4):
    """w (d,), H (ceil(d/B), B, B), an all-False (d,) mask."""
    n_b = -(-d // B)
    return torch.randn(d, dtype=F64), torch.eye(B, dtype=F64).repeat(n_b, 1, 1), torch.zeros(d) == 1


def _full_builder():
    builder = fisher_build.BlockFisherBuilder(8, 4, 2, 1e-3, mspace=True)
    builder.add(torch.randn(2, 8))
    builder.add(torch.randn(1, 8))  # a third sample with num_grads=2


W, H, NONE = _problem()
w, Hf, none = _flat()
# entry point -> (text of the kernel's own message, a call with one bad argument). Every public
# function of the pruning kernels that checks its arguments is listed here
# (test_every_checking_entry_point_is_covered), and the curvature entry points.
BAD_CALLS = {
    "packed.SymBlocks": ("packed blocks must be", lambda: packed.SymBlocks(torch.zeros(2, 3), 4)),
    "fast_cap.fast_cap_scores": (
        "F must be",
        lambda: fast_cap.fast_cap_scores(torch.zeros(2, 4), torch.eye(3), 4),
    ),
    "fast_cap_sweep.select_smallest": (
        "one count per copy",
        lambda: fast_cap_sweep.select_smallest(torch.zeros(3, 4), [1, 2]),
    ),
    "fast_cap.sweep_levels": (
        "one sparsity per group",
        lambda: fast_cap.sweep_levels([0.5], 2, (4, 5), 2),
    ),
    "fast_cap.row_scales": (
        "row_energy must be 1-D",
        lambda: fast_cap.row_scales(torch.ones(2, 2)),
    ),
    "fast_cap_sweep.factors": (
        "square",
        lambda: fast_cap_sweep.factors(torch.zeros(2, 3, 4), 4, 1e-2),
    ),
    "native_fast_cap.sweep_run": (
        "C-contiguous",
        lambda: native_fast_cap.sweep_run(
            torch.zeros(4, 6, dtype=torch.float64).T,
            torch.zeros(2, 4, dtype=torch.float64),
            torch.eye(6, dtype=torch.float64)[None],
            0,
            0,
            2,
            4,
        ),
    ),
    "native_fast_cap.sweep_run/rows": (
        "a multiple of R",
        lambda: native_fast_cap.sweep_run(
            torch.zeros(6, 4, dtype=torch.float64),
            torch.zeros(2, 4, dtype=torch.float64),
            torch.eye(6, dtype=torch.float64)[None],
            0,
            0,
            2,
            3,
        ),
    ),
    "fast_cap_sweep.check_scale": (
        "row_scale must have shape",
        lambda: fast_cap_sweep.check_scale(torch.ones(3), 2),
    ),
    "fast_cap_sweep.Factors": (
        "F must be",
        lambda: fast_cap_sweep.Factors(
            torch.zeros(3, 4), torch.eye(4)[None].repeat(2, 1, 1), 4, 1e-2, None, None
        ),
    ),
    "fast_cap_sweep.Sweep": (
        "num_grads",
        lambda: fast_cap_sweep.Sweep(
            torch.zeros(2, 4), torch.eye(4), 0, 1e-2, 4, None, None, None, None, None
        ),
    ),
    "fast_cap.group_count": (
        "group_rows",
        lambda: fast_cap.group_count(6, 0),
    ),
    "fast_cap_sweep.inverse_factor": (
        "F must be square",
        lambda: fast_cap_sweep.inverse_factor(torch.eye(3)[:2], 4, 1e-2),
    ),
    "cap.cap_eliminate": ("expected W", lambda: cap.cap_eliminate(W, H[:, :3, :3], NONE)),
    "cap.cap_eliminate/blocks_per_batch": (
        "blocks_per_batch",
        lambda: cap.cap_eliminate(W, H, NONE, blocks_per_batch=0),
    ),
    "cap_prefix.cap_reconstruct": (
        "counts",
        lambda: cap_prefix.cap_reconstruct(W, H, NONE.long(), torch.tensor([5, 0])),
    ),
    "cap.cap_eliminate_factored": (
        "expected W",
        lambda: cap.cap_eliminate_factored(W, H[:, :3, :3], NONE),
    ),
    "cap_prefix.cap_prefix_weights": (
        "counts",
        lambda: cap_prefix.cap_prefix_weights(
            W, H, NONE.long(), torch.tensor([5, 0]), NONE[:, 0], NONE
        ),
    ),
    "cap_prefix.prefix_counts": ("differ", lambda: cap_prefix.prefix_counts(NONE, NONE[:, :3])),
    "cap.cap_nm_prune": ("B % m", lambda: cap.cap_nm_prune(W, H, NONE, 2, 3)),
    "fast_cap.accumulate_shared_fisher": (
        "grads must be",
        lambda: fast_cap.accumulate_shared_fisher(torch.zeros(3), 4),
    ),
    "fast_cap.fast_cap_prune": ("sparsity", lambda: fast_cap.fast_cap_prune(W, H[0], 1, 1.5)),
    "fast_cap.fast_cap_losses": (
        "max_rows",
        lambda: fast_cap.fast_cap_losses(W, H[0], 1, [0.5], max_rows=0),
    ),
    "fisher.num_blocks": ("block_size", lambda: fisher.num_blocks(10, 0)),
    "fisher.to_blocks": ("block_size", lambda: fisher.to_blocks(torch.zeros(10), 2.5)),
    "fisher.accumulate_block_gram": (
        "grads must have shape",
        lambda: fisher.accumulate_block_gram(torch.zeros(10), 4),
    ),
    "fisher.invert_block_fisher": (
        "damp",
        lambda: fisher.invert_block_fisher(torch.zeros(2, 4, 4), 4, 0.0),
    ),
    "fisher_build.mspace_block_inverse": (
        "grads must be",
        lambda: fisher_build.mspace_block_inverse([], 4, 1e-3),
    ),
    "fisher_build.BlockFisherBuilder": (
        "num_grads",
        lambda: fisher_build.BlockFisherBuilder(8, 4, 0, 1e-3),
    ),
    "fisher_build.BlockFisherBuilder.add": (
        "grads must have shape",
        lambda: fisher_build.BlockFisherBuilder(8, 4, 2, 1e-3).add(torch.zeros(2, 7)),
    ),
    "fisher_build.block_fisher_inverse": (
        "grads must have shape",
        lambda: fisher_build.block_fisher_inverse(torch.zeros(0, 8), 4, 1.0),
    ),
    "obs.obs_scores": ("blocks", lambda: obs.obs_scores(w[:4], Hf, none[:4])),
    "obs.obs_group_scores": ("group size", lambda: obs.obs_group_scores(w, Hf, none, 3)),
    "obs.obs_prune_update": ("bool tensor", lambda: obs.obs_prune_update(w, Hf, none.float())),
    "obs.obs_loss": ("H must have shape", lambda: obs.obs_loss(w, Hf[:, :3], none)),
    "obs.obs_independent_update": (
        "group size",
        lambda: obs.obs_independent_update(w, Hf, none, group=3),
    ),
    "mfac.MFACInverse.build": (
        "damp",
        lambda: mfac.MFACInverse.build(torch.randn(4, 10), damp=0.0),
    ),
    "mfac.MFACInverse.build/grads": (
        "grads",
        lambda: mfac.MFACInverse.build(torch.zeros(4), damp=1.0),
    ),
    "mfac.MFACInverse.mul": (
        "vector of shape",
        lambda: mfac.MFACInverse.build(torch.randn(4, 10), 1.0).mul(torch.zeros(3, dtype=F64)),
    ),
    "curvature.hessian_diagonal": (
        "no Hessian-vector products",
        lambda: curvature.hessian_diagonal([], [4], 1),
    ),
    "curvature.kfac_factors": ("no batches", lambda: curvature.kfac_factors([], [])),
    "curvature.GradientMoments.mean": (
        "no gradient samples",
        lambda: curvature.GradientMoments([4]).mean(),
    ),
}
# Builder state misused by its caller: RuntimeError, still not a user error.
BAD_STATE = {
    "fisher_build.BlockFisherBuilder.finish": (
        "no gradient samples",
        lambda: fisher_build.BlockFisherBuilder(8, 4, 2, 1e-3).finish(),
    ),
    "fisher_build.BlockFisherBuilder.add/too_many": ("more than num_grads", _full_builder),
}
# Public names of the pruning kernels with no argument check of their own (pure views or
# formulas whose callers are the checked entry points above).
UNCHECKED = {
    "cap_prefix.prefix_mask",
    "cap_prefix.recon_batch",  # sizes only, never given user values
    "cap.workspace_bytes",  # sizes only, never given user values
    "fisher.from_blocks",
    "packed.pack",  # pure views and copies of blocks the kernels built themselves
    "packed.unpack",
    "packed.packed_numel",
    "fisher.block_diag",
    "fisher.block_matvec",
    "mfac.MFACInverse",  # the constructor stores pieces; build() checks
    "mfac.mfac_recursion_reference",
    "mfac.recursion_diag",
    "mfac.recursion_mul",
    "native_fast_cap.usable",  # a yes/no on a tensor's device and dtype
    "native_fast_cap.warm_up",  # no arguments
}


def _raised_in_package(err: pytest.ExceptionInfo) -> bool:
    """The error comes from the package's own check, not from torch or this test."""
    return str(SRC) in traceback.extract_tb(err.tb)[-1].filename


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_kernel_bad_argument_is_an_ordinary_error(name):
    text, call = BAD_CALLS[name]
    with pytest.raises((ValueError, TypeError), match=re.escape(text)) as err:
        call()
    assert not isinstance(err.value, SparsificationError), f"{name}: {err.value!r}"
    assert _raised_in_package(err)


@pytest.mark.parametrize("name", sorted(BAD_STATE))
def test_misused_builder_is_a_runtime_error(name):
    text, call = BAD_STATE[name]
    with pytest.raises(RuntimeError, match=re.escape(text)) as err:
        call()
    assert not isinstance(err.value, SparsificationError), f"{name}: {err.value!r}"
    assert _raised_in_package(err)


def test_every_checking_entry_point_is_covered():
    public = set()
    kernels = (
        cap, cap_prefix, fast_cap, fast_cap_sweep, fisher, fisher_build, mfac, native_fast_cap,
        obs, packed,
    )  # fmt: skip
    for module in kernels:
        short = module.__name__.rsplit(".", 1)[1]
        for name, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if name.startswith("_") or not defined_here:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                public.add(f"{short}.{name}")
    covered = {key.split("/")[0] for key in (*BAD_CALLS, *BAD_STATE)}
    covered |= {key.rsplit(".", 1)[0] for key in covered if key.count(".") == 2}
    missing = public - covered - UNCHECKED
    assert not missing, f"add a bad-argument case (or list as UNCHECKED): {sorted(missing)}"


def test_numerical_failure_is_still_a_numerical_error():
    grads = torch.randn(4, 10)
    grads[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        mfac.MFACInverse.build(grads, 1.0)


def test_kernels_and_curvature_never_mention_recipe_error():
    files = sorted((SRC / "kernels").glob("*.py")) + sorted((SRC / "curvature").glob("*.py"))
    assert len(files) > 5
    offenders = [str(f.relative_to(ROOT)) for f in files if "RecipeError" in f.read_text()]
    assert not offenders, f"kernels raise ValueError/TypeError/RuntimeError: {offenders}"


# ----- end to end: how the research scripts report each kind ---------------------------------
SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    import torch.nn.functional as F
    from torch import nn

    from utils.faults import run_main
    from sparseml.kernels import obs
    from sparseml.pytorch.optim import ScheduledModifierManager

    RECIPE = '''
    modifiers:
      - !OBSPruningModifier
        params: ["re:.*weight"]
        final_sparsity: 0.5
        start_epoch: 0
        end_epoch: 1
        num_grads: NUM_GRADS
        damp: 0.05
        fisher_block_size: 8
    '''

    def batches(**kwargs):
        while True:
            x = torch.randn(4, 8)
            yield [x], {}, x[:, :4]

    KERNEL = obs.obs_scores

    def broken_caller(w, H, pruned, **kwargs):
        # A caller bug: the real kernel's own argument check refuses the truncated weights.
        return KERNEL(w[:1], H, pruned[:1], **kwargs)

    def main():
        text = RECIPE.replace("NUM_GRADS", "0" if sys.argv[1] == "user" else "4")
        manager = ScheduledModifierManager.from_yaml(text)  # imports the pruner's module
        # The pruner reaches the kernel through whatever module imported it by name.
        for module in list(sys.modules.values()):
            names = vars(module) if module is not None else {}
            for name, value in list(names.items()) if names is not globals() else ():
                if value is KERNEL:
                    setattr(module, name, broken_caller)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        sampler = {"data_loader_builder": batches, "loss_fn": F.mse_loss}
        manager.apply(model, grad_sampler=sampler)

    run_main(main)
    """
)


def _run(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "tiny_main.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": f"{ROOT / 'research'}{os.pathsep}{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )


def test_scripts_report_user_error_in_one_line_and_internal_error_with_traceback(tmp_path):
    user = _run("user", tmp_path)
    assert user.returncode == 2, user.stderr
    lines = [line for line in user.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), user.stderr
    assert "num_grads" in lines[0] and "Traceback" not in user.stderr

    internal = _run("internal", tmp_path)
    assert internal.returncode == 1, internal.stderr
    assert "Traceback (most recent call last)" in internal.stderr
    assert "ValueError: w must be (d,)" in internal.stderr  # the kernel's own check
    assert "broken_caller" in internal.stderr and "kernels/obs.py" in internal.stderr
    assert "\nerror:" not in internal.stderr


def test_describe_maps_each_origin_to_its_exit_code():
    from utils.faults import EXIT_FAILED, EXIT_USAGE, describe

    assert describe(RecipeError("bad field")) == (EXIT_USAGE, "error: bad field")
    assert describe(NumericalError("NaN")) == (EXIT_FAILED, "error: NaN")
    for err in (ValueError("bug"), TypeError("bug"), RuntimeError("bug")):
        assert describe(err) == (EXIT_FAILED, None)  # None: the traceback is printed
