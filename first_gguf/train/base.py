"""Loading the frozen base model, and the process settings of training and evaluation."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from .. import models
from ..arch import DecoderStack
from ..errors import FirstError
from ..hf_gguf import one_parse_per_file


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise FirstError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def dist_state():
    """accelerate's process state: device, process index and count (one CPU process here)."""
    from accelerate import PartialState

    return PartialState()


def load_base(base: str, device: torch.device | str = "cpu"):
    """(model, tokenizer) of an HF directory, a GGUF file or a zoo name; float32, frozen, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(base)
    if not path.exists() and base in models.MODELS:
        path = models.fetch(base)
    if path.is_file():
        if path.suffix != ".gguf":
            raise FirstError(f"{path}: expected an HF model directory, a .gguf file or a zoo model name")
        src, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        src, kwargs = path, {}
    else:
        raise FirstError(f"{base}: no such file or directory, and not a zoo model ({', '.join(models.MODELS)})")
    with one_parse_per_file():  # a GGUF's header is parsed once, not four times
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    model.eval().requires_grad_(False).to(device)
    DecoderStack(model)  # an unsupported architecture fails here, before any work
    return model, tokenizer


def context_length(model) -> int:
    return int(getattr(model.config.get_text_config(), "max_position_embeddings", 1 << 20))


def peak_memory_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
