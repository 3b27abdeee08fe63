"""Development, CPU only: the host work of one LoRA layer call with every kernel launch stubbed out.

    python scripts/host_stub.py [--profile]

Runs fastpeft's kernel path (FASTPEFT_BACKEND=triton under TRITON_INTERPRET=1) on tiny CPU tensors
with ``Plan.run`` and ``launch`` replaced by no-ops and ``Tensor.addmm_`` (the cuBLAS route's second
launch) by one that returns its input, so what is timed is the Python and torch-dispatcher work
between the launches: the layer's forward and forward+backward at M = 1 (the Triton route) and
M = 512 (the cuBLAS route), next to nn.Linear's at M = 1. The numbers are this CPU's, not the GPU machine's
(no launch cost, and the backward runs on the calling thread instead of the autograd engine's
device thread), so they rank host work; they do not predict the GPU machine's absolute times.
``FASTPEFT_GEMM=tma`` times the TMA route instead (its kernel and C launcher stubbed too; CPU
tensors rarely reuse an address, so its descriptors are built more often here than on the GPU).
With ``--profile``, a cProfile of forward+backward follows each row.
"""
import cProfile
import os
import pstats
import sys
import time
import types

os.environ["TRITON_INTERPRET"] = "1"  # before fastpeft.kernels is imported: the kernel path on CPU
os.environ.setdefault("FASTPEFT_BACKEND", "triton")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fastpeft import LoraLinear  # noqa: E402
from fastpeft.kernels import launch, linear  # noqa: E402


def per_call_us(fn, n=1000, repeats=5) -> float:
    """The fastest of ``repeats`` loops of n calls, µs per call (this machine's other load moves it)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


class _StubTmaKernel:
    """Stands in for the TMA matmul's JIT kernel: its first "launch" hands back a compiled-looking
    object, and ``descriptor_launcher`` a no-op call, so later runs take the direct path's host work."""

    arg_names = linear._lora_linear_tma_kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **meta: types.SimpleNamespace(function=0)


def main():
    launch.Plan.run = lambda self, tensors: None
    launch.launch = lambda *args, **kwargs: None
    torch.Tensor.addmm_ = lambda self, *args, **kwargs: self
    # the TMA route (FASTPEFT_GEMM=tma): the kernel, its C launcher and the stream query stubbed
    linear._lora_linear_tma_kernel = _StubTmaKernel()
    launch.descriptor_launcher = lambda compiled, tail: (lambda grid3, stream, args: None, lambda i, desc: (desc,))
    launch.ENABLED = True
    launch._current_stream = lambda index: 0
    torch.set_num_threads(1)
    K = N = 64
    for M in (1, 512):
        x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, dtype=torch.bfloat16)
        for p in (0.0, 0.05):
            base = nn.Linear(K, N, bias=False, dtype=torch.bfloat16).requires_grad_(False)
            fast = LoraLinear(nn.Linear(K, N, bias=False, dtype=torch.bfloat16), r=16, lora_alpha=32,
                              lora_dropout=p).train()
            cells = []
            # nn.Linear only at M = 1: its CPU matmul is real work (fastpeft's addmm_ is stubbed)
            for name, layer in (("nn.Linear", base), ("fastpeft", fast))[0 if M == 1 else 1:]:
                params = [x] + [t for t in layer.parameters() if t.requires_grad]
                cells.append(f"{name} fwd {per_call_us(lambda: layer(x)):6.1f} fwd+bwd "
                             f"{per_call_us(lambda: torch.autograd.grad(layer(x), params, g)):6.1f}")
            print(f"M={M} p={p}: " + " | ".join(cells) + " us", flush=True)
            if "--profile" in sys.argv:
                params = [x] + [t for t in fast.parameters() if t.requires_grad]
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(2000):
                    torch.autograd.grad(fast(x), params, g)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
