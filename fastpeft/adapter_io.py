"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensors and their keys are ``peft_format.peft_state_dict`` of the patched model: ``save_adapter``
writes it, ``load_adapter`` checks a file against it and copies each tensor in. Only safetensors is read
or written (never pickle). Loading checks every key, shape and dtype kind before copying anything in,
and a new adapter is patched in only for that check: a bad file leaves the model as it was.

Distributed training (README, "Multi-GPU"): a ``DistributedDataParallel`` wrapper is unwrapped (its
``.module`` holds the adapter); a model sharded by FSDP2 (``fully_shard``: its parameters are
DTensors) saves the full tensors, gathered by every rank and written by rank 0 alone, and loads
each rank's shard of the file's full tensors into its local shard.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from .config import CONFIG_NAME, LoraConfig
from .layer import adapter_parameters
from .model_state import adapter_configs, check_model, fastpeft_layers, is_peft_model
from .patch import mark_trainable, plan_applied
from .peft_format import is_wrapper_copy_key, peft_state_dict
from .targets import plan_patch

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def _dtensor_class():
    """torch's ``DTensor`` class, or None where torch.distributed is not built in."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_sharded(model: nn.Module, tensors) -> bool:
    """Whether saving ``tensors`` of ``model`` is a collective: some are DTensors, or the model is an FSDP2
    module (whose parameters may sit unsharded between its forward and backward)."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or any(isinstance(t, dtensor) for t in tensors)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (which holds the adapters), else ``model``."""
    if torch.distributed.is_available() and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _adapter_dir(directory: str, adapter_name: str) -> str:
    """PEFT writes a non-default adapter to ``directory/<adapter_name>/``."""
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _model_class(model: nn.Module) -> type:
    """The model's class; under FSDP2 the one ``fully_shard`` subclassed (``FSDP<name>``)."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def _auto_mapping(model: nn.Module) -> dict:
    cls = _model_class(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> str:
    """Write adapter ``adapter_name`` of a fastpeft-patched model in PEFT's format; returns the folder used.

    A ``DistributedDataParallel`` wrapper is unwrapped; call it on one rank (every rank holds the same
    adapter). A model sharded by FSDP2 (``fully_shard``, DTensor parameters): call it on every rank,
    which gathers the full tensors (a collective); rank 0 writes them, and all ranks return after it has.
    """
    check_model(model, "fastpeft.save_adapter")
    model = _unwrap_ddp(model)
    if is_peft_model(model):
        raise TypeError("this is a PEFT model: save it with peft_model.save_pretrained(directory)")
    tensors = peft_state_dict(model, adapter_name)
    config = adapter_configs(model)[adapter_name].copy()
    out_dir = _adapter_dir(directory, adapter_name)
    if os.path.isfile(out_dir):
        raise ValueError(f"expected a directory to save the adapter in, got the file {out_dir}")
    sharded = _is_sharded(model, tensors.values())
    if sharded:  # every rank gathers each tensor, in the same (state-dict) order
        dtensor = _dtensor_class()
        tensors = {k: t.detach().full_tensor() if isinstance(t, dtensor) else t for k, t in tensors.items()}
        if torch.distributed.get_rank() != 0:
            torch.distributed.barrier()  # returns once rank 0 has written the files
            return out_dir
        try:
            _write(model, tensors, config, out_dir)
        finally:  # the other ranks wait here; an error on rank 0 raises there
            torch.distributed.barrier()
    else:
        _write(model, tensors, config, out_dir)
    return out_dir


def _write(model: nn.Module, tensors: dict, config: LoraConfig, out_dir: str) -> None:
    """adapter_model.safetensors (``tensors``, full ones) and adapter_config.json into ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state, seen = {}, {}
    for key, t in tensors.items():
        t = t.detach()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        # safetensors refuses shared storage: clone repeats, as PEFT does
        state[key] = t.clone().contiguous() if (ptr is not None and ptr in seen) else t.contiguous()
        if ptr is not None:
            seen[ptr] = key
    state = {k: v.cpu() for k, v in state.items()}
    save_file(state, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    config.save(out_dir, auto_mapping=_auto_mapping(model) if config.task_type is None else None)


# A Hugging Face Hub repo id ("org/name"), as a path that does not exist locally might be meant.
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def _find_adapter_dir(directory, adapter_name: str) -> str:
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise NotADirectoryError(f"expected an adapter directory, got the file {directory}")
    if not os.path.isdir(directory):
        if _HUB_ID.fullmatch(directory):
            raise FileNotFoundError(
                f"adapter directory not found: {directory}; fastpeft reads local directories only: if "
                f"{directory!r} is a Hugging Face Hub repo id, download it first with "
                f"huggingface_hub.snapshot_download({directory!r}) and pass the path it returns"
            )
        raise FileNotFoundError(f"adapter directory not found: {directory} (fastpeft reads local directories only)")
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    sub = os.path.join(directory, adapter_name)
    if adapter_name != "default" and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}" + (f" or {sub}" if adapter_name != "default" else ""))


def _read_weights(path_dir: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(path_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(path_dir, PICKLE_WEIGHTS_NAME)):
            raise ValueError(
                f"{os.path.join(path_dir, PICKLE_WEIGHTS_NAME)} is a pickle file: fastpeft only loads safetensors "
                f"({WEIGHTS_NAME}); re-save the adapter with safe_serialization=True"
            )
        raise FileNotFoundError(f"adapter weights not found: {path}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read the adapter weights {path}: {exc}") from exc


def _load_tensors(model: nn.Module, adapter_name: str, loaded: dict[str, torch.Tensor], where: str):
    """Check ``loaded`` (a file's tensors) against the keys, shapes and dtype kinds of adapter
    ``adapter_name`` of the patched model, then copy it in; returns the model's tensors by key."""
    expected = peft_state_dict(model, adapter_name)
    missing = sorted(k for k in expected if k not in loaded)
    unexpected = sorted(k for k in loaded if k not in expected and not is_wrapper_copy_key(model, adapter_name, k))
    if missing:
        raise KeyError(f"{where} is missing {len(missing)} tensor(s) the model expects, e.g. {missing[:5]}")
    if unexpected:
        raise KeyError(f"{where} has {len(unexpected)} tensor(s) the model does not have, e.g. {unexpected[:5]}")
    for k, target in expected.items():
        got = loaded[k]
        if tuple(got.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch for {k} in {where}: the file has {tuple(got.shape)}, the model expects {tuple(target.shape)}")
        if not got.dtype.is_floating_point and target.dtype.is_floating_point:
            raise ValueError(f"dtype mismatch for {k} in {where}: the file has {got.dtype}, the model expects {target.dtype}")
    dtensor = _dtensor_class()
    with torch.no_grad():
        for key, target in expected.items():
            source = loaded[key].to(device=target.device, dtype=target.dtype)
            if dtensor is not None and isinstance(target, dtensor):  # this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                source = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(source)
    return expected


def load_adapter(
    model: nn.Module,
    directory: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load a PEFT- (or fastpeft-) saved LoRA adapter into ``model`` and return it.

    If the model has no adapter ``adapter_name`` yet it is patched from the saved config first (a
    further adapter is added inactive, as PEFT's ``load_adapter`` does). Strict: a missing, unexpected
    or mis-shaped tensor, or a missing/unreadable config, raises and leaves the model as it was.
    ``is_trainable=False`` (PEFT's default) freezes the loaded adapter and puts the model in eval mode.

    Distributed: every rank reads the file. Into a ``DistributedDataParallel`` wrapper or a model sharded
    by FSDP2 (DTensor parameters) only an existing adapter loads (patch it in before wrapping or
    sharding); each rank then copies its shard of every tensor into its local shard, no communication.
    """
    check_model(model, "fastpeft.load_adapter")
    wrapper, model = model, _unwrap_ddp(model)
    if is_peft_model(model):
        raise TypeError("this is a PEFT model: load adapters with peft_model.load_adapter(directory, adapter_name)")
    path_dir = _find_adapter_dir(directory, adapter_name)
    config = LoraConfig.from_pretrained(path_dir)
    loaded = _read_weights(path_dir)
    where = os.path.join(path_dir, WEIGHTS_NAME)
    configs = adapter_configs(model)
    was_patched = bool(configs)

    if adapter_name not in configs and (wrapper is not model or _is_sharded(model, model.parameters())):
        how = ("is wrapped in DistributedDataParallel" if wrapper is not model
               else "is sharded by fully_shard (its parameters are DTensors)")
        raise ValueError(
            f"cannot add adapter {adapter_name!r} to a model that {how}: patch it in before wrapping or sharding "
            f"(fastpeft.patch or load_adapter on the plain model), then load_adapter loads into it"
        )
    if adapter_name in configs:  # load into the existing adapter
        expected = _load_tensors(model, adapter_name, loaded, where)
        configs[adapter_name].inference_mode = not is_trainable
        mark_trainable(model)
    else:  # patch the adapter in, then load the file into it; an error in either undoes the patch
        config.inference_mode = not is_trainable
        plan = plan_patch(model, config, adapter_name)
        with plan_applied(model, plan, autocast_adapter_dtype):
            expected = _load_tensors(model, adapter_name, loaded, where)
        if was_patched and is_trainable:  # PEFT's load_adapter(is_trainable=True): the new adapter trains
            for _, layer in fastpeft_layers(model):
                if adapter_name in layer.lora_A:
                    for p in adapter_parameters(layer, adapter_name):
                        p.requires_grad_(True)
    if not is_trainable:
        for target in expected.values():
            if isinstance(target, nn.Parameter):
                target.requires_grad_(False)
        wrapper.eval()
    return wrapper
