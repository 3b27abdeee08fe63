"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (never as a top-level ``kernels``).

Math only: ``@triton.jit`` kernels and the launchers that check shapes and pick the grid. One
kernel family per file, its launcher beside it: ``shrink``, ``shrink_expand``, ``linear`` (the matmul
with the LoRA epilogue, Triton and TMA), ``nf4`` (the 4-bit base product from bitsandbytes' packed
weights), ``grads`` (the adapter gradients), ``activation`` (the GLU MLP's), ``dropout`` (the Philox
keep mask), ``multi_lora`` (many adapters in one serving batch, one per token), ``dora`` (DoRA's weight norm per row), ``ia3`` ((IA)³'s
column scaling and its backward). Shared: ``common`` (dot modes, precision, PDL, device
properties), ``configs`` (tile tables per GPU family), ``launch`` (direct launches, kept plans, TMA
descriptors). Nothing here imports from ``fastpeft``.

The top-level name ``kernels`` belongs to Hugging Face's distribution (transformers >= 5.25 imports
it). A Python started in the repository root (``python -m ...``, ``python -m pytest``, a notebook)
has the root on ``sys.path`` and would find this folder under that name first; when that happens,
the block below hands the import over to whatever ``kernels`` the rest of ``sys.path`` holds, or,
where there is none, leaves the empty namespace module Python itself would give for a folder without
``__init__.py`` (no ``__file__``, no version: what transformers takes for "not installed").
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
