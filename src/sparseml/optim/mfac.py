"""M-FAC optimizer: preconditioned steps with the inverse of a sliding-window empirical Fisher.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
E. Frantar, E. Kurtic, D. Alistarh, arXiv 2107.03356, https://arxiv.org/abs/2107.03356

Each step (the paper's "dynamic" algorithm):

1. g = grad + weight_decay * theta, flattened over all parameters (or their unmasked entries);
2. g replaces the oldest row of the ring buffer G (ngrads x n); row and column j of the Gram
   matrix G G^T are refreshed with one GEMV, G g;
3. A = k*I + G G^T / damp is refactored by Cholesky in float64 (k^3/3 flops, a few ms for
   k <= 1024; cheaper than the reference's LU plus coefficient matrix);
4. u = F^-1 g = g/damp - G^T A^-1 (G g) / damp^2, reusing G g (one more GEMV);
5. buf = momentum * buf + (1 - momentum) * u (an EMA, as the reference) and theta -= lr * buf.

F = damp*I + (1/k) sum of the last k gradients g g^T, k = min(steps taken, ngrads). Before the
window is full only the gradients seen so far enter, averaged over their count k (the reference
instead keeps zero rows and divides by ngrads, which makes its first steps ngrads/k times larger).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from sparseml.errors import NumericalError, RecipeError
from sparseml.kernels.precision import matmul64

__all__ = ["MFAC"]


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if isinstance(value, bool) or not ok:
        raise RecipeError(f"MFAC {name} must be {allowed}, got {value!r}")


class MFAC(torch.optim.Optimizer):
    """Optimizer stepping along F^-1 g for a sliding-window empirical Fisher F.

    Example::

        opt = MFAC(model.parameters(), lr=1e-3, damp=1e-5, ngrads=1024, sparse=True)

    | field | paper | meaning |
    |---|---|---|
    | ngrads | m | gradients kept in the sliding window |
    | damp | lambda | F = lambda*I + (1/m) sum g g^T |
    | momentum | - | EMA weight: buf = mu*buf + (1-mu)*u |
    | sparse | - | only coordinates with a mask of 1 are optimized; the others stay 0 |

    `lr`, `momentum` and `weight_decay` may differ per parameter group; `damp` and `ngrads` are
    shared because the Fisher couples all parameters. Parameters whose `.grad` is None enter the
    Fisher with a zero gradient and are not moved. With `sparse=True` the mask of a parameter is
    `masks[param]` if given (pruned entries are set to 0), else `param != 0` at construction;
    call `reset_window(masks)` after changing masks. `exact=True` (default) forms the Gram
    products in float64 (accurate at small damp); `exact=False` uses float32 GEMVs, about 3x
    faster per step. Memory: ngrads x (optimized coordinates)
    floats, kept on the device of the first parameter.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        damp: float = 1e-5,
        ngrads: int = 1024,
        sparse: bool = False,
        masks: Mapping[Tensor, Tensor] | None = None,
        exact: bool = True,
    ) -> None:
        _check("damp", damp, isinstance(damp, (int, float)) and 0 < damp < float("inf"), "> 0")
        _check("ngrads", ngrads, isinstance(ngrads, int) and ngrads >= 1, "an integer >= 1")
        if masks is not None and not sparse:
            raise RecipeError("MFAC masks are only used with sparse=True; pass sparse=True")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._ready = False
        super().__init__(params, defaults)
        self.damp = float(damp)
        self.ngrads = ngrads
        self.sparse = sparse
        self.exact = bool(exact)
        self._params = [p for group in self.param_groups for p in group["params"]]
        self._ready = True
        self.reset_window(masks)

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:
            raise RecipeError("MFAC cannot add parameter groups after construction")
        for name, allowed in (("lr", "a number >= 0"), ("weight_decay", "a number >= 0")):
            value = param_group.get(name, self.defaults[name])
            _check(name, value, isinstance(value, (int, float)) and value >= 0, allowed)
        mu = param_group.get("momentum", self.defaults["momentum"])
        _check("momentum", mu, isinstance(mu, (int, float)) and 0 <= mu < 1, "in [0, 1)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def reset_window(self, masks: Mapping[Tensor, Tensor] | None = None) -> None:
        """Clear the gradient window and momentum; in sparse mode recompute the masks."""
        masks = masks or {}
        index = []
        for p in self._params:
            state = self.state[p]
            state.pop("momentum_buffer", None)
            if not self.sparse:
                state.pop("index", None)
                index.append(p.numel())
                continue
            mask = masks.get(p)
            if mask is None:
                mask = p != 0
            elif mask.shape != p.shape:
                raise RecipeError(
                    f"MFAC mask shape {tuple(mask.shape)} differs from parameter {tuple(p.shape)}"
                )
            mask = mask.to(device=p.device, dtype=torch.bool)
            p.masked_fill_(~mask, 0.0)
            state["index"] = mask.reshape(-1).nonzero().squeeze(1)
            index.append(state["index"].numel())
        first = self._params[0]
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else None
        dtype = dtype or torch.float32
        self._window = {
            "grads": torch.zeros(self.ngrads, sum(index), dtype=dtype, device=first.device),
            "gram": torch.zeros(self.ngrads, self.ngrads, dtype=torch.float64, device=first.device),
            "count": 0,
            "next": 0,
        }

    def _flat_grad(self) -> Tensor:
        win = self._window["grads"]
        parts = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    g = torch.zeros_like(p)
                else:
                    g = (
                        p.grad.add(p, alpha=group["weight_decay"])
                        if group["weight_decay"]
                        else p.grad
                    )
                g = g.reshape(-1).to(device=win.device, dtype=win.dtype)
                parts.append(g[self.state[p]["index"].to(win.device)] if self.sparse else g)
        return torch.cat(parts)

    def _precondition(self, g: Tensor) -> Tensor:
        """Push g into the window and return F^-1 g for the updated window."""
        win = self._window
        grads, gram, j = win["grads"], win["gram"], win["next"]
        grads[j] = g
        # exact: float64 products (accurate for damp down to ~1e-10 of the gradients' scale,
        # ~3x the time of a step); else one float32 GEMV (error ~eps_32 ||G|| ||g|| / damp).
        # Rows not yet filled are zero.
        gg = matmul64(grads, g) if self.exact else (grads @ g).double()
        gram[j, :] = gg
        gram[:, j] = gg
        k = min(win["count"] + 1, self.ngrads)
        win["count"], win["next"] = k, (j + 1) % self.ngrads
        mat = gram[:k, :k] / self.damp
        mat.diagonal().add_(k)
        lower, info = torch.linalg.cholesky_ex(mat)
        if int(info) != 0 or not bool(torch.isfinite(gg).all()):
            raise NumericalError("MFAC: non-finite gradient or A = k*I + G G^T/damp not PD")
        coef = torch.cholesky_solve(gg[:k, None], lower).squeeze(1) / self.damp**2
        # float64: at small damp both terms are ~||g||/damp and cancel to the (small) result
        if not self.exact:
            return g / self.damp - coef.to(g.dtype) @ grads[:k]
        return (g.double() / self.damp - matmul64(coef[None], grads[:k])[0]).to(g.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One M-FAC step; `closure` re-evaluates the loss (with grad enabled) if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = self._precondition(self._flat_grad())
        offset = 0
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                state = self.state[p]
                size = state["index"].numel() if self.sparse else p.numel()
                u = update[offset : offset + size].to(device=p.device, dtype=p.dtype)
                offset += size
                if p.grad is None:
                    continue
                if mu:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(u))
                    u = buf.mul_(mu).add_(u, alpha=1 - mu)
                if self.sparse:
                    # scatter into zeros so pruned entries get exactly +0 added
                    u = torch.zeros(p.numel(), dtype=p.dtype, device=p.device).index_copy_(
                        0, state["index"], u
                    )
                p.add_(u.view_as(p), alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        win = self._window
        out["mfac_window"] = {key: win[key] for key in ("grads", "gram", "count", "next")}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("mfac_window", None)
        super().load_state_dict(state_dict)
        if saved is None:
            raise RecipeError("MFAC state_dict lacks 'mfac_window' (not saved by MFAC?)")
        device = self._params[0].device
        if saved["grads"].shape[0] != self.ngrads:
            raise RecipeError(
                f"MFAC ngrads {self.ngrads} differs from the saved window {saved['grads'].shape[0]}"
            )
        width = 0
        for p in self._params:
            if self.sparse and "index" not in self.state[p]:
                raise RecipeError("MFAC(sparse=True) cannot load a state_dict saved without masks")
            if self.sparse:
                self.state[p]["index"] = self.state[p]["index"].to(device=p.device)
            width += self.state[p]["index"].numel() if self.sparse else p.numel()
        if saved["grads"].shape[1] != width:
            raise RecipeError(
                f"MFAC saved window has {saved['grads'].shape[1]} coordinates, expected {width}"
            )
        self._window = {
            "grads": saved["grads"].to(device, copy=True),
            "gram": saved["gram"].to(device=device, dtype=torch.float64, copy=True),
            "count": int(saved["count"]),
            "next": int(saved["next"]),
        }
