"""Several adapters in one batch (`lora_linear_segmented`): every row through its own adapter.

Each output and gradient is checked against the fp64 reference computed adapter by adapter
(`lora_linear_segmented_ref`) with the suite's error rule, on both backends (the Triton kernels
through the interpreter on CPU). Would catch a row reaching another adapter's columns, a scaling
applied to the wrong adapter, gradients leaking between adapters, an adapter without rows
receiving a (zero) gradient, and bad row tables accepted.
"""

import pytest
import torch

from lorakernels import lora_linear, lora_linear_segmented, lora_linear_segmented_ref
from lorakernels.operands import FourBitWeight
from lorakernels.ops import specs
from lorakernels.testing import saved_activation_bytes
from tests.utils import DEVICE, assert_close_to_reference, replay_keep_mask

BACKENDS = ["torch", "triton"]


def _adapters(K, N, ranks, scalings, dtype):
    return [((torch.randn(r, K) / K**0.5).to(dtype).requires_grad_(),
             (torch.randn(N, r) * 0.5).to(dtype).requires_grad_(), s) for r, s in zip(ranks, scalings)]


def _check_against_reference(x, weight, bias, adapters, row_adapter, p, backend, dtype, index=None, base_gemm=None):
    """Run the fused call and check y, dx and every adapter's gradients against fp64; return the
    adapters' gradients."""
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    rng_state = torch.get_rng_state()
    xg = x.detach().clone().requires_grad_()
    y = lora_linear_segmented(xg, weight, bias, adapters, row_adapter, dropout_p=p, backend=backend,
                              base_gemm=base_gemm)
    keep = replay_keep_mask(rng_state, M, K, p, backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    index = row_adapter if index is None else index
    dense = weight.dequantize(dtype) if isinstance(weight, FourBitWeight) else weight
    results = {}
    for upcast in (True, False):
        leaves = [t.detach().double() if upcast else t.detach().to(dtype, copy=True) for t in (x,)]
        leaves = [t.requires_grad_() for t in leaves]
        ad = [((A.detach().double() if upcast else A.detach().to(dtype, copy=True)).requires_grad_(),
               (B.detach().double() if upcast else B.detach().to(dtype, copy=True)).requires_grad_(), s)
              for A, B, s in adapters]
        ref = lora_linear_segmented_ref(leaves[0], dense, bias, ad, index, keep, p, upcast=upcast)
        ref.backward(dy.to(ref.dtype))
        results[upcast] = (ref.detach(), leaves[0].grad, ad)
    (y64, dx64, ad64), (ylp, dxlp, adlp) = results[True], results[False]
    assert_close_to_reference("y", y.detach(), y64, ylp, dtype)
    assert_close_to_reference("dx", xg.grad, dx64, dxlp, dtype)
    for a, ((A, B, _), (A64, B64, _), (Alp, Blp, _)) in enumerate(zip(adapters, ad64, adlp)):
        if A64.grad is None:  # no rows: the reference never touched it
            assert A.grad is None and B.grad is None, f"adapter {a} has no rows but got a gradient"
            continue
        assert_close_to_reference(f"dA[{a}]", A.grad, A64.grad, Alp.grad, dtype)
        assert_close_to_reference(f"dB[{a}]", B.grad, B64.grad, Blp.grad, dtype)
    return [(A.grad, B.grad) for A, B, _ in adapters]


CASES = {  # ranks, scalings, per-row adapters (unsorted, -1 = base only), dropout
    "three_adapters_unsorted": ([4, 8, 3], [0.5, 2.0, 1.0], [2, 0, -1, 2, 2, 0, -1, 2, 0, 2, 1, 0, 2], 0.0),
    "dropout": ([4, 8, 3], [0.5, 2.0, 1.0], [2, 0, -1, 2, 2, 0, -1, 2, 0, 2, 1, 0, 2], 0.2),
    "an_adapter_without_rows": ([2, 16, 5], [1.0, 0.25, 3.0], [0, 2, 2, 0, 0, 2, -1, 0, 2, 2, 0, 0, 2], 0.1),
    "one_row_adapter": ([8, 8], [1.0, 4.0], [0] * 12 + [1], 0.0),
    "every_row_base_only": ([4], [2.0], [-1] * 13, 0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_reference_per_segment(backend, case):
    ranks, scalings, rows, p = CASES[case]
    torch.manual_seed(0)
    M, K, N = len(rows), 40, 24
    x = torch.randn(M, K)
    weight, bias = torch.randn(N, K) / K**0.5, torch.randn(N)
    adapters = _adapters(K, N, ranks, scalings, torch.float32)
    grads = _check_against_reference(x, weight, bias, adapters, torch.tensor(rows), p, backend, torch.float32)
    for a, (dA, dB) in enumerate(grads):  # exactly the adapters with rows get gradients
        assert (dA is not None and dB is not None) == (a in rows), a


# Per-sequence runs over several row blocks (the interpreter's tiles are 32 rows): runs straddle
# block boundaries, blocks hold one or two adapters, an adapter (1) has no rows, and the rank-R
# kernels' programs for a segment without rows in their block skip it.
RUNS = [20, 25, 13, 30, 12]
RUN_ADAPTERS = [3, 0, -1, 3, 2]
BLOCK_CASES = {  # ranks, run adapters, x dtype, base_gemm, dropout
    "four_adapters": ([4, 16, 8, 2], RUN_ADAPTERS, torch.float32, None, 0.1),
    "one_adapter_and_base_rows": ([8], [0, -1, 0, -1, 0], torch.float32, None, 0.0),  # dB in the pass over dY
    "tma_bf16": ([4, 16, 8, 2], RUN_ADAPTERS, torch.bfloat16, "triton-tma", 0.1),
    "cublas_base_gemm": ([4, 16, 8, 2], RUN_ADAPTERS, torch.float32, "cublas", 0.0),
    "rank_over_fused_db_limit": ([40, 8], [0, 1, 0, -1, 1], torch.float32, None, 0.0),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_segments_across_row_blocks(case, monkeypatch):
    ranks, run_adapters, dtype, base_gemm, p = BLOCK_CASES[case]
    launched = []
    launch = specs.KernelSpec.launch
    monkeypatch.setattr(specs.KernelSpec, "launch",
                        lambda spec, *args, **kwargs: launched.append(spec.code) or launch(spec, *args, **kwargs))
    torch.manual_seed(8)
    M, K, N = sum(RUNS), 48, 40
    x = torch.randn(M, K).to(dtype)
    weight, bias = (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N).to(dtype)
    adapters = _adapters(K, N, ranks, [0.5 * (a + 1) for a in range(len(ranks))], torch.float32)
    rows = torch.tensor(run_adapters).repeat_interleave(torch.tensor(RUNS))
    grads = _check_against_reference(x, weight, bias, adapters, rows, p, "triton", dtype, base_gemm=base_gemm)
    assert [dA is not None for dA, _ in grads] == [a in run_adapters for a in range(len(ranks))]
    gemms = {"F2-TMA", "B2-TMA"} if base_gemm == "triton-tma" else {"F2", "B2"}
    assert gemms <= set(launched), launched


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_state_holds_each_row_at_its_own_rank(backend):
    """16 adapters of rank 16, every row through one of them: autograd keeps x, U at rank 16 (not
    at the summed 256) and the segment tables; not the concatenated factors (a copy of
    all 16 adapters: backward concatenates the parameters again). Would catch U kept at the summed
    rank or the concatenation kept from forward to backward."""
    torch.manual_seed(9)
    M, K, N, r, count = 64, 32, 24, 16, 16
    adapters = _adapters(K, N, [r] * count, [1.0] * count, torch.float32)
    x = torch.randn(M, K, requires_grad=True)
    rows = torch.arange(M) % count
    weight = torch.randn(N, K)
    params = [weight] + [t for A, B, _ in adapters for t in (A, B)]
    saved, y = saved_activation_bytes(
        lambda: lora_linear_segmented(x, weight, None, adapters, rows, backend=backend), params)
    tables = M * 4 + (count + 1) * 4 + count * 4  # row -> adapter, rank columns, scalings
    assert saved == M * K * 4 + M * r * 4 + tables
    y.sum().backward()
    assert all(A.grad is not None for A, _, _ in adapters)


def test_factors_modified_in_place_before_backward_are_refused():
    """Backward concatenates the adapters' factors again: modified in place since forward, it would
    use the new values, so it refuses (as autograd does for a tensor it saved)."""
    adapters = _adapters(16, 8, [4, 2], [1.0, 2.0], torch.float32)
    y = lora_linear_segmented(torch.randn(3, 16), torch.randn(8, 16), None, adapters, torch.tensor([0, 1, 1]),
                              backend="torch")
    with torch.no_grad():
        adapters[1][0].mul_(2.0)
    with pytest.raises(RuntimeError, match="adapter 1's lora_A or lora_B .* modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_activations_fp32_adapters_per_sequence_list(backend):
    """PEFT's convention: 3-D x and one adapter per sequence as a list; bf16 x and base, fp32
    adapters (PEFT's default), different ranks."""
    torch.manual_seed(1)
    B, S, K, N = 4, 5, 48, 32
    x = torch.randn(B, S, K).bfloat16()
    weight, bias = (torch.randn(N, K) / K**0.5).bfloat16(), torch.randn(N).bfloat16()
    adapters = _adapters(K, N, [4, 12, 8], [1.0, 0.5, 2.0], torch.float32)
    names = [1, -1, 0, 1]
    index = torch.tensor(names).repeat_interleave(S).reshape(B, S)
    _check_against_reference(x, weight, bias, adapters, names, 0.1, backend, torch.bfloat16, index=index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_bit_base(backend):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    M, K, N = 11, 64, 40
    codes, state = bnb_functional.quantize_4bit(torch.randn(N, K) / K**0.5, blocksize=64, quant_type="nf4")
    base = FourBitWeight.from_bitsandbytes(codes.to(DEVICE), state)
    x = torch.randn(M, K)
    adapters = _adapters(K, N, [4, 4], [1.0, 2.0], torch.float32)
    rows = torch.tensor([1, 0, 0, 1, -1, 1, 0, 1, 1, 0, 0])
    _check_against_reference(x, base, None, adapters, rows, 0.0, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_for_every_row_is_lora_linear(backend):
    """The segmented path with one adapter on every row computes lora_linear's function (dropout 0)."""
    torch.manual_seed(3)
    x, weight, bias = torch.randn(9, 32), torch.randn(20, 32) / 32**0.5, torch.randn(20)
    A, B = torch.randn(6, 32) / 32**0.5, torch.randn(20, 6)
    y = lora_linear_segmented(x, weight, bias, [(A, B, 0.75)], torch.zeros(9, dtype=torch.long), backend=backend)
    torch.testing.assert_close(y, lora_linear(x, weight, bias, A, B, 0.75, backend=backend), rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_with_a_per_sequence_list():
    torch.manual_seed(4)
    x, weight = torch.randn(3, 4, 32), torch.randn(16, 32) / 32**0.5
    adapters = _adapters(32, 16, [4, 8], [1.0, 2.0], torch.float32)

    def f(x):
        return lora_linear_segmented(x, weight, None, adapters, [1, 0, 1], backend="torch")

    expected = f(x)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), expected)


BAD = {
    "index_out_of_range": (lambda a: (a, torch.tensor([0, 3, 1])), ValueError, "outside -1..1"),
    "float_index": (lambda a: (a, torch.tensor([0.0, 1.0, 1.0])), TypeError, "integer tensor"),
    "wrong_index_shape": (lambda a: (a, torch.tensor([0, 1])), ValueError, "leading shape"),
    "list_on_2d_rows": (lambda a: (a, [0, 1]), ValueError, "one adapter per sequence"),
    "adapter_dtype_neither_x_nor_fp32": (lambda a: ([a[0], (a[1][0].double(), a[1][1].double(), 1.0)],
                                                    torch.tensor([0, 1, 1])), TypeError, "x's .* or float32"),
    "not_triples": (lambda a: ([(a[0][0], a[0][1])], torch.tensor([0, 0, 0])), TypeError, "triple"),
    "empty": (lambda a: ([], torch.tensor([0, 0, 0])), ValueError, "empty"),
    "ranks_over_256": (lambda a: ([(torch.randn(200, 16), torch.randn(8, 200), 1.0)] * 2, torch.tensor([0, 1, 1])),
                       ValueError, "summing to 400 > 256"),
    "adapter_shape": (lambda a: ([a[0], (torch.randn(4, 15), torch.randn(8, 4), 1.0)], torch.tensor([0, 1, 1])),
                      ValueError, "lora_A"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_refused(case):
    make, error, message = BAD[case]
    adapters = [(torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True), 1.0),
                (torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True), 2.0)]
    before = [t.detach().clone() for A, B, _ in adapters for t in (A, B)]
    args, row_adapter = make(adapters)
    with pytest.raises(error, match=message):
        lora_linear_segmented(torch.randn(3, 16), torch.randn(8, 16), None, args, row_adapter, backend="torch")
    assert all(torch.equal(b, t) for b, t in zip(before, (t for A, B, _ in adapters for t in (A, B))))


def test_adapters_of_different_dtypes_are_refused():
    """bf16 x with one bf16 and one fp32 adapter: each alone is valid, together they are not (the
    concatenated factors have one dtype); refused with both dtypes named, nothing changed."""
    x, weight = torch.randn(3, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    adapters = [(torch.randn(4, 16).bfloat16(), torch.randn(8, 4).bfloat16(), 1.0),
                (torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True), 2.0)]
    with pytest.raises(TypeError, match="every adapter's lora_A and lora_B must share one dtype.*bfloat16.*float32"):
        lora_linear_segmented(x, weight, None, adapters, torch.tensor([0, 1, 1]), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_and_empty_batches(backend):
    """Under autocast the segmented call computes in the autocast dtype as lora_linear does (fp32
    adapters stay fp32); a batch without rows returns an empty output."""
    torch.manual_seed(6)
    x, weight = torch.randn(2, 3, 32), torch.randn(16, 32) / 32**0.5
    adapters = _adapters(32, 16, [4, 2], [1.0, 0.5], torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lora_linear_segmented(x, weight, None, adapters, [1, 0], backend=backend)
        expected = torch.cat([lora_linear(x[i:i + 1], weight, None, A.detach(), B.detach(), s, backend=backend)
                              for i, (A, B, s) in enumerate([adapters[1], adapters[0]])])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=2 * 2**-8 * expected.abs().max().item())
    empty = lora_linear_segmented(torch.randn(0, 3, 32), weight, None, adapters, [], backend=backend)
    assert empty.shape == (0, 3, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapters_with_different_dropout_rates(backend):
    """Per-adapter p: the rows are grouped by rate and each group is the one-rate call on its rows
    (replayed here from the same random state, group by group in rate order); outputs and gradients
    match, and in eval mode there is no dropout at all. Would catch a row dropped at another
    adapter's rate or gradients lost in the gather/scatter."""
    torch.manual_seed(7)
    M, K, N = 12, 32, 20
    x, weight, bias = torch.randn(M, K), torch.randn(N, K) / K**0.5, torch.randn(N)
    adapters = _adapters(K, N, [4, 8, 2], [1.0, 0.5, 2.0], torch.float32)
    rates = [0.3, 0.0, 0.3]
    index = torch.tensor([0, 1, -1, 2, 1, 0, 2, 2, 1, -1, 0, 1])
    xg = x.clone().requires_grad_()
    state = torch.get_rng_state()
    y = lora_linear_segmented(xg, weight, bias, adapters, index, rates, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [xg.grad] + [t.grad.clone() for A, B, _ in adapters for t in (A, B)]
    for A, B, _ in adapters:
        A.grad = B.grad = None

    torch.set_rng_state(state)
    xr = x.clone().requires_grad_()
    expected = torch.zeros(M, N)
    groups = {0.0: torch.tensor([1, 2, 4, 8, 9, 11]), 0.3: torch.tensor([0, 3, 5, 6, 7, 10])}  # base rows: first rate
    for p in sorted(groups):
        rows = groups[p]
        part = lora_linear_segmented(xr[rows], weight, bias, adapters, index[rows], p, backend=backend)
        expected = expected.index_copy(0, rows, part)
    expected.backward(dy)
    want = [xr.grad] + [t.grad for A, B, _ in adapters for t in (A, B)]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        eval_y = lora_linear_segmented(x, weight, bias, adapters, index, rates, training=False, backend=backend)
        no_dropout = lora_linear_segmented(x, weight, bias, adapters, index, 0.0, backend=backend)
    torch.testing.assert_close(eval_y, no_dropout, rtol=0, atol=0)
