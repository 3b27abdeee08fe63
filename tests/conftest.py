"""Shared fixtures: where kernels run, and the one tolerance rule."""
import os

import pytest
import torch

import fastpeft


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

    saved = {name: os.environ.get(name) for name in tuning.SWITCHES}

    def pin(name, value):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        tuning.reload()

    yield pin
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tuning.reload()


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
