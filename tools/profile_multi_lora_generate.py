"""Development: where a decode step's time goes, base model against MultiLora, on
bench/bench_multi_lora_generate.py's model (Llama hidden 2048, 8 layers, 64 sequences, 32 adapters
r = 16 all-linear).

* static (default): a compiled (static cache, CUDA graphs) decode step. After compiling and recording,
  one generate runs under torch.profiler; printed per setup: CUDA time per generated token step (the
  prefill included), and the kernels by total time with their count per step.
* eager (FASTPEFT_PROFILE_MODE=eager): transformers' default dynamic cache, no compile. Printed per setup:
  wall time per step; the host's ops by self CPU time per step (torch.profiler, CPU and CUDA, so the
  CUDA runtime's calls and synchronizations show); CUDA kernel time per step; the Python lines that
  synchronize the device (torch.cuda.set_sync_debug_mode); and the host time of one decoder layer's
  q, k and v calls at the decode step's shape (nn.Linear; wide layers grouped, wide layers apart,
  layers that are not wide).

    FASTPEFT_GEN_NEW=16 FASTPEFT_GEN_PROMPT=32 python tools/profile_multi_lora_generate.py
    FASTPEFT_PROFILE_MODE=eager python tools/profile_multi_lora_generate.py
    FASTPEFT_PROFILE_MODE=host python tools/profile_multi_lora_generate.py    # the layers' host times alone
"""
import os
import sys
import time
import warnings
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_multi_lora_generate as gen  # noqa: E402

TOP = int(os.environ.get("FASTPEFT_PROFILE_TOP", "14"))
MODE = os.environ.get("FASTPEFT_PROFILE_MODE", "static")


def _profile(label, run):
    for _ in range(2):  # compile, then record the graphs
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:60]] += ev.device_time
            count[ev.name[:60]] += 1
    steps = gen.NEW
    print(f"## {label}: {sum(total.values()) / steps:.0f} µs of kernels per step, "
          f"{sum(count.values()) / steps:.0f} kernels per step", flush=True)
    for name, t in sorted(total.items(), key=lambda kv: -kv[1])[:TOP]:
        print(f"  {t / steps:8.1f} µs  {count[name] / steps:6.1f}x  {name}", flush=True)


def _profile_eager(label, run):
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    steps = gen.NEW
    print(f"## {label} (eager): {(time.perf_counter() - t0) / steps * 1e3:.2f} ms per step (wall, prefill included)",
          flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"  synchronizations: {sum(where.values()) / steps:.1f} per step", flush=True)
    for line, n in where.most_common(8):
        print(f"    {n / steps:6.1f}x  {line}", flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        run()
        torch.cuda.synchronize()
    cuda = sum(ev.device_time for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA)
    print(f"  {cuda / steps:.0f} µs of kernels per step", flush=True)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:TOP * 2]
    for e in rows:
        print(f"  {e.self_cpu_time_total / steps:8.1f} µs self  {e.cpu_time_total / steps:8.1f} µs total  "
              f"{e.count / steps:6.1f}x  {e.key[:70]}", flush=True)


def _host_us(call, reps=2000):
    """Host time per ``call()`` (µs): the wall time of reps calls with no synchronization between them;
    the GPU's time per call is far below it at this shape, so the host's is what is measured."""
    with torch.no_grad():
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def _layers(state):
    """One decoder layer's q, k and v calls at the decode step's shape: host time per three calls."""
    import fastpeft
    from fastpeft.kernels import tuning

    base = state["base"]
    attn = base.model.layers[0].self_attn
    x = torch.randn(gen.SEQS, 1, attn.q_proj.in_features, device="cuda", dtype=torch.bfloat16)

    def qkv():
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    print(f"## q, k and v's host time per three calls, x {tuple(x.shape)}: nn.Linear {_host_us(qkv):.1f} µs",
          flush=True)
    for label, switches in (("wide, grouped", {}), ("wide, apart", {tuning.MULTI_LORA_GROUP: "0"}),
                            ("not wide", {tuning.MULTI_LORA_WIDE: "0"})):
        with tuning.switched(switches):
            ml = fastpeft.MultiLora(base, max_adapters=gen.ADAPTERS, max_rank=gen.RANK, target_modules=gen.TARGETS)
        for name, adapter in state["adapters"].items():
            ml.load_adapter(name, adapter)
        with ml.use(gen._names()):
            print(f"  MultiLoraLinear {label}: {_host_us(qkv):.1f} µs", flush=True)
        ml.close()


def main():
    import fastpeft

    state = gen._setup()
    ids = state["ids"]
    cache = "dynamic" if MODE == "eager" else "static"
    profile = _profile_eager if MODE == "eager" else _profile
    if MODE in ("eager", "host"):
        _layers(state)
    if MODE == "host":
        return
    ml = fastpeft.MultiLora(state["base"], max_adapters=gen.ADAPTERS, max_rank=gen.RANK, target_modules=gen.TARGETS)
    for name, adapter in state["adapters"].items():
        ml.load_adapter(name, adapter)
    with ml.use(gen._names()):
        profile("MultiLora", lambda: gen._generate(state["base"], ids, cache))
    ml.close()
    torch._dynamo.reset()
    profile("base", lambda: gen._generate(state["base"], ids, cache))


if __name__ == "__main__":
    main()
