"""PyTorch backend: the penalty, its gradient and the fused grad update with stock torch ops.

Two strategies, chosen by device:

* ``blocked`` (CPU): walk every parameter in blocks of ``BLOCK`` elements and run all the ops of
  one block before the next, so the temporaries (``theta - m``, ``A * (theta - m)``) stay in cache
  and memory sees only the unavoidable reads and writes. ``BLOCK`` = 256K elements (1 MB float32
  temporaries, within a typical per-core L2) was the fastest of 64K / 256K / 1M when it was chosen;
  whole-tensor ops were slower than any of them. ``benchmarks/bench_penalty.py`` measures this
  backend against the memory-traffic floor (results in ``benchmarks/results/``).
* ``foreach`` (CUDA and others): ``torch._foreach_*`` multi-tensor ops, a handful of launches per
  group whatever the number of tensors. Temporaries are whole-group, which costs memory traffic
  that only a fused kernel (the Triton backend) avoids.

Neither synchronises the host with the device.
"""

from __future__ import annotations

import torch

from .base import GroupPlan

BLOCK = 1 << 18  # elements per block; see the module docstring


def _strategy(plan: GroupPlan, forced: str | None) -> str:
    if forced is not None:
        return forced
    return "blocked" if plan.device.type == "cpu" else "foreach"


class TorchBackend:
    """The plain-PyTorch twin of every fast path. ``strategy``: None (by device), "blocked", "foreach"."""

    name = "torch"
    eager_grads = True  # forward computes the gradient in its pass over memory (see base.py)

    def __init__(self, strategy: str | None = None, block: int = BLOCK):
        if strategy not in (None, "blocked", "foreach"):
            raise ValueError(f"unknown torch-backend strategy {strategy!r}")
        self.strategy = strategy
        self.block = block

    # -- blocked (CPU) ------------------------------------------------------------------------
    def _blocks(self, plan: GroupPlan):
        """Per parameter: (flat block views of A, flat block views of m), cached on the plan."""
        blocks = plan.cache.get("blocks")
        if blocks is None:
            blocks = plan.cache["blocks"] = [
                (a.reshape(-1).split(self.block), m.reshape(-1).split(self.block))
                for a, m in zip(plan.importance_views, plan.anchor_views)
            ]
        return blocks

    def _scratch(self, plan: GroupPlan):
        s = plan.cache.get("scratch")
        if s is None:
            n = min(self.block, max(plan.numels, default=0))
            s = plan.cache["scratch"] = (torch.empty(n, dtype=plan.compute_dtype, device=plan.device),
                                         torch.empty(n, dtype=plan.compute_dtype, device=plan.device))
        return s

    @staticmethod
    def _diff(p_blk, m_blk, out):
        # theta - m in the compute dtype. When theta is already in it, one op; otherwise upcast
        # first (sub on two bf16 operands would round the difference to bf16).
        if p_blk.dtype == out.dtype:
            torch.sub(p_blk, m_blk, out=out)
        else:
            out.copy_(p_blk)
            out.sub_(m_blk)
        return out

    def _blocked(self, plan: GroupPlan, mode: str, lam=None, scale=None):
        t1, t2 = self._scratch(plan)
        cd = plan.compute_dtype
        sums, grads = [], []
        for i, (param, (a_blks, m_blks)) in enumerate(zip(plan.params, self._blocks(plan))):
            p = param.detach()
            g, fresh = None, False
            if mode in ("grads", "sum_grads") or (mode == "accumulate" and param.grad is None):
                g, fresh = torch.empty_like(p, memory_format=torch.contiguous_format), True
            elif mode == "accumulate":
                g = param.grad
            if not p.is_contiguous() or (g is not None and not g.is_contiguous()):
                # Rare (channels_last parameters or grads): whole-tensor ops on shaped views.
                s = self._whole(p, plan.importance_views[i], plan.anchor_views[i], g, fresh, mode, lam, scale, cd)
                if s is not None:
                    sums.append(s)
            else:
                g_blks = g.view(-1).split(self.block) if g is not None else a_blks
                for pb, ab, mb, gb in zip(p.view(-1).split(self.block), a_blks, m_blks, g_blks):
                    n = pb.numel()
                    d = self._diff(pb, mb, t1[:n])
                    if mode == "grads":
                        d.mul_(scale)
                        torch.mul(d, ab, out=gb)
                        continue
                    u = torch.mul(d, ab, out=t2[:n])
                    sums.append(torch.dot(d, u))
                    if fresh:
                        torch.mul(u, lam, out=gb)
                    elif mode == "accumulate":
                        gb.add_(u, alpha=lam)
            if mode in ("grads", "sum_grads"):
                grads.append(g)
            elif mode == "accumulate" and fresh:
                param.grad = g
        if mode == "grads":
            return grads
        return (_total(sums, plan), grads) if mode == "sum_grads" else _total(sums, plan)

    @staticmethod
    def _whole(p, a, m, g, fresh, mode, lam, scale, cd):
        d = p.to(cd) - m
        u = d * a
        if mode == "grads":
            g.copy_(u * scale)
            return None
        if fresh:
            g.copy_(u * lam)
        elif mode == "accumulate":
            g.add_(u, alpha=lam)
        return (d * u).sum()

    # -- foreach (CUDA and others) ------------------------------------------------------------
    @staticmethod
    def _foreach_terms(plan: GroupPlan):
        cd = plan.compute_dtype
        theta = [p.detach() for p in plan.params]
        if plan.param_dtype != cd:
            theta = [t.to(cd) for t in theta]
        m = plan.anchor_views if plan.anchor.dtype == cd else [v.to(cd) for v in plan.anchor_views]
        a = plan.importance_views if plan.importance.dtype == cd else [v.to(cd) for v in plan.importance_views]
        d = torch._foreach_sub(theta, m)
        return d, torch._foreach_mul(d, a)

    def _foreach(self, plan: GroupPlan, mode: str, lam=None, scale=None):
        if not plan.params:
            return {"grads": [], "sum_grads": (_total([], plan), [])}.get(mode, _total([], plan))
        d, u = self._foreach_terms(plan)
        if mode in ("grads", "sum_grads"):
            g = torch._foreach_mul(u, scale if mode == "grads" else lam)
            g = [x.to(plan.param_dtype) for x in g] if plan.param_dtype != plan.compute_dtype else g
            if mode == "grads":
                return g
        # A >= 0, so sum(A d^2) is the L1 norm of u * d: one multi-tensor reduction.
        sums = torch._foreach_norm(torch._foreach_mul(u, d), 1)
        if mode == "accumulate":
            have = [i for i, p in enumerate(plan.params) if p.grad is not None]
            if have:
                torch._foreach_add_([plan.params[i].grad for i in have], [u[i] for i in have], alpha=lam)
            for i, p in enumerate(plan.params):
                if p.grad is None:
                    p.grad = (u[i] * lam).to(plan.param_dtype)
        if mode == "sum_grads":
            return _total(list(sums), plan), g
        return _total(list(sums), plan)

    # -- the backend interface ---------------------------------------------------------------
    def _run(self, plan, mode, **kw):
        if _strategy(plan, self.strategy) == "blocked":
            return self._blocked(plan, mode, **kw)
        return self._foreach(plan, mode, **kw)

    def penalty_sum(self, plan: GroupPlan) -> torch.Tensor:
        with torch.no_grad():
            return self._run(plan, "sum")

    def penalty_sum_and_grads(self, plan: GroupPlan, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``penalty_sum`` and ``penalty_grads(lam)`` in one pass: 16 B/param instead of 12 + 16."""
        with torch.no_grad():
            return self._run(plan, "sum_grads", lam=lam)

    def penalty_grads(self, plan: GroupPlan, scale: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self._run(plan, "grads", scale=scale.to(plan.compute_dtype))

    def accumulate_grad_(self, plan: GroupPlan, lam: float) -> torch.Tensor:
        with torch.no_grad():
            return self._run(plan, "accumulate", lam=lam)


def _total(sums: list[torch.Tensor], plan: GroupPlan) -> torch.Tensor:
    if not sums:
        return torch.zeros((), dtype=plan.compute_dtype, device=plan.device)
    return torch.stack(sums).sum()
