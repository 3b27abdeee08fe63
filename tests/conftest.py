"""Shared fixtures: where kernels run, and the one tolerance rule."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]


class _CheckoutKernels:
    """Import ``fastpeft.kernels`` from this checkout's kernels/ whenever ``fastpeft`` itself came
    from this checkout. An editable install maps ``fastpeft.kernels`` to the kernels/ of the checkout
    it was installed from; a second checkout (a git worktree) run with PYTHONPATH pointing at it
    would otherwise test its own fastpeft/ against the other checkout's kernels. Where both are the
    same folder (the usual case) this changes nothing."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        package = sys.modules.get("fastpeft")
        if name != "fastpeft.kernels" or package is None:
            return None
        if Path(package.__file__).resolve().parent != _ROOT / "fastpeft":
            return None
        init = _ROOT / "kernels" / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


sys.meta_path.insert(0, _CheckoutKernels)

import fastpeft  # noqa: E402 (after the finder above)


@pytest.fixture
def kernel_device():
    """'cuda' on a GPU machine, 'cpu' under TRITON_INTERPRET=1, else skip (kernels cannot run)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")


@pytest.fixture
def set_options():
    """``fastpeft.set_options`` for one test: the process's options come back after it."""
    previous = fastpeft.get_options()
    yield fastpeft.set_options
    fastpeft.set_options(previous)


@pytest.fixture
def kernels_on(kernel_device, set_options):
    """kernel_device, with the triton backend (the kernels on CPU tensors too)."""
    set_options(backend="triton")
    return kernel_device


@pytest.fixture
def pin_config():
    """pin_config(switch, value): set one of the kernels' tuning switches (FASTPEFT_*_CONFIG; None
    unsets it) and re-read them (kernels/tuning.py reads them once); restored after the test."""
    from fastpeft.kernels import tuning

    with tuning.switched({name: os.environ.get(name) for name in tuning.SWITCHES}):
        yield lambda name, value: tuning.set_switches({name: value})


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
