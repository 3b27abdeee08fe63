"""The test rule, written once (flash-attention's): a kernel in dtype d may be off the fp64 reference
by at most twice what PyTorch itself is off in dtype d, plus a small absolute slack."""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, torch_same_dtype, dtype, what=""):
    err, base = rel_err(out, ref), rel_err(torch_same_dtype, ref)
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.3e} > 2 * {base:.3e} + {ATOL[dtype]:.0e} (PyTorch in {dtype})"


DTYPE_PAIRS = [  # (activation dtype, adapter dtype): what the kernels' tests run
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def dtype_pair_id(pair) -> str:
    return f"{str(pair[0])[6:]}-adapters_{str(pair[1])[6:]}"
