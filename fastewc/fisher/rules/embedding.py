"""``nn.Embedding``: sample n's gradient adds its output-gradient rows into the rows of the tokens
it holds (the padding row gets none)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_rule


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


def embedding_sq_sum(m: nn.Embedding, A: torch.Tensor, Gs: list) -> dict:
    """Group the (sample, token) pairs, sum their rows, square, and add into the table: memory
    O(tokens x dim), never O(N x V)."""
    n, V = A.shape[0], m.num_embeddings
    idx = A.reshape(n, -1)
    keys = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    uniq, inv = torch.unique(keys, return_inverse=True)
    rows = uniq % V
    table = torch.zeros_like(m.weight, dtype=Gs[0].dtype)
    for G in Gs:
        _, _, Gf = _rows(m, A, G)
        Gf = Gf.reshape(-1, m.embedding_dim)
        per_pair = torch.zeros(uniq.numel(), m.embedding_dim, dtype=Gf.dtype, device=Gf.device).index_add_(0, inv, Gf)
        table.index_add_(0, rows, per_pair.square_())
    return {"weight": table}


def embedding_applies(m: nn.Embedding) -> bool:
    # max_norm renormalises the table in place during forward; scale_grad_by_freq scales by the
    # token counts of the whole batch, not of one sample: neither has a per-sample formula here.
    return m.max_norm is None and not m.scale_grad_by_freq


register_rule(nn.Embedding, embedding_per_sample, name="embedding", sq_sum=embedding_sq_sum,
              applies=embedding_applies, add_into=embedding_add_into, sequence=True)
