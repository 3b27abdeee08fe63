"""Development: where a compiled (static cache, CUDA graphs) decode step's GPU time goes, base model
against MultiLora, on bench/bench_multi_lora_generate.py's model (Llama hidden 2048, 8 layers, 64
sequences, 32 adapters r = 16 all-linear). After compiling and recording, one generate runs under
torch.profiler; printed per setup: CUDA time per generated token step (the prefill included), and the kernels by total time
with their count per step.

    FASTPEFT_GEN_NEW=16 FASTPEFT_GEN_PROMPT=32 python tools/profile_multi_lora_generate.py
"""
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_multi_lora_generate as gen  # noqa: E402

TOP = int(os.environ.get("FASTPEFT_PROFILE_TOP", "14"))


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


def main():
    import fastpeft

    state = gen._setup()
    ids = state["ids"]
    ml = fastpeft.MultiLora(state["base"], max_adapters=gen.ADAPTERS, max_rank=gen.RANK, target_modules=gen.TARGETS)
    for name, adapter in state["adapters"].items():
        ml.load_adapter(name, adapter)
    with ml.use(gen._names()):
        _profile("MultiLora", lambda: gen._generate(state["base"], ids, "static"))
    ml.close()
    torch._dynamo.reset()
    _profile("base", lambda: gen._generate(state["base"], ids, "static"))


if __name__ == "__main__":
    main()
