"""Development: the fused multi-LoRA matmul's tiles (``multi_lora_linear``, FASTPEFT_MULTI_LORA_FUSED=1) on a
GPU. Per case and tile: µs per layer of LAYERS layers with distinct weights chained in one CUDA graph
(the grouping given), against ``F.linear`` and the default in-place route; "no slot" runs every token
without an adapter, so the epilogue's slot loop is empty and the main loop is what is timed.

    python tools/tune_multi_lora_linear.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import chain_us  # noqa: E402
from profile_multi_lora import layer_chain  # noqa: E402 (tools/, the script's own folder)

from fastpeft.kernels import launch, multi_lora as M  # noqa: E402

LAYERS = 16
CONFIGS = [None, (128, 128, 64, 8, 8, 3), (64, 64, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4), (32, 32, 128, 8, 4, 4)]
CASES = [(4096, 4096, 256, 32), (4096, 4096, 16, 32), (2048, 2048, 64, 32)]


def main():
    real = M.linear_config
    for K, N, T, slots in CASES:
        x, ws, As, Bs, scales, ranks = layer_chain(K, N, T, slots, LAYERS)
        idx = torch.randint(0, slots, (T,), device="cuda", dtype=torch.int32)
        none = torch.full((T,), -1, device="cuda", dtype=torch.int32)
        seg, seg0 = M.segments(idx, slots), M.segments(none, slots)
        tb = chain_us(lambda i: F.linear(x, ws[i]), LAYERS)
        tu = chain_us(lambda i: M.multi_lora(x, F.linear(x, ws[i]), idx, As[i], Bs[i], scales, ranks, seg), LAYERS)
        ref = M.multi_lora(x, F.linear(x, ws[0]), idx, As[0], Bs[0], scales, ranks, seg).float()
        print(f"K={K} N={N} T={T} slots={slots}: F.linear {tb:.1f} µs, in place {tu:.1f} ({tu / tb:.2f}); "
              f"table config {real(T, x.device)}", flush=True)
        for cfg in CONFIGS:
            M.linear_config = real if cfg is None else (lambda T, d, c=cfg: c)
            launch._plans.clear()  # the plans built with the previous tile
            try:
                tf = chain_us(lambda i: M.multi_lora_linear(x, ws[i], None, idx, As[i], Bs[i], scales, ranks, seg), LAYERS)
                t0 = chain_us(lambda i: M.multi_lora_linear(x, ws[i], None, none, As[i], Bs[i], scales, ranks, seg0), LAYERS)
                err = ((M.multi_lora_linear(x, ws[0], None, idx, As[0], Bs[0], scales, ranks, seg).float() - ref).norm()
                       / ref.norm()).item()
                print(f"  {cfg or 'table'}: fused {tf:.1f} ({tf / tb:.2f}), no slot {t0:.1f} ({t0 / tb:.2f}), err {err:.1e}",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
        M.linear_config = real
        ws = As = Bs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
