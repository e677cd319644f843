"""Calibrate which FFN neurons to keep, and write them as thinned FFNs: ``first-gguf thin``.

Per layer i and neuron j the score is ``contrib`` (``examples/ffn_slim.py``'s): the mean over
an example's tokens of z_j^2 * |W_down[:, j]|^2, with z = act(gate(x)) * up(x) the FFN's inner
activation, each example's scores normalised to sum 1 per layer, summed over the examples.
The examples are the built-in training families (``data.build_examples``, split ``train``;
HumanEval never), prompt and response run as one sequence by the transformers model that
loads the GGUF's own (dequantized) weights. Each layer keeps its ``width`` best neurons, the
same for every prompt (``format.thin_write`` writes them). Only ``calibrate`` needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FirstError
from ..log import logger
from ..prompts import FAMILIES

SCORES_KEY = "contrib"
SOURCE_KEY = "source"
MAX_PROMPT, MAX_RESPONSE = 128, 64
DEFAULT_EXAMPLES = 120

log = logger("thin")


def calibrate(model: str | os.PathLike, examples: int = DEFAULT_EXAMPLES, threads: int | None = None,
              seed: int = 0, families: Sequence[str] = FAMILIES) -> tuple[np.ndarray, str]:
    """Neuron scores of a GGUF's FFNs on training examples.

    Args:
        model: A GGUF file (its weights, dequantized, run by transformers).
        examples: Examples drawn from ``families`` (train split), shared evenly.
        threads: torch threads (default: all cores).
        seed: Which examples are drawn.

    Returns:
        (scores ``[n_layer, n_ff]`` float64, a one-line description for ``first.thin.source``).
    """
    import torch

    from ..arch import DecoderStack
    from .base import context_length, load_base, set_threads
    from .data import Limits, build_examples

    set_threads(threads)
    hf, tokenizer = load_base(str(model))
    mlps = [_gated_mlp(layer, i) for i, layer in enumerate(DecoderStack(hf).layers)]
    if len({m.down_proj.weight.shape[1] for m in mlps}) != 1:
        raise FirstError(f"{model}: the layers' FFN widths differ; one score array cannot hold them")
    data = build_examples(tokenizer, Limits(MAX_PROMPT, MAX_RESPONSE, context_length(hf)), tasks=families,
                          n_examples=examples, seed=seed, split="train")
    total = np.zeros((len(mlps), mlps[0].down_proj.weight.shape[1]))
    with torch.inference_mode():
        down_norm = [m.down_proj.weight.pow(2).sum(0) for m in mlps]
        seen: list[torch.Tensor | None] = [None] * len(mlps)

        def record(i: int):
            def hook(module, args):  # down_proj's input is z = act(gate(x)) * up(x)
                c = args[0][0].pow(2).mean(0) * down_norm[i]
                seen[i] = c / c.sum()
            return hook

        handles = [m.down_proj.register_forward_pre_hook(record(i)) for i, m in enumerate(mlps)]
        try:
            for n, ex in enumerate(data, 1):
                hf(torch.tensor([list(ex.prompt) + list(ex.response)]))
                total += torch.stack(seen).double().numpy()
                if n % 10 == 0 or n == len(data):
                    log(f"calibration: {n}/{len(data)} examples")
        finally:
            for h in handles:
                h.remove()
    source = (f"{SCORES_KEY}: mean over tokens of z^2 |W_down col|^2, normalised per example; {len(data)} "
              f"train examples of {','.join(families)} (seed {seed}), prompt + response")
    return total, source


def _gated_mlp(layer, i: int):
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise FirstError(f"layer {i}: not a gated FFN (gate_proj, up_proj, down_proj); thinned FFNs need one")
    return mlp


def load_scores(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """(scores, source) saved by ``save_scores``."""
    try:
        with np.load(path) as f:
            scores = np.asarray(f[SCORES_KEY], dtype=np.float64)
            source = str(f[SOURCE_KEY]) if SOURCE_KEY in f else f"{SCORES_KEY} scores from {Path(path).name}"
    except (OSError, ValueError, KeyError) as exc:
        raise FirstError(f"{path}: not a scores file (npz with key {SCORES_KEY!r}): {exc}") from None
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise FirstError(f"{path}: {SCORES_KEY} must be a finite [n_layer, n_ff] array, got shape {list(scores.shape)}")
    return scores, source


def save_scores(path: str | os.PathLike, scores: np.ndarray, source: str) -> Path:
    from ..paths import atomic_output

    out = Path(path)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{SCORES_KEY: scores, SOURCE_KEY: np.array(source)})
    return out


def thin_model(model: str | os.PathLike, out: str | os.PathLike, width: int | None, layers: Sequence[int] | None = None,
               examples: int = DEFAULT_EXAMPLES, threads: int | None = None, scores: str | os.PathLike | None = None,
               seed: int = 0, force: bool = False, qtype: str | None = None, attn: bool = False) -> Path:
    """Calibrate (or read ``scores``) and write ``model`` with thinned FFNs of ``width`` neurons.

    Args:
        model: A FiRST-GGUF.
        out: The FiRST-GGUF to write (never ``model``; an existing one only with ``force``).
        width: Kept neurons per thinned layer; None: every neuron (needs ``qtype``; no calibration).
        layers: Layers to thin (None: every layer).
        examples, threads, seed: Of the calibration (``calibrate``).
        scores: An npz of scores: read when it exists (no calibration), else written after it.
        force: Overwrite ``out``.
        qtype: A ggml type name: the thin copies are requantized to it.
        attn: Also write the thin layers' attention weights in ``qtype`` (``write_thin``).

    Returns:
        The output path.
    """
    from ..format.header import read_header
    from ..format.reader import first_parts_from_reader, model_dims
    from ..format.thin import ffn_length
    from ..format.thin_write import check_neurons, write_thin, write_thin_from_scores
    from ..paths import check_output_path

    model, out = Path(model), Path(out)
    check_output_path(out, force, inputs=(model,))
    reader = read_header(model)
    first_parts_from_reader(reader, str(model))
    arch, n_layer, _ = model_dims(reader, str(model))
    chosen = list(range(n_layer)) if layers is None else sorted(set(layers))
    if width is None:
        if qtype is None:
            raise FirstError("every neuron (width 'all') needs a type to requantize to (--type)")
        every = {i: np.arange(ffn_length(reader, arch, i, str(model))) for i in chosen}
        del reader  # write_thin checks the request before it writes anything
        return write_thin(model, every, out, source=f"every neuron, requantized to {qtype}", force=force, qtype=qtype,
                          attn=attn)
    check_neurons(reader, str(model), {i: np.arange(width) for i in chosen}, qtype)  # width fits, before the long part
    del reader
    if scores is not None and Path(scores).exists():
        values, source = load_scores(scores)
        log(f"scores from {scores}")
    else:
        values, source = calibrate(model, examples=examples, threads=threads, seed=seed)
        if scores is not None:
            save_scores(scores, values, source)
    suffix = f", requantized to {qtype}" if qtype else ""
    return write_thin_from_scores(model, values, width, out, layers=chosen,
                                  source=f"{source}; top {width} per layer{suffix}", force=force, qtype=qtype,
                                  attn=attn)
