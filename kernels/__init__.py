"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (never as a top-level ``kernels``).

Math only: ``@triton.jit`` kernels and the launchers that check shapes and pick the grid.
One kernel family per file: ``dropout`` (the Philox keep mask), ``lora`` (shrink, fused
linear + LoRA epilogue, adapter gradients).
"""
