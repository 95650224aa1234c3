"""The test models, one module for every test folder: small models with odd sizes, BatchNorm,
frozen and tied weights, and the data for them.

Fisher tests: each ``make_*`` returns ``(model, data)`` where ``data`` is a list of batches; build in float64
with ``dtype=torch.float64``. Models are deterministic given the seed (the autouse fixture in
conftest seeds the global RNG).

Penalty tests: ``MODELS`` (by name), ``make_tasks`` (random Fisher / anchor dicts),
``perturb``, and the one set of penalty assertions: ``ref_value_and_grads`` (the reference loop's
value and gradients), ``assert_grads_close`` and ``assert_penalty_steps`` (a regularizer's forward
and ``accumulate_grad_`` against the reference loop).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def batches(*tensors, batch_size):
    """Split equally long tensors into a list of ``tuple`` batches."""
    n = tensors[0].shape[0]
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def rebatch(data, batch_size):
    """Concatenate a list of tuple/dict batches and split again with another batch size."""
    if isinstance(data[0], dict):
        keys = list(data[0])
        full = {k: torch.cat([b[k] for b in data]) for k in keys}
        n = full[keys[0]].shape[0]
        return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
    full = [torch.cat([b[j] for b in data]) for j in range(len(data[0]))]
    return batches(*full, batch_size=batch_size)


# -- models ------------------------------------------------------------------------------------

def mlp():
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 5))


class CNN(nn.Module):
    """Conv + BatchNorm (non-trivial running statistics and affine) + linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(4) * 0.5)
            self.bn.running_var.copy_(torch.rand(4) + 0.5)
            self.bn.weight.copy_(torch.rand(4) + 0.5)
            self.bn.bias.copy_(torch.randn(4) * 0.1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class Encoder(nn.Module):
    """Token embedding + TransformerEncoder (d=16, 2 heads, dropout 0.1, LayerNorm, batch_first).

    ``per_token=False``: mean-pooled classification head, logits ``[N, C]``;
    ``per_token=True``: a head per position, logits ``[N, T, C]``.
    """

    def __init__(self, vocab=13, classes=5, per_token=False):
        super().__init__()
        self.per_token = per_token
        self.emb = nn.Embedding(vocab, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = self.enc(self.emb(x))
        return self.head(h if self.per_token else h.mean(1))


class Tied(nn.Module):
    """Embedding and output head share one weight (as in language models): logits ``[N, V]``."""

    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x).mean(1))))


def frozen():
    m = mlp()
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


class Branchy(nn.Module):
    """Data-dependent Python control flow: ``vmap`` cannot transform it, the loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(13, 5)

    def forward(self, x):
        y = self.lin(x)
        if x.sum() > 0:
            return y * 2.0
        return y


class ItemCall(nn.Module):
    """Calls ``.item()`` on a tensor in forward: ``vmap`` cannot transform it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(13, 5)

    def forward(self, x):
        y = self.lin(x)
        return y * (1.0 + 0.0 * float(y.abs().max().item()))


class Mixed(nn.Module):
    """Submodules left in mixed train/eval states, with dropout and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def set_mixed(self):
        self.train()
        self.a[1].eval()
        self.b.eval()
        self.b[1].train()  # a train-mode child of an eval-mode parent
        return self

    def flags(self):
        return {n: m.training for n, m in self.named_modules()}


# -- data --------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Token embedding -> ``nn.MultiheadAttention`` -> mean-pooled 3-class head. ``inputs``:
    ``"self"`` or ``"cross"`` (keys and values from another Linear); ``mask``: ``"bool"`` /
    ``"float"`` key padding, ``"causal"``, or ``"none"``; ``weights``: ``"none"`` (not asked
    for), or the loss also uses the ``"averaged"`` / ``"per-head"`` attention weights;
    ``batch_first=False`` feeds it ``[T, N, E]`` (PyTorch's default layout). Padding token: 0."""

    def __init__(self, inputs="self", mask="bool", weights="none", batch_first=True):
        super().__init__()
        self.inputs, self.mask, self.weights, self.batch_first = inputs, mask, weights, batch_first
        self.emb = nn.Embedding(11, 8)
        self.memory = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        kv = self.memory(h).tanh() if self.inputs == "cross" else h
        if not self.batch_first:  # the Linear layers above stay batch-first; self-attention: one tensor
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
            kv = h if self.inputs == "self" else kv
        kw = {}
        if self.mask == "bool":
            kw["key_padding_mask"] = ids == 0
        elif self.mask == "float":
            kw["key_padding_mask"] = (ids == 0).to(h.dtype) * -1e4
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=h.dtype)
            kw["is_causal"] = True
        out, w = self.attn(h, kv, kv, need_weights=self.weights != "none",
                           average_attn_weights=self.weights != "per-head", **kw)
        y = self.head(out.mean(1 if self.batch_first else 0))
        if self.weights != "none":
            y = y + 0.1 * w.square().flatten(1).mean(1, keepdim=True)
        return y


class Scale(nn.Module):
    """A position-wise scale with no built-in rule: the tests register rules for it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.weight


def spy(monkeypatch, table: dict, key, real) -> list:
    """Put a spy on ``table[key]`` (one of the rule tables: records, replays, sums) calling
    ``real``; the returned list gets, per call, whether ``real`` served (returned non-None)."""
    served = []

    def call(*a):
        got = real(*a)
        served.append(got is not None)
        return got

    monkeypatch.setitem(table, key, call)
    return served


def make_mlp(n=20, batch_size=7, dtype=torch.float32):
    model = mlp().to(dtype)
    x, y = torch.randn(n, 13, dtype=dtype), torch.randint(0, 5, (n,))
    return model, batches(x, y, batch_size=batch_size)


def make_cnn(n=12, batch_size=5, dtype=torch.float32):
    model = CNN().to(dtype)
    x, y = torch.randn(n, 3, 6, 6, dtype=dtype), torch.randint(0, 3, (n,))
    return model, batches(x, y, batch_size=batch_size)


def make_encoder(n=10, batch_size=4, dtype=torch.float32, seq=6):
    model = Encoder().to(dtype)
    x, y = torch.randint(0, 13, (n, seq)), torch.randint(0, 5, (n,))
    return model, batches(x, y, batch_size=batch_size)


def make_token_encoder(n=8, batch_size=3, dtype=torch.float32, seq=5):
    """Per-token logits ``[N, T, 5]``; some targets are ``-100`` (ignored)."""
    model = Encoder(per_token=True).to(dtype)
    x, y = torch.randint(0, 13, (n, seq)), torch.randint(0, 5, (n, seq))
    y[torch.rand(n, seq) < 0.3] = -100
    y[:, 0] = torch.randint(0, 5, (n,))  # at least one real target per sample
    return model, batches(x, y, batch_size=batch_size)


def make_tied(n=12, batch_size=5, dtype=torch.float32):
    model = Tied().to(dtype)
    x, y = torch.randint(0, 11, (n, 4)), torch.randint(0, 11, (n,))
    return model, batches(x, y, batch_size=batch_size)


def make_frozen(n=15, batch_size=4, dtype=torch.float32):
    model = frozen().to(dtype)
    x, y = torch.randn(n, 13, dtype=dtype), torch.randint(0, 5, (n,))
    return model, batches(x, y, batch_size=batch_size)


MAKERS = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "encoder": make_encoder,
    "token_encoder": make_token_encoder,
    "tied": make_tied,
    "frozen": make_frozen,
}


def make_gpt2(n=6, batch_size=4, seq=8, dtype=torch.float32, attn=None):
    """Tiny random GPT-2 (no download) and dict batches with input_ids / attention_mask / labels.

    Right padding of varying length: padded positions have ``attention_mask == 0`` and label
    ``-100``. Needs ``transformers``. ``attn``: the attention implementation (``"eager"``,
    ``"sdpa"``; None = the library's default, sdpa, whose padding-mask code reads tensor values in
    Python and so cannot be vmapped).
    """
    import transformers

    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                    bos_token_id=0, eos_token_id=0)
    if attn is not None:
        config._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    assert attn is None or model.config._attn_implementation == attn
    ids = torch.randint(0, 61, (n, seq))
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):
        length = seq - (i % 3)  # 0, 1 or 2 padded positions
        mask[i, length:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    data = [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
    return model, data


# -- comparison --------------------------------------------------------------------------------

def assert_fisher_close(got, ref, rtol=1e-6, atol_rel=1e-9):
    """Same names, shapes; every entry within ``rtol`` (plus ``atol_rel`` x the tensor's largest
    entry, for entries that are sums of cancelling terms)."""
    assert set(got) == set(ref), f"names differ: extra {set(got) - set(ref)}, missing {set(ref) - set(got)}"
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite entries"
        g64, r64 = g.detach().double().cpu(), r.detach().double().cpu()
        atol = atol_rel * float(r64.abs().max()) + 1e-30
        err = (g64 - r64).abs() - rtol * r64.abs()
        worst = float(err.max())
        assert worst <= atol, f"{name}: max error beyond tolerance by {worst:.3e} (atol {atol:.3e})"


# -- penalty tests ------------------------------------------------------------------------------
MODELS = {"mlp": mlp, "cnn": CNN, "frozen": frozen, "tied": Tied}


def make_tasks(model, n_tasks, *, spread=1.0, names=None, dtype=None):
    """Random (fisher, optimal_params) dicts for every parameter (frozen ones too, as a Fisher
    estimator over all parameters would give), with anchors near the current weights."""
    tasks = []
    for _ in range(n_tasks):
        fisher, anchors = {}, {}
        for n, p in model.named_parameters():
            if names is not None and n not in names:
                continue
            f = torch.rand(p.shape, dtype=dtype or p.dtype)
            f[torch.rand(p.shape) < 0.1] = 0.0  # some exact zeros, as real Fishers have
            fisher[n] = f
            anchors[n] = (p.detach().to(dtype or p.dtype) + spread * torch.randn(p.shape, dtype=dtype or p.dtype))
        tasks.append((fisher, anchors))
    return tasks


def grads_of(model):
    """``name -> a copy of .grad`` (None where there is none)."""
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def ref_value_and_grads(model64, ref):
    """The reference's value and gradients on ``model64`` (a float64 copy of the model): ``ref`` is
    a reference-loop regularizer (a module, or a seed-style object with ``compute_penalty``)."""
    model64.zero_grad(set_to_none=True)
    v = ref(model64) if isinstance(ref, nn.Module) else ref.compute_penalty(model64)
    v.backward()
    return v.detach(), grads_of(model64)


def assert_grads_close(got, want, rtol, model):
    """``got`` (``grads_of(model)``) equals ``want`` per parameter, relative to each parameter's
    largest reference gradient; a frozen parameter of ``model`` got no gradient."""
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert got[n] is None, f"{n} is frozen but received a gradient"
            continue
        w = want[n].to(torch.float64)
        g = got[n].to(torch.float64)
        scale = w.abs().max().clamp_min(1e-30) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(scale), msg=lambda m: f"{n}: {m}")


def assert_penalty_steps(ewc, model, ref, *, handed=None, rtol=2e-5):
    """``ewc``'s forward+backward and ``accumulate_grad_`` on ``handed`` (default ``model``; e.g. a
    wrapper around it) give the value and gradients of the float64 ``ref`` (a reference-loop
    regularizer) on a float64 copy of ``model`` as it is now; a frozen parameter gets none."""
    import copy

    want_v, want_g = ref_value_and_grads(copy.deepcopy(model).double(), ref)
    target = handed if handed is not None else model
    for use_accumulate in (False, True):
        model.zero_grad(set_to_none=True)
        if use_accumulate:
            v = ewc.accumulate_grad_(target)
        else:
            v = ewc(target)
            v.backward()
        torch.testing.assert_close(v.detach().double(), want_v, rtol=rtol, atol=0)
        assert_grads_close(grads_of(model), want_g, rtol, model)


def register_both(ewc, ref, tasks, model=None):
    """Register every ``(fisher, anchor)`` of ``tasks`` on ``ewc`` (with ``model=`` when given) and
    on the reference-loop regularizer ``ref``; returns ``(ewc, ref)``."""
    for f, a in tasks:
        if model is None:
            ewc.register_task(f, a)
        else:
            ewc.register_task(f, a, model=model)
        ref.register_task(f, a)
    return ewc, ref


def perturb(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def hf_batches(n, seq, vocab, labels, *, batch_size, num_labels=3, seed=0):
    """Right-padded dict batches (input_ids, attention_mask, labels) of varying lengths.

    ``labels``: ``"lm"`` (the input ids, -100 on padding), ``"cls"`` (one class per sequence),
    ``"multi"`` (float multi-label targets), ``"reg"`` (one float per sequence), ``"tok"`` (a
    class per position, -100 on padding) or None."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    lengths = seq - torch.arange(n) % 3                     # 0, 1 or 2 padded positions
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    full = {"input_ids": ids, "attention_mask": mask}
    if labels == "lm":
        full["labels"] = ids.masked_fill(mask == 0, -100)
    elif labels == "cls":
        full["labels"] = torch.randint(0, num_labels, (n,), generator=g)
    elif labels == "multi":
        full["labels"] = (torch.rand(n, num_labels, generator=g) > 0.5).float()
    elif labels == "reg":
        full["labels"] = torch.randn(n, generator=g)
    elif labels == "tok":
        full["labels"] = torch.randint(0, num_labels, (n, seq), generator=g).masked_fill(mask == 0, -100)
    return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]


def causal_lm_loss_fp64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' causal-LM loss without its upcast: a float64 model keeps float64 (their
    ``logits.float()`` would round a float64 model's loss to float32)."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    red = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shifted, ignore_index=ignore_index, reduction=red)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def hf_model(name, dtype=torch.float64, **overrides):
    """Tiny Hugging Face models built from config (no download), default attention."""
    import transformers as T

    if name.startswith("bert"):
        cfg = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                   max_position_embeddings=16, num_labels=3)
        cfg.update(overrides)
        cls = {"bert": T.BertForSequenceClassification, "bert_tok": T.BertForTokenClassification,
               "bert_mlm": T.BertForMaskedLM}[name]
        model = cls(T.BertConfig(**cfg))
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                               bos_token_id=0, eos_token_id=0, **overrides))
    elif name == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0, **overrides))
    elif name == "opt":
        # its decoder layers' feed-forward block and final norm take the batch's tokens as rows, [N*T, d]
        model = T.OPTForCausalLM(T.OPTConfig(vocab_size=40, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=1, **overrides))
    elif name == "gemma":
        # a scaled word embedding (an nn.Embedding subclass with its own forward) tied to the head
        model = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=4, max_position_embeddings=16, bos_token_id=1,
                                                 eos_token_id=2, pad_token_id=0, **overrides))
    else:
        raise ValueError(name)
    return model.to(dtype).eval()


def dist_model() -> nn.Module:
    """The small float64 MLP the multi-process tests train on every rank (same seed: same weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4)).double()


def dist_data(n: int):
    """``n`` float64 samples for ``dist_model`` and their labels, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
