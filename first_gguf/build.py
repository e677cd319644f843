"""Pinned llama-cpp-python sdist + ``patches/`` -> patched wheel, cached and installed.

The cold path downloads the sdist pinned in ``patches/BASE``, checks its sha256, applies
the numbered patches in order (idempotently), builds a wheel and installs it. The wheel is
cached under a key made of the sdist hash, the patch-series hash, the CMake flags and the
machine, so a second set-up only reinstalls it (or does nothing when the installed library
already reports that key through ``llama_first_build_key()``).

Patch developers use a persistent scratch tree instead (``first_gguf.build_dev``).
Standard library only: this module runs before anything else is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .log import logger
from .paths import cache_dir, repo_root

# Small build: libllama + ggml only. Tests/examples/tools are already off for the vendored
# subproject; the multimodal library (mtmd) and llama.cpp's common library are not used
# by the Python package for text models.
DEFAULT_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DGGML_CCACHE=OFF")
SCIKIT_BUILD_CORE = "scikit-build-core[pyproject]==1.1.2"
GIT_IDENTITY = ("-c", "user.name=first-gguf", "-c", "user.email=first-gguf@localhost")
KEY_SYMBOL_PROBE = (
    "import ctypes, llama_cpp.llama_cpp as l; f = l._lib.llama_first_build_key; "
    "f.restype = ctypes.c_char_p; print(f().decode())"
)


_log = logger("build")


@dataclass(frozen=True)
class Base:
    """The pin in ``patches/BASE``."""

    version: str
    sdist_sha256: str
    llama_cpp_commit: str

    @property
    def sdist_name(self) -> str:
        return f"llama_cpp_python-{self.version}.tar.gz"


def patches_dir() -> Path:
    """``patches/`` of the source checkout (the series is not shipped inside wheels)."""
    path = repo_root() / "patches"
    if not (path / "BASE").is_file():
        raise BuildError(f"{path}: no patches/BASE; building the runtime needs a source checkout")
    return path


def read_base(path: Path | None = None) -> Base:
    """Parse ``patches/BASE`` (``KEY=value`` lines, ``#`` comments)."""
    path = path or patches_dir() / "BASE"
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    try:
        return Base(values["LLAMA_CPP_PYTHON_VERSION"], values["SDIST_SHA256"], values["LLAMA_CPP_COMMIT"])
    except KeyError as exc:
        raise BuildError(f"{path}: missing {exc.args[0]}") from None


def patch_files(path: Path | None = None) -> list[Path]:
    """The numbered patches, in the order they apply."""
    return sorted((path or patches_dir()).glob("[0-9][0-9][0-9][0-9]-*.patch"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def series_hash(patches: list[Path]) -> str:
    """Hash of the patch series: names and contents, in order."""
    digest = hashlib.sha256()
    for p in patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()


# ggml's AMX kernels (compiled in when -march=native finds AMX) crash this llama.cpp with
# SIGILL on the first tile instruction (an invalid tile configuration: an open upstream fix);
# gcc keeps an explicit -mno-* over -march=native, so AMX stays off and every other native
# feature on. Only on a CPU with AMX: on any other the build flags stay the same.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_args(extra: str | None = None) -> list[str]:
    """Our defaults followed by the user's ``CMAKE_ARGS`` (later flags win in CMake)."""
    extra = os.environ.get("CMAKE_ARGS", "") if extra is None else extra
    user = shlex.split(extra)
    native = "-DGGML_NATIVE=OFF" not in user and platform.machine() in ("x86_64", "AMD64")
    no_amx = [f"-DCMAKE_{lang}_FLAGS={NO_AMX_FLAGS}" for lang in ("C", "CXX")] \
        if native and "amx_tile" in _cpu_flags().split() else []
    return [*DEFAULT_CMAKE_ARGS, *no_amx, *user]


def _cpu_flags() -> str:
    """The CPU's feature flags line of /proc/cpuinfo (empty elsewhere)."""
    if not Path("/proc/cpuinfo").is_file():
        return ""
    return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith(("flags", "Features"))), "")


def _machine_tag(args: list[str]) -> str:
    # GGML_NATIVE (on by default) compiles for this CPU, so the CPU is part of the key.
    tag = f"{platform.system()}-{platform.machine()}"
    if "-DGGML_NATIVE=OFF" not in args and Path("/proc/cpuinfo").is_file():
        tag += "-" + hashlib.sha256(_cpu_flags().encode()).hexdigest()[:8]
    return tag


def build_key(base: Base, patches: list[Path], args: list[str]) -> str:
    """Cache key of a build: sdist hash + patch-series hash + flags + machine."""
    payload = json.dumps([base.sdist_sha256, series_hash(patches), args, _machine_tag(args)])
    return f"{base.version}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def fetch_sdist(base: Base, cache: Path) -> Path:
    """The pinned sdist in the cache, downloaded with pip and sha256-checked."""
    dest = cache / "sdist" / base.sdist_name
    if dest.is_file() and sha256_file(dest) == base.sdist_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _ensure_build_backend()  # pip prepares the sdist's metadata with it
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _log(f"downloading llama-cpp-python=={base.version} (sdist)")
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--no-build-isolation", f"llama-cpp-python=={base.version}", "-d", tmp],
             what="pip download of the sdist")
        got = Path(tmp) / base.sdist_name
        if not got.is_file():
            raise BuildError(f"pip download gave no {base.sdist_name} (got {os.listdir(tmp)})")
        actual = sha256_file(got)
        if actual != base.sdist_sha256:
            raise BuildError(f"{base.sdist_name}: sha256 {actual} does not match patches/BASE "
                             f"({base.sdist_sha256}); refusing to build from it")
        os.replace(got, dest)
    return dest


def extract_sdist(sdist: Path, dest: Path) -> Path:
    """Extract ``sdist`` into an empty ``dest``; returns the source tree."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (tree,) = [p for p in dest.iterdir() if p.is_dir()]
    return tree


def git(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # The ceiling keeps git from adopting a repository above the tree (ours, for one):
    # inside a foreign repo `git apply` silently skips paths outside the current directory.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.resolve().parent)}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise BuildError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc


def apply_patches(tree: Path, patches: list[Path]) -> list[str]:
    """Apply ``patches`` to ``tree`` in order; a patch already applied is not applied twice.

    Later patches may edit what earlier ones added, so "already applied" is told by peeling:
    from the last patch back, each one whose reverse applies is reverted (``git apply
    --reverse --check``), then the whole series is applied forward again.

    Returns:
        One word per patch: "applied" or "already applied".
    """
    peeled = set()
    for patch in reversed(patches):
        if git(["apply", "--reverse", "--check", str(patch)], tree, check=False).returncode == 0:
            git(["apply", "--reverse", "--whitespace=nowarn", str(patch)], tree)
            peeled.add(patch)
    states = []
    for patch in patches:
        proc = git(["apply", "--check", str(patch)], tree, check=False)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            raise BuildError(f"patches/{patch.name} does not apply to {tree}: regenerate against "
                             f"patches/BASE (git: {err.splitlines()[0] if err else 'no output'})")
        git(["apply", "--whitespace=nowarn", str(patch)], tree)
        states.append("already applied" if patch in peeled else "applied")
    return states


def run_command(cmd: list[str], what: str, env: dict | None = None, cwd: Path | None = None,
         log: Path | None = None) -> None:
    """Run ``cmd``; on failure raise BuildError with the tail of its output."""
    out = open(log, "w") if log else subprocess.PIPE
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        text = log.read_text() if log else proc.stdout or ""
        tail = "\n".join(text.strip().splitlines()[-25:])
        where = f" (full log: {log})" if log else ""
        raise BuildError(f"{what} failed with exit code {proc.returncode}{where}:\n{tail}")


def _ensure_build_backend() -> None:
    try:
        import scikit_build_core  # noqa: F401
    except ImportError:
        _log(f"installing the build backend ({SCIKIT_BUILD_CORE})")
        run_command([sys.executable, "-m", "pip", "install", SCIKIT_BUILD_CORE], what="pip install")
    if shutil.which("cmake") is None and shutil.which("ninja") is None:
        raise BuildError("building needs cmake (>= 3.21) and a C++17 compiler on PATH")


def build_wheel(tree: Path, key: str, args: list[str], out: Path, build_dir: Path) -> Path:
    """Build the wheel of the patched ``tree`` into ``out``; returns its path."""
    _ensure_build_backend()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": shlex.join([*args, f"-DLLAMA_FIRST_BUILD_KEY={key}"]),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    log = out / "build.log"
    _log(f"building the patched wheel (a few minutes; log: {log})")
    t0 = time.monotonic()
    run_command([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out),
          "-C", f"build-dir={build_dir}", str(tree)], what="wheel build", env=env, log=log)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise BuildError(f"the build produced no wheel in {out} (log: {log})")
    _log(f"built {wheels[-1].name} in {time.monotonic() - t0:.0f} s")
    return wheels[-1]


def installed_build_key() -> str | None:
    """Key reported by the installed llama-cpp-python library, or None (stock/absent)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    proc = subprocess.run([sys.executable, "-c", KEY_SYMBOL_PROBE], capture_output=True, text=True, env=env)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def install_wheel(wheel: Path) -> None:
    _log(f"installing {wheel.name}")
    run_command([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
         what="pip install of the patched wheel")


@dataclass
class BuildResult:
    key: str
    wheel: Path
    action: str  # "up to date", "installed cached wheel" or "built"
    seconds: float


def ensure_built(force: bool = False, cache: Path | None = None, extra_cmake_args: str | None = None) -> BuildResult:
    """Make the installed llama-cpp-python the patched build of this checkout.

    Args:
        force: rebuild even if a cached wheel exists.
        cache: cache root (default: ``paths.cache_dir()``).
        extra_cmake_args: flags added after ours (default: ``$CMAKE_ARGS``).

    Returns:
        What was done, with the build key and wheel path.
    """
    t0 = time.monotonic()
    cache = cache or cache_dir()
    base, patches, args = read_base(), patch_files(), cmake_args(extra_cmake_args)
    key = build_key(base, patches, args)
    wheel_dir = cache / "wheels" / key
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if cached and not force and installed_build_key() == key:
        return BuildResult(key, cached[-1], "up to date", time.monotonic() - t0)
    if cached and not force:
        install_wheel(cached[-1])
        return BuildResult(key, cached[-1], "installed cached wheel", time.monotonic() - t0)
    sdist = fetch_sdist(base, cache)
    tree = extract_sdist(sdist, cache / "src" / key)
    for patch, state in zip(patches, apply_patches(tree, patches)):
        _log(f"{patch.name}: {state}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = build_wheel(tree, key, args, Path(tmp) / "out", cache / "build" / key)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        final = wheel_dir / wheel.name
        shutil.move(str(wheel), final)
        shutil.move(str(wheel.parent / "build.log"), wheel_dir / "build.log")
    (wheel_dir / "key.json").write_text(json.dumps(
        {"key": key, "sdist_sha256": base.sdist_sha256, "series": series_hash(patches),
         "patches": [p.name for p in patches], "cmake_args": args, "machine": _machine_tag(args)}, indent=1))
    shutil.rmtree(tree.parent, ignore_errors=True)
    install_wheel(final)
    return BuildResult(key, final, "built", time.monotonic() - t0)


def ensure_stock_library(cache: Path | None = None, extra_cmake_args: str | None = None) -> Path:
    """The unpatched libllama of the pinned sdist (the reference for parity and speed).

    Built once with the same flags into the cache (target ``llama`` only, so llama.cpp's
    common library is skipped without patching). Returns the directory to use as
    ``LLAMA_CPP_LIB_PATH``.
    """
    cache = cache or cache_dir()
    base, args = read_base(), cmake_args(extra_cmake_args)
    key = build_key(base, [], args)
    root = cache / "stock" / key
    libdir, stamp = root / "build" / "bin", root / "built.json"
    if stamp.is_file():
        return libdir
    tree = extract_sdist(fetch_sdist(base, cache), root / "src")
    _log(f"building the stock library for comparisons (a few minutes; log: {root / 'build.log'})")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    run_command(["cmake", "-S", str(tree), "-B", str(root / "build"), *gen, *args, "-DCMAKE_BUILD_TYPE=Release"],
         what="cmake configure (stock)", log=root / "configure.log")
    run_command(["cmake", "--build", str(root / "build"), "--target", "llama", "-j", str(os.cpu_count() or 1)],
         what="cmake build (stock)", log=root / "build.log")
    stamp.write_text(json.dumps({"key": key, "cmake_args": args}))
    return libdir


if __name__ == "__main__":  # `python -m first_gguf.build`: usable before the package is installed
    try:
        _r = ensure_built(force="--force" in sys.argv[1:])
    except BuildError as _exc:
        sys.exit(f"error: {_exc}")
    _log(f"{_r.action}: {_r.wheel.name} (key {_r.key}, {_r.seconds:.1f} s)")
