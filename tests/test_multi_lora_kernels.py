"""The multi-adapter kernels (kernels/multi_lora.py) against fastpeft.reference.multi_lora (fp64 oracle),
on the GPU or under the interpreter: the in-place LoRA part (``multi_lora``) and the whole layer with
its base matmul (``multi_lora_linear``).

Batches mix ranks (1 .. R, with R past one BLOCK_R chunk), rows with no adapter (-1), repeated and
unsorted indices, one segment and many, odd T/K/N, strided and transposed x and y; every slot's rows
are compared on their own (a wrong slot cannot hide in the batch's norm). Exact checks: segments
against plain Python, rows with -1 bit-identical, t's columns past the rank exactly zero.
"""
import pytest
import torch

from fastpeft import reference
import torch.nn.functional as F

from fastpeft.kernels.multi_lora import (Segments, multi_lora, multi_lora_expand, multi_lora_linear,
                                         multi_lora_linear_tma, multi_lora_shrink, multi_lora_wide,
                                         multi_lora_wide_group, segments)
from tolerance import DTYPE_PAIRS, dtype_pair_id, assert_close

# (T, K, N, ranks, R): R is the stacked width, ranks one per slot
CPU_CASES = [
    (37, 45, 29, (1, 3, 8, 16), 16),       # many segments
    (20, 33, 40, (5,), 16),                # one segment (one slot, rank below R)
    (24, 70, 50, (40, 17, 1, 5, 33, 0, 8, 2), 40),  # decode-like (3 tokens a slot: the split-K shrink), R > BLOCK_R
    (1, 64, 48, (4, 2), 4),
    (9, 40, 70, (72, 3, 0), 72),           # R > R_ONCE_MAX: the expand reloads t per column block
]
GPU_CASES = CPU_CASES + [
    (256, 4096, 4096, tuple([16, 8, 4, 1] * 8), 16),      # decode: one token per sequence, 32 adapters
    (3000, 1000, 2000, (64, 7, 32, 1, 64, 16), 64),
    (8192, 2048, 1024, (16, 16, 8, 4), 16),                # prefill: long runs of one adapter
    (9000, 256, 384, (16, 4, 9), 16),                      # past SEGMENTS_MAX_TOKENS: the torch grouping
]


def _cases(device):
    return GPU_CASES if device == "cuda" else CPU_CASES


def _tensor(rows, cols, dtype, device, layout):
    if layout == "strided":  # every other column of a wider tensor
        return torch.randn(rows, 2 * cols, device=device, dtype=dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(cols, rows, device=device, dtype=dtype).t()
    return torch.randn(rows, cols, device=device, dtype=dtype)


def _batch(T, K, N, ranks, R, dtype, adapter_dtype, device, x_layout="contiguous", y_layout="contiguous",
           indices=None):
    """x, y, indices, A, B, scales, ranks: random, with NaN in A and B past each slot's rank (where
    the kernels must not read), indices unsorted with repeats and -1."""
    S = len(ranks)
    x = _tensor(T, K, dtype, device, x_layout)
    y = _tensor(T, N, dtype, device, y_layout)
    if indices is None:
        indices = torch.randint(-1, S, (T,), device=device)
    A = (torch.randn(S, R, K, device=device) / K**0.5).to(adapter_dtype)
    B = (torch.randn(S, N, R, device=device) / R**0.5).to(adapter_dtype)
    for s, r in enumerate(ranks):
        A[s, r:] = float("nan")
        B[s, :, r:] = float("nan")
    scales = torch.rand(S, device=device) * 2 + 0.5
    return x, y, indices, A, B, scales, torch.tensor(ranks, dtype=torch.int32, device=device)


def _f64(*ts):
    return [t.double() for t in ts]


def _check(x, y, indices, A, B, scales, ranks, dtype):
    """multi_lora and its shrink against the fp64 reference, slot by slot; rows with -1 untouched."""
    before = y.clone()
    seg = segments(indices, A.shape[0])
    t = multi_lora_shrink(x, A, seg, ranks)
    out = multi_lora(x, y, indices, A, B, scales, ranks)
    assert out is y and out.dtype == before.dtype
    same = reference.multi_lora(x, before, indices, A, B, scales, ranks)
    exact = reference.multi_lora(*_f64(x, before), indices, *_f64(A, B, scales), ranks)
    none = indices < 0
    assert torch.equal(out[none], before[none]), "rows with no adapter were changed"
    assert t.dtype == torch.float32 and tuple(t.shape) == (x.shape[0], A.shape[1])
    assert torch.all(t[none] == 0), "t: rows with no adapter are not zero"
    for s, r in enumerate(ranks.tolist()):
        rows = indices == s
        if not rows.any():
            continue
        assert torch.all(t[rows, r:] == 0), f"t: slot {s}'s columns past its rank {r} are not zero"
        if r:
            xs = x[rows]
            assert_close(t[rows, :r], xs.double() @ A[s, :r].double().T, xs.float() @ A[s, :r].float().T, dtype,
                         f"t, slot {s} (rank {r})")
        assert_close(out[rows], exact[rows], same[rows], dtype, f"y, slot {s} (rank {r})")


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
def test_multi_lora_matches_reference(kernel_device, dtypes):
    dtype, adapter_dtype = dtypes
    for T, K, N, ranks, R in _cases(kernel_device):
        _check(*_batch(T, K, N, ranks, R, dtype, adapter_dtype, kernel_device), dtype)


@pytest.mark.parametrize("x_layout,y_layout", [("strided", "strided"), ("transposed", "transposed"),
                                               ("contiguous", "strided")])
def test_layouts(kernel_device, x_layout, y_layout):
    """Non-contiguous x and y (written in place through their strides), and stacked adapters that are
    views of other layouts (A from (S, K, R), B from (S, R, N))."""
    dtype = torch.float16
    x, y, indices, A, B, scales, ranks = _batch(37, 45, 29, (1, 3, 8, 16), 16, dtype, torch.float32, kernel_device,
                                                x_layout, y_layout)
    A = A.transpose(1, 2).contiguous().transpose(1, 2)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)
    _check(x, y, indices, A, B, scales, ranks, dtype)


def test_sorted_runs_and_unused_slots(kernel_device):
    """Sorted indices (a prefill batch: long runs of one adapter, each over several token blocks), a
    slot no token uses, a slot of rank 0, and no -1; then every row -1 (y untouched)."""
    T = 70
    indices = torch.tensor([0] * 30 + [2] * 25 + [3] * 15, device=kernel_device)
    batch = _batch(T, 40, 33, (8, 16, 3, 0), 16, torch.float32, torch.float32, kernel_device, indices=indices)
    _check(*batch, torch.float32)
    x, y, _, A, B, scales, ranks = batch
    nothing = torch.full((T,), -1, device=kernel_device)
    before = y.clone()
    multi_lora(x, y, nothing, A, B, scales, ranks)
    assert torch.equal(y, before)
    assert torch.all(multi_lora_shrink(x, A, segments(nothing, 4), ranks) == 0)


def test_batch_equals_rows_alone(kernel_device):
    """Each row run alone (T = 1, its own adapter) gives what the batch gives it, and that is the
    single-adapter LoRA: y + scale · x · A[s, :r]ᵀ · B[s, :, :r]ᵀ."""
    x, y, indices, A, B, scales, ranks = _batch(13, 45, 29, (1, 3, 8, 16), 16, torch.float32, torch.float32,
                                                kernel_device)
    indices[:4] = torch.tensor([0, 1, 2, 3])  # every slot at least once
    batch = multi_lora(x, y.clone(), indices, A, B, scales, ranks)
    for i, s in enumerate(indices.tolist()):
        alone = multi_lora(x[i:i + 1], y[i:i + 1].clone(), indices[i:i + 1], A, B, scales, ranks)
        torch.testing.assert_close(alone, batch[i:i + 1], rtol=1e-5, atol=1e-5)
        if s < 0:
            assert torch.equal(alone, y[i:i + 1])
            continue
        r = int(ranks[s])
        single = y[i:i + 1] + reference.lora_linear(x[i:i + 1], None, None, A[s, :r], B[s, :, :r], float(scales[s]))
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-5, atol=1e-5)


def test_given_segments_and_out(kernel_device):
    """multi_lora with the batch's segments given (one per batch, for every layer) gives what it gives
    computing them; multi_lora_shrink writes into a given (strided, dirty) out; shrink + expand is
    multi_lora, with t whole or as partial sums."""
    x, y, indices, A, B, scales, ranks = _batch(24, 70, 50, (40, 17, 1, 5, 33, 0, 8, 2), 40, torch.float16,
                                                torch.float16, kernel_device)
    seg = segments(indices, 8)
    a = multi_lora(x, y.clone(), indices, A, B, scales, ranks)
    b = multi_lora(x, y.clone(), indices, A, B, scales, ranks, seg=seg)
    assert torch.equal(a, b)
    out = torch.full((24, 80), float("nan"), device=kernel_device)[:, ::2]
    t = multi_lora_shrink(x, A, seg, ranks, out=out)
    assert t is out
    torch.testing.assert_close(t, multi_lora_shrink(x, A, seg, ranks), rtol=1e-5, atol=1e-5)
    assert torch.equal(multi_lora_expand(t, B, seg, ranks, scales, y.clone()), a)
    # t as (P, T, R) partial sums, summed in order by the expand, as the layer launchers pass them
    parts = torch.stack([t * 0.25, t * 0.5, t * 0.25])
    assert torch.equal(multi_lora_expand(parts, B, seg, ranks, scales, y.clone()), a)


def test_empty_batch(kernel_device):
    x, y, indices, A, B, scales, ranks = _batch(0, 45, 29, (1, 3), 4, torch.float16, torch.float16, kernel_device)
    seg = segments(indices, 2)
    assert seg.order.shape == (0,) and seg.counts.tolist() == [0, 0] and seg.starts.tolist() == [0, 0]
    assert multi_lora_shrink(x, A, seg, ranks).shape == (0, 4)
    assert multi_lora(x, y, indices, A, B, scales, ranks).shape == (0, 29)


def _segments_in_python(indices, num_slots):
    key = [v if 0 <= v < num_slots else -1 for v in indices]
    order = sorted(range(len(key)), key=lambda i: key[i])  # Python's sort is stable
    counts = [key.count(s) for s in range(num_slots)]
    starts = [key.count(-1) + sum(counts[:s]) for s in range(num_slots)]
    return order, starts, counts


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8],
                         ids=lambda d: str(d)[6:])
def test_segments_match_python(dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    low = 0 if dtype == torch.uint8 else -1
    cases = [torch.randint(low, 5, (T,)) for T in (0, 1, 17, 300)]
    cases += [torch.full((9,), low), torch.tensor([3, 3, 0, 0, 3, 7, 9] if low == 0 else [3, -1, 0, -2, 3, 7, 9])]
    for device in devices:
        for indices in cases:
            seg = segments(indices.to(dtype).to(device), 5)
            assert isinstance(seg, Segments) and all(t.dtype == torch.int32 for t in seg)
            order, starts, counts = _segments_in_python(indices.tolist(), 5)
            assert seg.order.tolist() == order, (indices.tolist(), seg.order.tolist())
            assert seg.starts.tolist() == starts and seg.counts.tolist() == counts


def test_errors():
    """Shape and dtype mismatches raise a ValueError that names the problem (no kernel runs)."""
    x, y, indices, A, B, scales, ranks = _batch(6, 8, 10, (1, 3), 4, torch.float32, torch.float32, "cpu")
    good = dict(x=x, y=y, indices=indices, A=A, B=B, scales=scales, ranks=ranks)
    bad = [
        (dict(B=B[:1]), "A holds 2 slots but B holds 1"),
        (dict(B=B[:, :, :3]), "A's R is 4"),
        (dict(A=A[:, :, :7]), "A's K is 7"),
        (dict(B=B[:, :9]), "B's N is 9"),
        (dict(ranks=ranks[:1]), "ranks must be \\(2,\\)"),
        (dict(scales=torch.ones(3)), "scales must be \\(2,\\)"),
        (dict(indices=indices.float()), "indices must be an integer tensor"),
        (dict(indices=indices[:5]), "indices must be \\(6,\\)"),
        (dict(y=y[:5]), "same rows"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            multi_lora(**{**good, **change})
    seg = segments(indices, 2)
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        segments(indices, 0)
    with pytest.raises(ValueError, match="indices must be 1-D"):
        segments(indices[None], 2)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        segments(indices.bool(), 2)
    with pytest.raises(ValueError, match="A must be fp32 or x's dtype"):
        multi_lora_shrink(x.half(), A.bfloat16(), seg, ranks)
    with pytest.raises(ValueError, match="seg holds 2 slots .* but the adapters hold S=3"):
        multi_lora_shrink(x, torch.cat([A, A[:1]]), seg, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="ranks must be \\(2,\\) int32"):
        multi_lora_shrink(x, A, seg, ranks.float())
    with pytest.raises(ValueError, match="out must be \\(6, 4\\) fp32"):
        multi_lora_shrink(x, A, seg, ranks, out=torch.empty(6, 4, dtype=torch.float16))
    t = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="t must be \\(T=6, R=4\\) fp32"):
        multi_lora_expand(t[:, :3], B, seg, ranks, scales, y)
    with pytest.raises(ValueError, match="or \\(P, T, R\\) partial sums"):
        multi_lora_expand(torch.zeros(0, 6, 4), B, seg, ranks, scales, y)
    with pytest.raises(ValueError, match="B must be fp32 or y's dtype"):
        multi_lora_expand(t, B.half(), seg, ranks, scales, y.bfloat16())


def test_int64_offsets(gpu):
    """T·K past 2^31 elements: the gathered rows' offsets must not wrap (the first and last rows are
    checked against the reference)."""
    T, K, N, ranks, R = 66_000, 32_768, 48, (16, 5, 9), 16
    x, y, indices, A, B, scales, ranks_t = _batch(T, K, N, ranks, R, torch.float16, torch.float16, gpu)
    assert x.numel() > 2**31
    rows = torch.cat([torch.arange(64), torch.arange(T - 64, T)]).to(gpu)
    before = y[rows].clone()
    multi_lora(x, y, indices, A, B, scales, ranks_t)
    sub = (x[rows], before, indices[rows])
    same = reference.multi_lora(*sub, A, B, scales, ranks_t)
    exact = reference.multi_lora(*_f64(x[rows], before), indices[rows], *_f64(A, B, scales), ranks_t)
    assert_close(y[rows], exact, same, torch.float16, "y, first and last rows")
    w = torch.randn(N, K, device=gpu, dtype=torch.float16) / K**0.5  # the fused layer gathers the same rows
    fused = multi_lora_linear(x, w, None, indices, A, B, scales, ranks_t)[rows]
    xs = x[rows]
    same = reference.multi_lora(xs, F.linear(xs.float(), w.float()).half(), indices[rows], A, B, scales, ranks_t)
    exact = reference.multi_lora(xs.double(), F.linear(xs.double(), w.double()), indices[rows], *_f64(A, B, scales),
                                 ranks_t)
    assert_close(fused, exact, same, torch.float16, "multi_lora_linear, first and last rows")


def test_cuda_graph_replay(gpu):
    """Captured once (segments included), replayed on new indices and new x: the grid depends on the
    shapes only, and nothing syncs with the host."""
    T, K, N, ranks, R = 256, 512, 384, (16, 8, 4, 1) * 4, 16
    x, y, indices, A, B, scales, ranks_t = _batch(T, K, N, ranks, R, torch.float16, torch.float16, gpu)
    y0 = y.clone()
    multi_lora(x, y.clone(), indices, A, B, scales, ranks_t)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_lora(x, y, indices, A, B, scales, ranks_t)
    for _ in range(2):
        indices.copy_(torch.randint(-1, len(ranks), (T,), device=gpu))
        x.copy_(torch.randn_like(x))
        y.copy_(y0)
        graph.replay()
        expected = multi_lora(x, y0.clone(), indices, A, B, scales, ranks_t)
        torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)  # split-K atomics: not bit-exact


def test_segments_kernel_and_torch_paths_agree(kernel_device):
    """segments' one-program kernel (up to SEGMENTS_MAX_TOKENS tokens) and its torch path (past it) give
    the same grouping; many slots, most of them empty."""
    from fastpeft.kernels import multi_lora as ml

    g = torch.Generator().manual_seed(3)
    for T, S in ((ml.SEGMENTS_MAX_TOKENS, 300), (ml.SEGMENTS_MAX_TOKENS + 1, 7), (5, 1000)):
        indices = torch.randint(-1, S + 2, (T,), generator=g, dtype=torch.int32).to(kernel_device)
        order, starts, counts = _segments_in_python(indices.tolist(), S)
        seg = segments(indices, S)
        assert seg.order.tolist() == order and seg.starts.tolist() == starts and seg.counts.tolist() == counts


def test_repeat_segments_group_repeated_rows(kernel_device):
    """repeat_segments(segments(rows, S), p) is segments(rows.repeat_interleave(p), S) (a batch's tokens,
    p per row, grouped from its rows'), with rows of no adapter, out-of-range slots and repeated ones;
    p = 1 gives the rows' grouping itself."""
    from fastpeft.kernels.multi_lora import repeat_segments

    g = torch.Generator().manual_seed(5)
    for T, S in ((1, 3), (7, 3), (64, 32), (300, 5)):
        rows = torch.randint(-1, S + 1, (T,), generator=g, dtype=torch.int32).to(kernel_device)
        seg = segments(rows, S)
        assert repeat_segments(seg, 1) is seg
        for p in (2, 5):
            got = repeat_segments(seg, p)
            order, starts, counts = _segments_in_python(rows.repeat_interleave(p).tolist(), S)
            assert all(t.dtype == torch.int32 for t in got)
            assert got.order.tolist() == order and got.starts.tolist() == starts and got.counts.tolist() == counts


def _wide(x, w, bias, indices, A, B, scales, ranks, seg=None):
    """multi_lora_wide's layer output (its first N columns) over w and A stacked as one weight (A past
    each rank holds NaN: the product computes those columns, the expand must not read them)."""
    S, R, K = A.shape
    N = w.shape[0]
    w_wide = torch.cat([w, A.to(w.dtype).reshape(S * R, K)])
    bias_wide = None if bias is None else torch.cat([bias, bias.new_zeros(S * R)]).to(x.dtype)
    y = multi_lora_wide(x, w_wide, bias_wide, indices, B, scales, ranks, seg)
    assert tuple(y.shape) == (x.shape[0], N + S * R)
    return y[:, :N]


ROUTES = {"addmm": multi_lora_linear, "wide": _wide, "tma": multi_lora_linear_tma}


def _check_linear(x, w, bias, indices, A, B, scales, ranks, dtype, seg=None, wide=False, route=None):
    """multi_lora_linear (``wide``: multi_lora_wide, A in x's dtype; ``route``: ROUTES' name) against
    x·wᵀ + bias then the reference's LoRA terms, slot by slot; rows with no adapter against the base
    product alone."""
    route = route or ("wide" if wide else "addmm")
    if route == "wide":  # A and the bias in x's dtype
        A = A.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    out = ROUTES[route](x, w, bias, indices, A, B, scales, ranks, seg)
    assert out.dtype == x.dtype and tuple(out.shape) == (x.shape[0], w.shape[0])
    base64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    base = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    exact = reference.multi_lora(x.double(), base64, indices, *_f64(A, B, scales), ranks)
    same = reference.multi_lora(x, base, indices, A, B, scales, ranks)
    assert_close(out[indices < 0], base64[indices < 0], base[indices < 0], dtype, "y, rows with no adapter")
    for s, r in enumerate(ranks.tolist()):
        rows = indices == s
        if rows.any():
            assert_close(out[rows], exact[rows], same[rows], dtype, f"y, slot {s} (rank {r})")
    return out


@pytest.mark.parametrize("wide", [False, True], ids=["addmm", "wide"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
def test_multi_lora_linear_matches_reference(kernel_device, dtypes, wide):
    dtype, adapter_dtype = dtypes
    for i, (T, K, N, ranks, R) in enumerate(_cases(kernel_device)):
        x, _, indices, A, B, scales, ranks_t = _batch(T, K, N, ranks, R, dtype, adapter_dtype, kernel_device)
        w = torch.randn(N, K, device=kernel_device, dtype=dtype) / K**0.5
        bias = torch.randn(N, device=kernel_device, dtype=dtype) if i % 2 else None
        _check_linear(x, w, bias, indices, A, B, scales, ranks_t, dtype, wide=wide)


@pytest.mark.parametrize("wide", [False, True], ids=["addmm", "wide"])
def test_multi_lora_linear_layouts_and_runs(kernel_device, wide):
    """Strided x, transposed w (addmm), an fp32 bias on fp16; a prefill-like batch (long sorted runs, a
    slot no token uses, rank 0); every row -1 (the base product alone); the segments given."""
    dtype = torch.float16
    x, _, indices, A, B, scales, ranks = _batch(37, 45, 29, (1, 3, 8, 16), 16, dtype, torch.float32, kernel_device,
                                                x_layout="strided")
    w = torch.randn(45, 29, device=kernel_device, dtype=dtype).t()
    bias = torch.randn(29, device=kernel_device)
    _check_linear(x, w, bias, indices, A, B, scales, ranks, dtype, wide=wide)
    runs = torch.tensor([0] * 30 + [2] * 25 + [3] * 15, device=kernel_device)
    x, _, _, A, B, scales, ranks = _batch(70, 40, 33, (8, 16, 3, 0), 16, dtype, dtype, kernel_device, indices=runs)
    w = torch.randn(33, 40, device=kernel_device, dtype=dtype) / 40**0.5
    a = _check_linear(x, w, None, runs, A, B, scales, ranks, dtype, wide=wide)
    route = _wide if wide else multi_lora_linear
    assert torch.equal(a, route(x, w, None, runs, A, B, scales, ranks, segments(runs, 4)))
    nothing = torch.full((70,), -1, device=kernel_device)
    _check_linear(x, w, None, nothing, A, B, scales, ranks, dtype, wide=wide)


# (T, K, N, ranks, R, layout): K and N multiples of 8 (TMA's 16-byte rows)
TMA_CPU_CASES = [
    (37, 48, 40, (1, 3, 8, 16), 16, "scattered"),   # many slots in a tile: one product each
    (70, 64, 56, (8, 16, 3, 0), 16, "runs"),         # prefill-like runs, a slot no token uses, rank 0
    (33, 40, 72, (40, 5), 40, "runs"),               # R past one BLOCK_R chunk
]
TMA_GPU_CASES = TMA_CPU_CASES + [
    (4096, 4096, 4096, (16,) * 8, 16, "runs"),      # prefill: 8 runs of 512
    (5000, 2048, 1024, (16, 8, 64, 1), 64, "runs"),
    (1000, 1024, 2048, (16, 8, 4, 1) * 8, 16, "scattered"),
]


def _runs(T, S, device, layout):
    """Slots in runs of about T / (2S) tokens (prefill rows), -1 among them, or scattered at random."""
    if layout == "scattered":
        return torch.randint(-1, S, (T,), device=device)
    runs = torch.randint(-1, S, (2 * S,), device=device)
    return runs.repeat_interleave(-(-T // (2 * S)))[:T].contiguous()


@pytest.mark.parametrize("adapter_dtype", ["fp32", "same"])
def test_multi_lora_linear_tma_matches_reference(kernel_device, adapter_dtype):
    """The TMA matmul with the LoRA terms in its epilogue (fp16 under the interpreter, whose bf16 dots
    are wrong; bf16 on the GPU): runs of one slot and scattered slots, mixed ranks, -1 rows, a bias or
    not, x with a padded row stride."""
    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float16
    cases = TMA_GPU_CASES if kernel_device == "cuda" else TMA_CPU_CASES
    for i, (T, K, N, ranks, R, layout) in enumerate(cases):
        a_dtype = torch.float32 if adapter_dtype == "fp32" else dtype
        indices = _runs(T, len(ranks), kernel_device, layout)
        x, _, _, A, B, scales, ranks_t = _batch(T, K, N, ranks, R, dtype, a_dtype, kernel_device, indices=indices)
        if i % 2:  # rows 16-byte aligned but padded
            x = torch.randn(T, K + 8, device=kernel_device, dtype=dtype)[:, :K]
        w = torch.randn(N, K, device=kernel_device, dtype=dtype) / K**0.5
        bias = torch.randn(N, device=kernel_device, dtype=dtype) if i % 2 == 0 else None
        _check_linear(x, w, bias, indices, A, B, scales, ranks_t, dtype, route="tma")


def test_multi_lora_linear_tma_errors(kernel_device):
    """On the kernels' device: TMA operands there (CPU tensors on a GPU machine are none)."""
    dev = kernel_device
    x, y, indices, A, B, scales, ranks = _batch(6, 16, 8, (1, 3), 4, torch.float16, torch.float16, dev)
    w = torch.randn(8, 16, dtype=torch.float16, device=dev)
    with pytest.raises(ValueError, match="are not its operands"):
        multi_lora_linear_tma(x.float(), w.float(), None, indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="w must have x's dtype torch.float16"):
        multi_lora_linear_tma(x, w.bfloat16(), None, indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="are not its operands"):
        multi_lora_linear_tma(x, torch.randn(16, 8, dtype=torch.float16, device=dev).t(), None, indices, A, B, scales,
                              ranks)
    with pytest.raises(ValueError, match="bias must be \\(8,\\)"):
        multi_lora_linear_tma(x, w, torch.zeros(9, dtype=torch.float16, device=dev), indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="B's N is 7"):
        multi_lora_linear_tma(x, w, None, indices, A, B[:, :7], scales, ranks)


# (T, K, widths, ranks per layer, R): sibling layers of one input (q, k, v), one slot count
GROUP_CPU_CASES = [
    (37, 45, (29, 13, 13), ((1, 3, 8, 16), (4, 0, 8, 2), (16, 16, 0, 1)), 16),
    (9, 40, (70, 33), ((40, 3, 0), (1, 40, 7)), 40),   # R past BLOCK_R chunks; a column run per layer
]
GROUP_GPU_CASES = GROUP_CPU_CASES + [
    (256, 4096, (4096, 1024, 1024), ((16, 8, 4, 1) * 8, (16, 0, 4, 1) * 8, (16, 8, 0, 16) * 8), 16),
    (64, 2048, (5632, 5632), ((16,) * 32, (8,) * 32), 16),
]


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=dtype_pair_id)
def test_multi_lora_wide_group_matches_layers(kernel_device, dtypes):
    """multi_lora_wide_group: each layer's columns as that layer alone (its own ranks and scales; rank 0
    where an adapter leaves the layer out), a bias on some layers, NaN past each rank."""
    dtype, adapter_dtype = dtypes
    cases = GROUP_GPU_CASES if kernel_device == "cuda" else GROUP_CPU_CASES
    for T, K, widths, layer_ranks, R in cases:
        S = len(layer_ranks[0])
        indices = torch.randint(-1, S, (T,), device=kernel_device)
        layers = [_batch(T, K, n, ranks, R, dtype, adapter_dtype, kernel_device, indices=indices)
                  for n, ranks in zip(widths, layer_ranks)]
        x = layers[0][0]
        ws = [torch.randn(n, K, device=kernel_device, dtype=dtype) / K**0.5 for n in widths]
        biases = [torch.randn(n, device=kernel_device, dtype=dtype) if g % 2 == 0 else None
                  for g, n in enumerate(widths)]
        w_group = torch.cat([torch.cat([w, layer[3].to(dtype).reshape(S * R, K)]) for w, layer in zip(ws, layers)])
        bias_group = torch.cat([torch.cat([b if b is not None else torch.zeros(n, device=kernel_device, dtype=dtype),
                                           torch.zeros(S * R, device=kernel_device, dtype=dtype)])
                                for b, n in zip(biases, widths)])
        B = torch.cat([layer[4] for layer in layers], dim=1)
        scales = torch.stack([layer[5] for layer in layers])
        ranks = torch.stack([layer[6] for layer in layers])
        y = multi_lora_wide_group(x, w_group, bias_group, indices, B, scales, ranks, widths)
        assert tuple(y.shape) == (T, sum(widths) + len(widths) * S * R) and y.dtype == dtype
        col = 0
        for g, (n, w, bias, layer) in enumerate(zip(widths, ws, biases, layers)):
            A, B_g = layer[3].to(dtype), layer[4]
            out = y[:, col:col + n]
            base64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            base = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(dtype)
            exact = reference.multi_lora(x.double(), base64, indices, *_f64(A, B_g, scales[g]), ranks[g])
            same = reference.multi_lora(x, base, indices, A, B_g, scales[g], ranks[g])
            for s in range(-1, S):
                rows = indices == s
                if rows.any():
                    assert_close(out[rows], exact[rows], same[rows], dtype, f"layer {g}, slot {s}")
            col += n + S * R


def test_multi_lora_wide_group_errors():
    x, y, indices, A, B, scales, ranks = _batch(6, 8, 10, (1, 3), 4, torch.float32, torch.float32, "cpu")
    w_group = torch.randn(2 * (5 + 2 * 4), 8)
    two = torch.stack([ranks, ranks])
    with pytest.raises(ValueError, match=r"B must be \(S, ΣN_g = 12, R\)"):
        multi_lora_wide_group(x, w_group, None, indices, B, scales[None], two, (6, 6))
    with pytest.raises(ValueError, match=r"w_group must be \(Σ\(N_g \+ S·R\) = 26, K = 8\)"):
        multi_lora_wide_group(x, w_group[:20], None, indices, B, torch.stack([scales, scales]), two, (5, 5))
    with pytest.raises(ValueError, match=r"ranks must be \(2, 2\)"):
        multi_lora_wide_group(x, w_group, None, indices, B, torch.stack([scales, scales]), ranks, (5, 5))
    with pytest.raises(ValueError, match=r"scales must be \(2, 2\)"):
        multi_lora_wide_group(x, w_group, None, indices, B, scales, two, (5, 5))


def test_multi_lora_wide_errors():
    x, y, indices, A, B, scales, ranks = _batch(6, 8, 10, (1, 3), 4, torch.float32, torch.float32, "cpu")
    w_wide = torch.randn(10 + 2 * 4, 8)
    with pytest.raises(ValueError, match=r"w_wide must be \(N \+ S·R = 18, K = 8\) in x's dtype"):
        multi_lora_wide(x, w_wide[:10], None, indices, B, scales, ranks)
    with pytest.raises(ValueError, match="w_wide must be .* in x's dtype torch.float32"):
        multi_lora_wide(x, w_wide.half(), None, indices, B, scales, ranks)
    with pytest.raises(ValueError, match=r"bias_wide must be \(18,\)"):
        multi_lora_wide(x, w_wide, torch.zeros(10), indices, B, scales, ranks)
    with pytest.raises(ValueError, match=r"indices must be \(6,\)"):
        multi_lora_wide(x, w_wide, None, indices[:5], B, scales, ranks)
    with pytest.raises(ValueError, match=r"scales must be \(2,\)"):
        multi_lora_wide(x, w_wide, None, indices, B, torch.ones(3), ranks)


def test_multi_lora_linear_errors():
    x, y, indices, A, B, scales, ranks = _batch(6, 8, 10, (1, 3), 4, torch.float32, torch.float32, "cpu")
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="w must have x's dtype"):
        multi_lora_linear(x, w.half(), None, indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="x must be \\(T, K\\) and w \\(N, K\\)"):
        multi_lora_linear(x, w[:, :7], None, indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="bias must be \\(10,\\)"):
        multi_lora_linear(x, w, torch.zeros(9), indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="bias must be \\(10,\\) floating point"):
        multi_lora_linear(x, w, torch.zeros(10, dtype=torch.int32), indices, A, B, scales, ranks)
    with pytest.raises(ValueError, match="scales must be \\(2,\\)"):
        multi_lora_linear(x, w, None, indices, A, B, torch.ones(3), ranks)
    with pytest.raises(ValueError, match="B's N is 9"):
        multi_lora_linear(x, w, None, indices, A, B[:, :9], scales, ranks)


@pytest.mark.parametrize("route", ["addmm", "wide", "tma"])
def test_multi_lora_linear_cuda_graph_replay(gpu, route):
    """Captured once (segments included), replayed on new indices and x."""
    T, K, N, ranks, R = 256, 512, 384, (16, 8, 4, 1) * 4, 16
    x, _, indices, A, B, scales, ranks_t = _batch(T, K, N, ranks, R, torch.bfloat16, torch.bfloat16, gpu)
    w = torch.randn(N, K, device=gpu, dtype=torch.bfloat16) / K**0.5
    route = ROUTES[route]
    route(x, w, None, indices, A, B, scales, ranks_t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = route(x, w, None, indices, A, B, scales, ranks_t)
    for _ in range(2):
        indices.copy_(torch.randint(-1, len(ranks), (T,), device=gpu))
        x.copy_(torch.randn_like(x))
        graph.replay()
        expected = route(x, w, None, indices, A, B, scales, ranks_t)
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)  # split-K atomics: not bit-exact
