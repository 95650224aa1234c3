"""A weight shared by a Linear layer (a language model's head) and lookups of its rows (the token
embeddings tied to it): the sum of squared per-sample gradients without a dense per-sample block.

Sample n's gradient of the weight is ``H_n + E_n``: the head's ``H_n = G_n^T A_n`` (dense, every
row of the vocabulary) plus the lookups' ``E_n``, nonzero only in the rows of the tokens the sample
holds. So

    sum_n (H_n + E_n)^2 = sum_n H_n^2 + sum_n sum_{v looked up by n} E_n[v] (2 H_n[v] + E_n[v]),

the first term the Linear rule's own sum (the fused kernel where it serves), the second one row
per (sample, token) pair: ``H_n[v]`` for those rows only, gathered from ``G_n``'s columns. Before,
each sample's ``[V, d]`` block was formed, the rows added into it, and squared: for a vocabulary
of thousands, most of the Fisher's time on the encoder-decoders.
"""

from __future__ import annotations

import torch

from .embedding import ROW_LOOKUPS, add_by_pair, sample_token_pairs
from .linear import _as_3d, linear_per_sample, sq_sum_linear
from .registry import factor_terms


def tied_uses(q: str, uses: list, site_of) -> tuple | None:
    """``(the head's use, [the lookups' uses])`` when parameter ``q``'s ``uses`` are one Linear
    rule site with ``q`` as its weight and embedding rule sites with ``q`` as their only
    parameter; else None. ``site_of(use)``: the use's site (with ``rule`` and ``params``)."""
    heads, rows = [], []
    for use in uses:
        site = site_of(use)
        rule = None if site is None else site.rule
        if rule is not None and rule.per_sample is linear_per_sample and site.params.get("weight") == q:
            heads.append(use)
        elif rule is not None and rule.per_sample in ROW_LOOKUPS and dict(site.params) == {"weight": q}:
            rows.append(use)
        else:
            return None
    return (heads[0], rows) if len(heads) == 1 and rows else None


def head_and_rows_sq_sum(A: torch.Tensor, Gs: list, lookups: list, scale=None, **kernel) -> torch.Tensor:
    """``sum_k sum_n g_nk^2`` ``[V, d]`` for a weight used by a Linear head (input ``A`` ``[n, ...,
    d]``, output gradients ``Gs[k]`` ``[n, ..., V]``, one per column of the exact Fisher) and by
    lookups ``[(indices [n, L], [rows' gradients [n, L, d] per column]), ...]`` of its rows by the
    same samples (``embedding.lookup_rows``). ``kernel``: as ``sq_sum_linear``'s.

    ``scale``: each sample's factor on ``Gs`` (a number, or a tensor ``[n]`` or 0-d), applied
    where the sums read them: a scaled copy of ``Gs``, vocabulary-wide, would cost more than the
    scaling. The lookups' rows carry their factor already."""
    alpha, weights = factor_terms(scale, A.shape[0])
    total = sq_sum_linear(A, Gs, False, alpha=alpha, weights=weights, **kernel)["weight"]
    n, V, d = A.shape[0], total.shape[0], total.shape[1]
    if n == 0 or not lookups:
        return total
    sample, row, inv = sample_token_pairs(torch.cat([i.reshape(n, -1) for i, _ in lookups], 1), V)
    # H_n[v] at the pairs: each sample's own pairs, padded to the most any sample has, in one product
    counts = torch.bincount(sample, minlength=n)
    slot = torch.arange(row.numel(), device=row.device) - (torch.cumsum(counts, 0) - counts)[sample]
    cols = torch.zeros(n, int(counts.max()), dtype=torch.long, device=row.device)
    cols[sample, slot] = row
    for k, G in enumerate(Gs):
        A3, G3 = _as_3d(A, G)
        H = torch.bmm(G3.gather(2, cols.unsqueeze(1).expand(-1, G3.shape[1], -1)).transpose(1, 2), A3)
        H = H[sample, slot].to(total.dtype)                                    # [pairs, d]
        if weights is not None:
            H = H * weights.to(H.dtype)[sample].unsqueeze(1)
        elif scale is not None:
            H = H * float(scale)
        rows = torch.cat([r[k].reshape(n, -1, d) for _, r in lookups], 1).to(total.dtype)
        E = add_by_pair(inv, row.numel(), rows)                                # E_n[v]
        total.index_add_(0, row, E * (2 * H + E))
    return total
