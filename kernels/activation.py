"""Gated activation of a GLU MLP (LLaMA's SwiGLU, Gemma's GeGLU) and its backward, elementwise.

* ``gated_act(g, u, act)``              h = act(g) · u
* ``gated_act_backward(g, u, dh, act)`` (dg, du) = (dh · u · act'(g), dh · act(g)); with
  ``with_h`` also h (the forward's bits), with ``into_dh`` dg written over dh

g, u, dh: tensors of one shape, contiguous (the LoRA kernels and cuBLAS produce them so); outputs in
g's dtype, math in fp32. ``act``: "silu" (x·σ(x)) or "gelu_tanh" (0.5·x·(1 + tanh(√(2/π)·(x +
0.044715·x³)))). The fused MLP (fastpeft/ops.py) never saves h, only g and u: its backward has the
backward kernel rebuild h for dA of down_proj as it reads g and u for dg and du (one pass over g and
u instead of two), and write dg over dh (no third M × I output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_BLOCK = 2048


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:  # silu
        sig = tl.sigmoid(g)
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    else:  # gelu, tanh approximation; tanh(z) = 2σ(2z) - 1
        c: tl.constexpr = 0.7978845608028654  # √(2/π)
        t = 2.0 * tl.sigmoid(2.0 * c * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit
def _gated_act_kernel(g_ptr, u_ptr, dh_ptr, out0_ptr, out1_ptr, h_ptr, n, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                      STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    """BACKWARD: out0 = dg, out1 = du from g, u, dh; STORE_H: h = act(g) · u into h_ptr. Flat, BLOCK
    elements a program, int64 offsets."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    if BACKWARD:
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out0_ptr + offs, (dh * u * da).to(out0_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptr + offs, (dh * a).to(out1_ptr.dtype.element_ty), mask=mask)
    if STORE_H:  # h = act(g) · u, the same expression as the forward's
        tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


def _check(act: str, *tensors) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"gated activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape or not t.is_contiguous():
            raise ValueError(f"gated_act: tensors must be contiguous and of one shape, got "
                             f"{[(tuple(x.shape), x.is_contiguous()) for x in tensors]}")
    return ACTIVATIONS[act]


def gated_act(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(g) · u (g's dtype)."""
    code = _check(act, g, u)
    h = torch.empty_like(g)
    if g.numel():
        launch(_gated_act_kernel, (cdiv(g.numel(), _BLOCK),), (g, u, g, h, h, h), (g.numel(),),
               ACT=code, BACKWARD=False, STORE_H=True, BLOCK=_BLOCK, num_warps=8)
    return h


def gated_act_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, act: str, with_h: bool = False,
                       into_dh: bool = False):
    """(dg, du) = (dh · u · act'(g), dh · act(g)), in g's dtype; (dg, du, h) ``with_h``, h = act(g) · u
    bit for bit as ``gated_act`` gives it. ``into_dh``: dg is written over dh (of g's dtype), which
    the caller gives up; each element is read before it is written."""
    code = _check(act, g, u, dh)
    if into_dh and dh.dtype != g.dtype:
        raise ValueError(f"gated_act_backward: dg can go into dh only of g's dtype {g.dtype}, got {dh.dtype}")
    dg = dh if into_dh else torch.empty_like(g)
    du = torch.empty_like(g)
    h = torch.empty_like(g) if with_h else du
    if g.numel():
        launch(_gated_act_kernel, (cdiv(g.numel(), _BLOCK),), (g, u, dh, dg, du, h), (g.numel(),),
               ACT=code, BACKWARD=True, STORE_H=with_h, BLOCK=_BLOCK, num_warps=8)
    return (dg, du, h) if with_h else (dg, du)
