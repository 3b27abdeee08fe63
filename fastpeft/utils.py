"""Parameter counts, as PEFT's ``PeftModel.print_trainable_parameters`` reports them."""
from __future__ import annotations

import torch.nn as nn


def _param_count(param) -> int:
    """numel, with PEFT's corrections: DeepSpeed ZeRO-3 placeholders and packed bitsandbytes 4-bit weights."""
    n = param.numel()
    if n == 0 and hasattr(param, "ds_numel"):
        n = param.ds_numel
    if param.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of the packed storage
        if hasattr(param, "element_size"):
            num_bytes = param.element_size()
        elif not hasattr(param, "quant_storage"):
            num_bytes = 1
        else:
            num_bytes = param.quant_storage.itemsize
        n = n * 2 * num_bytes
    return n


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``; shared (tied) parameters count once."""
    trainable = total = 0
    for _, param in model.named_parameters():
        n = _param_count(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` in PEFT's exact wording."""
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
