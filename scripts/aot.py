"""Development, CPU only: compile the persistent TMA matmul for sm_90 without a GPU and print each
config's registers and stack (a stack means spills), the way ptxas leaves them.

    python scripts/aot.py [config name ...]     # default: every config in kernels/configs.py's TMA_CONFIGS["sm90"]
    FASTPEFT_AOT_SET="ACCUMULATE=1,EXPAND_MODE=1" python scripts/aot.py wide   # constexprs set by hand

For each config: the dX form (W's transpose view, bf16 output, fp32 adapters) without and with the
dropout mask, and the forward form. It uses this machine's triton and its bundled ptxas and
cuobjdump; the GPU machine's triton may allocate differently, so compare configs with each other here,
not with the GPU's numbers. Session 10 (triton 3.9): wide 240 registers, no stack; wide with the mask
255 and a 1128-byte stack (the GPU ran it at 1283 against 797 µs); wide_masked (halves) 255 and 472.
"""
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastpeft.kernels.configs import TMA_CONFIGS  # noqa: E402
from fastpeft.kernels.linear import _lora_linear_tma_kernel  # noqa: E402

SCALARS_FP32 = ("scaling", "drop_scale")
POINTER_TYPES = {"bias_ptr": "*bf16", "out_ptr": "*bf16", "seed_ptr": "*i64"}  # the others: *fp32


def resources(config: tuple, mask: bool, dx: bool) -> str:
    """'REG:.. STACK:..' of the TMA kernel compiled for sm_90 with ``config``."""
    fn = _lora_linear_tma_kernel
    BM, BN, BK, GM, warps, stages, tma_store, flatten, *extra = config
    pieces = (4 if extra[1] == 4 else 2 if extra[1] else 1) if len(extra) > 1 else 1
    w_block = [BK, BN] if dx else [BN, BK]
    constants = dict(HAS_BIAS=not dx, OUT_DROPOUT=mask, W_KMAJOR=not dx, TMA_STORE=tma_store, ACCUMULATE=False,
                     MODE=0, EXPAND_MODE=3, PRECISION="tf32", BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=16,
                     GROUP_M=GM, NUM_PROGRAMS=132, FLATTEN=flatten, WARP_SPECIALIZE=bool(extra and extra[0]),
                     PDL_WAIT=False, L_SPLIT=2, EPILOGUE_SPLIT=pieces if pieces > 1 else False)
    for item in filter(None, os.environ.get("FASTPEFT_AOT_SET", "").split(",")):  # NAME=int, a branch's switch
        name, value = item.split("=")
        constants[name.strip()] = int(value)
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            constants.setdefault(p.name, False)  # a switch this script does not know: off
        elif p.name.endswith("_desc"):
            block = {"a_desc": [BM, BK], "w_desc": w_block, "out_desc": [BM, BN // pieces]}[p.name]
            signature[p.name] = f"tensordesc<bf16[{block[0]}, {block[1]}]>"
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTER_TYPES.get(p.name, "*fp32")
        else:
            signature[p.name] = "fp32" if p.name in SCALARS_FP32 else "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), out.strip())
    return " ".join(w for w in line.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL"))


def main():
    names = sys.argv[1:] or list(TMA_CONFIGS["sm90"])
    for name in names:
        config = TMA_CONFIGS["sm90"][name]
        cells = [f"{form} {resources(config, mask, dx)}"
                 for form, mask, dx in (("forward", False, False), ("dX", False, True), ("dX with mask", True, True))]
        print(f"{name} {config}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
