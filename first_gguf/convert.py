"""Hugging Face model directory -> FiRST-GGUF, with llama.cpp's own converter and quantizer.

Stages, one progress line each on stderr:

1. convert: upstream's ``convert_hf_to_gguf.py`` with its own ``gguf-py``, both from the pinned
   llama-cpp-python sdist the runtime is built from (extracted once into the cache, never
   copied into this repository), run in a subprocess -> an f32 / f16 / bf16 / q8_0 GGUF.
   Upstream knows every architecture's tensor names and tokenizer quirks; we do not.
2. quantize (K-quants and the other llama-quantize types): the f16 intermediate through the
   loaded library's ``llama_model_quantize``, the entry point ``llama-quantize`` calls.
3. attach: the routers, after quantization so they stay F32 (``format.attach_checked``).

Every check that can fail on the inputs runs before stage 1 (HF directory, model type,
routers against config.json, output path); the routers are checked there, once. Temporary
files live next to the output and are removed on any failure, KeyboardInterrupt included; the
output appears only by a rename.
"""

from __future__ import annotations

import collections
import collections.abc
import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import FirstError
from .log import logger
from .format import RouterSet, attach_checked, checked_routers, inspect_gguf, read_header
from .hf_gguf import one_parse_per_file
from .paths import ScratchFiles, cache_dir, check_output_path, move_output, temp_path

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by upstream's converter itself
# Quantized by llama_model_quantize from an f16 intermediate (no importance matrix needed).
QUANT_TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q3_k_l", "q3_k_s", "q2_k",
               "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs")
OUTTYPES = CONVERTER_TYPES + QUANT_TYPES
QUANT_INTERMEDIATE = "f16"  # llama.cpp's documented path: HF -> f16 -> llama-quantize

# Members of the sdist's vendor/llama.cpp/ the converter runs from: the script, its package,
# its gguf-py, the chat templates and the two vocab files it may load itself.
SDIST_LLAMA_CPP = "vendor/llama.cpp/"
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/",
                     "models/ggml-vocab-gpt-neox.gguf", "models/ggml-vocab-llama-spm.gguf")
CONVERTER_STAMP = "extracted.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them, for every supported type
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default when the GGUF has no sliding_window_pattern key


_log = logger("convert")


@dataclass(frozen=True)
class HFModel:
    """What conversion needs to know of an HF directory before converting it."""

    path: Path
    model_type: str
    n_layer: int
    n_embd: int


def supported_model_types() -> list[str]:
    """HF ``model_type`` values with a reference entry (``arch.ARCHS``), i.e. what we convert."""
    from .arch import ARCHS

    return sorted(ARCHS)


def inspect_hf_dir(hf_dir: str | os.PathLike) -> HFModel:
    """Check that ``hf_dir`` is an HF model directory of a supported type; read its dimensions.

    Raises:
        FirstError: not a directory with config.json, unreadable config, unsupported
            model_type (the message lists the supported ones), no weights.
    """
    path = Path(hf_dir)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise FirstError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FirstError(f"{config}: unreadable ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    supported = supported_model_types()
    if model_type not in supported:
        raise FirstError(f"{path}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(supported)}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FirstError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FirstError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                         f"with the model (tokenizer.save_pretrained)")
    _check_converter_deps()  # before transformers: a user without it gets the friendly error
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(path).get_text_config()  # fills the defaults config.json omits
    _check_layer_pattern(path, model_type, text)
    return HFModel(path, model_type, int(text.num_hidden_layers), int(text.hidden_size))


def _check_layer_pattern(path: Path, model_type: str, text) -> None:
    """Upstream's Gemma 3 converter stores no layer_types; llama.cpp then assumes every 6th
    layer global. Another pattern would convert into a silently different model."""
    if not model_type.startswith("gemma3") or not getattr(text, "sliding_window", None):
        return
    want = ["sliding_attention" if (i + 1) % GEMMA3_SWA_PATTERN else "full_attention"
            for i in range(text.num_hidden_layers)]
    if list(getattr(text, "layer_types", want)) != want:
        raise FirstError(f"{path}: layer_types {text.layer_types} differ from the pattern llama.cpp assumes for "
                         f"gemma3 (every {GEMMA3_SWA_PATTERN}th layer global); the GGUF would not be this model")


def load_routers(routers: str | os.PathLike | RouterSet, model: HFModel) -> RouterSet:
    """The routers (a router file or a RouterSet), checked once, and against the model's layers and n_embd."""
    rs = checked_routers(routers)
    if rs.n_layer != model.n_layer:
        raise FirstError(f"{rs.source}: routers are for {rs.n_layer} layers but {model.path} has {model.n_layer}")
    if rs.n_embd != model.n_embd:
        raise FirstError(f"{rs.source}: routers are for n_embd {rs.n_embd} but {model.path} has "
                         f"hidden_size {model.n_embd}")
    return rs


def converter_dir(cache: Path | None = None) -> Path:
    """Upstream's converter, extracted once from the pinned sdist into ``<cache>/converter/<sha>/``."""
    from .build import fetch_sdist, read_base

    base = read_base()
    root = (cache or cache_dir()) / "converter"
    dest = root / base.sdist_sha256[:16]
    if (dest / CONVERTER_STAMP).is_file():
        return dest
    sdist = fetch_sdist(base, cache or cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                name = rel.removeprefix(SDIST_LLAMA_CPP)
                if rel.startswith(SDIST_LLAMA_CPP) and any(
                        name.startswith(want) if want.endswith("/") else name == want for want in CONVERTER_MEMBERS):
                    m.name = name
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise FirstError(f"{sdist}: no {SDIST_LLAMA_CPP}convert_hf_to_gguf.py in the sdist")
        (tmp / CONVERTER_STAMP).write_text(json.dumps({"sdist": sdist.name, "sha256": base.sdist_sha256,
                                                       "members": len(members)}))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process extracted it first
            if not (dest / CONVERTER_STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_converter_deps() -> None:
    missing = [m for m in ("torch", "transformers", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise FirstError(f"conversion needs {', '.join(missing)} (pip install 'first-gguf[train]')")


def run_converter(model: HFModel, out: Path, outtype: str) -> None:
    """``python convert_hf_to_gguf.py HF_DIR --outfile OUT --outtype T`` with upstream's gguf-py.

    Raises:
        FirstError: the converter failed; the message ends with its last output lines.
    """
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(conv / "gguf-py"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model.path), "--outfile", str(out),
           "--outtype", outtype]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
        rc = proc.wait()
    except BaseException:  # KeyboardInterrupt too: never leave the converter running
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        raise FirstError(f"upstream convert_hf_to_gguf.py failed on {model.path} (exit {rc}): {_reason(tail)}")


_EXCEPTION_LINE = re.compile(r"^([\w.]*(Error|Exception|Interrupt|Exit)\b|ERROR:)")


def _reason(lines: collections.abc.Iterable[str]) -> str:
    """The converter's last exception (or ERROR log line) and its message, else its last lines."""
    lines = [ln.strip() for ln in lines if ln.strip() and "%|" not in ln and not set(ln.strip()) <= set("*")]
    starts = [i for i, ln in enumerate(lines) if _EXCEPTION_LINE.match(ln)]
    picked = lines[starts[-1]:][:3] if starts else lines[-3:]
    return " ".join(picked) or "no output"


def quantize(inp: Path, out: Path, outtype: str, threads: int | None = None) -> None:
    """``llama_model_quantize`` of the loaded llama.cpp library (what ``llama-quantize`` runs)."""
    import llama_cpp
    from llama_cpp import _logger

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}", None)
    if ftype is None:
        raise FirstError(f"this llama-cpp-python has no quantization type {outtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0  # 0: all cores
    level = _logger.logger.level
    _logger.set_verbose(False)  # llama.cpp logs a line per tensor; errors still show
    try:
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        _logger.logger.setLevel(level)
    if rc != 0:
        raise FirstError(f"llama_model_quantize failed (code {rc}) quantizing {inp} to {outtype}")


def convert_hf(hf_dir: str | os.PathLike, out: str | os.PathLike,
               routers: str | os.PathLike | RouterSet | None = None, outtype: str = "f16",
               force: bool = False, threads: int | None = None) -> Path:
    """Convert an HF model directory into a FiRST-GGUF (or, without routers, a plain GGUF).

    Args:
        hf_dir: A Hugging Face model directory (config.json, weights, tokenizer files) of a
            supported model_type; a LoRA-merged model converts like any other.
        out: The GGUF to write.
        routers: A router file (.safetensors) or RouterSet for exactly this model's layers and
            hidden size; None writes a plain GGUF (it runs in ``full`` or ``mask`` mode only).
        outtype: f32, f16, bf16, q8_0 (upstream's converter), or a llama-quantize type such as
            q4_k_m, q5_k_m, q6_k, q4_0 (quantized from an f16 intermediate).
        force: Overwrite an existing output.
        threads: Quantization threads (default: all cores).

    Returns:
        The output path.

    Raises:
        FirstError: bad input (before any work) or a failed stage; no output is left behind.
    """
    t0 = time.monotonic()
    out = Path(out)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise FirstError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    check_output_path(out, force)
    model = inspect_hf_dir(hf_dir)
    rs = load_routers(routers, model) if routers is not None else None

    stages = ["convert"] + (["quantize"] if outtype in QUANT_TYPES else []) + (["attach"] if rs else [])
    if rs is None:
        _log("no routers: writing a plain GGUF, which runs in full or mask mode only")

    def step(name: str, what: str) -> None:
        _log(f"{stages.index(name) + 1}/{len(stages)} {name} (at {time.monotonic() - t0:.0f} s): {what}")

    with ScratchFiles(out) as scratch:
        first_type = outtype if outtype in CONVERTER_TYPES else QUANT_INTERMEDIATE
        base = scratch.path(first_type)
        step("convert", f"{model.path} ({model.model_type}, {model.n_layer} layers) -> {first_type} "
                        f"with llama.cpp's convert_hf_to_gguf.py")
        run_converter(model, base, first_type)
        if outtype in QUANT_TYPES:
            step("quantize", f"{first_type} -> {outtype} with llama_model_quantize")
            quantized = scratch.path(outtype)
            quantize(base, quantized, outtype, threads)
            base.unlink()
            base = quantized
        if rs is not None:
            step("attach", f"routers of {rs.n_layer} layers, hidden {rs.hidden_size} ({rs.source})")
            attach_checked(base, rs, out, force=force)  # checked once, by load_routers
        else:
            move_output(base, out, force)
    _log(summary(out, time.monotonic() - t0))
    return out


def summary(path: Path, seconds: float | None = None) -> str:
    """One line: architecture, layers, quantization, size, router hidden size, path."""
    info = inspect_gguf(path)
    hidden = info["first"]["hidden_size"] if info["first"] else "none"
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    return (f"done{took}: {info['architecture']}, {info['n_layer']} layers, "
            f"{info['quantization']['file_type']}, {info['size_bytes'] / 1e6:.1f} MB, "
            f"router hidden {hidden} -> {path}")


def hf_tokenizer_from_gguf(gguf_path: str | os.PathLike):
    """transformers' tokenizer of a GGUF, with the GGUF's added tokens restored.

    transformers rebuilds a GGUF's tokenizer with only BOS/EOS/UNK/PAD as added tokens, and
    guesses some of those (Qwen's EOS becomes <|endoftext|>); the other CONTROL and
    USER_DEFINED tokens (<|fim_prefix|>, <tool_call>, ...) would convert back as plain text.
    They are added again under their own ids, and the special tokens set from the GGUF's ids.
    """
    import gguf
    from transformers import AddedToken, AutoTokenizer

    path = Path(gguf_path)
    with one_parse_per_file():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    fields = read_header(path).fields
    texts, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    have = set(tok.added_tokens_decoder)
    control, user_defined = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    tok.add_tokens([AddedToken(texts[i], special=int(t) == control, normalized=False)
                    for i, t in enumerate(types) if int(t) in (control, user_defined) and i not in have])
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        if (field := fields.get(f"tokenizer.ggml.{key}_token_id")) is not None:  # transformers guesses some
            setattr(tok, attr, texts[int(field.contents())])
    return tok


def hf_dir_from_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """An HF model directory from a GGUF (transformers dequantizes it to float32): the input of
    ``convert_hf`` when all one has is a GGUF, e.g. a zoo model to fine-tune or re-quantize.

    Returns:
        ``dest``, holding config.json, model.safetensors and the tokenizer files.
    """
    from transformers import AutoModelForCausalLM

    path, dest = Path(gguf_path), Path(dest)
    with one_parse_per_file():  # the header is parsed once, not once per step
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        model.save_pretrained(dest, safe_serialization=True)
        hf_tokenizer_from_gguf(path).save_pretrained(dest)
    return dest
