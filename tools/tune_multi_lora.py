"""Development: the multi-adapter kernels' parts and tile configs, on a GPU, each in a CUDA graph (the
GPU time a serving loop pays): ``segments``, ``multi_lora_shrink`` and ``multi_lora_expand`` over a
sweep of configs, per batch shape, against the layer's base ``F.linear``.

    python tools/tune_multi_lora.py            # prints one table per part; the best config per shape
    FASTPEFT_TUNE_SHRINK=0 python tools/tune_multi_lora.py   # the expand's configs alone
    FASTPEFT_TUNE_EXPAND="16,256,16,4,2,8;64,128,16,4,2,8" ...  # these expand configs, each one's time
    FASTPEFT_TUNE_CASES=prefill ...            # the cases of these layouts or token counts
    FASTPEFT_TUNE_TMA=1 ...                    # instead: the TMA route's layer at the prefill cases, its
                                               # shrink configs, then its matmul's (FASTPEFT_TMA_CONFIG)

The expand is timed as the layers run it, LAYERS of them (each its own t, B and y, so that they come
from memory as a model's layers' do) in one CUDA graph, µs per layer: on a wide product's columns
(``slot_columns``) where the slots' A fit a wide layer (``fastpeft.multi_lora.WIDE_MAX_BYTES``), else
on the shrink's split-K partial sums.

The TMA route (``multi_lora_linear_tma``: the shrink's split-K partial sums, then the TMA matmul behind
it with PDL) is timed as a whole layer, LAYERS of them chained: first over TMA_SHRINK with the default
matmul tiles, then over TMA_MATMUL with the best of those shrinks.

Pins configs by replacing the "sm90" entry of kernels/configs.py MULTI_LORA_CONFIGS for the run (and
clearing the launchers' kept plans). What it finds goes into configs.py and docs/performance.md.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import chain_us, graph_time_ms  # noqa: E402

from fastpeft.kernels import configs, launch, tuning  # noqa: E402
from fastpeft.multi_lora import WIDE_MAX_BYTES  # noqa: E402
from fastpeft.kernels.multi_lora import (_expand_plan, _shrink_plan, multi_lora_linear_tma,  # noqa: E402
                                         multi_lora_shrink, segments)

# (K, N, T, slots, layout): decode = tokens scattered over the slots, prefill = 8 runs of T/8
CASES = [(2048, 2048, 64, 32, "decode"), (2048, 5632, 64, 32, "decode"), (4096, 4096, 64, 32, "decode"),
         (4096, 4096, 256, 32, "decode"), (4096, 4096, 256, 128, "decode"), (4096, 14336, 256, 32, "decode"),
         (4096, 4096, 4096, 8, "prefill"), (4096, 14336, 4096, 8, "prefill")]
R = 16
SHRINK = [(bm, bk, 16, sk, w, st) for bm, bk, sk, w, st in itertools.product(
    (16, 64), (64, 128, 256), (1, 4, 16), (4,), (3,))] if os.environ.get("FASTPEFT_TUNE_SHRINK", "1") == "1" else []
EXPAND = [(bm, bn, 16, w, st, per_sm) for bm, bn, w, st, per_sm in itertools.product(
    (16, 32, 64), (64, 128, 256), (4, 8), (2,), (1, 2, 4, 8))]
if os.environ.get("FASTPEFT_TUNE_EXPAND"):  # only these configs, each one's time printed: "16,256,16,4,2,8;..."
    EXPAND = [tuple(int(v) for v in c.split(",")) for c in os.environ["FASTPEFT_TUNE_EXPAND"].split(";")]
# the TMA route: its shrink's prefill configs (split_k at most MAX_PARTIALS), its matmul's tiles
TMA_SHRINK = [(bm, bk, 32, sk, w, st) for bm, bk, sk, w, st in itertools.product(
    (16, 32, 64), (64, 128, 256), (1, 2, 4), (4,), (3,))] + [(64, 128, 32, 1, 8, 3), (128, 64, 32, 1, 8, 3)]
TMA_MATMUL = ["128,256,64,16,8,3,1,1", "128,256,64,8,8,3,1,1", "128,256,64,4,8,3,1,1", "128,256,64,32,8,3,1,1",
              "128,256,64,16,8,3,1,0", "128,256,32,16,8,5,1,1", "256,128,64,16,8,3,1,1", "128,128,64,8,8,4,1,1",
              "128,128,128,8,8,3,1,1", "128,256,64,16,8,4,1,1"]
LAYERS = int(os.environ.get("FASTPEFT_TUNE_LAYERS", "16"))
if os.environ.get("FASTPEFT_TUNE_CASES"):  # only these layouts or token counts: "prefill" or "256,4096"
    CASES = [c for c in CASES if {c[4], str(c[2])} & set(os.environ["FASTPEFT_TUNE_CASES"].split(","))]


def pin(shrink, expand) -> None:
    configs.MULTI_LORA_CONFIGS["sm90"] = ((None, (shrink, expand)),)
    launch._plans.clear()


def case(K, N, T, slots, layout):
    gen = torch.Generator(device="cpu").manual_seed(T + slots)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    A = torch.randn(slots, R, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    B = torch.randn(slots, N, R, device="cuda", dtype=torch.bfloat16) * 0.02
    if layout == "prefill":
        idx = torch.randint(0, slots, (8,), generator=gen).repeat_interleave(T // 8)
    else:
        idx = torch.randint(0, slots, (T,), generator=gen)
    idx = idx.to(torch.int32).cuda()
    return x, w, A, B, idx, torch.full((slots,), 2.0, device="cuda"), torch.full((slots,), R, device="cuda",
                                                                                   dtype=torch.int32)


def tma_layers() -> None:
    """The TMA route's layer at the prefill cases: its shrink's configs, then its matmul's tiles."""
    saved = configs.MULTI_LORA_CONFIGS["sm90"]
    print(f"# {torch.cuda.get_device_name()}; multi_lora_linear_tma, {LAYERS} layers chained in one graph, µs per "
          "layer (× F.linear)")
    print("| K | N | T | slots | F.linear | default | best shrink | config | best matmul tiles | config |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for K, N, T, slots, layout in CASES:
        if layout != "prefill":
            continue
        x, w, A, B, idx, scales, ranks = case(K, N, T, slots, layout)
        ws = [w] + [w.clone() for _ in range(LAYERS - 1)]
        seg = segments(idx, slots)
        base = chain_us(lambda i: F.linear(x, ws[i]), LAYERS)
        shrink_default, expand_default = configs.multi_lora_config(-(-T // slots), x.device)

        def layer(i):
            return multi_lora_linear_tma(x, ws[i], None, idx, A, B, scales, ranks, seg)

        times = {}
        for cfg in [shrink_default] + [c for c in TMA_SHRINK if c != shrink_default]:
            pin(cfg, expand_default)
            try:
                times[cfg] = chain_us(layer, LAYERS)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                print(f"<!-- shrink {cfg}: {type(e).__name__} -->")
        best_shrink = min(times, key=times.get)
        print("<!-- shrink: " + "; ".join(f"{c}: {t:.1f}" for c, t in times.items()) + " -->", flush=True)
        pin(best_shrink, expand_default)
        tiles = {}
        for cfg in TMA_MATMUL:
            try:
                with tuning.switched({tuning.TMA: cfg}):
                    tiles[cfg] = chain_us(layer, LAYERS)
            except Exception as e:  # noqa: BLE001
                print(f"<!-- tiles {cfg}: {type(e).__name__} -->")
        best_tiles = min(tiles, key=tiles.get)
        print("<!-- tiles: " + "; ".join(f"{c}: {t:.1f}" for c, t in tiles.items()) + " -->", flush=True)
        d = times[shrink_default]
        print(f"| {K} | {N} | {T} | {slots} | {base:.1f} | {d:.1f} ({d / base:.2f}) | {times[best_shrink]:.1f} "
              f"({times[best_shrink] / base:.2f}) | {best_shrink} | {tiles[best_tiles]:.1f} "
              f"({tiles[best_tiles] / base:.2f}) | {best_tiles} |", flush=True)
        ws = None
        torch.cuda.empty_cache()
    configs.MULTI_LORA_CONFIGS["sm90"] = saved
    launch._plans.clear()


def main() -> None:
    saved = configs.MULTI_LORA_CONFIGS["sm90"]
    print(f"# {torch.cuda.get_device_name()}; times in µs, each in a CUDA graph")
    print("| K | N | T | slots | layout | base | segments | shrink (default) | best shrink | config | "
          "expand on | expand (default) | best expand | config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K, N, T, slots, layout in CASES:
        x, w, A, B, idx, scales, ranks = case(K, N, T, slots, layout)
        configs.MULTI_LORA_CONFIGS["sm90"] = saved
        DEFAULT_SHRINK, DEFAULT_EXPAND = configs.multi_lora_config(-(-T // slots), x.device)
        y = F.linear(x, w)
        base = graph_time_ms(lambda: F.linear(x, w)) * 1e3
        seg_t = graph_time_ms(lambda: segments(idx, slots)) * 1e3
        seg = segments(idx, slots)
        wide = slots * R * K * 2 <= WIDE_MAX_BYTES
        if wide:  # each layer's wide product's output: y (T, N) then every slot's t (T, S·R)
            ys = [torch.cat([y, (x @ A.reshape(-1, K).T)], dim=1) for _ in range(LAYERS)]
            args = [(yw[:, N:], B.clone(), seg, ranks, scales, yw[:, :N]) for yw in ys]
        else:
            t = _shrink_plan(x, A, seg, ranks, None, partial=True)(x, A, seg, ranks, None)
            args = [(t.clone(), B.clone(), seg, ranks, scales, y.clone()) for _ in range(LAYERS)]
        shrink_times, expand_times = {}, {}
        for cfg in [DEFAULT_SHRINK] + [c for c in SHRINK if c != DEFAULT_SHRINK]:
            pin(cfg, DEFAULT_EXPAND)
            try:
                shrink_times[cfg] = graph_time_ms(lambda: multi_lora_shrink(x, A, seg, ranks)) * 1e3
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                print(f"<!-- shrink {cfg}: {type(e).__name__} -->")
        for cfg in [DEFAULT_EXPAND] + [c for c in EXPAND if c != DEFAULT_EXPAND]:
            pin(DEFAULT_SHRINK, cfg)
            try:
                expand = _expand_plan(*args[0], slot_columns=wide)
                expand_times[cfg] = chain_us(lambda i: expand(*args[i]), LAYERS)
            except Exception as e:  # noqa: BLE001
                print(f"<!-- expand {cfg}: {type(e).__name__} -->")
        args = None  # the layers' tensors, freed before the next case
        bs = min(shrink_times, key=shrink_times.get)
        be = min(expand_times, key=expand_times.get)
        on = "wide" if wide else "partials"
        print(f"| {K} | {N} | {T} | {slots} | {layout} | {base:.1f} | {seg_t:.1f} | "
              f"{shrink_times[DEFAULT_SHRINK]:.1f} | {shrink_times[bs]:.1f} | {bs} | {on} | "
              f"{expand_times[DEFAULT_EXPAND]:.1f} | {expand_times[be]:.1f} | "
              f"{be} |", flush=True)
        if os.environ.get("FASTPEFT_TUNE_EXPAND"):
            print("<!-- " + "; ".join(f"{c}: {t:.1f}" for c, t in expand_times.items()) + " -->", flush=True)
    configs.MULTI_LORA_CONFIGS["sm90"] = saved
    launch._plans.clear()


if __name__ == "__main__":
    tma_layers() if os.environ.get("FASTPEFT_TUNE_TMA") == "1" else main()
