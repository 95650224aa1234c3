"""Other libraries' diagonal Fisher, timed beside fastewc by ``benchmarks/bench_fisher.py``: the
anchors that say where fastewc stands against the tools a user would otherwise reach for.

Each anchor computes, on a copy of the model and over the same N samples, the mean over samples
of the per-sample Fisher diagonal with the cross-entropy loss (what fastewc computes):

* BackPACK: ``SumGradSquared`` for the empirical kind, ``DiagGGNMC`` for the sampled one,
  ``DiagGGNExact`` for the exact one (``pip install --no-deps backpack-for-pytorch einops
  unfoldNd``: its package requires torchvision, which does not install beside the CPU-only torch
  wheel);
* ASDL: ``fisher_emp`` / ``fisher_mc`` with one sample / ``fisher_exact``, shape ``diag``;
* nngeometry: a ``PMatDiag`` from its Jacobian backend at the dataset labels / ``FIM_MonteCarlo``
  / ``FIM`` (both with ``pip install --no-deps asdfghjkl nngeometry``).

:func:`cases` is the ``extra_cases`` hook of :func:`fastewc.bench.fisher_benchmark`. An anchor that
is not installed, or that does not support a layer of the model, gives ``(None, why)``: the
benchmark then lists its row as skipped, with the reason. ``benchmarks/test_fisher_anchors.py``
checks each against the reference loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_BACKPACK = {"empirical": "SumGradSquared", "sampled": "DiagGGNMC", "exact": "DiagGGNExact"}


def backpack_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing BackPACK's diagonal of ``kind`` on a copy of ``model`` (sum reduction,
    summed over the batches, divided by N; ``fn()`` returns ``{name: diagonal}``), or
    ``(None, why)`` when it cannot run."""
    import copy
    import importlib
    import warnings

    try:
        bp = importlib.import_module("backpack")
        ext = importlib.import_module("backpack.extensions")
    except ImportError:
        return None, "backpack-for-pytorch is not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd)"
    extension, attr = {"empirical": (ext.SumGradSquared, "sum_grad_squared"),
                       "sampled": (ext.DiagGGNMC, "diag_ggn_mc"),
                       "exact": (ext.DiagGGNExact, "diag_ggn_exact")}[kind]
    try:
        net = bp.extend(copy.deepcopy(model).eval(), use_converter=False)
        loss_fn = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    except Exception as e:  # noqa: BLE001 - report why the anchor is missing
        return None, f"BackPACK cannot extend the model ({type(e).__name__}: {e})"

    def run():
        n, sums = 0, None
        for x, y in data:
            net.zero_grad(set_to_none=True)
            with warnings.catch_warnings(), bp.backpack(extension()):
                warnings.simplefilter("ignore")
                loss_fn(net(x), y).backward()
            got = [getattr(p, attr) for p in net.parameters()]
            sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            n += x.shape[0]
        return {name: s / n for (name, _), s in zip(net.named_parameters(), sums)}

    return _tried(run, "BackPACK")


ANCHOR_INSTALL = "pip install --no-deps asdfghjkl nngeometry"
# ASDL's fisher types; nngeometry's functions (it has no empirical-Fisher helper: that row runs its
# Jacobian backend on log p(y|x) at the dataset labels, the construction FIM_MonteCarlo uses with
# drawn labels, stored the same way in a PMatDiag).
_ASDL = {"empirical": "fisher_emp", "sampled": "fisher_mc", "exact": "fisher_exact"}
_NNGEOMETRY = {"empirical": "PMatDiag, labels", "sampled": "FIM_MonteCarlo PMatDiag", "exact": "FIM PMatDiag"}


def _tried(run, who: str):
    """``(run, None)`` when one call of ``run`` succeeds, else ``(None, why)``: the anchor is then
    skipped with the reason (unsupported layers raise anything from anywhere inside it)."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - reported as the reason the row is skipped
        return None, f"{who} does not support this model ({type(e).__name__}: {str(e)[:160]})"
    return run, None


def _every_parameter(net: nn.Module, got: dict, why: str) -> dict:
    """``{name: diagonal}`` for every trainable parameter of ``net``, in order; NotImplementedError
    (the anchor is then skipped) naming those an anchor gave no diagonal for and ``why``."""
    missing = [n for n, p in net.named_parameters() if p.requires_grad and n not in got]
    if missing:
        raise NotImplementedError(f"no Fisher for {len(missing)} parameters ({', '.join(missing[:3])}"
                                  f"{', ...' if len(missing) > 3 else ''}): {why}")
    return {n: got[n] for n, p in net.named_parameters() if p.requires_grad}


def asdl_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing ASDL's diagonal Fisher (``asdl.FisherConfig`` with ``fisher_type``
    ``fisher_emp`` / ``fisher_mc`` with one sample / ``fisher_exact`` for ``kind``, shape
    ``diag``) on a copy of ``model``; ``fn()`` returns ``{name: diagonal}``. Or ``(None, why)``
    when ASDL is missing or leaves parameters without a Fisher (layers it does not support).

    ASDL takes the cross-entropy with ``reduction="sum"`` and scales each batch's squared
    per-sample gradients by ``1 / data_size``: with ``data_size = N`` and the batches accumulated,
    the result is the mean over the N samples. Its exact Fisher backpropagates
    ``sqrt(p_c) * CE(z, c)`` per class, whose squared per-sample gradient is ``p_c g_c^2``: the
    same ``sum_c p_c g_c^2`` as fastewc's.
    """
    import copy
    import importlib
    import warnings

    try:
        asdl = importlib.import_module("asdl")
    except ImportError:
        return None, f"ASDL (asdfghjkl) is not installed ({ANCHOR_INSTALL})"
    n_total = sum(x.shape[0] for x, _ in data)
    net = copy.deepcopy(model).eval()
    fisher_type = {"empirical": asdl.FISHER_EMP, "sampled": asdl.FISHER_MC, "exact": asdl.FISHER_EXACT}[kind]
    config = asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[asdl.SHAPE_DIAG],
                               loss_type=asdl.LOSS_CROSS_ENTROPY, n_mc_samples=1, data_size=n_total)
    maker = asdl.get_fisher_maker(net, config)

    def run():
        with warnings.catch_warnings():
            # ASDL's module hooks trigger PyTorch's deprecation warning on every call, and ASDL
            # warns (then skips) for layers it does not support: the coverage check reports those.
            warnings.simplefilter("ignore")
            for i, (x, y) in enumerate(data):
                out = maker.setup_model_call(net, x)
                maker.setup_loss_call(F.cross_entropy, out, y)
                # The first batch starts a new Fisher; the others add into it.
                maker.forward_and_backward(accumulate=i > 0)
        got = {}
        for mname, module in net.named_modules():
            diag = getattr(getattr(module, config.fisher_attr, None), "diag", None)
            for pname in ("weight", "bias"):
                value = getattr(diag, pname, None) if diag is not None else None
                if value is not None:
                    got[f"{mname}.{pname}" if mname else pname] = value
        return _every_parameter(net, got, "layers ASDL does not support")

    return _tried(run, "ASDL")


def nngeometry_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing nngeometry's diagonal Fisher (a ``PMatDiag``) for ``kind`` on a copy
    of ``model``: ``FIM(variant="classif_logits")`` for ``exact``, ``FIM_MonteCarlo(trials=1)``
    for ``sampled``, and for ``empirical`` (no helper in nngeometry) its
    ``TorchHooksJacobianBackend`` on ``log softmax(z)[y]`` at the dataset labels. ``fn()`` returns
    ``{name: diagonal}``. Or ``(None, why)`` when nngeometry is missing or does not support a
    layer of the model.

    nngeometry squares per-sample Jacobians of the function it is given and divides by the number
    of examples of its DataLoader (N): the mean over samples. The batches are handed to it as one
    DataLoader over the same samples, in the same batches, built once outside the timed call.
    Its exact Fisher factors the multinomial covariance ``diag(p) - p p^T`` (Tanabe and Sagae)
    into ``C - 1`` outputs, whose squared Jacobians sum to ``sum_c p_c g_c^2`` as fastewc's.
    """
    import copy
    import importlib

    try:
        nng = importlib.import_module("nngeometry")
        pmat = importlib.import_module("nngeometry.object")
        backend = importlib.import_module("nngeometry.backend")
        layers = importlib.import_module("nngeometry.layercollection")
    except ImportError:
        return None, f"nngeometry is not installed ({ANCHOR_INSTALL})"
    from torch.utils.data import DataLoader, TensorDataset

    net = copy.deepcopy(model).eval()
    try:
        lc = layers.LayerCollection.from_model(net)
    except Exception as e:  # noqa: BLE001 - it raises a bare Exception for unknown layers
        return None, f"nngeometry does not support this model ({type(e).__name__}: {str(e)[:160]})"
    device = next(net.parameters()).device
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
                        batch_size=data[0][0].shape[0])

    def label_log_prob(x, y):
        """log p(y | x) at the dataset labels: its squared gradient is the empirical Fisher's."""
        return torch.log_softmax(net(x.to(device)), dim=1).gather(1, y.to(device)[:, None])

    def run():
        if kind == "exact":
            mat = nng.FIM(net, loader, pmat.PMatDiag, variant="classif_logits", device=device, layer_collection=lc)
        elif kind == "sampled":
            mat = nng.FIM_MonteCarlo(net, loader, pmat.PMatDiag, variant="classif_logits", trials=1,
                                     device=device, layer_collection=lc)
        else:
            gen = backend.TorchHooksJacobianBackend(net, function=label_log_prob, layer_collection=lc)
            mat = pmat.PMatDiag(generator=gen, examples=loader)
        got = {}
        for layer_id, parts in pmat.PVector(lc, vector_repr=mat.get_diag()).to_dict().items():
            for pname, value in zip(("weight", "bias"), parts):
                got[f"{layer_id}.{pname}" if layer_id else pname] = value
        return _every_parameter(net, got, "outside nngeometry's layers")

    return _tried(run, "nngeometry")


# (row label, method name per kind, case): the anchors timed beside fastewc.
ANCHORS = (("BackPACK", _BACKPACK, backpack_case), ("ASDL", _ASDL, asdl_case),
            ("nngeometry", _NNGEOMETRY, nngeometry_case))


def cases(model: nn.Module, data, kind: str):
    """``(method label, fn or None, why)`` for every anchor on ``model`` and ``data`` (none for the
    Hugging Face models' dict batches, which no anchor takes)."""
    if isinstance(data[0], dict):
        return []
    out = []
    for label, method_names, case in ANCHORS:
        fn, why = case(model, data, kind)
        out.append((f"{label} {method_names[kind]}", fn, why))
    return out
