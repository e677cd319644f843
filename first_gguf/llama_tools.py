"""llama.cpp's own Python tools, run from the pinned sdist (never copied into this repository).

The sdist the patched build uses (``patches/BASE``, sha256-checked) carries llama.cpp's
conversion scripts with their own ``gguf-py``; they are extracted once into the cache and run
in a subprocess with this interpreter (torch, transformers and safetensors come from the
``train`` extra).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .build import extract_sdist, fetch_sdist, read_base
from .errors import FirstError
from .log import logger
from .paths import cache_dir

log = logger("llama.cpp tools")


def vendored_llama_cpp(cache: Path | None = None) -> Path:
    """The llama.cpp source tree inside the pinned sdist, extracted once into the cache."""
    cache = cache or cache_dir()
    base = read_base()
    root = cache / "tools" / f"{base.version}-{base.sdist_sha256[:16]}"
    stamp = root / "extracted"
    if not stamp.is_file():
        tree = extract_sdist(fetch_sdist(base, cache), root / "src")
        stamp.write_text(str(tree.relative_to(root)))
    tree = root / stamp.read_text() / "vendor" / "llama.cpp"
    if not tree.is_dir():
        raise FirstError(f"{tree}: the sdist has no vendored llama.cpp; delete {root} and retry")
    return tree


def convert_lora(adapter_dir: Path, base_config_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """A PEFT adapter directory -> a LoRA GGUF, by llama.cpp's ``convert_lora_to_gguf.py``.

    Args:
        adapter_dir: ``adapter_config.json`` + ``adapter_model.safetensors``.
        base_config_dir: the base model's ``config.json`` (its ``architectures`` set).
        out: the GGUF to write.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (the script's choices).
    """
    script = vendored_llama_cpp() / "convert_lora_to_gguf.py"
    cmd = [sys.executable, str(script), "--base", str(base_config_dir), "--outfile", str(out),
           "--outtype", outtype, str(adapter_dir)]
    log(f"convert_lora_to_gguf.py -> {out.name} ({outtype})")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise FirstError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter_dir} (exit {done.returncode}):\n{tail}")
    return out
