"""Development: where the host time of one eager LoRA layer call goes (GPU machine).

    python scripts/host_profile.py [M]        one layer
    python scripts/host_profile.py e2e [p]    the bench_e2e training step (FASTPEFT_E2E_* shrink it)

One layer: the wall time per call of each launcher and of the whole layer (forward, forward+backward)
next to nn.Linear and PEFT, then a cProfile of forward+backward sorted by own time, then how each
kept launch runs (the direct C launcher or Triton's runner).
e2e: a cProfile of fastpeft training steps (dropout p, default 0.05) sorted by own time.
"""
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_lora import make_layers  # noqa: E402

from fastpeft.kernels import launch as kernel_launch  # noqa: E402
from fastpeft.kernels import lora as kl  # noqa: E402


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    M = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    K = N = 4096
    r = 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, K, device="cuda")
    b = torch.randn(N, r, device="cuda")
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    seed = torch.randint(0, 2**62, (1,), device="cuda")
    xd = x.detach()
    xa = kl.lora_shrink(xd, a)
    print(f"M={M}: per-call wall time, us (direct launch on / through Triton's run)")
    for name, fn in [
        ("torch.empty", lambda: torch.empty(M, N, device="cuda", dtype=torch.bfloat16)),
        ("torch.zeros", lambda: torch.zeros(M, r, device="cuda")),
        ("torch.randint seed", lambda: torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cuda")),
        ("F.linear", lambda: torch.nn.functional.linear(xd, w)),
        ("lora_shrink", lambda: kl.lora_shrink(xd, a)),
        ("lora_shrink dropout", lambda: kl.lora_shrink(xd, a, seed, 3277, 1.05)),
        ("lora_linear", lambda: kl.lora_linear(xd, w, None, xa, b, 2.0)),
        ("lora_linear fused shrink", lambda: kl.lora_linear(xd, w, None, xa, b, 2.0, shrink_a=a)),
        ("lora_shrink_expand", lambda: kl.lora_shrink_expand(xd, a, b, None, 2.0)),
        ("lora_adapter_grads", lambda: kl.lora_adapter_grads(xd, xa, g.detach(), xa, 2.0)),
    ]:
        kernel_launch.ENABLED = False
        slow = per_call_us(fn)
        kernel_launch.ENABLED = True
        print(f"  {name:24s} {per_call_us(fn):8.1f} / {slow:8.1f}")
    for p in (0.0, 0.05):
        base, fast, peft_layer = make_layers(K, N, r, p)
        params = {n: [x] + [t for t in l.parameters() if t.requires_grad] for n, l in
                  (("linear", base), ("fastpeft", fast), ("peft", peft_layer))}
        for name, layer in (("linear", base), ("fastpeft", fast), ("peft", peft_layer)):
            f = per_call_us(lambda: layer(x))
            fb = per_call_us(lambda: torch.autograd.grad(layer(x), params[name], g))
            print(f"  p={p} {name:10s} fwd {f:8.1f}  fwd+bwd {fb:8.1f}")
        kernel_launch.ENABLED = False
        f = per_call_us(lambda: fast(x))
        fb = per_call_us(lambda: torch.autograd.grad(fast(x), params["fastpeft"], g))
        kernel_launch.ENABLED = True
        print(f"  p={p} fastpeft through Triton's run: fwd {f:8.1f}  fwd+bwd {fb:8.1f}")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            torch.autograd.grad(fast(x), params["fastpeft"], g)
        torch.cuda.synchronize()
        pr.disable()
        print(f"--- cProfile fastpeft fwd+bwd x200, p={p}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)
    launch_kinds()


def launch_kinds() -> None:
    """How each kept launch runs: the compiled kernel's C launcher ('_raw_launcher'), Triton's
    CompiledKernel runner ('_runner', when the kernel needs scratch memory or hooks are set), or, for
    a plan without a kept call, launch() at every call (unaligned pointers)."""
    from collections import Counter

    kinds = Counter(f"{getattr(k[0], '__name__', k[0])}: {c.__qualname__.split('.')[0]}"
                    for k, c in kernel_launch._compiled.items())
    for build in kernel_launch._plans.values():
        for cell in getattr(build, "__closure__", None) or ():
            plan = cell.cell_contents
            if isinstance(plan, kernel_launch.Plan) and plan.call is None:
                kinds[f"{getattr(plan.kernel, '__name__', plan.kernel)}: plan without a kept call"] += 1
    print("--- launch kinds (kernel: how, count)")
    for kind, n in sorted(kinds.items()):
        print(f"   {kind}  x{n}")


def e2e(p: float):
    from bench_e2e import training_case

    for setup, drop in (("frozen", None), ("fastpeft", p)):
        case, step = training_case(setup, drop)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        pr.disable()
        print(f"--- cProfile {setup} p={drop}: 5 training steps")
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        case.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["e2e"]:
        e2e(float(sys.argv[2]) if len(sys.argv) > 2 else 0.05)
    else:
        main()
