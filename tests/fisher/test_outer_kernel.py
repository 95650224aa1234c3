"""The fused CPU kernel of the Linear rule's squared per-sample gradients
(``fastewc/kernels/outer_sq_cpu.c`` through ``fastewc.fisher.rules.outer_cpu``) and its plain twin,
the batched products of ``sq_sum_linear``: both against a per-sample loop in float64, where the
kernel serves by default, and what happens where it cannot be built. Its build cache is the one
``tests/penalty/test_native_build.py`` tests."""

from __future__ import annotations

import pytest
import torch

import fastewc
from fastewc import reference
from fastewc.fisher import clear_plan_cache
from fastewc.fisher.rules import linear, outer_cpu
from models import assert_fisher_close, make_encoder, make_gpt2

KERNEL = outer_cpu.kernel()
needs_kernel = pytest.mark.skipif(KERNEL.why is not None, reason=f"no fused CPU kernel here: {KERNEL.why}")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


class Counting(outer_cpu.OuterKernel):
    """The kernel, counting its calls: shows which sums went to it."""

    def __init__(self, kernel: outer_cpu.OuterKernel, threads: int | None = None):
        super().__init__(kernel.library, kernel.threaded)
        self.calls, self.threads = 0, threads

    def __call__(self, G, A, total, threads=None, **kw):
        self.calls += 1
        super().__call__(G, A, total, self.threads if threads is None else threads, **kw)


def per_sample_loop(A3, G3) -> torch.Tensor:
    """The definition, one sample at a time in float64: ``sum_n (G_n^T A_n)^2``."""
    total = torch.zeros(G3.shape[2], A3.shape[2], dtype=torch.float64)
    for a, g in zip(A3.double(), G3.double()):
        total += (g.t() @ a) ** 2
    return total


def assert_close(got, want, dtype):
    assert got.shape == want.shape
    if want.numel():
        assert float((got.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())


# n, T, O, I: odd sizes, every remainder of the 6-row tiles (O = 7..11), columns left over from the
# two-vector tiles, for the one-vector tile and for the scalar loop, with 32-byte vectors (8 float32
# or 4 float64 lanes) and 64-byte ones (16 or 8; I = 59 takes all three), empty and one-element
# tensors, and a sequence long enough that one sample's columns are split into several cache
# blocks (T = 64, I = 100), and a tall layer whose rows end in a partial tile (O = 2100).
SHAPES = [(3, 5, 13, 7), (1, 1, 1, 1), (0, 4, 6, 16), (4, 0, 6, 16), (2, 3, 12, 32), (2, 2, 7, 17),
          (2, 2, 8, 33), (3, 2, 9, 48), (2, 3, 10, 5), (2, 3, 11, 40), (2, 64, 14, 100), (5, 17, 30, 24),
          (2, 3, 7, 59), (2, 64, 2100, 20)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_per_sample_loop(dtype, shape, threads, with_bias):
    n, T, O, I = shape
    torch.manual_seed(sum(shape))
    A, G = torch.randn(n, T, I, dtype=dtype), torch.randn(n, T, O, dtype=dtype)
    total = torch.full((O, I), 0.5, dtype=dtype)  # it adds into what is there
    bias = torch.full((O,), 0.25, dtype=dtype) if with_bias else None
    alpha = 0.3 if with_bias else 1.0  # every square times alpha (a mean loss's factor)
    KERNEL(G, A, total, threads, bias, alpha)
    assert_close(total, alpha * per_sample_loop(A, G) + 0.5, dtype)
    if with_bias:  # the gradient against an input of ones
        assert_close(bias, alpha * per_sample_loop(torch.ones(n, T, 1), G)[:, 0] + 0.25, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("picks", [[4, 0, 2], [], [1, 1], None], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_sums_the_picked_samples_where_they_are_each_scaled(dtype, picks, weighted):
    # The picked samples only, read in place (a tracked subset of a batch), each sample's
    # gradient scaled by its weight: the loop over the selected and scaled copies.
    torch.manual_seed(len(picks or ()))
    n, T, O, I = 5, 3, 13, 40
    A, G = torch.randn(n, T, I, dtype=dtype), torch.randn(n, T, O, dtype=dtype)
    rows = torch.arange(n) if picks is None else torch.tensor(picks, dtype=torch.int64)
    w = torch.rand(len(rows), dtype=dtype) + 0.5 if weighted else None
    total, bias = torch.zeros(O, I, dtype=dtype), torch.zeros(O, dtype=dtype)
    KERNEL(G, A, total, 2, bias, 0.7, None if picks is None else rows, w)
    Gw = G[rows] * (1 if w is None else w.view(-1, 1, 1))
    assert_close(total, 0.7 * per_sample_loop(A[rows], Gw), dtype)
    assert_close(bias, 0.7 * per_sample_loop(torch.ones(len(rows), T, 1), Gw)[:, 0], dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("O", [1, 63, 150])
def test_kernel_sums_a_bias_alone(dtype, threads, O):
    # total None: the bias only, more rows than one local block of the kernel holds, picked
    # samples each scaled, output gradients laid out [n, O, T]; as the call with a total gives.
    torch.manual_seed(O)
    n, T, I = 6, 7, 5
    G = torch.randn(n, O, T, dtype=dtype).transpose(1, 2)
    A = torch.randn(n, T, I, dtype=dtype)
    rows, w = torch.tensor([5, 0, 3, 3]), torch.rand(4, dtype=dtype) + 0.5
    alone, both = torch.full((O,), 0.25, dtype=dtype), torch.full((O,), 0.25, dtype=dtype)
    KERNEL(G, A, None, threads, alone, 0.7, rows, w)
    KERNEL(G, A, torch.zeros(O, I, dtype=dtype), threads, both, 0.7, rows, w)
    Gw = G[rows] * w.view(-1, 1, 1)
    assert_close(alone, 0.7 * per_sample_loop(torch.ones(len(rows), T, 1, dtype=dtype), Gw)[:, 0] + 0.25, dtype)
    assert torch.equal(alone, both)


@needs_kernel
def test_kernel_refuses_picks_and_weights_that_do_not_fit():
    A, G, total = torch.randn(4, 3, 2), torch.randn(4, 3, 5), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"outer_sq: picks must index the 4 samples of G, got \[0, 4\]"):
        KERNEL(G, A, total, picks=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="picks must be a 1-D int64 CPU tensor"):
        KERNEL(G, A, total, picks=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"outer_sq: weights \(4,\) torch.float32 do not fit the 2 samples summed"):
        KERNEL(G, A, total, picks=torch.tensor([0, 1]), weights=torch.ones(4))
    assert total.abs().sum() == 0


@needs_kernel
def test_kernel_reads_strided_gradients_and_copies_strided_inputs():
    # Output gradients laid out [n, O, T] (a convolution's), inputs whose last axis is not contiguous.
    torch.manual_seed(0)
    G = torch.randn(4, 19, 9, dtype=torch.float64).transpose(1, 2)      # [n, T, O], o-stride T
    A = torch.randn(4, 21, 9, dtype=torch.float64).transpose(1, 2)      # [n, T, I], i-stride T
    total, bias = torch.zeros(19, 21, dtype=torch.float64), torch.zeros(19, dtype=torch.float64)
    KERNEL(G, A, total, 2, bias)
    assert_close(total, per_sample_loop(A, G), torch.float64)
    assert_close(bias, per_sample_loop(torch.ones(4, 9, 1), G)[:, 0], torch.float64)


@needs_kernel
def test_kernel_refuses_tensors_that_do_not_fit_together():
    A, G = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"outer_sq: G \(2, 3, 5\), A \(2, 3, 4\) and total \(4, 5\)"):
        KERNEL(G, A, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="do not fit together"):
        KERNEL(G, A.double(), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"outer_sq: bias \(4,\) torch.float32 does not fit G \(2, 3, 5\)"):
        KERNEL(G, A, torch.zeros(5, 4), bias=torch.zeros(4))
    with pytest.raises(ValueError, match="one entry per output"):
        KERNEL(G, A, torch.zeros(5, 4), bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"outer_sq: nothing to sum into \(total and bias are both None\)"):
        KERNEL(G, A, None)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("positions", [(5,), (3, 4), (linear.KERNEL_MAX_T + 1,)], ids=str)
def test_sq_sum_linear_kernel_and_products_agree_with_the_loop(dtype, transposed, positions):
    # Two output gradients (two columns of the exact Fisher) into one sum; a 4-D input (an image's
    # positions); past KERNEL_MAX_T positions the products serve, as documented.
    torch.manual_seed(len(positions))
    n, I, O = 5, 11, 13
    A = torch.randn(n, *positions, I, dtype=dtype)
    Gs = [torch.randn(n, *positions, O, dtype=dtype) for _ in range(2)]
    counting = Counting(KERNEL)
    fused = linear.sq_sum_linear(A, Gs, True, transposed, kernel=counting)
    plain = linear.sq_sum_linear(A, Gs, True, transposed, kernel=None)
    A3 = A.reshape(n, -1, I)
    want = sum(per_sample_loop(A3, G.reshape(n, -1, O)) for G in Gs)
    want = want.t() if transposed else want
    for got in (fused, plain):
        assert_close(got["weight"], want, dtype)
        assert_close(got["bias"], sum(G.reshape(n, -1, O).double().sum(1).square().sum(0) for G in Gs), dtype)
    long_sequence = positions[0] > linear.KERNEL_MAX_T
    # one call per column; a transposed weight's bias in a second one, the bias alone
    assert counting.calls == (0 if long_sequence else 2 * (2 if transposed else 1))


def conv_per_sample_loop(conv: torch.nn.Module, A: torch.Tensor, Gs: list) -> dict:
    """The definition for a convolution, one sample and one output gradient at a time in float64,
    through the convolution's own backward."""
    conv = conv.double()
    total = {name: torch.zeros_like(p) for name, p in conv.named_parameters()}
    for k in range(A.shape[0]):
        for G in Gs:
            grads = torch.autograd.grad(conv(A[k:k + 1].double()), list(conv.parameters()), G[k:k + 1].double())
            for (name, _), g in zip(conv.named_parameters(), grads):
                total[name] += g ** 2
    return total


# Convolutions: a patch embedding (stride = kernel), padded, dilated and reflected ones, a 1-D one,
# more positions than the kernel takes, and a grouped one (the products serve those two).
CONVS = [
    (lambda: torch.nn.Conv2d(3, 13, 4, stride=4), (3, 16, 12), 1),
    (lambda: torch.nn.Conv2d(2, 7, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 9, 8), 1),
    (lambda: torch.nn.Conv2d(3, 5, 3, padding="same", padding_mode="reflect", bias=False), (3, 7, 6), 1),
    (lambda: torch.nn.Conv1d(2, 9, 3, stride=2, padding=1, dilation=2), (2, 11), 1),
    (lambda: torch.nn.Conv2d(2, 3, 1), (2, 12, 11), 0),
    (lambda: torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5), 0),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("conv,shape,fused", CONVS)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_conv_sums_through_the_kernel_and_the_products_agree_with_the_loop(dtype, conv, shape, fused, n):
    from fastewc.fisher.rules.conv import conv_sq_sum

    torch.manual_seed(n + len(shape))
    m = conv().to(dtype)
    A = torch.randn(n, *shape, dtype=dtype)
    out_shape = m(torch.zeros(1, *shape, dtype=dtype)).shape[1:]
    Gs = [torch.randn(n, *out_shape, dtype=dtype) for _ in range(2)]
    want = conv_per_sample_loop(m, A, Gs)
    counting = Counting(KERNEL)
    for kernel in (counting, None):
        got = conv_sq_sum(m, A, Gs, kernel=kernel)
        for name, w in want.items():
            assert_close(got[name], w, dtype)
    assert counting.calls == (2 * fused if n else 0)


# Inputs for each path of sq_sum_linear: no sequence axis, the kernel's short sequence, the batched
# products' small blocks (kernel=None) and their one-sample-at-a-time large blocks.
PATHS = {"rows": ((5, 11), 13, "kernel"), "kernel": ((5, 4, 11), 13, "kernel"),
         "small blocks": ((5, 4, 11), 13, None), "large blocks": ((2, 3, 190), 180, None)}


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("attrs", [("weight", "bias"), ("weight",), ("bias",)], ids="+".join)
@pytest.mark.parametrize("subset", [False, True])
def test_sq_sum_linear_adds_into_running_sums_for_the_attributes_given(path, transposed, attrs, subset):
    # alpha times the sums added in place into what the running sums hold; an attribute not given
    # is not computed; the same values as fresh sums (of the picked samples, each scaled).
    shape, O, kernel = PATHS[path]
    torch.manual_seed(len(attrs))
    A = torch.randn(*shape, dtype=torch.float64)
    Gs = [torch.randn(*shape[:-1], O, dtype=torch.float64) for _ in range(2)]
    picks, w = (torch.tensor([shape[0] - 1, 0]), torch.tensor([0.5, 2.0], dtype=torch.float64)) if subset else (None, None)
    kernel = Counting(KERNEL) if kernel else None
    mine = [G[picks] * w.view(-1, *[1] * (G.dim() - 1)) for G in Gs] if subset else Gs
    fresh = linear.sq_sum_linear(A[picks] if subset else A, mine, True, transposed, kernel=None)
    start = {"weight": torch.rand(fresh["weight"].shape, dtype=torch.float64), "bias": torch.rand(O, dtype=torch.float64)}
    into = {a: start[a].clone() for a in attrs}
    got = linear.sq_sum_linear(A, Gs, True, transposed, kernel=kernel, into=into, alpha=0.3, picks=picks, weights=w)
    assert set(got) == set(attrs) and all(got[a] is into[a] for a in attrs)
    for a in attrs:
        assert_close(got[a] - start[a], 0.3 * fresh[a], torch.float64)
    # per column: the weight's call, which sums a bias too where the weight is not transposed;
    # else the bias's own call
    calls = ("weight" in attrs) + ("bias" in attrs and (transposed or "weight" not in attrs))
    assert kernel is None or kernel.calls == (2 * calls if path == "kernel" else 0)


@needs_kernel
@pytest.mark.parametrize("conv,shape,fused", CONVS[:1] + CONVS[-1:])
def test_conv_sums_add_into_running_sums(conv, shape, fused):
    from fastewc.fisher.rules.conv import conv_sq_sum

    torch.manual_seed(0)
    m = conv().double()
    A = torch.randn(3, *shape, dtype=torch.float64)
    Gs = [torch.randn(3, *m(A[:1]).shape[1:], dtype=torch.float64)]
    want = conv_per_sample_loop(m, A, Gs)
    start = {"weight": torch.rand(m.weight.shape, dtype=torch.float64), "bias": torch.rand(m.out_channels, dtype=torch.float64)}
    for attrs in (("weight", "bias"), ("weight",), ("bias",)):
        into = {a: start[a].clone() for a in attrs}
        got = conv_sq_sum(m, A, Gs, kernel=KERNEL, into=into, alpha=0.3)
        assert set(got) == set(attrs)
        for a in attrs:
            assert_close(got[a] - start[a], 0.3 * want[a], torch.float64)
    # the samples picked, each gradient scaled
    picks, w = torch.tensor([2, 0]), torch.tensor([0.5, 3.0], dtype=torch.float64)
    want = conv_per_sample_loop(m, A[picks], [Gs[0][picks] * w.view(-1, *[1] * (Gs[0].dim() - 1))])
    got = conv_sq_sum(m, A, Gs, kernel=KERNEL, picks=picks, weights=w)
    for a in want:
        assert_close(got[a], want[a], torch.float64)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_other_dtypes_go_to_the_products(dtype):
    counting = Counting(KERNEL)
    A, G = torch.randn(3, 4, 8, dtype=dtype), torch.randn(3, 4, 6, dtype=dtype)
    got = linear.sq_sum_linear(A, [G], False, kernel=counting)
    assert counting.calls == 0 and got["weight"].dtype == dtype


@needs_kernel
@pytest.mark.parametrize("make", [make_encoder, make_gpt2], ids=["encoder", "gpt2"])
def test_estimate_fisher_through_the_kernel_matches_the_reference(monkeypatch, make):
    # The default path: the process's kernel serves the Linear layers over the sequence (counted),
    # and the Fisher is the reference loop's in float64.
    counting = Counting(KERNEL, threads=2)
    monkeypatch.setattr(outer_cpu._process, "value", counting)
    torch.manual_seed(0)
    model, data = make(dtype=torch.float64)
    clear_plan_cache()
    got = fastewc.estimate_fisher(model, data, kind="empirical")
    assert counting.calls > 0
    assert_fisher_close(got, reference.estimate_fisher(model, data, kind="empirical"), rtol=1e-10)


def test_a_kernel_that_cannot_be_built_says_why_and_the_products_serve(tmp_path):
    broken = outer_cpu.load(cc=["false"], folder=tmp_path, features="flags: test")
    assert broken.library.lib is None and not broken.threaded
    assert "outer_sq_cpu.c could not be built" in broken.why and "exited with 1" in broken.why
    A, G = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    assert not broken.supports(A)
    got = linear.sq_sum_linear(A, [G], False, kernel=broken)["weight"]
    assert_close(got, per_sample_loop(A, G), torch.float64)


MAPS = """\
7f00-7f01 r-xp 00000000 08:01 11 /usr/lib/python3/site-packages/torch/lib/libgomp.so.1
7f01-7f02 r--p 00001000 08:01 11 /usr/lib/python3/site-packages/torch/lib/libgomp.so.1
7f02-7f03 r-xp 00000000 08:01 12 /usr/lib/libc.so.6
7f03-7f04 rw-p 00000000 00:00 0
"""


def test_openmp_runtimes_are_read_from_the_process_maps():
    torch_gomp = "/usr/lib/python3/site-packages/torch/lib/libgomp.so.1"
    assert outer_cpu.openmp_libraries(MAPS) == {torch_gomp}
    second = MAPS + "7f05-7f06 r-xp 00000000 08:01 13 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n"
    assert len(outer_cpu.openmp_libraries(second)) == 2
    iomp = MAPS + "7f05-7f06 r-xp 00000000 08:01 13 /opt/intel/libiomp5.so\n"
    assert len(outer_cpu.openmp_libraries(iomp)) == 2


@pytest.mark.parametrize("flags, libraries, info, threaded", [
    (("-O3", "-fopenmp"), {"a/libgomp.so.1"}, "ATen parallel backend: OpenMP", True),
    (("-O3",), {"a/libgomp.so.1"}, "ATen parallel backend: OpenMP", False),             # built without OpenMP
    (("-O3", "-fopenmp"), {"a/libgomp.so.1", "b/libgomp.so.1"}, "ATen parallel backend: OpenMP", False),  # two runtimes
    (("-O3", "-fopenmp"), None, "ATen parallel backend: OpenMP", False),               # maps unreadable
    (("-O3", "-fopenmp"), {"a/libgomp.so.1"}, "ATen parallel backend: native thread pool", False),
])
def test_threads_only_on_pytorchs_own_openmp_runtime(flags, libraries, info, threaded):
    assert outer_cpu.shares_torch_openmp(flags, libraries, info) is threaded
