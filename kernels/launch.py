"""Kernel launches with less host work than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` re-derives, on every call, each argument's specialization, the cache
key and the launch options, and its C launcher asks the driver about every tensor pointer
(``cuPointerGetAttribute``): host time that, at decode sizes and in a whole training step, set the
pace rather than the GPU (docs/performance.md, "The host"), since a LoRA layer launches several kernels.

``launch(kernel, grid, tensors, scalars, **meta)`` is ``kernel[grid](*tensors, *scalars, **meta)``
for a kernel whose parameters are its pointers, then its scalars, then its constexprs. The first
call for a key goes through Triton (which compiles and caches as usual) and keeps the
``CompiledKernel`` it returns; later calls with the same key hand raw pointers straight to that
kernel's C launcher. The key holds what Triton specializes on, or more: the tensors' dtypes,
which pointers are 16-byte aligned, the scalars' values and types themselves (so a new M, say, takes
Triton's path once; the table is cleared when it grows past ``MAX_KEYS``), the constexprs and launch
options, and the device. ``FASTPEFT_FAST_LAUNCH=0`` (read at import) sends every launch through
Triton, as does the Triton interpreter. Launch hooks (profilers) set after a key's first launch are
not called on the direct path.

A launcher keeps what it works out per shape key (``cached``): a ``Plan`` (the launch with
everything but the pointers fixed), or for a kernel that takes TMA descriptors a ``DescriptorPlan``,
which also builds the descriptors and keeps each one's encoding per base pointer.
"""
from __future__ import annotations

import functools
import operator
import os

import torch
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

# Read once, as triton.jit itself does when it decorates a kernel (the kernel modules use it too).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("FASTPEFT_FAST_LAUNCH", "1") != "0" and not INTERPRETING
MAX_KEYS = 4096

_compiled: dict = {}  # key -> callable(grid3, stream, args)
_data_ptr = torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")
# torch's own C calls for the current device and its current stream (what Triton asks too); absent
# from CPU builds of torch, where the direct path is never taken
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_tensor_device = torch.Tensor.get_device  # a tensor's CUDA device index, -1 for a CPU tensor


def _other_device(tensors: tuple):
    """The CUDA device of ``tensors`` (the first one's) where it is not the current device, else None.
    Triton launches on the current device, as do the kept C launches: a process that never called
    ``torch.cuda.set_device`` (one of several GPUs, say under DDP) would launch there with another
    device's pointers."""
    index = _tensor_device(tensors[0]) if tensors else -1
    return index if index >= 0 and index != _current_device() else None


def cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python (triton.cdiv is a jit function: slow to call from the host)."""
    return -(-a // b)


def aligned16(ptrs: tuple) -> bool:
    """Whether every pointer in ``ptrs`` is 16-byte aligned (what a kept direct launch assumes)."""
    return functools.reduce(operator.or_, ptrs, 0) & 15 == 0


def _hooks_set(knobs) -> bool:
    """Whether a launch hook is installed (triton 3.6 keeps them in HookChains, never None)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _launch_head(compiled):
    """(the compiled kernel's C launcher, the arguments it takes before the kernel's own) in triton
    3.6's layout, or None when the kernel needs what only Triton's own path provides (scratch memory,
    launch hooks) or this Triton's layout is another."""
    run = getattr(compiled, "run", None)
    c_launch = getattr(run, "launch", None)
    try:
        import triton
        from triton import knobs

        hooks = _hooks_set(knobs)
        version_ok = triton.__version__.split(".")[:2] == ["3", "6"]
    except Exception:  # pragma: no cover - another triton layout: use its runner
        return None
    if (c_launch is None or not version_ok or hooks or run.global_scratch_size or run.profile_scratch_size
            or not hasattr(compiled, "packed_metadata")):
        return None
    return c_launch, (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                      compiled.packed_metadata, None, None, None)


def _c_call(c_launch, head: tuple, tail: tuple):
    """call(grid3, stream, args): ``c_launch`` with the kernel's arguments between head and tail."""
    def call(grid3, stream, args):
        c_launch(*grid3, stream, *head, *args, *tail)

    return call


def _raw_launcher(compiled, tail: tuple):
    """A call of the compiled kernel's C launcher, or None where ``_launch_head`` says there is none."""
    found = _launch_head(compiled)
    return None if found is None else _c_call(*found, tail)


def descriptor_launcher(compiled, tail: tuple):
    """For a kernel whose parameters include host tensor descriptors: (call, expand), or None when
    this Triton's layout is not the known one (3.6's) or the kernel needs what only Triton's path
    provides. ``expand(i, desc)`` builds the i-th descriptor parameter's launch form (the encoded
    CUtensorMap, then the shape and strides) once; a launcher keeps it per base pointer, since within
    one specialization the encoding depends on nothing else. ``call(grid3, stream, args)`` launches
    with those forms spliced in at the descriptors' places, the other pointers as ints: what Triton's
    own wrapper does per call, without encoding the descriptors again."""
    found = _launch_head(compiled)
    inner = found and found[0]  # Triton's wrapper: it encodes the descriptors, then calls `launcher`
    names = getattr(getattr(inner, "__code__", None), "co_freevars", ())
    if not {"launcher", "tensordesc_meta", "tensordesc_indices"} <= set(names):
        return None
    free = dict(zip(names, (cell.cell_contents for cell in inner.__closure__)))
    try:
        from triton.backends.nvidia.driver import make_tensordesc_arg
    except ImportError:  # pragma: no cover - another triton layout
        return None
    meta = free["tensordesc_meta"]
    if not meta or len(meta) != len(free["tensordesc_indices"]):
        return None

    def expand(i, desc):
        return tuple(make_tensordesc_arg(desc, meta[i]))

    return _c_call(free["launcher"], found[1], tail), expand


def _runner(compiled, tail: tuple):
    def call(grid3, stream, args):
        compiled[grid3](*args, *tail, stream=stream)

    return call


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, **meta):
    """``kernel[grid](*tensors, *scalars, **meta)``: ``tensors`` are the kernel's leading pointer
    parameters, ``scalars`` the ints and floats after them; ``meta`` holds the rest (constexprs by
    name) and the launch options (num_warps, num_stages).

    Returns the direct call of this specialization when every pointer is 16-byte aligned and one is
    known (``Plan`` keeps it), else None. Tensors on a CUDA device other than the current one launch
    with theirs made current for the call."""
    other = _other_device(tensors)
    if other is not None:
        with torch.cuda.device(other):
            return launch(kernel, grid, tensors, scalars, **meta)
    if not ENABLED:
        kernel[grid](*tensors, *scalars, **meta)
        return None
    ptrs = tuple(map(_data_ptr, tensors))
    device = _current_device()
    aligned = aligned16(ptrs)
    if not aligned:  # rare (odd views): which pointers are aligned is part of the specialization
        aligned = tuple(p & 15 == 0 for p in ptrs)
    key = (kernel, tuple(map(_dtype, tensors)), aligned, scalars, tuple(map(type, scalars)), tuple(meta.items()),
           device)
    call = _compiled.get(key)
    if call is None:
        compiled = kernel[grid](*tensors, *scalars, **meta)
        if compiled is not None and hasattr(compiled, "function"):
            n_args = len(tensors) + len(scalars)
            tail = tuple(meta[name] for name in kernel.arg_names[n_args:])
            if len(_compiled) >= MAX_KEYS:
                _compiled.clear()
            call = _compiled[key] = _raw_launcher(compiled, tail) or _runner(compiled, tail)
        return call if aligned is True else None
    grid3 = grid + (1,) * (3 - len(grid))
    call(grid3, _current_stream(device), ptrs + scalars)
    return call if aligned is True else None


class Plan:
    """One launch of ``kernel`` with everything but its tensors fixed: the grid, the scalars, the
    constexprs and launch options. A launcher builds one per shape key (``cached``) and ``run``s it
    on each call's tensors (the same dtypes, by the key). Once the first run has compiled the kernel,
    runs whose pointers are all 16-byte aligned (the common case) call the compiled kernel's launcher
    with no further work; any other run goes through ``launch``. A config whose pipeline needs more
    shared memory than the GPU has (Triton's OutOfResources, raised before anything runs) is
    compiled again with one stage less, down to one, and the plan keeps the stages that fit."""

    __slots__ = ("kernel", "grid", "grid3", "scalars", "meta", "call", "device")

    def __init__(self, kernel, grid: tuple, scalars: tuple, **meta):
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, scalars, meta
        self.grid3 = grid + (1,) * (3 - len(grid))
        self.call = self.device = None

    def run(self, tensors: tuple) -> None:
        call = self.call
        if call is not None:
            ptrs = tuple(map(_data_ptr, tensors))
            device = _current_device()
            if aligned16(ptrs) and device == self.device:
                call(self.grid3, _current_stream(device), ptrs + self.scalars)
                return
        while True:
            try:
                self.call = launch(self.kernel, self.grid, tensors, self.scalars, **self.meta)
                break
            except OutOfResources:  # the tile's pipeline does not fit this GPU's shared memory: one stage less
                stages = self.meta.get("num_stages", 1)
                if stages <= 1:
                    raise
                self.meta = {**self.meta, "num_stages": stages - 1}
        if self.call is not None:  # the device it was compiled for: the direct path runs only while it is current
            self.device = _tensor_device(tensors[0])


class DescriptorPlan:
    """A ``Plan`` for a kernel whose leading parameters are host TMA descriptors, then pointers,
    scalars and constexprs. ``descriptors`` gives each descriptor parameter's (shape, block,
    transposed): the descriptor of tensor t covers ``t.t()`` where transposed, else t, with that
    view's row stride and unit inner stride. The first run goes through Triton (which compiles); later
    runs whose pointers are all 16-byte aligned launch the compiled kernel directly
    (``descriptor_launcher``), each descriptor encoded once per base pointer (within one plan's
    shapes, strides and tiles the encoding depends on nothing else); any other run goes through
    Triton again (unaligned pointers re-specialize)."""

    __slots__ = ("kernel", "launcher", "grid3", "descriptors", "scalars", "meta", "stream_index", "direct",
                 "encoded")

    def __init__(self, kernel, grid: tuple, descriptors: tuple, scalars: tuple, device: torch.device, **meta):
        self.kernel, self.launcher = kernel, kernel[grid]
        self.grid3 = grid + (1,) * (3 - len(grid))
        self.descriptors, self.scalars, self.meta = descriptors, scalars, meta
        self.stream_index = device.index
        self.direct = None  # after the first launch: descriptor_launcher's (call, expand)
        self.encoded = tuple({} for _ in descriptors)  # per descriptor: base pointer -> its launch form

    def describe(self, i: int, t: torch.Tensor):
        """The TensorDescriptor of the i-th descriptor parameter over tensor ``t``."""
        shape, block, transposed = self.descriptors[i]
        view = t.t() if transposed else t
        return TensorDescriptor(view, shape, [view.stride(0), 1], block)

    def _encode(self, tensors: tuple, expand) -> list:
        forms = []
        for i, t in enumerate(tensors):
            cache, ptr = self.encoded[i], _data_ptr(t)
            form = cache.get(ptr)
            if form is None:
                if len(cache) >= 64:
                    cache.clear()
                form = cache[ptr] = expand(i, self.describe(i, t))
            forms += form
        return forms

    def run(self, descriptor_tensors: tuple, tensors: tuple) -> None:
        """Launch on ``descriptor_tensors`` (one per descriptor parameter) and the pointer ``tensors``."""
        ptrs = tuple(map(_data_ptr, tensors))
        index = self.stream_index
        if index is not None and index != _current_device():  # Triton launches on the current device
            with torch.cuda.device(index):
                return self.run(descriptor_tensors, tensors)
        direct = self.direct
        if direct is not None and ENABLED and aligned16(ptrs):
            call, expand = direct
            call(self.grid3, _current_stream(self.stream_index),
                 (*self._encode(descriptor_tensors, expand), *ptrs, *self.scalars))
            return
        args = (*(self.describe(i, t) for i, t in enumerate(descriptor_tensors)), *tensors)
        compiled = self.launcher(*args, *self.scalars, **self.meta)
        if direct is None and hasattr(compiled, "function") and ENABLED:
            n_args = len(args) + len(self.scalars)
            tail = tuple(self.meta[name] for name in self.kernel.arg_names[n_args:])
            fast = descriptor_launcher(compiled, tail)
            if fast is None:  # the compiled kernel's runner, which encodes the descriptors per call
                runner = compiled[self.grid3]
                fast = (lambda _grid, stream, args: runner(*args, *tail, stream=stream), lambda _i, desc: (desc,))
            self.direct = fast


_plans: dict = {}  # a launcher's shape key -> what it built for that key (a closure holding Plans)


def cached(key, build, *args):
    """``_plans[key]``, built by ``build(*args)`` the first time (the table is cleared past
    ``MAX_KEYS``). The key must hold everything ``build`` reads from its arguments."""
    entry = _plans.get(key)
    if entry is None:
        if len(_plans) >= MAX_KEYS:
            _plans.clear()
        entry = _plans[key] = build(*args)
    return entry
