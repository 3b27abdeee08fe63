"""kernels/launch.py: the direct path reuses a compiled kernel only for what Triton would reuse it for,
and hands the compiled kernel's C launcher the arguments in Triton's own layout."""
import contextlib

import pytest
import torch
import triton

from fastpeft.kernels import launch as L


class _Runner:
    """What the stand-in CompiledKernel's ``run`` looks like (triton 3.6's CudaLauncher)."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = False

    def __init__(self, log):
        self.launch = lambda *args: log.append(("c_launch", args))


class _Compiled:
    function = 1234
    packed_metadata = (4, 1, 0)

    def __init__(self, log):
        self.log = log
        self.run = _Runner(log)

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.log.append(("runner", grid, args, stream))


class _Kernel:
    arg_names = ["x", "n", "s", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return _Compiled(self.log)
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.9.0")  # Triton's runner; the C-launcher test sets 3.6
    monkeypatch.setattr(L, "ENABLED", True)
    monkeypatch.setattr(L, "_compiled", {})
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_tensor_device", lambda t: 0)  # the tensors "on" the current device
    monkeypatch.setattr(L, "_current_stream", lambda device: 77)


def test_direct_launch_after_first_and_new_key_per_specialization(fast):
    k = _Kernel()
    x = torch.zeros(64)
    calls = [
        ((4,), (x,), (32, 1.0), dict(BLOCK=16, FLAG=True, num_warps=4)),
        ((5, 2), (x,), (32, 1.0), dict(BLOCK=16, FLAG=True, num_warps=4)),   # same key: direct
        ((4,), (x,), (48, 1.0), dict(BLOCK=16, FLAG=True, num_warps=4)),     # another scalar value
        ((4,), (x,), (32, 1), dict(BLOCK=16, FLAG=True, num_warps=4)),       # int where a float was
        ((4,), (x[1:],), (32, 1.0), dict(BLOCK=16, FLAG=True, num_warps=4)),  # pointer not 16-byte aligned
        ((4,), (x.half(),), (32, 1.0), dict(BLOCK=16, FLAG=True, num_warps=4)),  # another dtype
        ((4,), (x,), (32, 1.0), dict(BLOCK=32, FLAG=True, num_warps=4)),     # another constexpr
        ((4,), (x,), (32, 1.0), dict(BLOCK=16, FLAG=True, num_warps=8)),     # another launch option
    ]
    for grid, tensors, scalars, meta in calls:
        L.launch(k, grid, tensors, scalars, **meta)
    kinds = [entry[0] for entry in k.log]
    assert kinds == ["triton", "runner"] + ["triton"] * 6
    _, grid, args, stream = k.log[1]
    assert grid == (5, 2, 1) and args == (x.data_ptr(), 32, 1.0, 16, True) and stream == 77


def test_misaligned_pointers_key_on_which_ones(fast):
    k = _Kernel()
    k.arg_names = ["x", "y", "BLOCK"]
    x = torch.zeros(64)
    L.launch(k, (1,), (x[1:], x), (), BLOCK=16)
    L.launch(k, (1,), (x, x[1:]), (), BLOCK=16)  # another pointer misaligned: another specialization
    L.launch(k, (1,), (x[1:], x), (), BLOCK=16)
    assert [entry[0] for entry in k.log] == ["triton", "triton", "runner"]


def test_c_launcher_gets_tritons_argument_layout(fast, monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    k = _Kernel()
    x = torch.zeros(64)
    for _ in range(2):
        L.launch(k, (3, 2), (x,), (32, 0.5), BLOCK=16, FLAG=False, num_warps=4)
    assert [entry[0] for entry in k.log] == ["triton", "c_launch"]
    args = k.log[1][1]
    # grid, stream, function, cooperative, pdl, two scratch buffers, packed metadata, launch metadata,
    # two hooks, then the kernel's arguments with tensors as raw pointers, then the constexprs
    assert args == (3, 2, 1, 77, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                    x.data_ptr(), 32, 0.5, 16, False)


def test_launch_hooks_keep_tritons_runner(fast, monkeypatch):
    from triton import knobs

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [lambda *a: None])
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), (torch.zeros(4),), (16, 1.0), BLOCK=16, FLAG=False)
    assert [entry[0] for entry in k.log] == ["triton", "runner"]


def test_table_is_bounded(fast, monkeypatch):
    monkeypatch.setattr(L, "MAX_KEYS", 3)
    k = _Kernel()
    for n in range(5):
        L.launch(k, (1,), (torch.zeros(4),), (n, 1.0), BLOCK=16, FLAG=False)
    assert len(L._compiled) <= 3


def test_disabled_goes_through_triton(monkeypatch):
    monkeypatch.setattr(L, "ENABLED", False)
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), (torch.zeros(4),), (16, 1.0), BLOCK=16, FLAG=False)
    assert [entry[0] for entry in k.log] == ["triton", "triton"]


def test_plan_launches_directly_after_its_first_run(fast):
    """A Plan compiles through Triton once, then calls the compiled kernel with each run's pointers;
    a run with a misaligned pointer takes ``launch`` (its own specialization), and the next aligned
    run is direct again."""
    k = _Kernel()
    plan = L.Plan(k, (4,), (32, 1.0), BLOCK=16, FLAG=True, num_warps=4)
    x, y = torch.zeros(64), torch.zeros(64)
    plan.run((x,))
    plan.run((y,))
    plan.run((x[1:],))
    plan.run((x,))
    assert [entry[0] for entry in k.log] == ["triton", "runner", "triton", "runner"]
    assert k.log[1][2] == (y.data_ptr(), 32, 1.0, 16, True)
    assert k.log[3][2] == (x.data_ptr(), 32, 1.0, 16, True)


def test_plan_drops_stages_that_do_not_fit(fast):
    """A config whose pipeline needs more shared memory than the GPU has (Triton raises OutOfResources
    before running anything) compiles again with one stage less; the plan keeps the stages that fit,
    and a kernel that does not fit in one stage is the caller's error."""
    class Big(_Kernel):
        def __init__(self, fits: int):
            super().__init__()
            self.fits = fits

        def __getitem__(self, grid):
            run = super().__getitem__(grid)

            def check(*args, **meta):
                if meta["num_stages"] > self.fits:
                    self.log.append(("too big", meta["num_stages"]))
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return run(*args, **meta)
            return check

    k = Big(fits=2)
    plan = L.Plan(k, (4,), (32, 1.0), BLOCK=16, FLAG=True, num_warps=4, num_stages=4)
    x = torch.zeros(64)
    plan.run((x,))
    plan.run((x,))
    assert [entry[:2] for entry in k.log[:2]] == [("too big", 4), ("too big", 3)]
    assert [entry[0] for entry in k.log[2:]] == ["triton", "runner"]
    assert k.log[2][3]["num_stages"] == 2 and plan.meta["num_stages"] == 2
    with pytest.raises(triton.runtime.errors.OutOfResources):
        L.Plan(Big(fits=0), (4,), (32, 1.0), BLOCK=16, FLAG=True, num_warps=4, num_stages=2).run((x,))


def test_tensors_on_another_device_launch_there(fast, monkeypatch):
    """Triton launches on the current device: tensors on device 1 while device 0 is current (a process
    that never called torch.cuda.set_device) launch with device 1 made current, and a Plan's direct
    path runs only while device 1 is current."""
    current = [0]

    @contextlib.contextmanager
    def device(index):
        previous, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = previous

    class Log(list):  # each launch, with the device current when it ran
        def append(self, entry):
            super().append((entry[0], current[0]))

    monkeypatch.setattr(L, "_current_device", lambda: current[0])
    monkeypatch.setattr(L, "_tensor_device", lambda t: 1)
    monkeypatch.setattr(torch.cuda, "device", device)
    k = _Kernel()
    k.log = Log()
    plan = L.Plan(k, (4,), (32, 1.0), BLOCK=16, FLAG=True, num_warps=4)
    x = torch.zeros(64)
    plan.run((x,))
    plan.run((x,))  # device 0 current: through launch, which makes device 1 current
    assert current == [0]
    current[0] = 1  # torch.cuda.set_device(1): the direct path
    plan.run((x,))
    assert list(k.log) == [("triton", 1), ("runner", 1), ("runner", 1)]


def test_cached_builds_once_per_key(monkeypatch):
    monkeypatch.setattr(L, "_plans", {})
    monkeypatch.setattr(L, "MAX_KEYS", 2)
    built = []

    def build(n):
        built.append(n)
        return n * 10

    assert [L.cached(("k", n), build, n) for n in (1, 1, 2, 1)] == [10, 10, 20, 10]
    assert built == [1, 2]
    L.cached(("k", 3), build, 3)  # past MAX_KEYS the table starts over
    assert len(L._plans) == 1
