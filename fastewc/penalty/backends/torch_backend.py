"""PyTorch backend: the penalty, its gradient and the fused grad update with stock torch ops.

Two strategies, chosen by device:

* ``blocked`` (CPU): walk every parameter in blocks of ``BLOCK`` elements and run all the ops of
  one block before the next, so the temporaries (``theta - m``, ``A * (theta - m)``) stay in cache
  and memory sees only the unavoidable reads and writes. Consecutive small parameters are walked
  as one block (a *run*: gathered by one ``cat``, updated by one multi-tensor op), so that a model
  of many small tensors does not pay several op launches per tensor. Operands stored in another
  dtype than the compute dtype (bfloat16 parameters or storage) are converted by copies into
  scratch blocks: ops that mix dtypes take torch's per-element casting loop. ``BLOCK`` = 64K
  elements per torch thread: torch splits each op among its threads, so each core's share of the
  three float32 temporaries (256 KB each) fits its L2 cache, while a block stays long enough that
  per-op overhead is small next to its memory traffic. Smaller blocks pay more launches, larger
  ones (and whole-tensor ops) spill the temporaries to memory. ``benchmarks/bench_penalty.py`` and
  ``benchmarks/bench_scale.py`` measure this backend against the memory-traffic floor (results in
  ``benchmarks/results/``); rerun them before changing ``BLOCK``.
* ``foreach`` (CUDA and others): ``torch._foreach_*`` multi-tensor ops, a handful of launches per
  group whatever the number of tensors. Temporaries are whole-group, which costs memory traffic
  that only a fused kernel (the Triton backend) avoids.

Neither synchronises the host with the device.
"""

from __future__ import annotations

import torch

from ..packing import ALIGN
from .base import GroupPlan

BLOCK = 1 << 16  # elements per block and per torch thread; see the module docstring
# Parameters up to this many elements are walked in runs of consecutive ones, a run at most one
# block long: each op then covers a run instead of one small tensor, whose per-op overhead would
# cost more than its memory traffic.
SMALL = 1 << 16


def _strategy(plan: GroupPlan, forced: str | None) -> str:
    if forced is not None:
        return forced
    return "blocked" if plan.device.type == "cpu" else "foreach"


class TorchBackend:
    """The plain-PyTorch twin of every fast path. ``strategy``: None (by device), "blocked", "foreach"."""

    name = "torch"
    eager_grads = True  # forward computes the gradient in its pass over memory (see base.py)

    def __init__(self, strategy: str | None = None, block: int | None = None, small: int = SMALL):
        """``block``: elements per block (default ``BLOCK`` times torch's thread count when a
        group is first bound); ``small``: parameters up to this size are walked in runs."""
        if strategy not in (None, "blocked", "foreach"):
            raise ValueError(f"unknown torch-backend strategy {strategy!r}")
        if block is not None and block < 1 or small < 0:
            raise ValueError(f"block ({block}) must be positive and small ({small}) not negative")
        self.strategy = strategy
        self.block = block
        self.small = small

    # -- blocked (CPU) ------------------------------------------------------------------------
    def _block(self, plan: GroupPlan) -> int:
        """Elements per block for this plan, fixed when first asked."""
        block = plan.cache.get("block")
        if block is None:
            block = plan.cache["block"] = self.block or BLOCK * max(1, torch.get_num_threads())
        return block

    def _blocks(self, plan: GroupPlan):
        """Per parameter: (flat block views of A, flat block views of m), cached on the plan."""
        blocks = plan.cache.get("blocks")
        if blocks is None:
            b = self._block(plan)
            blocks = plan.cache["blocks"] = [
                (a.reshape(-1).split(b), m.reshape(-1).split(b))
                for a, m in zip(plan.importance_views, plan.anchor_views)
            ]
        return blocks

    def _scratch(self, plan: GroupPlan):
        """Three compute-dtype scratch blocks and, for runs of parameters of another dtype, one
        in the parameters' dtype; cached on the plan."""
        s = plan.cache.get("scratch")
        if s is None:
            runs = any(isinstance(u, _Run) for u in self._units(plan))
            block = self._block(plan)
            n = block if runs else min(block, max(plan.numels, default=0))
            s = tuple(torch.empty(n, dtype=plan.compute_dtype, device=plan.device) for _ in range(3))
            if runs and plan.param_dtype != plan.compute_dtype:
                s += (torch.empty(n, dtype=plan.param_dtype, device=plan.device),)
            plan.cache["scratch"] = s
        return s

    def _units(self, plan: GroupPlan) -> list:
        """The walk over a group, cached on the plan: a parameter index on its own, or a
        :class:`_Run` of consecutive small parameters handled as one block."""
        units = plan.cache.get("units")
        if units is None:
            units, run = [], []
            block = self._block(plan)
            small = min(self.small, block)
            bounds = [(o, o + n) for o, n in zip(plan.offsets, plan.numels)]

            def close():
                if len(run) > 1:
                    units.append(_Run(plan, run, bounds))
                else:
                    units.extend(run)
                run.clear()

            for i, (start, end) in enumerate(bounds):
                if end - start > small:
                    close()
                    units.append(i)
                    continue
                if run and (end - bounds[run[0]][0] > block or not 0 <= start - bounds[run[-1]][1] < ALIGN):
                    # A gap of ALIGN or more holds a parameter outside this group's plan (a frozen
                    # one), whose A and m are not zero: a run covers alignment gaps only.
                    close()
                run.append(i)
            close()
            plan.cache["units"] = units
        return units

    @staticmethod
    def _diff(p_blk, m_blk, out, spare):
        # theta - m in the compute dtype. Operands of another dtype are converted by a copy
        # first: an op mixing dtypes takes torch's per-element casting loop, which does far more
        # work per element than a vectorised conversion copy followed by a same-dtype op (sub on
        # two bf16 operands would also round the difference to bf16).
        if p_blk.dtype == out.dtype and m_blk.dtype == out.dtype:
            return torch.sub(p_blk, m_blk, out=out)
        out.copy_(p_blk)
        if m_blk.dtype != out.dtype:
            m_blk = spare.copy_(m_blk)
        return out.sub_(m_blk)

    @staticmethod
    def _times_importance(d, a_blk, out):
        """``d * A`` into ``out`` (A converted by a copy first when stored in another dtype)."""
        if a_blk.dtype == out.dtype:
            return torch.mul(d, a_blk, out=out)
        return out.copy_(a_blk).mul_(d)

    def _blocked(self, plan: GroupPlan, mode: str, lam=None, scale=None):
        scratch = self._scratch(plan)
        sums, grads = [], []
        blocks = self._blocks(plan)
        for unit in self._units(plan):
            if isinstance(unit, _Run):
                got = unit.run(plan, mode, lam, scratch, sums) if mode != "grads" else None
                if got is not None:
                    grads.extend(got)
                    continue
                members = unit.members
            else:
                members = (unit,)
            for i in members:
                g = self._one(plan, i, blocks[i], mode, lam, scale, scratch, sums)
                if g is not None:
                    grads.append(g)
        if mode == "grads":
            return grads
        return (_total(sums, plan), grads) if mode == "sum_grads" else _total(sums, plan)

    def _one(self, plan, i, blocks, mode, lam, scale, scratch, sums):
        """One parameter, block by block; returns its new gradient in the grads modes."""
        t1, t2, t3 = scratch[:3]
        param = plan.params[i]
        p = param.detach()
        g, fresh = None, False
        if mode in ("grads", "sum_grads") or (mode == "accumulate" and param.grad is None):
            g, fresh = torch.empty_like(p, memory_format=torch.contiguous_format), True
        elif mode == "accumulate":
            g = param.grad
        if not p.is_contiguous() or (g is not None and not g.is_contiguous()):
            # Rare (channels_last parameters or grads): whole-tensor ops on shaped views.
            s = self.whole_tensor(plan, i, g, fresh, mode, lam, scale)
            if s is not None:
                sums.append(s)
        else:
            a_blks, m_blks = blocks
            b = self._block(plan)
            g_blks = g.view(-1).split(b) if g is not None else a_blks
            for pb, ab, mb, gb in zip(p.view(-1).split(b), a_blks, m_blks, g_blks):
                n = pb.numel()
                d = self._diff(pb, mb, t1[:n], t2[:n])
                if mode == "grads":
                    d.mul_(scale)
                    if ab.dtype == d.dtype and gb.dtype == d.dtype:
                        torch.mul(d, ab, out=gb)
                    else:
                        gb.copy_(self._times_importance(d, ab, t2[:n]))
                    continue
                u = self._times_importance(d, ab, t2[:n])
                sums.append(torch.dot(d, u))
                if fresh:
                    if gb.dtype == u.dtype:
                        torch.mul(u, lam, out=gb)
                    else:
                        gb.copy_(torch.mul(u, lam, out=t3[:n]))
                elif mode == "accumulate":
                    if gb.dtype == u.dtype:
                        gb.add_(u, alpha=lam)
                    else:  # accumulate in the compute dtype, round once
                        gb.copy_(t3[:n].copy_(gb).add_(u, alpha=lam))
        if mode in ("grads", "sum_grads"):
            return g
        if mode == "accumulate" and fresh:
            param.grad = g
        return None

    @staticmethod
    def whole_tensor(plan: GroupPlan, i: int, g, fresh: bool, mode: str, lam=None, scale=None):
        """Parameter ``i`` of ``plan`` with whole-tensor ops on its shaped views (any layout):
        the ``mode``'s update of ``g`` (``fresh``: ``g`` is new, written not read) and, except
        in "grads" mode, its sum ``A (theta - m)^2``. The fused backends' fallback for tensors
        their kernels do not take (not contiguous, or a gradient of another dtype)."""
        d = plan.params[i].detach().to(plan.compute_dtype) - plan.anchor_views[i]
        u = d * plan.importance_views[i]
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


class _Run:
    """Consecutive small parameters of a group, one block of the flat buffers (alignment gaps
    included): theta gathered into the block by one ``cat`` (zeros in the gaps, where A and m are
    zero too), one op per step of the quadratic, and the gradients updated by one multi-tensor op."""

    def __init__(self, plan: GroupPlan, members: list[int], bounds: list[tuple[int, int]]):
        self.members = tuple(members)
        self.start, self.end = bounds[members[0]][0], bounds[members[-1]][1]
        self.pieces = []  # (member index, or None for a gap; length)
        at = self.start
        for i in members:
            s, e = bounds[i]
            if s > at:
                self.pieces.append((None, s - at))
            self.pieces.append((i, e - s))
            at = e
        gap = max((n for i, n in self.pieces if i is None), default=0)
        self.zeros = torch.zeros(gap, dtype=plan.param_dtype, device=plan.device)
        self.views = None  # per member, shaped views of a scratch block (set on first use)
        self.slices = None  # the run's slices of the scratch blocks and flat buffers (first use)
        # What ``cat`` gathers theta from: flat views of the members (and zeros for the gaps),
        # made once; they hold for the plan's life (see GroupPlan). None when a member is not
        # contiguous: the run is then walked tensor by tensor.
        params = {i: plan.params[i] for i in members}
        self.theta = self._flat(params) if all(p.is_contiguous() for p in params.values()) else None

    def _member_view(self, plan: GroupPlan, block: torch.Tensor, i: int) -> torch.Tensor:
        start = plan.offsets[i] - self.start
        return block[start:start + plan.numels[i]].view(plan.importance_views[i].shape)

    def _flat(self, tensors: dict) -> list:
        return [self.zeros[:n] if i is None else tensors[i].view(-1) for i, n in self.pieces]

    def run(self, plan: GroupPlan, mode: str, lam, scratch, sums: list) -> list | None:
        """``sum``, ``accumulate`` or ``sum_grads`` for the run: appends the run's sum to ``sums``
        and returns the members' new gradients (``sum_grads``; else an empty list). None, with
        nothing added, where a member or its gradient is not contiguous: the caller then walks
        the members one by one. A missing gradient to accumulate into starts at zero (a
        parameter only the penalty reaches, or every one after ``zero_grad()``). Runs under
        ``torch.no_grad`` (the backend's entry points)."""
        pieces = self.theta
        if pieces is None:
            return None
        if mode == "accumulate":
            for i in self.members:
                p = plan.params[i]
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        targets = [plan.params[i].grad for i in self.members] if mode == "accumulate" else []
        if not all(g is not None and g.is_contiguous() and g.dtype == plan.param_dtype for g in targets):
            return None
        same = plan.param_dtype == plan.compute_dtype
        if self.slices is None:
            n = self.end - self.start
            self.slices = (scratch[0][:n], scratch[1][:n], scratch[2][:n], scratch[0][:n] if same else scratch[3][:n],
                           plan.anchor[self.start:self.end], plan.importance[self.start:self.end])
            # per member: views of u, or of the parameters'-dtype block
            self.views = [self._member_view(plan, scratch[1] if same else scratch[3], i) for i in self.members]
        theta, u, spare, gathered, m, a = self.slices
        # Gathered in the parameters' dtype, then converted by one copy: a cat that converts
        # copies its inputs one by one.
        torch.cat(pieces, out=gathered)
        if not same:
            theta.copy_(gathered)
        d = theta.sub_(m if m.dtype == theta.dtype else spare.copy_(m))
        u = torch.mul(d, a, out=u) if a.dtype == u.dtype else u.copy_(a).mul_(d)
        sums.append(torch.dot(d, u))
        if mode == "sum":
            return []
        if mode == "sum_grads":
            if same:
                return torch._foreach_mul(self.views, lam)
            gathered.copy_(torch.mul(u, lam, out=spare))
            return [v.clone(memory_format=torch.contiguous_format) for v in self.views]
        if same:
            torch._foreach_add_(targets, self.views, alpha=lam)
        else:  # accumulate in the compute dtype, round once
            torch.cat(self._flat(dict(zip(self.members, targets))), out=gathered)
            gathered.copy_(spare.copy_(gathered).add_(u, alpha=lam))
            torch._foreach_copy_(targets, self.views)
        return []


def _total(sums: list[torch.Tensor], plan: GroupPlan) -> torch.Tensor:
    if not sums:
        return torch.zeros((), dtype=plan.compute_dtype, device=plan.device)
    return torch.stack(sums).sum()
