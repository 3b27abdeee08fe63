"""kernels/launch.py: the direct path reuses a compiled kernel only for what Triton would reuse it for."""
import torch

from fastpeft.kernels import launch as L


class _Compiled:
    function = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Kernel:
    arg_names = ["x", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return _Compiled(self.log)
        return run


def test_direct_launch_after_first_and_new_key_per_specialization(monkeypatch):
    monkeypatch.setattr(L, "ENABLED", True)
    monkeypatch.setattr(L, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    k = _Kernel()
    x = torch.zeros(64)
    L.launch(k, (4,), (x, 32), BLOCK=16, FLAG=True, num_warps=4)
    L.launch(k, (5, 2), (x, 48), BLOCK=16, FLAG=True, num_warps=4)   # same specialization: direct
    L.launch(k, (4,), (x, 33), BLOCK=16, FLAG=True, num_warps=4)     # 33 is not divisible by 16
    L.launch(k, (4,), (x, 1), BLOCK=16, FLAG=True, num_warps=4)      # 1 is specialized
    L.launch(k, (4,), (x[1:], 32), BLOCK=16, FLAG=True, num_warps=4)  # pointer not 16-byte aligned
    L.launch(k, (4,), (x.half(), 32), BLOCK=16, FLAG=True, num_warps=4)  # another dtype
    L.launch(k, (4,), (x, 32), BLOCK=32, FLAG=True, num_warps=4)     # another constexpr
    L.launch(k, (4,), (x, 32), BLOCK=16, FLAG=True, num_warps=8)     # another launch option
    kinds = [entry[0] for entry in k.log]
    assert kinds == ["triton", "direct"] + ["triton"] * 6
    assert k.log[1][1] == (5, 2, 1) and k.log[1][2][1:] == (48, 16, True)


def test_disabled_goes_through_triton(monkeypatch):
    monkeypatch.setattr(L, "ENABLED", False)
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), (torch.zeros(4), 16), BLOCK=16, FLAG=False)
    assert [entry[0] for entry in k.log] == ["triton", "triton"]
