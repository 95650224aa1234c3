"""The registry of per-layer Fisher rules, and :func:`register_rule` to add one.

A rule turns what one batched forward and backward recorded for a module, its input ``A``
(``[N, ...]``, the first positional argument) and the gradient ``G`` of the summed per-sample
losses w.r.t. its output (``[N, ...]``), into the per-sample gradients of the module's own
parameters. This is exact because ``G[n]`` is the gradient of sample ``n``'s loss alone: in eval
mode a sample's loss depends on that sample only (the engine checks it on a probe).

* ``per_sample(module, A, G) -> {attr: [n, *param.shape]}`` (required): the per-sample
  gradients of a chunk of samples. The engine picks the chunk so that the blocks stay small,
  squares and sums them, and adds up the blocks of every use of a shared or tied parameter
  before squaring.
* ``sq_sum(module, A, [G_1, ..., G_K]) -> {attr: sum_k sum_n g_nk^2}`` (optional): a faster
  route to the sum of squares when the parameter has no other use (``K > 1`` for the exact
  Fisher's columns). A Linear layer without a sequence axis, for example, needs no per-sample
  gradient at all.
* ``add_into(module, A, G, {attr: block [n, *param.shape]}) -> bool`` (optional): add this use's
  per-sample gradients into the blocks another use of a shared parameter formed, in place
  (True when it did). For gradients that are mostly zeros (an embedding's rows of the tokens a
  sample holds, added into a tied LM head's dense block) this avoids a dense block of zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

PerSample = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict]
SqSum = Callable[[nn.Module, torch.Tensor, list], dict]
AddInto = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], bool]

# A rule that forms per-sample gradients keeps one chunk's block under this many bytes: blocks of
# a few tens of MB stay cheap to allocate and to stream through twice (written, then squared and
# summed); see benchmarks/results/ for the Fisher timings by chunk size.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Rule:
    """A per-layer rule: see the module docstring for ``per_sample`` and ``sq_sum``."""

    name: str
    per_sample: PerSample
    sq_sum: SqSum | None = None
    applies: Callable[[nn.Module], bool] | None = None   # configuration check (None: always)
    add_into: AddInto | None = None
    sequence: bool = False   # per_sample / sq_sum take A [n, ..., d] with any axes between n and d
    fits: Callable[[nn.Module, torch.Tensor], "str | None"] | None = None   # a recorded call's check
    sums_into: bool = False  # sq_sum takes into=, alpha=, picks= and weights= (see add_sq_sums)


_BY_TYPE: dict[type, Rule] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_rule(module_type, per_sample: PerSample | None = None, *, name: str | None = None,
                  sq_sum: SqSum | None = None, applies: Callable[[nn.Module], bool] | None = None,
                  add_into: AddInto | None = None, sequence: bool = False, fits=None, sums_into: bool = False):
    """Register a Fisher rule for a module type (or for every module a predicate accepts).

    Use as a decorator on the per-sample function, or call with it::

        @fastewc.register_rule(MyScale)
        def my_scale(module, A, G):          # A: input [n, ..., d]; G: output gradient, same shape
            return {"weight": (G * A).reshape(A.shape[0], -1, A.shape[-1]).sum(1)}   # [n, d]

    Args:
        module_type: an ``nn.Module`` subclass (its subclasses are covered too, unless they
            override ``forward``), or a predicate ``f(module) -> bool``.
        per_sample: ``f(module, A, G) -> {attr: tensor [n, *param.shape]}`` for a chunk of ``n``
            samples; ``attr`` is the parameter's name in the module (``"weight"``).
        name: the rule's name in reports (default: the function's name).
        sq_sum: optional ``f(module, A, [G_1..G_K]) -> {attr: sum over samples and columns of
            the squared per-sample gradients}``.
        applies: optional ``f(module) -> bool``: configurations the rule covers (others get
            the module-local rule).
        add_into: optional ``f(module, A, G, {attr: block}) -> bool``: add the per-sample
            gradients into existing blocks ``[n, *param.shape]`` of a shared parameter in place.
        sequence: True when ``per_sample`` and ``sq_sum`` accept inputs with any number of
            axes between the samples and the features (``[n, T, d]``, ``[n, k, T, d]``), as a
            Linear rule does, the layer acting on each position alike (a sample's gradient is
            the sum over its positions: a module called several times is summed as one call
            over every call's positions). A module fed the batch flattened with another axis (``[n*k, d]``)
            then gets ``A`` viewed as ``[n, k, d]``; otherwise its rule runs on the rows and
            each sample's ``k`` row gradients are added up.
        fits: optional ``f(module, A) -> None or why not``: whether calls on inputs like ``A``
            (one sample's) suit the rule, for what only a call shows (a subclass's own
            forward); where one does not, the module-local rule takes the module.
        sums_into: True when ``sq_sum`` also takes keywords ``into={attr: running sum}``,
            ``alpha``, ``picks`` and ``weights``, adds ``alpha`` times its sums into those
            tensors in place (for the attributes given only), over the samples ``picks`` only
            (int64 indices, None: all), each sample's gradient scaled by its entry of
            ``weights`` (None: 1), and returns them: no sums are formed in memory and added
            again (``FisherTracker`` adds every step into its running sums this way).

    Later registrations take precedence. The rule is proven against the per-sample loop on a
    probe of the first samples before it is used, like the built-in ones.
    """
    if per_sample is None:
        return lambda fn: register_rule(module_type, fn, name=name, sq_sum=sq_sum, applies=applies,
                                        add_into=add_into, sequence=sequence, fits=fits,
                                        sums_into=sums_into) or fn
    if not callable(per_sample):
        raise TypeError(f"register_rule: per_sample must be callable, got {type(per_sample).__name__}")
    if sums_into and sq_sum is None:
        raise TypeError("register_rule: sums_into=True needs the sq_sum it describes")
    rule = Rule(name or getattr(per_sample, "__name__", "rule"), per_sample, sq_sum, applies, add_into, sequence,
                fits, sums_into)
    if isinstance(module_type, type):
        if not issubclass(module_type, nn.Module):
            raise TypeError(f"register_rule: {module_type.__name__} is not an nn.Module subclass")
        _BY_TYPE[module_type] = rule
    elif callable(module_type):
        _BY_PREDICATE.insert(0, (module_type, rule))
    else:
        raise TypeError(f"register_rule: expected an nn.Module subclass or a predicate, got {module_type!r}")
    return None


def unregister_rule(module_type) -> None:
    """Remove what :func:`register_rule` registered for ``module_type`` (a type or the same predicate)."""
    if isinstance(module_type, type):
        _BY_TYPE.pop(module_type, None)
    else:
        _BY_PREDICATE[:] = [(p, r) for p, r in _BY_PREDICATE if p is not module_type]


def rule_for(m: nn.Module) -> tuple[Rule | None, str]:
    """``(rule, "")`` for module ``m``, or ``(None, why not)``."""
    for pred, rule in _BY_PREDICATE:
        if pred(m) and (rule.applies is None or rule.applies(m)):
            return rule, ""
    for cls in type(m).__mro__:
        rule = _BY_TYPE.get(cls)
        if rule is None:
            continue
        if type(m).forward is not cls.forward:  # a subclass that computes something else
            return None, f"no rule for {type(m).__name__}"
        if rule.applies is not None and not rule.applies(m):
            return None, f"no rule for {type(m).__name__} in this configuration"
        return rule, ""
    return None, f"no rule for {type(m).__name__}"


def chunks(n: int, per_sample_bytes: int, budget: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """``[(i, j), ...]`` covering ``0..n`` in chunks whose blocks stay under ``budget`` bytes."""
    step = max(1, budget // max(1, per_sample_bytes))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


# Per-sample blocks of at least this many elements are squared one sample at a time on the CPU
# (add_squares); below it a chunk's squared copy stays in cache and one reduction is faster.
_CPU_ROW_SQUARES = 2**15


def add_squares(total: torch.Tensor, b: torch.Tensor) -> None:
    """``total += (b ** 2).sum(0)``: the squares of per-sample blocks ``b`` ``[n, *shape]`` summed
    into ``total`` ``[*shape]``, without writing over ``b`` (it may share memory with a gradient).

    On the CPU a squared copy of a large block costs more than the squares: the copy lands in
    freshly mapped pages that the kernel must fault in and zero, so large per-sample gradients
    are squared into the sum one sample at a time instead. On other devices the allocator
    reuses memory and one squared copy, reduced over the samples, is fewer kernel launches.
    """
    if b.shape[0] <= 4 or (b.device.type == "cpu" and b[0].numel() >= _CPU_ROW_SQUARES):
        for one in b.unbind(0):
            total.addcmul_(one, one)
    else:
        total.add_(b.square().sum(0))


def factor_terms(factor, n: int) -> tuple[float, torch.Tensor | None]:
    """``(alpha, weights)`` that apply ``factor``, each sample's multiplier on its output
    gradients, where the sums read them: a number squares into ``alpha`` (1.0 for None); a
    tensor (``[n]``, or 0-d for one factor held on its device, such as a loss scaler's) becomes
    one weight per sample, with no host read of its value and no scaled copy of the gradients."""
    if factor is None:
        return 1.0, None
    if isinstance(factor, torch.Tensor):
        return 1.0, factor.reshape(1).expand(n) if factor.dim() == 0 else factor
    return float(factor) ** 2, None


def select_samples(A: torch.Tensor, Gs: list, picks: torch.Tensor | None, weights: torch.Tensor | None):
    """``(A, Gs)`` for the samples ``picks`` only (default all), each output gradient scaled by
    its sample's weight (default 1): copies."""
    if picks is not None:
        A, Gs = A.index_select(0, picks), [G.index_select(0, picks) for G in Gs]
    if weights is not None:
        Gs = [G * weights.to(G.dtype).view(-1, *([1] * (G.dim() - 1))) for G in Gs]
    return A, Gs


def add_sq_sums(rule: Rule, m: nn.Module, A: torch.Tensor, Gs: list, totals: dict, alpha: float = 1.0,
                picks: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
    """``totals[attr] += alpha * sum_k sum_n g^2`` in place for the attributes ``totals`` holds,
    over the samples ``picks`` of ``A`` and ``Gs`` (default all), each sample's gradient scaled
    by its entry of ``weights`` (default 1): through the rule's ``sq_sum`` itself where it adds
    into running sums (``sums_into``, and sums of the gradients' dtype), else its sums added."""
    if rule.sums_into and all(t.dtype == Gs[0].dtype and t.is_contiguous() for t in totals.values()):
        rule.sq_sum(m, A, Gs, into=totals, alpha=alpha, picks=picks, weights=weights)
        return
    got = sq_sum_of(rule, m, *select_samples(A, Gs, picks, weights))
    for attr, t in totals.items():
        t.add_(got[attr].to(t.dtype), alpha=alpha)


def sq_sum_of(rule: Rule, m: nn.Module, A: torch.Tensor, Gs: list) -> dict:
    """``{attr: sum_k sum_n g^2}``: the rule's ``sq_sum``, or its per-sample blocks squared and
    summed chunk by chunk."""
    if rule.sq_sum is not None:
        return rule.sq_sum(m, A, Gs)
    n = A.shape[0]
    per = sum(p.numel() for p in m.parameters(recurse=False)) * A.element_size()
    out: dict = {}
    for G in Gs:
        for i, j in chunks(n, per):
            for attr, b in rule.per_sample(m, A[i:j], G[i:j]).items():
                if attr not in out:
                    out[attr] = torch.zeros(b.shape[1:], dtype=b.dtype, device=b.device)
                add_squares(out[attr], b)
    return out
