"""``nn.Embedding``: sample n's gradient adds its output-gradient rows into the rows of the tokens
it holds (the padding row gets none).

Subclasses with a forward of their own (Hugging Face's scaled word embeddings of BART, Gemma,
M2M100 or NLLB, which multiply the looked-up rows by a scale; learned position tables that look
up positions computed from their input) still look their rows up with one ``F.embedding`` of
their weight. Their rule replays the forward on the recorded input once, for all samples,
catching that lookup (:class:`_Lookup`): the indices it was given, and, through its result made
an autograd leaf, the gradient of those rows. The plain rule then takes those.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...errors import EWCInputError
from .registry import register_rule, select_samples


def _rows(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor):
    n = A.shape[0]
    idx = A.reshape(n, -1)
    Gf = G.reshape(n, -1, m.embedding_dim)
    if m.padding_idx is not None:
        Gf = Gf * (idx != m.padding_idx).unsqueeze(-1).to(Gf.dtype)
    return n, idx, Gf


def _add_rows(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Add each sample's output-gradient rows into the rows of its tokens in ``W`` ``[n, V, dim]``
    (contiguous), in place."""
    n, idx, Gf = _rows(m, A, G)
    keys = (torch.arange(n, device=idx.device).unsqueeze(1) * m.num_embeddings + idx).reshape(-1)
    W.view(-1, m.embedding_dim).index_add_(0, keys, Gf.reshape(-1, m.embedding_dim))
    return W


def embedding_per_sample(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor) -> dict:
    table = torch.zeros(A.shape[0], m.num_embeddings, m.embedding_dim, dtype=G.dtype, device=G.device)
    return {"weight": _add_rows(m, A, G, table)}


def embedding_add_into(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor, into: dict) -> bool:
    """Add each sample's rows into its block ``into["weight"]`` ``[n, V, dim]`` (a tied weight's
    dense block from another use): no dense block of zeros for the embedding's own use."""
    W = into.get("weight")
    if W is None or not W.is_contiguous() or W.dtype != G.dtype:
        return False
    _add_rows(m, A, G, W)
    return True


def sample_token_pairs(idx: torch.Tensor, V: int):
    """The distinct (sample, token) pairs of ``idx`` ``[n, L]`` (tokens below ``V``): ``(samples,
    tokens, inverse)``, each pair once, and for each entry of ``idx`` (flattened) its pair's
    position, to add up the rows a sample looked up more than once."""
    n = idx.shape[0]
    keys = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    pairs, inv = torch.unique(keys, return_inverse=True)
    return pairs // V, pairs % V, inv


def add_by_pair(inv: torch.Tensor, count: int, rows: torch.Tensor) -> torch.Tensor:
    """``[count, dim]``: the rows ``[n, L, dim]`` added up per (sample, token) pair."""
    flat = rows.reshape(-1, rows.shape[-1])
    return torch.zeros(count, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, inv, flat)


def embedding_sq_sum(m: nn.Embedding, A: torch.Tensor, Gs: list, *, into: dict | None = None, alpha: float = 1.0,
                     picks: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> dict:
    """Group the (sample, token) pairs, sum their rows, square, and add into the table: memory
    O(tokens x dim), never O(N x V). ``into``, ``alpha``, ``picks``, ``weights``: as
    ``add_sq_sums`` describes; by default a fresh table. Added into a running sum, a step
    touches the rows of its tokens only: a vocabulary-sized table of zeros, added again, would
    cost more than the sums on a large vocabulary."""
    A, Gs = select_samples(A, Gs, picks, weights)  # indices and rows: O(tokens x dim) copies
    _, tokens, inv = sample_token_pairs(A.reshape(A.shape[0], -1), m.num_embeddings)
    table = torch.zeros_like(m.weight, dtype=Gs[0].dtype) if into is None else into["weight"]
    for G in Gs:
        table.index_add_(0, tokens, add_by_pair(inv, tokens.numel(), _rows(m, A, G)[2]).square_(), alpha=alpha)
    return {"weight": table}


def lookup_rows(m: nn.Embedding, A: torch.Tensor, Gs: list) -> tuple[torch.Tensor, list]:
    """``(indices [n, L], [rows' gradients [n, L, dim] per output gradient])``: what each sample
    looked up and the gradient of those rows (zero at the padding index), for either rule of
    this file; a tied weight's other use adds them into its own (``fastewc.fisher.rules.tied_head``)."""
    if type(m).forward is not nn.Embedding.forward:
        A, Gs = _looked_up(m, A, Gs)
    got = [_rows(m, A, G) for G in Gs]
    return got[0][1], [Gf for _, _, Gf in got]


def embedding_applies(m: nn.Embedding) -> bool:
    # max_norm renormalises the table in place during forward; scale_grad_by_freq scales by the
    # token counts of the whole batch, not of one sample: neither has a per-sample formula here.
    return m.max_norm is None and not m.scale_grad_by_freq


register_rule(nn.Embedding, embedding_per_sample, name="embedding", sq_sum=embedding_sq_sum,
              applies=embedding_applies, add_into=embedding_add_into, sequence=True, sums_into=True)


# -- subclasses with a forward of their own ---------------------------------------------------
class _Lookup(TorchFunctionMode):
    """During one call of the module's own forward: the ``F.embedding`` calls on ``weight``
    (indices and the looked-up rows, made an autograd leaf) and any other use of ``weight``
    (reading its metadata, such as its device, is no use)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.lookups: list = []
        self.other: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and len(args) > 1 and args[1] is self.weight:
            names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
            options = {**dict(zip(names, args[2:])), **kwargs}
            if options.get("max_norm") is not None or options.get("scale_grad_by_freq"):
                self.other = "F.embedding with max_norm or scale_grad_by_freq"
            rows = func(args[0], self.weight.detach(), options.get("padding_idx")).requires_grad_(True)
            self.lookups.append((args[0], options.get("padding_idx"), rows))
            return rows
        if (self.other is None and getattr(func, "__name__", "") != "__get__"
                and any(a is self.weight for a in (*args, *kwargs.values()))):
            self.other = f"{getattr(func, '__name__', func)} of the weight"
        return func(*args, **kwargs)


def _replay(m: nn.Embedding, A: torch.Tensor):
    """``(output, lookup mode)`` of the module's own forward on ``A``, its lookup caught."""
    mode = _Lookup(m.weight)
    with torch.enable_grad(), mode:
        out = type(m).forward(m, A)  # not m(A): no hook of the pass that recorded A runs again
    return out, mode


def _trouble(m: nn.Embedding, A: torch.Tensor, out, mode: _Lookup) -> str | None:
    """Why this call of the module's own forward does not suit the rule, or None."""
    if len(mode.lookups) != 1 or mode.other is not None:
        return (f"{type(m).__name__}'s forward does not look its rows up with exactly one F.embedding of its weight "
                f"({len(mode.lookups)} lookups{', and ' + mode.other if mode.other else ''})")
    idx, padding_idx, _ = mode.lookups[0]
    if padding_idx != m.padding_idx:
        return f"{type(m).__name__}'s forward looks up with padding index {padding_idx}, the module has {m.padding_idx}"
    if not isinstance(out, torch.Tensor) or idx.dim() == 0 or idx.shape[0] != A.shape[0] or out.shape[:1] != A.shape[:1]:
        return f"{type(m).__name__}'s forward looks up or returns rows without the batch axis of its input"
    return None


def own_forward_fits(m: nn.Embedding, A: torch.Tensor) -> str | None:
    """Why calls like ``m(A)`` do not suit the rule (the module-local rule then takes the module), or None."""
    out, mode = _replay(m, A)
    return _trouble(m, A, out, mode)


def _looked_up(m: nn.Embedding, A: torch.Tensor, Gs: list):
    """``(indices [n, ...], [gradient of the looked-up rows [n, ..., dim] per output gradient])``
    of the module's own forward on ``A``, from one batched replay for all of ``Gs``."""
    out, mode = _replay(m, A)
    why = _trouble(m, A, out, mode)
    if why is not None:
        raise EWCInputError(why)
    idx, _, rows = mode.lookups[0]
    grads = []
    with torch.enable_grad():
        for k, G in enumerate(Gs):
            g = torch.autograd.grad(out, rows, G.to(out.dtype), retain_graph=k < len(Gs) - 1, allow_unused=True)[0]
            grads.append(torch.zeros_like(rows) if g is None else g)
    return idx, grads


def _own_forward(m: nn.Module) -> bool:
    return (isinstance(m, nn.Embedding) and type(m).forward is not nn.Embedding.forward
            and embedding_applies(m) and not m.sparse)


def own_forward_per_sample(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor) -> dict:
    idx, (g,) = _looked_up(m, A, [G])
    return embedding_per_sample(m, idx, g)


def own_forward_sq_sum(m: nn.Embedding, A: torch.Tensor, Gs: list) -> dict:
    return embedding_sq_sum(m, *_looked_up(m, A, Gs))


def own_forward_add_into(m: nn.Embedding, A: torch.Tensor, G: torch.Tensor, into: dict) -> bool:
    idx, (g,) = _looked_up(m, A, [G])
    return embedding_add_into(m, idx, g, into)


register_rule(_own_forward, own_forward_per_sample, name="embedding (own forward)", sq_sum=own_forward_sq_sum,
              add_into=own_forward_add_into, fits=own_forward_fits)

# The per-sample functions of the rules whose uses ``lookup_rows`` serves.
ROW_LOOKUPS = (embedding_per_sample, own_forward_per_sample)
