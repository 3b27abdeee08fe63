"""The one table of model-specific knowledge: default LoRA targets per ``config.model_type``, the
heads that ``"all-linear"`` leaves out, the nn.Linear subclasses that compute nn.Linear's forward, and
the GLU MLPs fastpeft runs as one fused op. Everything here is data or follows PEFT's conventions:

- ``DEFAULT_TARGET_MODULES`` is PEFT's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``
  (``peft/utils/constants.py``, v0.21): a list (matched exactly or as a ``.``-suffix) or a regex string.
- ``all_linear_exclusions`` is PEFT's ``_maybe_include_all_linear_layers``: the output embedding of a
  generation model, else (for ``task_type="SEQ_CLS"``) the ``score`` / ``classifier`` head.
- ``TASK_MODULES_TO_SAVE``: the heads PEFT's task models add to ``modules_to_save``.
- ``LINEAR_EQUIVALENT_CLASSES``: nn.Linear subclasses (e.g. Falcon's ``FalconLinear``) whose own forward is
  ``x @ weight.T + bias``, by name, so fastpeft may compute them as nn.Linear.
- ``GATED_MLP_*``: transformers' LlamaMLP and its copies (Mistral, Qwen2/3, Gemma 1-3, OLMo, Granite,
  Cohere, DeepSeek-V3's dense MLP, ...), recognised by what their forward computes, not by name.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional, Union

import torch.nn as nn

DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _classifier_heads() -> list[str]:
    """The heads PEFT's classification models add to modules_to_save, as the installed PEFT does
    (read from its version, without importing it): peft >= 0.22 adds DistilBERT's ``pre_classifier``."""
    try:
        from importlib.metadata import version
        from packaging.version import Version

        before = Version(version("peft")) < Version("0.22")
    except Exception:  # no peft installed: the newest PEFT's list
        before = False
    return ["classifier", "score"] if before else ["classifier", "score", "pre_classifier"]


# Heads PEFT's task-specific PeftModel classes add to modules_to_save (peft_model.py).
_CLASSIFIER_HEADS = _classifier_heads()
TASK_MODULES_TO_SAVE: dict[str, list[str]] = {
    "SEQ_CLS": list(_CLASSIFIER_HEADS),
    "TOKEN_CLS": list(_CLASSIFIER_HEADS),
    "QUESTION_ANS": ["qa_outputs"],
}

# Classification-head attribute names "all-linear" skips for SEQ_CLS (PEFT's SEQ_CLS_HEAD_NAMES).
SEQ_CLS_HEAD_NAMES = ["score", "classifier"]

# Layer classes that "all-linear" collects (PEFT: torch.nn.Linear and transformers' Conv1D).
def linear_classes() -> tuple[type, ...]:
    from .layer import conv1d_class

    conv1d = conv1d_class()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


# --- nn.Linear subclasses with nn.Linear's math ----------------------------------------------------
# Subclasses that override forward with exactly nn.Linear's computation, x @ weight.T (+ bias): fastpeft's
# LoraLinear computes them as nn.Linear (its forward never calls the base layer's). Named "module.class",
# resolved only in modules already imported (a model that uses one has imported it), so a name missing
# from an older or newer transformers is no error. Looked at in transformers 4.57 and 5.25 (every
# nn.Linear subclass in models/ and integrations/) and not listed:
# - EsmFoldLinear (esm): no forward of its own (only its init differs), so it is an nn.Linear already;
# - IdeficsDecoupledLinear (idefics): concatenates a second linear's output when out_additional_features > 0;
# - Llama4Router (llama4), PhimoeTopKRouter (phimoe): top-k routing after the matmul, return a tuple;
# - DeepseekV4GroupedLinear (deepseek_v4): a block-diagonal grouped matmul (torch.bmm over groups);
# - DoryLMHead (dory): logits scaled by a learned per-token vector;
# - ErgoLinearWithFP32Output (ergo): fp32 logits, input cast to the weight's dtype;
# - Ovis2_5VisualEmbeddingProjection (ovis2_5): an embedding lookup into weight.T with lookup=True;
# - the quantized layers of transformers.integrations (AutoBitLinear, FP8Linear, FbgemmFp8Linear,
#   CompressedTensorsFP8Linear, QuantizedLinear, MetalLinear): quantized weights and their own matmul.
LINEAR_EQUIVALENT_CLASSES = ("transformers.models.falcon.modeling_falcon.FalconLinear",)


def has_linear_forward(cls: type) -> bool:
    """Whether nn.Linear subclass ``cls`` computes nn.Linear's forward: inherited, or a listed class's."""
    if cls.forward is nn.Linear.forward:
        return True
    for path in LINEAR_EQUIVALENT_CLASSES:
        module_name, _, class_name = path.rpartition(".")
        known = getattr(sys.modules.get(module_name), class_name, None)
        if known is not None and cls.forward is known.forward:
            return True
    return False


def model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module) -> Union[set[str], str]:
    """PEFT's default LoRA targets for this model's ``config.model_type``; ValueError when it has none."""
    mtype = model_type(model)
    targets = DEFAULT_TARGET_MODULES.get(mtype) if mtype is not None else None
    if targets is None:
        what = f"model_type {mtype!r}" if mtype is not None else f"{type(model).__name__} (no config.model_type)"
        raise ValueError(
            f"fastpeft has no default target modules for {what}: pass target_modules, e.g. "
            f"LoraConfig(target_modules=['q_proj', 'v_proj']) or target_modules='all-linear'"
        )
    return targets if isinstance(targets, str) else set(targets)


def all_linear_exclusions(model: nn.Module, task_type: Optional[str]) -> set[str]:
    """Module names "all-linear" must not target: the output embedding, else the SEQ_CLS head."""
    names: set[str] = set()
    if not hasattr(model, "get_output_embeddings"):
        return names
    try:
        output_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output_emb = None
    if output_emb is not None:
        names.update(name for name, module in model.named_modules() if module is output_emb)
    elif task_type == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            cls_head = getattr(model, head, None)
            if cls_head is not None:
                names.update(name for name, module in model.named_modules() if module is cls_head)
                break
    return names


# --- projections of one input -------------------------------------------------------------------
# Sibling modules that attention blocks call one after another on the same tensor; with LoRA on all of
# a group fastpeft computes them as one autograd op (fastpeft/group.py), exact for any other calling
# pattern (it checks that the input is the very same tensor).
SHARED_INPUT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"),)


# --- GLU MLPs ---------------------------------------------------------------------------------
# A module whose forward is exactly this (LlamaMLP and every model that copies it) computes
# down(act(gate(x)) * up(x)); with LoRA on all three projections fastpeft runs it as one autograd op
# that keeps gate's and up's outputs for backward instead of act(gate) and the product (ops.py).
GATED_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GATED_MLP_FORWARD = ("def forward(self, x):", "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
                     "return down_proj")

# Projections that a module calls on one input, in the order it calls them: MultiLora runs each such
# group of wide layers as one product and one expand in eager forwards (fastpeft/multi_lora.py, _Siblings).
SIBLING_PROJECTIONS = SHARED_INPUT_PROJECTIONS + (GATED_MLP_PROJECTIONS[:2],)

# transformers' activation modules -> the fused kernels' name for them (kernels/activation.py)
GATED_MLP_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
}


@functools.lru_cache(maxsize=None)
def _forward_is_gated_mlp(cls: type) -> bool:
    try:
        lines = [line.strip() for line in inspect.getsource(cls.forward).splitlines()]
    except (OSError, TypeError):
        return False
    return tuple(line for line in lines if line and not line.startswith("#")) == GATED_MLP_FORWARD


def gated_mlp_activation(module: nn.Module) -> Optional[str]:
    """The activation name if ``module`` is a GLU MLP fastpeft can fuse, else None."""
    if not _forward_is_gated_mlp(type(module)):
        return None
    return GATED_MLP_ACTIVATIONS.get(type(getattr(module, "act_fn", None)).__name__)
