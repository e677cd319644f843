"""HF ``model_type`` -> how to drive its decoder one layer at a time (a registry).

``first_gguf/router.py`` runs a frozen Hugging Face causal LM layer by layer so that it can
skip layers. What differs between architectures is only where the parts live and how one
decoder layer is called; that is one ``ArchSpec`` entry per HF ``model_type`` in ``ARCHS``.
A new architecture is a new entry; an unknown type raises ``UnsupportedArchError``.

Everything else reuses transformers' own code (4.57.6): the embedding module (Gemma 3's
``Gemma3TextScaledWordEmbedding`` multiplies by sqrt(hidden_size) itself), the rotary
modules, ``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask``, the
decoder layer modules with a ``cache_utils.DynamicCache``, the final norm and ``lm_head``.
"""

from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import FirstError

if TYPE_CHECKING:  # torch and transformers load on first use: the registry itself is plain data
    import torch
    from transformers.cache_utils import DynamicCache

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Attention pattern of a layer (HF ``config.layer_types``) -> the helper of
# ``transformers.masking_utils`` that builds its mask, exactly as the HF model's own forward does.
MASK_BUILDERS = {
    FULL_ATTENTION: "create_causal_mask",
    SLIDING_ATTENTION: "create_sliding_window_causal_mask",
}


def mask_builder(kind: str) -> Any:
    """The transformers function of ``MASK_BUILDERS[kind]`` (imports transformers and torch)."""
    return getattr(importlib.import_module("transformers.masking_utils"), MASK_BUILDERS[kind])


class UnsupportedArchError(FirstError):
    """The model's HF ``model_type`` has no entry in ``ARCHS``."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one HF causal-LM family live, and how a decoder layer is called.

    Attribute paths are dotted, from the ``*ForCausalLM`` object (``model``) or from its
    decoder stack (``text_model``).
    """

    text_model: str = "model"            # model -> decoder stack (embed, layers, norm, rotary)
    layers: str = "layers"               # text_model -> ModuleList of decoder layers
    embed: str = "embed_tokens"          # text_model -> token embedding (applies any scaling)
    norm: str = "norm"                   # text_model -> final norm
    head: str = "lm_head"                # model -> output projection
    # Keyword of the decoder layer's forward -> text_model attribute of the rotary module
    # producing it (Gemma 3 passes a global and a local RoPE to every layer).
    rope: dict[str, str] = field(default_factory=lambda: {"position_embeddings": "rotary_emb"})
    logit_softcap: str | None = None     # text-config attribute of a tanh cap on the logits


_GEMMA3_TEXT = ArchSpec(
    rope={"position_embeddings_global": "rotary_emb", "position_embeddings_local": "rotary_emb_local"},
    logit_softcap="final_logit_softcapping",
)

ARCHS: dict[str, ArchSpec] = {
    "qwen2": ArchSpec(),
    "llama": ArchSpec(),
    "qwen3": ArchSpec(),
    # Gemma3ForCausalLM (also what transformers builds from a gemma3 GGUF).
    "gemma3_text": _GEMMA3_TEXT,
    # Gemma3ForConditionalGeneration: the same text stack inside the multimodal wrapper, whose
    # forward applies no logit soft-cap (Gemma 3 checkpoints set none anyway).
    "gemma3": replace(_GEMMA3_TEXT, text_model="model.language_model", logit_softcap=None),
}


def get_arch(model_type: str) -> ArchSpec:
    """The registry entry of an HF ``model_type``.

    Raises:
        UnsupportedArchError: the type has no entry (the message lists the supported ones).
    """
    spec = ARCHS.get(model_type)
    if spec is None:
        raise UnsupportedArchError(f"Can not map model_type {model_type!r} to a FiRST decoder: supported "
                                   f"model types are {', '.join(sorted(ARCHS))} (add an entry to "
                                   f"first_gguf/arch.py ARCHS)")
    return spec


class DecoderStack:
    """A view of one HF causal LM as embed -> layers -> norm -> head, driven by the caller.

    Args:
        model: A loaded ``*ForCausalLM`` (or Gemma 3 multimodal) model of a registered type.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.spec = get_arch(model.config.model_type)
        self.text = operator.attrgetter(self.spec.text_model)(model)
        self.config = model.config.get_text_config()
        if getattr(self.config, "use_bidirectional_attention", False):
            raise UnsupportedArchError(f"{model.config.model_type}: bidirectional attention (an embedding "
                                       f"model) cannot be decoded causally")
        self.layers = list(operator.attrgetter(self.spec.layers)(self.text))[: self.config.num_hidden_layers]
        self.n_layer = len(self.layers)
        self.n_embd = self.config.hidden_size
        types = getattr(self.config, "layer_types", None) or [FULL_ATTENTION] * self.n_layer
        for kind in set(types):
            if kind not in MASK_BUILDERS:
                raise UnsupportedArchError(f"{model.config.model_type}: layer type {kind!r} is not supported "
                                           f"(supported: {', '.join(MASK_BUILDERS)})")
        self.layer_types = list(types[: self.n_layer])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, n_embd): the residual stream entering layer 0."""
        return operator.attrgetter(self.spec.embed)(self.text)(input_ids)

    def context(self, h: torch.Tensor, start: int, cache: DynamicCache) -> dict[str, Any]:
        """Masks, rotary embeddings and positions shared by every layer for tokens at ``start``...

        Build it before any layer runs: the masks take their KV length from the cache's first
        layer, which then holds exactly ``start`` positions (every layer of the cache must).
        """
        import torch

        cache_position = torch.arange(start, start + h.shape[1], device=h.device)
        position_ids = cache_position.unsqueeze(0)
        masks = {kind: mask_builder(kind)(config=self.config, input_embeds=h, attention_mask=None,
                                          cache_position=cache_position, past_key_values=cache,
                                          position_ids=position_ids)
                 for kind in set(self.layer_types)}
        rope = {kw: operator.attrgetter(attr)(self.text)(h, position_ids) for kw, attr in self.spec.rope.items()}
        return {"masks": masks, "rope": rope, "cache_position": cache_position, "position_ids": position_ids}

    def layer(self, i: int, h: torch.Tensor, ctx: dict[str, Any], cache: DynamicCache) -> torch.Tensor:
        """Run decoder layer ``i`` on ``h``; it appends its K/V for these positions to ``cache``."""
        out = self.layers[i](h, attention_mask=ctx["masks"][self.layer_types[i]],
                             position_ids=ctx["position_ids"], past_key_values=cache, use_cache=True,
                             cache_position=ctx["cache_position"], **ctx["rope"])
        return out[0] if isinstance(out, tuple) else out  # Gemma 3 layers return a tuple

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, output projection and any logit soft-cap, as the HF model's forward."""
        h = operator.attrgetter(self.spec.norm)(self.text)(h)
        logits = operator.attrgetter(self.spec.head)(self.model)(h)
        cap = getattr(self.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        if cap is not None:
            logits = (logits / cap).tanh() * cap
        return logits
