"""Sibling LoRA projections of one input (q, k and v of an attention block) as one autograd op.

``fastpeft.patch`` groups the projections named in ``models.SHARED_INPUT_PROJECTIONS`` of every module
that has all of them as LoRA layers. When the first of a group is called (gradients on, kernels on),
``ops.LoraGroupFunction`` computes all of them for that input: one autograd node instead of three,
one dX buffer that each projection's backward adds into instead of three dX tensors that autograd
sums. The first projection returns its output; the others keep theirs for their own calls, which
take them only for the very same tensor, unmodified (identity and version counter). Any other call
runs the layer alone and drops what was kept, so a module that calls its projections on different
inputs (cross-attention) still gets exact results. Seeds are drawn in call order (q, k, v), as the
separate layers draw them, so the masks match the ungrouped path's. Not grouped: no grad, the
reference backend, torch.compile, any projection that ``layer.single_lora`` does not cover (several,
merged or disabled adapters, a trainable base), and the ``group_projections`` option off.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional, models, options
from .backend import use_triton
from .layer import GROUP_ATTR, has_lora, single_lora


class ProjectionGroup:
    """The projections of one input in call order, and the outputs computed ahead for the later ones
    (``pending``: (input, its version, {index: output}) or None)."""

    __slots__ = ("layers", "pending")

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.pending = None

    def output(self, index: int, layer: nn.Module, x: torch.Tensor):
        """Projection ``index``'s output for ``x`` from the group, or None to run the layer alone."""
        pending, self.pending = self.pending, None
        if index:
            if pending is None or pending[0] is not x or pending[1] != x._version:
                return None
            outputs = pending[2]
            y = outputs.pop(index, None)
            if outputs:
                self.pending = pending
            return y
        projections = self._fusable(x)
        if projections is None:
            return None
        ys = functional.lora_group(x, projections)
        self.pending = (x, x._version, dict(enumerate(ys[1:], 1)))
        return ys[0]

    def _fusable(self, x: torch.Tensor):
        opts = options.of(self.layers[0])
        if not torch.is_grad_enabled() or not opts.group_projections or not use_triton(x, opts.backend):
            return None
        projections = [single_lora(layer) for layer in self.layers]
        if any(p is None for p in projections):
            return None
        # dropout only in training mode, layer by layer (as each layer alone would do)
        return [p if layer.training else p[:5] + (0.0,) for p, layer in zip(projections, self.layers)]


def install(model: nn.Module) -> None:
    """Group the shared-input projections of every module of ``model`` that has all of a group as LoRA
    layers (again on a model that has them: nothing changes)."""
    for module in model.modules():
        for names in models.SHARED_INPUT_PROJECTIONS:
            layers = [getattr(module, name, None) for name in names]
            if not all(has_lora(layer) for layer in layers) or any(GROUP_ATTR in layer.__dict__ for layer in layers):
                continue
            group = ProjectionGroup(layers)
            for index, layer in enumerate(layers):
                layer.__dict__[GROUP_ATTR] = (group, index)


def uninstall(modules) -> None:
    """Ungroup the projections among ``modules`` (e.g. ``model.modules()``)."""
    for module in modules:
        module.__dict__.pop(GROUP_ATTR, None)
