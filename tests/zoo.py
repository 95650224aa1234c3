"""The model zoo of the differential harness: tiny models of every family fastewc claims to
handle, built from config in float64 (random weights, no download), with their data, and the
comparison of ``fastewc.estimate_fisher`` against the reference per-sample loop.

Shared by ``tests/fisher/test_zoo.py`` (a mismatch fails the run) and
``benchmarks/fisher_zoo.py`` (the table and its JSON), so both judge the same cases.

A case's error is, per tensor, ``max |fast - ref| / max(max |ref|, 1e-9 x the model's largest
entry)``: relative to the tensor's own largest entry, since a Fisher spans many decades within a
tensor, and floored because some tensors (attention key biases) have a Fisher of zero in theory
and rounding noise in practice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fastewc
from fastewc import reference as R

D = torch.float64
N = 4          # samples per case: enough for two batches, few enough for the reference loop
SEQ = 7        # source tokens; padded batches drop 0, 1 or 2 of them per sample
TGT = 5        # decoder tokens of the encoder-decoders: not SEQ, so that a mix-up cannot pass
VOCAB = 40
TOL = 1e-8
# Parts computed in float32 inside a float64 model carry float32 rounding (~1e-7) into the
# per-sample gradients, whatever the method: the reference loop has it too, but not the same.
TOL_FP32 = 1e-6
WHY_RMSNORM = "RMSNorm computes in float32"


@dataclass
class Case:
    name: str
    build: Callable[[bool], tuple]   # padded -> (model, data)
    kinds: tuple = ("empirical", "sampled", "exact")
    paddings: tuple = (True, False)  # (False,) for inputs without padding (images, tuples)
    top_k: int | None = None         # for kind "exact" on large vocabularies
    fp32: dict = field(default_factory=dict)   # kind (or "*") -> why the tolerance is TOL_FP32

    def tol(self, kind: str) -> tuple[float, str]:
        why = self.fp32.get(kind) or self.fp32.get("*")
        return (TOL_FP32, why) if why else (TOL, "")


# -- data ----------------------------------------------------------------------------------------
def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def text(labels: str | None, padded: bool, *, n=N, seq=SEQ, vocab=None, num_labels=3, batch_size=3, seed=0):
    """Right-padded (``padded``) dict batches: input_ids, attention_mask and labels ``"cls"``
    (one class per sequence), ``"tok"`` (one per position), ``"lm"`` (the ids) or None;
    padding has label -100. Batches of 3: two batches of unequal size."""
    g = _gen(seed)
    vocab = vocab or SIZE.vocab
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    lengths = seq - (torch.arange(n) % 3 if padded else torch.zeros(n, dtype=torch.long))
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    full = {"input_ids": ids, "attention_mask": mask}
    if labels == "cls":
        full["labels"] = torch.randint(0, num_labels, (n,), generator=g)
    elif labels == "tok":
        full["labels"] = torch.randint(0, num_labels, (n, seq), generator=g).masked_fill(mask == 0, -100)
    elif labels == "lm":
        full["labels"] = ids.masked_fill(mask == 0, -100)
    return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]


def seq2seq(padded: bool, *, n=N, vocab=None, batch_size=3, seq=SEQ, tgt=TGT):
    """Source of ``seq`` tokens, targets of ``tgt`` tokens; padded: source and target padding (-100)."""
    vocab = vocab or SIZE.vocab
    data = text(None, padded, n=n, seq=seq, vocab=vocab, batch_size=n)
    full = data[0]
    g = _gen(1)
    labels = torch.randint(3, vocab, (n, tgt), generator=g)
    if padded:
        lengths = tgt - torch.arange(n) % 3
        labels = labels.masked_fill(torch.arange(tgt)[None] >= lengths[:, None], -100)
    full["labels"] = labels
    return [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]


def images(n=N, size=None, channels=3, classes=3, batch_size=3):
    g = _gen(2)
    size = size or SIZE.image
    x = torch.randn(n, channels, size, size, generator=g, dtype=D)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"pixel_values": x[i : i + batch_size], "labels": y[i : i + batch_size]} for i in range(0, n, batch_size)]


def tuples(x, y, batch_size=3):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


# -- models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """The shape of the zoo's models. The tests use the tiny default; the speed benchmark
    (``benchmarks/fisher_zoo_speed.py``) sets :data:`SIZE` to a wider one, where the work per
    sample rather than per call decides the time."""

    width: int = 16
    ffn: int = 24
    layers: int = 2
    heads: int = 2
    vocab: int = VOCAB
    positions: int = 32
    image: int = 16
    patch: int = 8
    window: int = 2      # Swin's attention window (in patches of 4 pixels)


SIZE = Size()
SMALL = Size(width=128, ffn=512, layers=2, heads=4, vocab=2000, positions=128, image=32, patch=8, window=4)


def _T():
    import transformers

    return transformers


def _hf(model):
    return model.to(D).eval()


def _small(**extra):
    """The shape every text transformer of the zoo shares (:data:`SIZE`)."""
    S = SIZE
    return dict(vocab_size=S.vocab, hidden_size=S.width, num_hidden_layers=S.layers, num_attention_heads=S.heads,
                intermediate_size=S.ffn, max_position_embeddings=S.positions, **extra)


def bert(padded):
    T = _T()
    return _hf(T.BertForSequenceClassification(T.BertConfig(**_small(num_labels=3)))), text("cls", padded)


def roberta(padded):
    T = _T()
    cfg = T.RobertaConfig(**_small(num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2))
    return _hf(T.RobertaForTokenClassification(cfg)), text("tok", padded)


def distilbert(padded):
    T = _T()
    S = SIZE
    cfg = T.DistilBertConfig(vocab_size=S.vocab, dim=S.width, n_layers=S.layers, n_heads=S.heads, hidden_dim=S.ffn,
                             max_position_embeddings=S.positions, num_labels=3)
    return _hf(T.DistilBertForSequenceClassification(cfg)), text("cls", padded)


def albert(padded):
    T = _T()
    cfg = T.AlbertConfig(**_small(embedding_size=SIZE.width // 2, num_labels=3, num_hidden_groups=1))  # one layer, shared
    return _hf(T.AlbertForSequenceClassification(cfg)), text("cls", padded)


def electra(padded):
    T = _T()
    cfg = T.ElectraConfig(**_small(embedding_size=SIZE.width // 2))
    return _hf(T.ElectraForMaskedLM(cfg)), text("lm", padded)


def bigbird(padded):
    """BigBird with full attention: its embeddings add the position table in place
    (``embeddings += position_embeddings``)."""
    T = _T()
    cfg = T.BigBirdConfig(**_small(num_labels=3, attention_type="original_full"))
    return _hf(T.BigBirdForSequenceClassification(cfg)), text("cls", padded)


def funnel(padded):
    """Funnel Transformer: relative-position attention whose scores are masked in place after a
    reshape (``positional_attn *= cls_mask``), and a pooled second block."""
    T = _T()
    cfg = T.FunnelConfig(vocab_size=SIZE.vocab, block_sizes=[1, 1], d_model=SIZE.width, n_head=SIZE.heads, d_head=8,
                         d_inner=SIZE.ffn, num_labels=3)
    return _hf(T.FunnelForSequenceClassification(cfg)), text("cls", padded)


def deberta(padded):
    """DeBERTa-v2 with relative attention: its position projections apply to a table without a
    batch axis, ``[1, 2k, d]``, repeated over a batch folded with the heads into ``[N*heads, ...]``
    rows. ``problem_type`` set: without it the model takes its loss in float32."""
    T = _T()
    cfg = T.DebertaV2Config(**_small(num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                     max_relative_positions=-1, type_vocab_size=0, pad_token_id=0,
                                     problem_type="single_label_classification"))
    return _hf(T.DebertaV2ForSequenceClassification(cfg)), text("cls", padded)


def deberta_v3(padded):
    """DeBERTa-v3's configuration: the position table normalised by a LayerNorm, and each layer's
    query and key projections applied both to the hidden states and to that table
    (``share_att_key``), with log-bucketed relative positions."""
    T = _T()
    cfg = T.DebertaV2Config(**_small(num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                     position_buckets=4, share_att_key=True, norm_rel_ebd="layer_norm",
                                     max_relative_positions=-1, type_vocab_size=0, pad_token_id=0))
    return _hf(T.DebertaV2ForTokenClassification(cfg)), text("tok", padded)


def _lm(cls_name, cfg_name, cfg: Callable[[], dict]):
    def build(padded):
        T = _T()
        return _hf(getattr(T, cls_name)(getattr(T, cfg_name)(**cfg()))), text("lm", padded)
    return build


def _llama_like():
    return dict(**_small(num_key_value_heads=1), bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _half_layers():
    """Layers of each stack of an encoder-decoder or a vision transformer."""
    return max(1, SIZE.layers // 2)


gpt2 = _lm("GPT2LMHeadModel", "GPT2Config", lambda: dict(
    vocab_size=SIZE.vocab, n_embd=SIZE.width, n_layer=SIZE.layers, n_head=SIZE.heads, n_positions=SIZE.positions,
    bos_token_id=0, eos_token_id=0))
gpt_neox = _lm("GPTNeoXForCausalLM", "GPTNeoXConfig", lambda: dict(**_small(), bos_token_id=1, eos_token_id=2))
llama = _lm("LlamaForCausalLM", "LlamaConfig", _llama_like)
mistral = _lm("MistralForCausalLM", "MistralConfig", _llama_like)
qwen2 = _lm("Qwen2ForCausalLM", "Qwen2Config", _llama_like)
phi = _lm("PhiForCausalLM", "PhiConfig", lambda: dict(**_small(), bos_token_id=1, eos_token_id=2, pad_token_id=0))
opt = _lm("OPTForCausalLM", "OPTConfig", lambda: dict(
    vocab_size=SIZE.vocab, hidden_size=SIZE.width, num_hidden_layers=SIZE.layers, num_attention_heads=SIZE.heads,
    ffn_dim=SIZE.ffn, max_position_embeddings=SIZE.positions, word_embed_proj_dim=SIZE.width,
    pad_token_id=1, bos_token_id=2, eos_token_id=2))


def t5(padded):
    T, S = _T(), SIZE
    cfg = T.T5Config(vocab_size=S.vocab, d_model=S.width, d_kv=S.width // S.heads, d_ff=S.ffn, num_layers=_half_layers(),
                     num_decoder_layers=_half_layers(), num_heads=S.heads, relative_attention_num_buckets=8,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _hf(T.T5ForConditionalGeneration(cfg)), seq2seq(padded)


def bart(padded):
    T, S = _T(), SIZE
    cfg = T.BartConfig(vocab_size=S.vocab, d_model=S.width, encoder_layers=_half_layers(), decoder_layers=_half_layers(),
                       encoder_attention_heads=S.heads, decoder_attention_heads=S.heads, encoder_ffn_dim=S.ffn,
                       decoder_ffn_dim=S.ffn, max_position_embeddings=S.positions, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, decoder_start_token_id=2)
    return _hf(T.BartForConditionalGeneration(cfg)), seq2seq(padded)


def marian(padded):
    """MarianMT: an encoder-decoder whose class is not named ``...ForConditionalGeneration``
    (its head is found from what it is, not from its name), with sinusoidal positions."""
    T, S = _T(), SIZE
    cfg = T.MarianConfig(vocab_size=S.vocab, d_model=S.width, encoder_layers=_half_layers(),
                         decoder_layers=_half_layers(), encoder_attention_heads=S.heads,
                         decoder_attention_heads=S.heads, encoder_ffn_dim=S.ffn, decoder_ffn_dim=S.ffn,
                         max_position_embeddings=S.positions, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1)
    return _hf(T.MarianMTModel(cfg)), seq2seq(padded)


def _vision(cls_name, cfg_name, cfg: Callable[[], dict]):
    def build(padded):
        T = _T()
        return _hf(getattr(T, cls_name)(getattr(T, cfg_name)(num_labels=3, **cfg()))), images()
    return build


def _vit_like():
    S = SIZE
    return dict(image_size=S.image, patch_size=S.patch, hidden_size=S.width, num_hidden_layers=_half_layers(),
                num_attention_heads=S.heads, intermediate_size=S.ffn)


vit = _vision("ViTForImageClassification", "ViTConfig", _vit_like)
deit = _vision("DeiTForImageClassification", "DeiTConfig", _vit_like)
swin = _vision("SwinForImageClassification", "SwinConfig", lambda: dict(
    image_size=SIZE.image, patch_size=4, embed_dim=SIZE.width // 2, depths=[1, 1],
    num_heads=[max(1, SIZE.heads // 2), SIZE.heads], window_size=SIZE.window))
swinv2 = _vision("Swinv2ForImageClassification", "Swinv2Config", lambda: dict(
    image_size=SIZE.image, patch_size=4, embed_dim=SIZE.width // 2, depths=[1, 1],
    num_heads=[max(1, SIZE.heads // 2), SIZE.heads], window_size=SIZE.window))  # a position-bias MLP
convnext = _vision("ConvNextForImageClassification", "ConvNextConfig", lambda: dict(
    hidden_sizes=[SIZE.width // 2, SIZE.width], depths=[1, 1], num_stages=2, patch_size=4))
resnet = _vision("ResNetForImageClassification", "ResNetConfig", lambda: dict(
    embedding_size=SIZE.width // 2, hidden_sizes=[SIZE.width // 2, SIZE.width], depths=[1, 1], layer_type="basic"))


def wav2vec2(padded):
    T = _T()
    cfg = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                           conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                           num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=8, vocab_size=VOCAB)
    g = _gen(3)
    x, y = torch.randn(N, 200, generator=g, dtype=D), torch.randint(0, 3, (N,), generator=g)
    data = [{"input_values": x[i : i + 3], "labels": y[i : i + 3]} for i in range(0, N, 3)]
    return _hf(T.Wav2Vec2ForSequenceClassification(cfg)), data


def whisper(padded):
    """Whisper: an audio encoder (two convolutions over log-mel frames) and a text decoder. Given
    labels, the model shifts them into its decoder's inputs inside its forward (it has no
    ``prepare_decoder_input_ids_from_labels``)."""
    T, S = _T(), SIZE
    cfg = T.WhisperConfig(vocab_size=S.vocab, num_mel_bins=8, encoder_layers=_half_layers(),
                          decoder_layers=_half_layers(), encoder_attention_heads=S.heads,
                          decoder_attention_heads=S.heads, encoder_ffn_dim=S.ffn, decoder_ffn_dim=S.ffn,
                          d_model=S.width, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=None,
                          begin_suppress_tokens=None)
    x = torch.randn(N, 8, 16, generator=_gen(7), dtype=D)  # [N, mel bins, 2 * max_source_positions frames]
    labels = torch.cat([b["labels"] for b in seq2seq(padded)])
    data = [{"input_features": x[i : i + 3], "labels": labels[i : i + 3]} for i in range(0, N, 3)]
    return _hf(T.WhisperForConditionalGeneration(cfg)), data


class RNNClassifier(nn.Module):
    """Embedding -> batch-first LSTM / GRU -> the last step's hidden state -> Linear."""

    def __init__(self, cell):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 12, num_layers=1, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


def _rnn(cell):
    def build(padded):
        g = _gen(4)
        x, y = torch.randint(0, VOCAB, (N, SEQ), generator=g), torch.randint(0, 3, (N,), generator=g)
        return RNNClassifier(cell).to(D).eval(), tuples(x, y)
    return build


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (batch first) with a per-token head: logits ``[N, T, C]``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def torch_encoder(padded):
    g = _gen(5)
    x, y = torch.randint(0, VOCAB, (N, SEQ), generator=g), torch.randint(0, 3, (N, SEQ), generator=g)
    if padded:  # ignored targets, as padding gives them
        y[torch.arange(SEQ)[None] >= (SEQ - torch.arange(N) % 3)[:, None]] = -100
    return TorchEncoder().to(D).eval(), tuples(x, y)


class Checkpointed(nn.Module):
    """Blocks under ``checkpoint(use_reentrant=False)``, called whatever the training flag."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = h + checkpoint(b, h, use_reentrant=False)
        return self.head(h.mean(1))


def checkpointed(padded):
    g = _gen(6)
    x, y = torch.randint(0, VOCAB, (N, SEQ), generator=g), torch.randint(0, 3, (N,), generator=g)
    return Checkpointed().to(D).train(), tuples(x, y)


def llama_checkpointing(padded):
    """Hugging Face gradient checkpointing, left on and the model in training mode, as a user
    would hand it over mid-training (estimate_fisher runs it in eval mode)."""
    model, data = llama(padded)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), data


def _lora(task_type):
    def build(padded):
        import peft

        model, data = llama(padded)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                              task_type=task_type, init_lora_weights=False)  # B != 0: a Fisher that is not 0
        return peft.get_peft_model(model, cfg).to(D).eval(), data
    return build


_RMS = {"*": WHY_RMSNORM}
# Every parameter of every case goes by rules under method "auto" (the coverage test checks it).
CASES = [
    Case("bert", bert),
    Case("roberta", roberta),
    Case("distilbert", distilbert),
    Case("albert", albert),
    Case("electra", electra, top_k=2),
    Case("bigbird", bigbird),
    Case("funnel", funnel, fp32={"exact": "Funnel's attention takes its scores' softmax in float32"}),
    Case("deberta", deberta),
    Case("deberta_v3", deberta_v3),
    Case("gpt2", gpt2, top_k=2),
    Case("gpt_neox", gpt_neox, top_k=2),
    Case("llama", llama, top_k=2, fp32=_RMS),
    Case("mistral", mistral, top_k=2, fp32=_RMS),
    Case("qwen2", qwen2, top_k=2, fp32=_RMS),
    Case("phi", phi, top_k=2),
    Case("opt", opt, top_k=2),
    Case("t5", t5, top_k=2, fp32={"*": "T5LayerNorm computes in float32"}),
    Case("bart", bart, top_k=2),
    Case("marian", marian, top_k=2),
    Case("vit", vit, paddings=(False,)),
    Case("deit", deit, paddings=(False,)),
    Case("swin", swin, paddings=(False,)),
    Case("swinv2", swinv2, paddings=(False,)),
    Case("convnext", convnext, paddings=(False,)),
    Case("resnet", resnet, paddings=(False,)),
    Case("wav2vec2", wav2vec2, paddings=(False,)),
    Case("whisper", whisper, top_k=2),
    Case("lstm", _rnn(nn.LSTM), paddings=(False,)),
    Case("gru", _rnn(nn.GRU), paddings=(False,)),
    Case("torch_encoder", torch_encoder),
    Case("checkpoint", checkpointed, paddings=(False,)),
    Case("llama_gradient_checkpointing", llama_checkpointing, top_k=2, fp32=_RMS),
    Case("lora_causal_lm", _lora("CAUSAL_LM"), top_k=2, fp32=_RMS),
    Case("lora_no_task_type", _lora(None), top_k=2, fp32=_RMS),
]
BY_NAME = {c.name: c for c in CASES}


# -- the comparison ------------------------------------------------------------------------------
def relative_errors(got: dict, ref: dict) -> dict[str, float]:
    """Per tensor: max abs difference over the tensor's largest reference entry, that largest
    entry floored at 1e-9 of the model's largest (module docstring)."""
    assert set(got) == set(ref), f"names differ: extra {set(got) - set(ref)}, missing {set(ref) - set(got)}"
    largest = max(float(r.abs().max()) for r in ref.values() if r.numel())
    out = {}
    for n, r in ref.items():
        g = got[n].detach().double()
        r = r.detach().double()
        if not bool(torch.isfinite(g).all()):
            out[n] = float("inf")
            continue
        den = max(float(r.abs().max()), 1e-9 * largest, 1e-300)
        out[n] = float((g - r).abs().max()) / den
    return out


def coverage(info) -> dict:
    """What went where, from a FisherReport: counts by rule, the per-sample parameters and the
    distinct reasons they went per sample."""
    by_rule: dict[str, int] = {}
    for rule in info.methods.values():
        by_rule[rule] = by_rule.get(rule, 0) + 1
    return {"rules": dict(sorted(by_rule.items())), "rule_params": len(info.rule_params),
            "vmap_params": list(info.vmap_params), "loop_params": list(info.loop_params),
            "reasons": sorted(set(info.reasons.values()))}


# The weights' scale of the "trained" runs (every matrix's weights times this): at Hugging Face's
# initialisation (std 0.02) attention is nearly uniform, and the Fisher of attention's query and
# key projections, among others, lies 1e-9 to 1e-14 below the model's largest entry, where a
# wrong value shows only absolutely. Trained weights are larger; times 8, every tensor but the
# key biases (zero in theory) and ConvNeXt's and DeiT's damped blocks is within 1e-9 of it.
TRAINED = 8.0


def build_scaled(case: Case, padded: bool, scale: float = 1.0) -> tuple:
    """``case.build(padded)`` from seed 0, every weight matrix (parameters of two or more
    dimensions) multiplied by ``scale`` (:data:`TRAINED`)."""
    torch.manual_seed(0)
    model, data = case.build(padded)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(scale)
    return model, data


def run(case: Case, kind: str, padded: bool, scale: float = 1.0) -> dict:
    """fastewc (method auto) against the reference loop on one case: per-tensor errors, the
    worst, the tolerance and the coverage. ``scale``: as :func:`build_scaled`'s."""
    model, data = build_scaled(case, padded, scale)
    top_k = case.top_k if kind == "exact" else None
    gen = (lambda: _gen(11)) if kind == "sampled" else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback warnings are recorded by the report
        got, info = fastewc.estimate_fisher(model, data, kind=kind, generator=gen(), top_k=top_k, return_info=True)
        ref = R.estimate_fisher(model, data, kind=kind, generator=gen(), top_k=top_k)
    errs = relative_errors(got, ref)
    worst = max(errs, key=errs.get)
    tol, why = case.tol(kind)
    return {"model": case.name, "kind": kind, "padded": padded, "max_rel_error": errs[worst], "worst": worst,
            "tol": tol, "tol_why": why, "passed": errs[worst] <= tol,
            "params": len(errs), "coverage": coverage(info),
            "off": {n: e for n, e in sorted(errs.items(), key=lambda kv: -kv[1]) if e > tol}}
