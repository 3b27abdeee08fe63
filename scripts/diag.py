"""Development diagnostics on the GPU machine (not part of the suite).

    python scripts/diag.py prec      errors per output and route for same-dtype half adapters
    python scripts/diag.py kernels   GPU time of each kernel at training shapes, grid variants
    python scripts/diag.py dropout   the LoRA kernels at the training step's shapes with and without
                                     dropout (graph replay): what the mask costs in each
    python scripts/diag.py gemm      the persistent TMA matmul (lora_linear_tma) against cuBLAS and the
                                     cuBLAS route, forward and dX forms, over tile configs
    python scripts/diag.py pdl       graph-replayed forward / forward+backward with and without PDL
    python scripts/diag.py small     decode-size main matmul tile configs (pointer and TMA kernels)
    python scripts/diag.py eager     the bench layer's eager forward at decode sizes, PDL off and on
    python scripts/diag.py layer M [K N [r]]   one layer's wall time against its GPU kernels (profiler)
    python scripts/diag.py e2e       GPU busy time per training step (profiler) vs step time
    python scripts/diag.py seed      what dropout costs a graph-replayed decode-size forward: the seed's
                                     draw and the mask, apart
"""
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from fastpeft import ops, reference  # noqa: E402
from fastpeft.kernels import launch as kernel_launch  # noqa: E402
from fastpeft.kernels import grads as grads_kernels  # noqa: E402
from fastpeft.kernels import shrink_expand as shrink_expand_kernels  # noqa: E402
from fastpeft.kernels import tuning  # noqa: E402
from fastpeft.kernels.configs import TMA_CONFIGS  # noqa: E402
from fastpeft.kernels.grads import lora_adapter_grads  # noqa: E402
from fastpeft.kernels.linear import lora_linear, lora_linear_tma  # noqa: E402
from fastpeft.kernels.shrink import lora_shrink  # noqa: E402
from fastpeft.kernels.shrink_expand import lora_shrink_expand  # noqa: E402
from fastpeft.kernels.launch import cdiv  # noqa: E402
from common import time_ms  # noqa: E402


def prec():
    import test_kernels as T
    from tolerance import ATOL, rel_err

    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for gemm in ("auto", "triton", "cublas"):
            os.environ["FASTPEFT_GEMM"] = gemm
            for M, K, N, R in [s for s in T.GPU_SHAPES if s[0]]:
                for p in (0.0,):
                    x, w, b, a, bb = T._make(M, K, N, R, dtype, dtype, "cuda")
                    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cuda") if p else None
                    g = torch.randn(M, N, device="cuda", dtype=dtype)
                    need = (True, True, True)
                    out = T._grads(lambda *t: ops.lora_linear(*t, 2.0, p, seed), x, w, b, a, bb, need, g)
                    same = T._grads(lambda *t: reference.lora_linear(*t, 2.0, p, seed), x, w, b, a, bb, need, g)
                    ex = T._grads(lambda *t: reference.lora_linear(*t, 2.0, p, seed), x.double(), w.double(),
                                  b.double(), a.double(), bb.double(), need, g.double())
                    cells = []
                    for name, o, s_, e in zip(("y", "dx", "dA", "dB"), out, same, ex):
                        err, base = rel_err(o, e), rel_err(s_, e)
                        flag = "FAIL" if err > 2 * base + ATOL[dtype] else "ok"
                        cells.append(f"{name} {err:.2e}/{base:.2e} {flag}")
                    print(f"{str(dtype)[6:]} {gemm:6s} {M, K, N, R} p={p}: " + " | ".join(cells), flush=True)
    os.environ.pop("FASTPEFT_GEMM")




def _shapes(default: str) -> list:
    """(M, K, N) shapes from FASTPEFT_DIAG_SHAPES="M,K,N;...", else ``default`` (same form)."""
    spec = os.environ.get("FASTPEFT_DIAG_SHAPES", default)
    return [tuple(int(v) for v in s.split(",")) for s in spec.split(";")]


def _operands(M: int, K: int, N: int, R: int = 16):
    """x, dY (bf16), A, B, xa (fp32) of one projection, and its dropout args (seed, threshold, scale) at
    p = 0.05."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(R, K, device="cuda") / K**0.5
    bb = torch.randn(N, R, device="cuda")
    xa = torch.randn(M, R, device="cuda")
    seed = torch.tensor([5], device="cuda")
    return x, dy, a, bb, xa, (seed, reference.dropout_threshold(0.05), reference.dropout_scale(0.05))


def kernels():
    """GPU time of each kernel at training shapes; grid variants (BM, BN / BM, BC, split).
    FASTPEFT_DIAG_SHAPES="M,K,N;..." picks the shapes."""
    for M, K, N in _shapes("16384,4096,4096;4096,4096,4096;8192,2048,5632"):
        x, dy, a, bb, xa, (seed, t, sc) = _operands(M, K, N)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        line = [f"M={M} K={K} N={N}:", f"F.linear {time_ms(lambda: F.linear(x, w)) * 1e3:.1f}",
                f"dX mm {time_ms(lambda: dy @ w) * 1e3:.1f}"]
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        line.append(f"addmm_ {time_ms(lambda: c.addmm_(x, w.t())) * 1e3:.1f}")
        line.append(f"shrink {time_ms(lambda: lora_shrink(x, a)) * 1e3:.1f}")
        print(" ".join(line), flush=True)
        real_grid = shrink_expand_kernels._shrink_expand_grid
        variants = [  # (label, (BM, BK, BN, n_split) -> the same)
            ("auto", None),
            ("BK 64", lambda g: (g[0], 64, g[2], g[3])),
            ("BK 128", lambda g: (g[0], 128, g[2], g[3])),
            ("n_split 1", lambda g: (g[0], g[1], g[2], 1)),
            ("BM 32 n_split 1", lambda g: (32, g[1], g[2], 1)),
        ]
        for label, change in variants:
            def grid(M_, N_, BR, sms, in_dropout=False, change=change):
                g = real_grid(M_, N_, BR, sms, in_dropout)
                if change is not None:
                    g = change(g)
                    g = g[:3] + (max(1, min(cdiv(N_, g[2]), g[3])),)
                return g
            shrink_expand_kernels._shrink_expand_grid = grid
            kernel_launch._plans.clear()  # the launchers keep the grid they planned per shape
            try:
                f0 = time_ms(lambda: lora_shrink_expand(x, a, bb, None, 2.0))
                f1 = time_ms(lambda: lora_shrink_expand(x, a, bb, None, 2.0, seed, t, sc))
                b0 = time_ms(lambda: lora_shrink_expand(dy, bb.t(), a.t(), None, 2.0))
                b1 = time_ms(lambda: lora_shrink_expand(dy, bb.t(), a.t(), None, 2.0, seed, t, sc, mask_output=True))
            except Exception as e:
                print(f"  shrink_expand {label}: {type(e).__name__}", flush=True)
                continue
            print(f"  shrink_expand {label} {grid(M, N, 16, 132)} (p.05 {grid(M, N, 16, 132, True)}) / dX "
                  f"{grid(M, K, 16, 132)}: fwd {f0 * 1e3:.1f} / p.05 {f1 * 1e3:.1f}; dX {b0 * 1e3:.1f} / p.05 "
                  f"{b1 * 1e3:.1f} us", flush=True)
        shrink_expand_kernels._shrink_expand_grid = real_grid
        kernel_launch._plans.clear()
        real_gg = grads_kernels._grad_grid
        for cfg in (None, (128, 64, 1), (128, 64, 2), (128, 64, 4), (64, 64, 2)):
            def gg(Cs, M_, n_r, sms, cfg=cfg):
                if cfg is None:
                    return real_gg(Cs, M_, n_r, sms)
                bm, bc, split = cfg
                return bm, bc, [cdiv(C, bc) for C in Cs], split
            grads_kernels._grad_grid = gg
            kernel_launch._plans.clear()
            g0 = time_ms(lambda: lora_adapter_grads(x, xa, dy, xa, 2.0))
            g1 = time_ms(lambda: lora_adapter_grads(x, xa, dy, xa, 2.0, seed, t, sc))
            shown = gg([K, N], M, 1, 132)
            print(f"  adapter_grads (BM, BC, blocks, split)={shown}{'' if cfg else ' auto'}: "
                  f"{g0 * 1e3:.1f} / p.05 {g1 * 1e3:.1f} us", flush=True)
        grads_kernels._grad_grid = real_gg
        kernel_launch._plans.clear()


def dropout():
    """GPU time (graph replay) of the cuBLAS route's LoRA kernels at the training step's shapes, p = 0
    and 0.05: the forward C pass, the backward's C pass (output mask) and the adapter grads, and the
    shrink dY·B. FASTPEFT_DIAG_SHAPES="M,K,N;..." picks the shapes."""
    from common import graph_time_ms

    us = lambda f: f"{graph_time_ms(f) * 1e3:.1f}"  # noqa: E731
    print(f"Philox rounds: {reference.DROPOUT_ROUNDS}", flush=True)
    for M, K, N in _shapes("8192,2048,2048;8192,2048,256;8192,2048,5632;8192,5632,2048;16384,4096,4096"):
        x, dy, a, bb, xa, drop = _operands(M, K, N)
        dyb = lora_shrink(dy, bb.t())
        cells = []
        for args in ((None, 0, 1.0), drop):
            cells.append("/".join((us(lambda: lora_shrink_expand(x, a, bb, None, 2.0, *args)),
                                   us(lambda: lora_shrink_expand(dy, bb.t(), a.t(), None, 2.0, *args,
                                                                 mask_output=True)),
                                   us(lambda: lora_adapter_grads(x, dyb, dy, xa, 2.0, *args)))))
        print(f"M={M} K={K} N={N}: fwd C pass / dX C pass / grads, p=0: {cells[0]}, p=0.05: {cells[1]} us; "
              f"shrink dY·B {us(lambda: lora_shrink(dy, bb.t()))} us", flush=True)


def _pinned_linear(configs, us, run, label: str) -> list:
    """'label config time' of ``run`` with each lora_linear tile config pinned (FASTPEFT_LINEAR_CONFIG)."""
    cells = []
    for cfg in configs:
        os.environ["FASTPEFT_LINEAR_CONFIG"] = ",".join(map(str, cfg))
        try:
            tuning.reload()  # the switches are read once
            cells.append(f"{label} {cfg} {us(run)}")
        except Exception as e:
            cells.append(f"{label} {cfg} {type(e).__name__}")
    os.environ.pop("FASTPEFT_LINEAR_CONFIG", None)
    tuning.reload()
    return cells


def host():
    """Host time per call at tiny shapes (the GPU idle): F.linear, lora_linear (its kept plan) and
    lora_linear_tma (its descriptors encoded once per base pointer, then its compiled kernel)."""
    import time

    xs, ws, ls, rs, As = (torch.randn(*s_, device="cuda", dtype=dt) for s_, dt in
                          (((64, 512), torch.bfloat16), ((512, 512), torch.bfloat16), ((64, 16), torch.float32),
                           ((512, 16), torch.float32), ((16, 512), torch.float32)))
    for name, f in (("F.linear", lambda: F.linear(xs, ws)),
                    ("lora_linear", lambda: lora_linear(xs, ws, None, ls, rs, 2.0)),
                    ("lora_linear pdl", lambda: lora_linear(xs, ws, None, ls, rs, 2.0, pdl=True)),
                    ("lora_shrink", lambda: lora_shrink(xs, As)),
                    ("lora_linear_tma", lambda: lora_linear_tma(xs, ws, None, ls, rs, 2.0))):
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        per_call = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"host per call: {name} {per_call:.1f} us", flush=True)


def gemm():
    """lora_linear_tma's GPU time (do_bench) and error over tile configs against F.linear, the cuBLAS
    route's forward (C pass + addmm) and dX, and the pointer-based Triton matmul.
    FASTPEFT_DIAG_SHAPES="M,K,N;..." picks the shapes, FASTPEFT_DIAG_TMA_CONFIGS=kept|kept+ws|kept+ws-masked
    the configs (default: a wide sweep)."""
    import inspect

    import triton.language as tl

    print("tl.range:", inspect.signature(tl.range.__init__), flush=True)
    host()
    us = lambda f: f"{time_ms(f) * 1e3:.1f}"  # noqa: E731
    configs = [(128, 256, 64, 8, 8, 3, True, True), (128, 256, 64, 8, 8, 3, False, True),
               (128, 256, 64, 8, 8, 4, False, True), (128, 256, 64, 8, 8, 3, True, False),
               (256, 128, 64, 8, 8, 3, True, True), (128, 128, 64, 8, 8, 4, True, True),
               (128, 128, 64, 8, 4, 4, True, True), (128, 128, 128, 8, 8, 3, True, True),
               (128, 256, 64, 16, 8, 3, True, True), (128, 256, 64, 4, 8, 3, True, True),
               (128, 256, 64, 16, 8, 3, True, True, True), (128, 256, 64, 16, 4, 3, True, True, True),
               (128, 128, 64, 8, 8, 4, True, True, True), (128, 128, 64, 8, 4, 4, True, True, True),
               (128, 256, 64, 16, 8, 4, True, False, True)]
    if os.environ.get("FASTPEFT_DIAG_TMA_CONFIGS") == "kept+ws":  # the kept ones and the warp-specialized ones
        configs = list(TMA_CONFIGS["sm90"].values()) + [c for c in configs if len(c) > 8]
    elif os.environ.get("FASTPEFT_DIAG_TMA_CONFIGS") == "kept":
        configs = list(TMA_CONFIGS["sm90"].values())
    elif os.environ.get("FASTPEFT_DIAG_TMA_CONFIGS") == "kept+ws-masked":  # warp-specialized, for the mask
        configs = list(TMA_CONFIGS["sm90"].values()) + [(128, 256, 64, 16, 8, 3, True, True, True, True),
                                                        (128, 256, 64, 16, 8, 3, True, True, True),
                                                        (128, 128, 64, 8, 8, 4, True, True, True)]
    for M, K, N in _shapes("16384,4096,4096;4096,4096,4096;8192,2048,2048;8192,2048,256;8192,2048,5632;8192,5632,2048"):
        x, dy, a, bb, xa, (seed, t, sc) = _operands(M, K, N)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        dyb = torch.randn(M, 16, device="cuda")
        want = (F.linear(x, w, bias).float() + 2.0 * xa @ bb.t()).float()
        want_dx = (dy.float() @ w.float() + 2.0 * dyb @ a)
        os.environ["FASTPEFT_GEMM"] = "cublas"
        line = [f"M={M} K={K} N={N}: F.linear {us(lambda: F.linear(x, w, bias))}, dY·W {us(lambda: dy @ w)}",
                f"cuBLAS route fwd {us(lambda: ops.forward_impl(x, w, bias, a, bb, 2.0, 0.0, None))}",
                f"p.05 {us(lambda: ops.forward_impl(x, w, bias, a, bb, 2.0, 0.05, seed))}",
                f"dX {us(lambda: ops.backward_impl(dy, x, w, a, bb, xa, 2.0, 0.0, None, True, False, False))}",
                f"p.05 {us(lambda: ops.backward_impl(dy, x, w, a, bb, xa, 2.0, 0.05, seed, True, False, False))}"]
        os.environ.pop("FASTPEFT_GEMM")
        line += _pinned_linear(((128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3)), us,
                               lambda: lora_linear(x, w, bias, xa, bb, 2.0), "pointer")
        line.append(f"shrink {us(lambda: lora_shrink(x, a))}")
        print(" | ".join(line) + " us", flush=True)
        for cfg in configs:
            try:
                out = lora_linear_tma(x, w, bias, xa, bb, 2.0, config=cfg)
                err = ((out.float() - want).abs().max() / want.abs().max()).item()
                fwd = us(lambda: lora_linear_tma(x, w, bias, xa, bb, 2.0, config=cfg))
                dx = lora_linear_tma(dy, w.t(), None, dyb, a.t(), 2.0, config=cfg)
                err_dx = ((dx.float() - want_dx).abs().max() / want_dx.abs().max()).item()
                bwd = us(lambda: lora_linear_tma(dy, w.t(), None, dyb, a.t(), 2.0, config=cfg))
                bwd1 = us(lambda: lora_linear_tma(dy, w.t(), None, dyb, a.t(), 2.0, seed, t, sc,
                                                  mask_output=True, config=cfg))
                print(f"  tma {cfg}: fwd {fwd} (err {err:.1e}), dX {bwd} / p.05 {bwd1} us (err {err_dx:.1e})",
                      flush=True)
            except Exception as e:
                print(f"  tma {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        # the whole forward / dX on the TMA route: shrink then the matmul, in order or overlapped (PDL)
        from common import graph_time_ms

        def fwd(pdl, p=False):
            xa_ = lora_shrink(x, a, *((seed, t, sc) if p else ()), launch_dependents=pdl)
            return lora_linear_tma(x, w, bias, xa_, bb, 2.0, pdl=pdl)

        def dx(pdl, p=False):
            dyb_ = lora_shrink(dy, bb.t(), launch_dependents=pdl)
            return lora_linear_tma(dy, w.t(), None, dyb_, a.t(), 2.0, *((seed, t, sc) if p else ()),
                                   mask_output=True, pdl=pdl)
        try:
            same = (fwd(True) - fwd(False)).abs().max().item(), (dx(True, True) - dx(False, True)).abs().max().item()
            cells = [f"{name}{' p.05' if p else ''}{' PDL' if pdl else ''} {us(lambda: f(pdl, p))} / graph {graph_time_ms(lambda: f(pdl, p)) * 1e3:.1f}"
                     for name, f in (("fwd", fwd), ("dX", dx)) for p in (False, True) for pdl in (False, True)]
            print(f"  TMA route, do_bench / graph replay: {' | '.join(cells)} us; max |PDL - in order| {same}",
                  flush=True)
        except Exception as e:
            print(f"  TMA route: {type(e).__name__}: {str(e)[:300]}", flush=True)


def shrink():
    """lora_shrink(partial=True) (the TMA route's shrink: bf16 x, fp32 A, r = 16) over tile configs
    (FASTPEFT_SHRINK_CONFIG = BLOCK_M,BLOCK_K,split_k,warps,stages), µs and the read rate of x, with
    and without dropout. FASTPEFT_DIAG_SHAPES="M,K;..." picks the shapes."""
    us = lambda f: time_ms(f) * 1e3  # noqa: E731
    configs = ["", "64,128,2,4,3", "64,128,2,4,4", "64,128,4,4,3", "32,128,2,4,3", "64,256,2,4,3",
               "128,128,1,8,3", "128,128,2,8,3", "128,64,2,4,4", "128,256,1,8,2"]
    for spec in (os.environ.get("FASTPEFT_DIAG_SHAPES") or "16384,4096;8192,2048;8192,5632;4096,4096").split(";"):
        M, K = (int(v) for v in spec.split(","))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, K, device="cuda") / K**0.5
        seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cuda")
        drop = (seed, reference.dropout_threshold(0.05), reference.dropout_scale(0.05))
        want = (x.float() @ a.t())
        cells = []
        for cfg in configs:
            os.environ["FASTPEFT_SHRINK_CONFIG"] = cfg
            try:
                tuning.reload()  # the switches are read once
                err = (lora_shrink(x, a, partial=True).sum(0) - want).abs().max().item()
                t0 = us(lambda: lora_shrink(x, a, partial=True))
                t1 = us(lambda: lora_shrink(x, a, *drop, partial=True))
                cells.append(f"{cfg or 'default'}: {t0:.1f} ({M * K * 2 / t0 / 1e6:.2f} TB/s) / p.05 {t1:.1f} "
                             f"(err {err:.0e})")
            except Exception as e:
                cells.append(f"{cfg}: {type(e).__name__}: {str(e)[:120]}")
        os.environ.pop("FASTPEFT_SHRINK_CONFIG", None)
        tuning.reload()
        print(f"M={M} K={K} shrink us: " + " | ".join(cells), flush=True)


def pdl():
    """Graph-replayed forward and forward + dX + grads (forward_impl / backward_impl) of one 4096 x 4096
    r = 16 projection at decode and training sizes, FASTPEFT_PDL=0 against 1, routes as ``auto`` picks
    them (FASTPEFT_GEMM moves them), F.linear beside. FASTPEFT_DIAG_SHAPES="M,K,N;..." picks the shapes."""
    from common import graph_time_ms

    us = lambda f: f"{graph_time_ms(f) * 1e3:.1f}"  # noqa: E731
    for M, K, N in _shapes("1,4096,4096;16,4096,4096;256,4096,4096;4096,4096,4096;16384,4096,4096"):
        x, dy, a, bb, xa, (seed, t, sc) = _operands(M, K, N)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        cells = [f"M={M} K={K} N={N} route {ops.main_matmul(M)}: F.linear {us(lambda: F.linear(x, w))}"]
        for p in (0.0, 0.05):
            s_ = seed if p else None
            for flag in ("0", "1"):
                os.environ["FASTPEFT_PDL"] = flag

                def fwd():
                    return ops.forward_impl(x, w, None, a, bb, 2.0, p, s_)

                def both():
                    y, xa_ = ops.forward_impl(x, w, None, a, bb, 2.0, p, s_)
                    return ops.backward_impl(dy, x, w, a, bb, xa_, 2.0, p, s_, True, True, True)
                try:
                    cells.append(f"p={p} PDL={flag}: fwd {us(fwd)} fwd+bwd {us(both)}")
                except Exception as e:
                    cells.append(f"p={p} PDL={flag}: {type(e).__name__}: {str(e)[:200]}")
        os.environ.pop("FASTPEFT_PDL")
        print(" | ".join(cells) + " us", flush=True)


def small():
    """Graph-replayed GPU time of the Triton route's main matmul at decode sizes (K = N = 4096, r = 16)
    over tile configs: the pointer kernel (lora_linear) and the TMA one (lora_linear_tma), with
    F.linear beside. FASTPEFT_DIAG_SHAPES="M,K,N;..." picks the shapes."""
    from common import graph_time_ms

    us = lambda f: f"{graph_time_ms(f) * 1e3:.1f}"  # noqa: E731
    pointer = [(16, 32, 128, 8, 4, 5), (16, 64, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4), (16, 16, 256, 8, 4, 4),
               (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3), (64, 128, 64, 8, 4, 5),
               (64, 64, 256, 8, 4, 3), (128, 64, 64, 8, 4, 4)]
    tma = [(64, 128, 128, 8, 4, 4, True, True), (64, 128, 64, 8, 4, 5, True, True),
           (64, 64, 128, 8, 4, 5, True, True), (64, 64, 256, 8, 4, 3, True, True),
           (128, 128, 64, 8, 8, 4, True, True), (64, 32, 256, 8, 4, 4, True, True)]
    for M, K, N in _shapes("1,4096,4096;16,4096,4096;64,4096,4096;256,4096,4096"):
        x, dy, a, bb, xa, _ = _operands(M, K, N)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        cells = [f"M={M} K={K} N={N}: F.linear {us(lambda: F.linear(x, w))}"]
        cells += _pinned_linear([c for c in pointer if c[0] <= 16 * max(1, M)], us,
                                lambda: lora_linear(x, w, None, xa, bb, 2.0), "ptr")
        for cfg in tma:
            try:
                cells.append(f"tma {cfg[:6]} {us(lambda: lora_linear_tma(x, w, None, xa, bb, 2.0, config=cfg))}")
            except Exception as e:
                cells.append(f"tma {cfg[:6]} {type(e).__name__}")
        print(" | ".join(cells) + " us", flush=True)


def eager():
    """Eager forward of the bench's fastpeft layer at decode sizes, FASTPEFT_PDL=0 against 1, interleaved
    twice: do_bench's median (events around each call, L2 flushed before it) and the wall time per call
    of 200 back-to-back calls."""
    import time

    from bench_lora import make_layers

    for M in (1, 16, 256):
        for p in (0.0, 0.05):
            _, fast, _ = make_layers(4096, 4096, 16, p)
            x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            cells = []
            for flag in ("0", "1", "0", "1"):
                os.environ["FASTPEFT_PDL"] = flag
                bench = time_ms(lambda: fast(x)) * 1e3
                for _ in range(20):
                    fast(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    fast(x)
                torch.cuda.synchronize()
                cells.append(f"PDL={flag} {bench:.1f} / {(time.perf_counter() - t0) / 200 * 1e6:.1f}")
            os.environ.pop("FASTPEFT_PDL")
            print(f"M={M} p={p} eager fwd, do_bench / wall per call (us): " + " | ".join(cells), flush=True)


def _profile(run, n: int, label: str, top: int = 14):
    """Wall ms per call of ``run`` (events over n calls), then its GPU kernels from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        run()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / n
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events) / 2 / 1e3
    print(f"--- {label}: {wall:.3f} ms per call, GPU busy {busy:.3f} ms", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"   {e.self_device_time_total / 2:9.1f} us  {e.count // 2:5d}x  {e.key[:90]}")
    if os.environ.get("FASTPEFT_DIAG_GAPS") == "1":
        _gaps(run, label)


def _gaps(run, label: str):
    """The host side of ``run`` (FASTPEFT_DIAG_GAPS=1): CUDA runtime calls (a synchronizing one
    stalls the host behind the GPU) and the largest idle gaps between GPU kernels, each with the
    kernels around it, over 3 back-to-back calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    api = [e for e in prof.key_averages() if e.key.startswith("cu") and e.self_device_time_total == 0]
    print(f"   runtime calls over 3 calls ({label}):")
    for e in sorted(api, key=lambda e: -e.cpu_time_total)[:8]:
        print(f"   {e.cpu_time_total / 3:9.1f} us  {e.count // 3:5d}x  {e.key[:70]}")
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])]
    idle = sum(g for g, _, _ in gaps if g > 0)
    print(f"   GPU idle between kernels: {idle / 3:.1f} us per call; largest gaps:")
    for g, a, b in sorted(gaps, reverse=True)[:5]:
        print(f"   {g:9.1f} us  after {a[:45]}  before {b[:45]}")


def layer():
    """python scripts/diag.py layer M [K N [r]]: one layer's forward and forward+backward, wall time
    (back-to-back calls, no L2 flush) against GPU busy time, per kernel; fastpeft, PEFT, F.linear."""
    from bench_lora import make_layers

    M = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    K = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    N = int(sys.argv[4]) if len(sys.argv) > 4 else K
    r = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    for p in (0.0, 0.05):
        base, fast, peft_layer = make_layers(K, N, r, p)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for name, lay in (("linear", base), ("fastpeft", fast), ("peft", peft_layer)):
            if lay is None or (name == "linear" and p):
                continue
            params = [x] + [t for t in lay.parameters() if t.requires_grad]
            _profile(lambda: lay(x), 20, f"{name} M={M} r={r} p={p} fwd", top=6)
            _profile(lambda: torch.autograd.grad(lay(x), params, g), 20, f"{name} M={M} r={r} p={p} fwd+bwd", top=10)


def e2e():
    """python scripts/diag.py e2e [setup[:p] ...]: the training step's wall time, GPU busy time and
    largest kernels (default: frozen fastpeft:0.05 fastpeft:0); FASTPEFT_DIAG_GAPS=1 adds the host side."""
    from bench_e2e import training_case

    cases = sys.argv[2:] or ["frozen", "fastpeft:0.05", "fastpeft:0"]
    for setup, drop in ((c.split(":")[0], float(c.split(":")[1]) if ":" in c else None) for c in cases):
        case, step = training_case(setup, drop)
        _profile(step, 5, f"{setup} p={drop} step")
        case.clear()
        torch.cuda.empty_cache()


def seed():
    """Graph-replayed forward at decode sizes (K = N = 4096, r = 16, bf16), µs: F.linear, the seed's
    draw alone (torch.randint, one graph node), the fused forward at p = 0, at p = 0.05 with a seed
    drawn outside the graph (the mask's own cost) and with the seed drawn inside it (what a layer pays)."""
    from common import graph_time_ms

    from fastpeft.functional import draw_dropout_seed

    us = lambda f: f"{graph_time_ms(f) * 1e3:.1f}"  # noqa: E731
    dev = torch.device("cuda")
    for M in (1, 16, 256):
        x = torch.randn(M, 4096, device=dev, dtype=torch.bfloat16)
        w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) / 64
        a = torch.randn(16, 4096, device=dev) / 64
        bb = torch.randn(4096, 16, device=dev) / 4
        fixed = draw_dropout_seed(dev)
        with torch.no_grad():
            cells = [f"F.linear {us(lambda: F.linear(x, w))}", f"seed draw {us(lambda: draw_dropout_seed(dev))}",
                     f"fastpeft p0 {us(lambda: ops.lora_linear(x, w, None, a, bb, 2.0))}",
                     f"p.05 seed outside {us(lambda: ops.lora_linear(x, w, None, a, bb, 2.0, 0.05, fixed))}",
                     f"p.05 seed inside {us(lambda: ops.lora_linear(x, w, None, a, bb, 2.0, 0.05, draw_dropout_seed(dev)))}"]
        print(f"M={M}: " + " | ".join(cells) + " us", flush=True)


if __name__ == "__main__":
    {"prec": prec, "kernels": kernels, "dropout": dropout, "gemm": gemm, "shrink": shrink, "pdl": pdl, "small": small, "host": host, "eager": eager, "layer": layer, "e2e": e2e, "seed": seed}[sys.argv[1]]()
