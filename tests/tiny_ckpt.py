"""Tiny seeded random HF checkpoints on disk, with real tokenizers upstream's converter accepts.

The models are ``tiny_hf``'s (hidden 64, float32, seeded), with the vocabulary of a real
tokenizer so that ``convert_hf_to_gguf.py`` converts them like a real checkpoint. Nothing is
downloaded; the tokenizers come from GGUFs that are already here:

- qwen2, qwen3: the Qwen2.5 tokenizer of the zoo's default model, rebuilt by transformers
  (``AutoTokenizer.from_pretrained(..., gguf_file=...)``, added tokens restored by
  ``first_gguf.convert.hf_tokenizer_from_gguf``) and saved as tokenizer.json. (The sdist's
  ``ggml-vocab-qwen2.gguf`` hashes the same but types its padding entries USER_DEFINED, which
  transformers does not keep, so the zoo file is the one a converted file can equal.) Upstream's converter takes the GPT-2 BPE path and identifies the
  pre-tokenizer by hashing the tokens of a test string (``get_vocab_base_pre``); this
  tokenizer hashes to e636dc30..., its entry for Qwen/Qwen1.5-7B ("qwen2"), exactly what a
  real Qwen2.5 / Qwen3 checkpoint gives.
- llama: the Llama (SentencePiece) tokenizer of the sdist's ``models/ggml-vocab-llama-spm.gguf``,
  written back as the ``tokenizer.model`` a Llama 2 checkpoint ships. Its converter takes the
  SentencePiece path, which needs no hash (pre-tokenizer "default"). The Llama 3 BPE vocab
  (``ggml-vocab-llama-bpe.gguf``) cannot serve: transformers rebuilds it with a pre-tokenizer
  that hashes to 9058d999..., which the converter rightly refuses as unknown.
- gemma3 (``gemma3_text``, as Gemma 3 270M): the Gemma 3 tokenizer of the zoo's
  gemma-3-270m.gguf, written back as ``tokenizer.model``, since real Gemma 3 checkpoints
  ship one and upstream's Gemma 3 converter reads it (without one it falls back to the BPE
  path, where no Gemma 3 hash is known).

``tokenizer.model`` is a SentencePiece ModelProto; ``spm_model_from_gguf`` encodes the
pieces, scores and types the GGUF holds (all the converter reads from it) in protobuf's wire
format by hand, so writing it needs neither sentencepiece nor protobuf (reading it, in the
converter, needs sentencepiece, as for any real Llama 2 or Gemma checkpoint).
"""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from first_gguf.format import read_header
from tiny_hf import tiny_config

# model_type -> (tokenizer kind, source GGUF: "sdist:<vocab name>" or "zoo:<model name>")
TOKENIZERS = {
    "qwen2": ("hf", "zoo:qwen2.5-coder-0.5b-instruct"),
    "qwen3": ("hf", "zoo:qwen2.5-coder-0.5b-instruct"),
    "llama": ("spm", "sdist:llama-spm"),
    "gemma3_text": ("spm", "zoo:gemma-3-270m"),
}
N_LAYER = {"gemma3_text": 6}  # one global layer after five sliding ones, llama.cpp's Gemma 3 pattern
# GGUF token types are SentencePiece's enum: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
SPM_UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4


def source_gguf(spec: str, dest: Path) -> Path:
    """The GGUF a tokenizer comes from: a vocab-only GGUF of the pinned sdist, or a zoo model."""
    kind, name = spec.split(":", 1)
    if kind == "zoo":
        from first_gguf import models

        return models.fetch(name)
    from first_gguf.build import fetch_sdist, read_base
    from first_gguf.paths import cache_dir

    out = dest / f"ggml-vocab-{name}.gguf"
    if not out.is_file():
        base = read_base()
        member = f"llama_cpp_python-{base.version}/vendor/llama.cpp/models/{out.name}"
        with tarfile.open(fetch_sdist(base, cache_dir())) as tar:
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return out


def hf_tokenizer_files(gguf_path: Path, dest: Path) -> Path:
    """transformers' tokenizer of a GGUF (added tokens restored), saved as HF tokenizer files."""
    from first_gguf.convert import hf_tokenizer_from_gguf

    hf_tokenizer_from_gguf(gguf_path).save_pretrained(dest)
    return dest


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: int | float | bytes) -> bytes:
    """One protobuf field: varint (int), fixed32 float, or length-delimited bytes."""
    if isinstance(value, bytes):
        return _varint(num << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    return _varint(num << 3) + _varint(value)


def spm_model_from_gguf(gguf_path: Path) -> tuple[bytes, dict]:
    """A SentencePiece ``tokenizer.model`` (BPE, byte fallback) from a SentencePiece GGUF vocab.

    Returns:
        The model bytes and the matching tokenizer_config.json contents.
    """
    reader = read_header(gguf_path)  # first_gguf's fast reader: gguf-py's takes ~15 s on Gemma's vocab
    value = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    assert value("tokenizer.ggml.model") == "llama", f"{gguf_path}: not a SentencePiece vocab"
    tokens, scores = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores")
    types = value("tokenizer.ggml.token_type")
    unk = value("tokenizer.ggml.unknown_token_id", 0)
    specials = {k: value(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    pieces = []
    for i, (text, score, ttype) in enumerate(zip(tokens, scores, types)):
        # SentencePiece needs exactly one UNKNOWN piece; a GGUF may mark it CONTROL (HF's
        # tokenizer_config calls it special), as Gemma 3's does.
        spm_type = SPM_UNKNOWN if i == unk else int(ttype)
        pieces.append(_field(1, _field(1, text.encode()) + _field(2, float(score)) + _field(3, spm_type)))
    ids = [(40, specials["unknown"]), (41, specials["bos"]), (42, specials["eos"]), (43, specials["padding"])]
    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(35, 1)  # BPE, vocab size, byte_fallback
               + b"".join(_field(num, v) for num, v in ids if v is not None))
    add_prefix = bool(value("tokenizer.ggml.add_space_prefix", True))
    normalizer = _field(1, b"identity") + _field(3, int(add_prefix)) + _field(4, 0)
    # Control and user-defined tokens are HF "added tokens" (the converter types them from
    # tokenizer_config.json, not from tokenizer.model), as in the real checkpoints.
    added = {str(i): {"content": text, "special": int(t) == CONTROL, "normalized": False, "lstrip": False,
                      "rstrip": False, "single_word": False}
             for i, (text, t) in enumerate(zip(tokens, types)) if int(t) in (CONTROL, USER_DEFINED)}
    config = {"add_bos_token": bool(value("tokenizer.ggml.add_bos_token", True)),
              "add_eos_token": bool(value("tokenizer.ggml.add_eos_token", False)),
              "added_tokens_decoder": added}
    return b"".join(pieces) + _field(2, trainer) + _field(3, normalizer), config


def spm_tokenizer_files(gguf_path: Path, dest: Path) -> Path:
    """``tokenizer.model`` and ``tokenizer_config.json`` (BOS/EOS flags, added tokens) of a SentencePiece GGUF vocab."""
    dest.mkdir(parents=True, exist_ok=True)
    model, config = spm_model_from_gguf(gguf_path)
    (dest / "tokenizer.model").write_bytes(model)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def tokenizer_files(model_type: str, dest: Path, work: Path) -> Path:
    """The tokenizer files for ``model_type`` (see the module docstring) in ``dest``."""
    kind, spec = TOKENIZERS[model_type]
    src = source_gguf(spec, work)
    return hf_tokenizer_files(src, dest) if kind == "hf" else spm_tokenizer_files(src, dest)


def vocab_size(tok_dir: Path) -> int:
    """Rows the model's embedding needs for these tokenizer files."""
    if (tok_dir / "tokenizer.json").is_file():
        data = json.loads((tok_dir / "tokenizer.json").read_text())
        ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data["added_tokens"]]
        return max(ids) + 1
    return spm_piece_count(tok_dir / "tokenizer.model")


def spm_piece_count(path: Path) -> int:
    """Pieces of a tokenizer.model (a walk over its top-level, length-delimited protobuf fields)."""
    data, pos, count = path.read_bytes(), 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        length, pos = _read_varint(data, pos)
        count += key >> 3 == 1
        pos += length
    return count


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return n, pos


def special_ids(gguf_path: Path) -> dict[str, int]:
    """BOS / EOS / padding ids of a GGUF vocab, as a real checkpoint's config.json carries them."""
    fields = read_header(gguf_path).fields
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    return {attr: int(fields[f"tokenizer.ggml.{k}_token_id"].contents()) for attr, k in keys.items()
            if f"tokenizer.ggml.{k}_token_id" in fields}


def tiny_checkpoint(model_type: str, vocab: int, specials: dict[str, int] | None = None,
                    seed: int = 0) -> torch.nn.Module:
    """``tiny_hf.tiny_model`` with the vocabulary (and special ids) of a real tokenizer, and for
    Gemma 3 llama.cpp's layer pattern (upstream's converter stores no layer_types)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, N_LAYER.get(model_type, 4))
    config.vocab_size = vocab
    for attr, token_id in (specials or {}).items():
        setattr(config, attr, token_id)
    if model_type == "gemma3_text":
        config.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                              for i in range(config.num_hidden_layers)]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.float().eval()


def write_checkpoint(model: torch.nn.Module, tok_dir: Path, dest: Path) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer files: an HF model directory."""
    model.save_pretrained(dest, safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def checkpoint_dir(model_type: str, work: Path) -> tuple[torch.nn.Module, Path]:
    """A tiny seeded checkpoint of ``model_type`` with its zoo tokenizer, saved under ``work``:
    (model, HF directory)."""
    tok_dir = tokenizer_files(model_type, work / "tok", work)
    vocab_gguf = source_gguf(TOKENIZERS[model_type][1], work)
    model = tiny_checkpoint(model_type, vocab_size(tok_dir), special_ids(vocab_gguf))
    return model, write_checkpoint(model, tok_dir, work / "hf")
