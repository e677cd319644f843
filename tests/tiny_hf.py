"""Tiny seeded random Hugging Face causal LMs (no download): hidden 64, a few layers, float32.

Weights are HF's own initialisation with a wider spread (``initializer_range`` 0.15), plus
noise on every vector (norm gains, biases), so each layer changes the residual stream
enough for a skipped layer to show in the logits, and norm gains are not all 1.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

VOCAB = 512
HIDDEN = 64
N_LAYER = 4
# Gemma 3 alternates sliding-window and global layers; a window of 4 tokens is much shorter
# than the test sequences, so the window masks matter.
GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]

# The HF model_type values tiny_model builds ("gemma3" is the multimodal wrapper).
MODEL_TYPES = ("qwen2", "llama", "qwen3", "gemma3_text", "gemma3")

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYER,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.15)


def _gemma3_text_config(n_layer: int) -> Gemma3TextConfig:
    return Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": n_layer, "num_key_value_heads": 1},
                            head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                            layer_types=(GEMMA3_LAYER_TYPES * n_layer)[:n_layer], rope_theta=1e6,
                            rope_local_base_freq=1e4, final_logit_softcapping=3.0)


def tiny_config(model_type: str, n_layer: int = N_LAYER):
    """The config of a tiny model of one HF ``model_type``."""
    common = {**_COMMON, "num_hidden_layers": n_layer}
    if model_type == "qwen2":  # tied embeddings and q/k/v biases, as Qwen2.5-0.5B
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if model_type == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if model_type == "qwen3":  # per-head q/k norms
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if model_type == "gemma3_text":
        return _gemma3_text_config(n_layer)
    if model_type == "gemma3":
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=28, patch_size=14)
        return Gemma3Config(text_config=_gemma3_text_config(n_layer).to_dict(), vision_config=vision.to_dict(),
                            mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                            eoi_token_index=VOCAB - 3)
    raise ValueError(f"no tiny config for {model_type!r}")


def tiny_model(model_type: str, n_layer: int = N_LAYER, seed: int = 0) -> torch.nn.Module:
    """A seeded random float32 model in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, n_layer)
    if model_type == "gemma3":
        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.float().eval()
