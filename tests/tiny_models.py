"""Tiny random-config Hugging Face models for CPU tests: one table, model type -> config and class.

Every model: hidden 32, 2 layers, vocab 100, built from its config (no downloads), seeded.
    model = make_model("llama")                    # causal LM
    model = make_model("llama", head="seq_cls")    # sequence classification (head `score`)
    batch = make_inputs("t5")                      # kwargs for model(**batch)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

VOCAB = 100
HIDDEN = 32
LAYERS = 2


@dataclass(frozen=True)
class TinyModel:
    config_cls: str  # transformers class names (resolved lazily: importing this file stays cheap)
    kwargs: dict
    model_cls: str  # the "main" head used for the numeric comparisons
    seq_cls: str | None = None  # sequence-classification class, if the family has one
    encoder_decoder: bool = False
    default_targets: tuple[str, ...] | None = field(default=None)  # PEFT's defaults (None: no entry)


_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)

TINY_MODELS: dict[str, TinyModel] = {
    "llama": TinyModel("LlamaConfig", _DECODER, "LlamaForCausalLM", "LlamaForSequenceClassification",
                       default_targets=("q_proj", "v_proj")),
    "mistral": TinyModel("MistralConfig", _DECODER, "MistralForCausalLM", "MistralForSequenceClassification",
                         default_targets=("q_proj", "v_proj")),
    "qwen2": TinyModel("Qwen2Config", _DECODER, "Qwen2ForCausalLM", "Qwen2ForSequenceClassification",
                       default_targets=("q_proj", "v_proj")),
    "gemma": TinyModel("GemmaConfig", dict(_DECODER, head_dim=8), "GemmaForCausalLM",
                       "GemmaForSequenceClassification", default_targets=("q_proj", "v_proj")),
    "phi3": TinyModel("Phi3Config", dict(_DECODER, bos_token_id=1, eos_token_id=2), "Phi3ForCausalLM", "Phi3ForSequenceClassification",
                      default_targets=None),
    "gpt2": TinyModel("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
                      "GPT2LMHeadModel", "GPT2ForSequenceClassification", default_targets=("c_attn",)),
    "gpt_neox": TinyModel("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                                num_hidden_layers=LAYERS, num_attention_heads=4,
                                                max_position_embeddings=64, pad_token_id=0),
                          "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification",
                          default_targets=("query_key_value",)),
    "opt": TinyModel("OPTConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                                       pad_token_id=1),
                     "OPTForCausalLM", "OPTForSequenceClassification", default_targets=("q_proj", "v_proj")),
    # FalconLinear layers (an nn.Linear subclass with its own forward); bias=True runs its bias branch
    "falcon": TinyModel("FalconConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                             bias=True),
                        "FalconForCausalLM", "FalconForSequenceClassification",
                        default_targets=("query_key_value",)),
    "bert": TinyModel("BertConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64),
                      "BertForMaskedLM", "BertForSequenceClassification", default_targets=("query", "value")),
    "t5": TinyModel("T5Config", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS,
                                     num_decoder_layers=LAYERS, num_heads=4, decoder_start_token_id=0),
                    "T5ForConditionalGeneration", None, encoder_decoder=True, default_targets=("q", "v")),
}

MODEL_TYPES = list(TINY_MODELS)


def _transformers_attr(name: str):
    return getattr(importlib.import_module("transformers"), name)


def make_config(model_type: str, **overrides):
    spec = TINY_MODELS[model_type]
    return _transformers_attr(spec.config_cls)(**{**spec.kwargs, **overrides})


def make_model(model_type: str, head: str = "main", seed: int = 0, dtype=torch.float32, **config_overrides):
    """A tiny random model of ``model_type``; ``head`` = "main" or "seq_cls" (num_labels=3). Eval mode."""
    spec = TINY_MODELS[model_type]
    cls_name = spec.model_cls if head == "main" else spec.seq_cls
    if cls_name is None:
        raise ValueError(f"{model_type} has no {head} head in TINY_MODELS")
    if head == "seq_cls":
        config_overrides.setdefault("num_labels", 3)
    config = make_config(model_type, **config_overrides)
    torch.manual_seed(seed)
    model = _transformers_attr(cls_name)(config)
    model.eval()
    return model.to(dtype)


def make_inputs(model_type: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Token ids (no padding) as model(**inputs) kwargs; encoder-decoders get decoder_input_ids too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    if TINY_MODELS[model_type].encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, seq - 2), generator=g)
    return inputs
