"""Models the benchmarks and ``fastewc bench`` run on (also imported by benchmarks/*.py)."""

from __future__ import annotations

import torch.nn as nn


def transformer_like(params: float, d_model: int = 480, vocab: int = 8000) -> nn.Module:
    """A parameter set shaped like a transformer's, about ``params`` parameters.

    Embedding [vocab, d_model] + L blocks (qkv, proj, fc1, fc2 with biases, 2 LayerNorms: 12
    tensors per block) + a final LayerNorm; L is chosen to land near ``params``. Only the shapes
    matter: the penalty benchmarks never run its forward pass. 25e6 gives 26.0M in 99 tensors.
    """

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc1, self.fc2 = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    per_block = 12 * d_model * d_model + 13 * d_model
    layers = max(1, round((params - vocab * d_model) / per_block))
    return nn.Sequential(nn.Embedding(vocab, d_model), *[Block() for _ in range(layers)], nn.LayerNorm(d_model))


# -- Fisher benchmark models (N = 512 samples; the README's Fisher table is measured on these) ----
def fisher_mlp() -> nn.Module:
    """MLP 784-1000-1000-10 (1.79M parameters), inputs [N, 784]."""
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))


def fisher_cnn() -> nn.Module:
    """Small CNN on 3x32x32: two conv(3x3)+BatchNorm+ReLU+pool stages, then a linear head (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


class FisherTransformer(nn.Module):
    """2-layer Transformer encoder, d=128, 4 heads, feed-forward 256, dropout 0.1, on 32 tokens of
    a 1000-word vocabulary; mean-pooled into a 10-class head. Inputs: int64 [N, 32]."""

    def __init__(self, vocab: int = 1000, d: int = 128, seq: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * __import__("torch").randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(1))


def fisher_problem(name: str, n: int = 512, batch_size: int = 64, seed: int = 0):
    """``(model, list of (inputs, targets) batches)`` for the Fisher benchmarks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, x = fisher_mlp(), torch.randn(n, 784, generator=g)
    elif name == "cnn":
        model, x = fisher_cnn(), torch.randn(n, 3, 32, 32, generator=g)
    elif name == "transformer":
        model, x = FisherTransformer(), torch.randint(0, 1000, (n, 32), generator=g)
    else:
        raise ValueError(f"unknown Fisher benchmark model {name!r}; expected mlp, cnn or transformer")
    y = torch.randint(0, 10, (n,), generator=g)
    model.eval()
    return model, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


FISHER_MODELS = ("mlp", "cnn", "transformer")
HF_MODELS = ("bert", "gpt2", "llama")
HF_SAMPLES = 128  # the Hugging Face rows run on fewer samples than the small models (N = 512)


def hf_problem(name: str, n: int = HF_SAMPLES, batch_size: int = 32, seq: int = 64, seed: int = 0):
    """``(model, list of dict batches)``: a Hugging Face model built from config (no download,
    the library's default attention) and right-padded batches of ``seq`` tokens (lengths from
    ``seq / 2`` to ``seq``) with ``attention_mask`` and ``labels``.

    * ``bert``: BertForSequenceClassification with the MiniLM shape (6 layers, hidden 384, 12
      heads, intermediate 1536, vocabulary 30522), 2 classes; 22.7M parameters.
    * ``gpt2``: GPT2LMHeadModel, 4 layers, 256 wide, 8 heads, vocabulary 8192 (the embedding
      tied to the LM head); causal-LM labels (-100 on padding).
    * ``llama``: LlamaForCausalLM, 4 layers, 256 wide, 8 query and 2 key/value heads (grouped),
      intermediate 688, vocabulary 8192; causal-LM labels.
    The vocabularies of the two LMs are cut to 8192 so that the per-sample loop over N = 128
    sequences stays within minutes on a 2-core CPU.
    """
    import torch

    from .._utils import require

    T = require("transformers", extra="hf")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "bert":
        vocab = 30522
        model = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            max_position_embeddings=512, num_labels=2))
    elif name == "gpt2":
        vocab = 8192
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=256, n_layer=4, n_head=8, n_positions=seq,
                                               bos_token_id=0, eos_token_id=0))
    elif name == "llama":
        vocab = 8192
        model = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=seq, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        raise ValueError(f"unknown Hugging Face benchmark model {name!r}; expected one of {', '.join(HF_MODELS)}")
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(0, 2, (n,), generator=g) if name == "bert" else ids.masked_fill(mask == 0, -100)
    full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model.eval()
    return model, [{k: v[i : i + batch_size] for k, v in full.items()} for i in range(0, n, batch_size)]
