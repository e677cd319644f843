"""Describe a GGUF for people and scripts: ``first-gguf inspect`` (text or ``--json``).

Reads whatever it can of a file, valid or not: a broken FiRST part is reported (``valid``
holds the validation error), never raised. numpy + gguf only, never torch.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from ..constants import (
    FIRST_KEY_PREFIX,
    KEY_AGGREGATION,
    KEY_POINTS,
    KEY_POINTS_DEFAULT,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    ATTN_COPY_MARKER,
    KEY_THIN_ATTN,
    KEY_THIN_LAYERS,
    KEY_THIN_SOURCE,
    KEY_THIN_TYPE,
    KEY_THIN_WIDTHS,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    KEY_VOCAB_SOURCE,
    KEY_VOCAB_TOKENS,
    KEY_VOCAB_TYPE,
    OUTPUT_TENSOR,
    ROUTER_IN_WEIGHT,
    ROUTER_NAME_MARKER,
    ROUTER_OUT_BIAS,
    ROUTER_TENSORS,
    THIN_NAME_MARKER,
    THIN_TENSORS,
    TOKEN_EMBD_TENSOR,
    VOCAB_TENSOR,
    base_ffn_name,
)
from ..errors import FormatError
from .header import read_header
from .reader import Reader, architecture, int_key, routers_from_reader
from .rules import parse_router_name
from .thin import parse_thin_name

# first.* key -> its name in inspect's output.
_FIRST_FIELDS = {
    KEY_VERSION: "version",
    KEY_ROUTER_HIDDEN_SIZE: "hidden_size",
    KEY_ROUTER_NORM_EPS: "norm_eps",
    KEY_ROUTER_THRESHOLD: "threshold",
    KEY_PROTECTED_LAYERS: "protected_layers",
    KEY_AGGREGATION: "aggregation",
    KEY_PREFILL: "prefill",
    KEY_TRAIN_SOURCE: "train_source",
    KEY_POINTS: "points",                  # the first.points strings as stored, or None
    KEY_POINTS_DEFAULT: "points_default",
}


def inspect_gguf(path: str | os.PathLike) -> dict:
    """Describe a GGUF as JSON-serialisable data: model, quantization, FiRST keys and routers.

    Returns:
        ``{file, size_bytes, architecture, n_layer, n_embd, n_tensors, quantization:
        {file_type, tensor_types}, first}``; ``first`` is None for a plain GGUF, else the
        first.* values, ``router`` (dtypes and ``ne`` per role, per-layer b2, p_bias =
        sigmoid(b2) and W1 Frobenius norm), ``thin`` (None, or the thinned FFNs' layers, widths,
        source, and bytes against the full FFNs of those layers), ``vocab`` (None, or the short
        vocabulary's size, n_vocab, source, and bytes against the output matrix's) and ``valid``:
        True or the validation error.
    """
    reader = read_header(path)
    arch = architecture(reader)
    file_type = int_key(reader, gguf.Keys.General.FILE_TYPE)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path),
        "size_bytes": os.path.getsize(path),
        "architecture": arch,
        "n_layer": int_key(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)) if arch else None,
        "n_embd": int_key(reader, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) if arch else None,
        "n_tensors": len(reader.tensors),
        "quantization": {"file_type": None if file_type is None else _file_type_name(file_type),
                         "tensor_types": dict(counts.most_common())},
        "first": _inspect_first(reader, str(path)),
    }


def _file_type_name(value: int) -> str:
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({value})"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _inspect_first(reader: Reader, where: str) -> dict | None:
    """The FiRST part as far as it can be read, and whether it is valid; None if there is none."""
    fields = {n: f for n, f in reader.fields.items() if n.startswith(FIRST_KEY_PREFIX)}
    tensors = [t for t in reader.tensors if ROUTER_NAME_MARKER in t.name]
    if not fields and not tensors:
        return None
    info: dict[str, Any] = {}
    for key, short in _FIRST_FIELDS.items():
        try:
            value = fields[key].contents() if key in fields else None
        except (UnicodeDecodeError, IndexError, ValueError):
            value = None
        # strict JSON has no NaN / inf: an invalid file's non-finite value is shown as text
        info[short] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
    info["router"] = _router_summary(tensors)
    info["thin"] = _thin_summary(reader, fields)
    info["vocab"] = _vocab_summary(reader, fields)
    try:
        routers_from_reader(reader, where)
        info["valid"] = True
    except FormatError as exc:
        info["valid"] = str(exc)
    return info


def _router_summary(tensors: list[Any]) -> dict:
    """dtypes and ne per role, and per-layer stats, from whatever router tensors are readable."""
    dtypes: dict[str, set] = collections.defaultdict(set)
    shapes: dict[str, set] = collections.defaultdict(set)
    layers: dict[int, dict] = collections.defaultdict(dict)
    for t in tensors:
        parsed = parse_router_name(t.name)
        if parsed is None:
            continue
        bid, role = parsed
        dtypes[role].add(t.tensor_type.name)
        shapes[role].add(tuple(int(n) for n in t.shape))
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or t.data.size == 0:
            continue
        values = np.asarray(t.data, dtype=np.float64)
        if role == ROUTER_OUT_BIAS:
            b2 = float(values.flat[0])
            layers[bid]["b2"] = _finite(b2)
            layers[bid]["p_bias"] = _finite(_sigmoid(b2)) if math.isfinite(b2) else None
        elif role == ROUTER_IN_WEIGHT:
            # not np.linalg.norm: its BLAS dot spins up threads, ~100x slower on a busy machine
            layers[bid]["w1_norm"] = _finite(math.sqrt(float(np.square(values).sum())))
    one = lambda s: sorted(s)[0] if len(s) == 1 else sorted(s)  # noqa: E731
    return {
        "dtypes": {role: one(dtypes[role]) for role in ROUTER_TENSORS if role in dtypes},
        "shapes": {role: [list(x) for x in sorted(shapes[role])] if len(shapes[role]) > 1
                   else list(one(shapes[role])) for role in ROUTER_TENSORS if role in shapes},
        "layers": [{"layer": bid, "b2": s.get("b2"), "p_bias": s.get("p_bias"), "w1_norm": s.get("w1_norm")}
                   for bid, s in sorted(layers.items())],
    }


def _thin_summary(reader: Reader, fields: dict[str, Any]) -> dict | None:
    """The thinned FFNs as far as they are readable: layers, widths, source, type, thin and full bytes,
    and the attention copies (``attn``: first.thin.attn, ``attn_bytes``: the copies' bytes)."""
    thin = [t for t in reader.tensors if THIN_NAME_MARKER in t.name]
    copies = [t for t in reader.tensors if ATTN_COPY_MARKER in t.name]
    if KEY_THIN_LAYERS not in fields and not thin and not copies:
        return None
    values = {}
    for key in (KEY_THIN_LAYERS, KEY_THIN_WIDTHS, KEY_THIN_SOURCE, KEY_THIN_TYPE, KEY_THIN_ATTN):
        try:
            values[key] = fields[key].contents() if key in fields else None
        except (UnicodeDecodeError, IndexError, ValueError):
            values[key] = None
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    layers = sorted({parsed[0] for t in thin if (parsed := parse_thin_name(t.name))})
    return {"layers": values[KEY_THIN_LAYERS], "widths": values[KEY_THIN_WIDTHS], "source": values[KEY_THIN_SOURCE],
            "type": values[KEY_THIN_TYPE], "thin_bytes": sum(int(t.n_bytes) for t in thin),
            "full_bytes": sum(sizes.get(base_ffn_name(role, i), 0) for i in layers for role in THIN_TENSORS),
            "attn": bool(values[KEY_THIN_ATTN]), "attn_bytes": sum(int(t.n_bytes) for t in copies)}


def _vocab_summary(reader: Reader, fields: dict[str, Any]) -> dict | None:
    """The short vocabulary as far as it is readable: size, n_vocab, source, its bytes and the output matrix's."""
    sizes = {t.name: t for t in reader.tensors if t.name in (VOCAB_TENSOR, OUTPUT_TENSOR, TOKEN_EMBD_TENSOR)}
    if KEY_VOCAB_TOKENS not in fields and VOCAB_TENSOR not in sizes:
        return None
    values = {}
    for key in (KEY_VOCAB_TOKENS, KEY_VOCAB_SOURCE, KEY_VOCAB_TYPE):
        try:
            values[key] = fields[key].contents() if key in fields else None
        except (UnicodeDecodeError, IndexError, ValueError):
            values[key] = None
    tokens, source = values[KEY_VOCAB_TOKENS], values[KEY_VOCAB_SOURCE]
    out = sizes.get(OUTPUT_TENSOR, sizes.get(TOKEN_EMBD_TENSOR))
    return {"size": len(tokens) if isinstance(tokens, list) else None,
            "n_vocab": int(out.shape[1]) if out is not None and len(out.shape) == 2 else None,
            "source": source, "type": values[KEY_VOCAB_TYPE], "output": None if out is None else out.name,
            "vocab_bytes": int(sizes[VOCAB_TENSOR].n_bytes) if VOCAB_TENSOR in sizes else 0,
            "output_bytes": 0 if out is None else int(out.n_bytes)}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def format_inspect(info: dict) -> str:
    """The compact human-readable report of ``inspect_gguf`` (what ``first-gguf inspect`` prints)."""
    q = info["quantization"]
    types = ", ".join(f"{name} {n}" for name, n in q["tensor_types"].items())
    lines = [
        f"file          {info['file']} ({info['size_bytes'] / 1e6:.1f} MB)",
        f"model         {info['architecture']}, {info['n_layer']} layers, n_embd {info['n_embd']}, "
        f"{info['n_tensors']} tensors",
        f"quantization  {q['file_type'] or '?'} ({types})",
    ]
    first = info["first"]
    if first is None:
        return "\n".join(lines + ["not a FiRST-GGUF"])
    router = first["router"]
    lines += [
        f"FiRST         version {first['version']}, router hidden {first['hidden_size']}, "
        f"norm eps {_num(first['norm_eps'])}, threshold {_num(first['threshold'])}",
        f"              protected layers {first['protected_layers']}, aggregation {first['aggregation']}, "
        f"prefill {first['prefill']}",
        f"trained on    {first['train_source']}",
        *_points_lines(first),
        *_thin_lines(first.get("thin")),
        *_vocab_lines(first.get("vocab")),
        "router        " + ", ".join(f"{role} {dtype} {router['shapes'][role]}"
                                     for role, dtype in router["dtypes"].items()),
        "  layer        b2   p_bias    |W1|",
    ]
    lines += [f"  {s['layer']:5d} {_num(s['b2'], 9)} {_num(s['p_bias'], 8)} {_num(s['w1_norm'], 7)}"
              for s in router["layers"]]
    lines.append("valid         yes" if first["valid"] is True else f"INVALID       {first['valid']}")
    return "\n".join(lines)


def _points_lines(first: dict) -> list[str]:
    """One line per operating point, the default marked; none when the file has none."""
    specs = first.get("points")
    if not isinstance(specs, list) or not specs:
        return []
    default = first.get("points_default")
    marks = [" (default)" if str(s).partition("=")[0] == default else "" for s in specs]
    return [f"{'points' if i == 0 else '':<14}{s}{m}" for i, (s, m) in enumerate(zip(specs, marks))]


def _thin_lines(thin: dict | None) -> list[str]:
    """The thinned FFNs in two lines; none when the file has none."""
    if not thin:
        return []
    widths = thin["widths"] or []
    width = f"width {widths[0]}" if widths and len(set(widths)) == 1 else f"widths {widths}"
    share = f" ({100 * thin['thin_bytes'] / thin['full_bytes']:.1f}%)" if thin["full_bytes"] else ""
    kind = f", requantized to {thin['type']}" if thin.get("type") else ""
    return [f"thin FFNs     layers {thin['layers']}, {width}{kind}",
            f"              {thin['thin_bytes'] / 1e6:.1f} MB thin of {thin['full_bytes'] / 1e6:.1f} MB full FFN{share}; "
            f"{thin['source'] or 'no source'}"] + (
        [f"              and attention copies of those layers, {thin['attn_bytes'] / 1e6:.1f} MB"]
        if thin.get("attn") else [])


def _vocab_lines(vocab: dict | None) -> list[str]:
    """The short vocabulary in two lines; none when the file has none."""
    if not vocab:
        return []
    share = f" ({100 * vocab['vocab_bytes'] / vocab['output_bytes']:.1f}%)" if vocab["output_bytes"] else ""
    kind = f", requantized to {vocab['type']}" if vocab.get("type") else ""
    return [f"vocabulary    {vocab['size']} tokens of {vocab['n_vocab']}{kind}",
            f"              {vocab['vocab_bytes'] / 1e6:.1f} MB short of {vocab['output_bytes'] / 1e6:.1f} MB "
            f"{vocab['output']}{share}; {vocab['source'] or 'no source'}"]


def _num(x: object, width: int = 0) -> str:
    """A number in 4 significant digits; "-" for None; anything else (an invalid file's value) as is."""
    if x is None:
        return f"{'-':>{width}}"
    return f"{x:>{width}.4g}" if isinstance(x, (int, float)) else f"{x!s:>{width}}"
