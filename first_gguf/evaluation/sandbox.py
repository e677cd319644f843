"""Run untrusted generated Python in a separate, resource-limited process.

Each program runs as ``python -I -S prog.py`` in a fresh temporary directory, in a session
of its own, with a reduced environment and limits on address space, CPU time, file size and
core dumps. Only the exit status counts: 0 passed, a non-zero exit failed, our wall-clock
timeout (or the CPU-time limit) timeout, any other signal crashed. The evaluating process
never runs generated code.

``-S`` (no ``site``) keeps the venv's site-packages off ``sys.path``: generated code sees the
standard library only, as HumanEval intends, whatever the evaluator has installed. It also
drops the ``exit()``/``quit()`` builtins (``sys.exit`` still works; HumanEval programs pass only
when they reach their end marker, see ``humaneval.END_MARKER``).

Not a security boundary against hostile code: a process that calls ``setsid()`` leaves our
process group, and nothing caps the number of processes (``RLIMIT_NPROC`` is per user).
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from ..errors import FirstError

Status = Literal["passed", "failed", "timeout", "crashed"]

DETAIL_CHARS = 500
FILE_LIMIT_BYTES = 16 * 2**20   # RLIMIT_FSIZE: also bounds the captured stderr file
PROGRAM_NAME = "program.py"
STDERR_NAME = "stderr.txt"

# Sets the limits in the child, then execs a fresh interpreter on the program. Popen's
# preexec_fn would do the same, but the subprocess docs call it unsafe in a process with
# threads, and the evaluator has them (llama.cpp's pool, run_programs' workers).
_LAUNCHER = """\
import os, resource, sys
for spec in sys.argv[2:]:
    name, soft, hard = spec.split(":")
    resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))
os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[1]])
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended.

    Attributes:
        status: "passed", "failed", "timeout" or "crashed".
        detail: the reason (timeout, signal, exit code) and the last ~500 characters of stderr.
    """

    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run ``code`` as a Python script in a sandboxed child process.

    Args:
        code: the program text (standard library imports only).
        timeout: wall-clock seconds before the whole process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``) of each process it starts.

    Returns:
        The :class:`Outcome`. The temporary directory is removed in every case.
    """
    if timeout <= 0 or memory_mb <= 0:
        raise FirstError(f"sandbox needs timeout > 0 and memory_mb > 0, got {timeout} and {memory_mb}")
    workdir = Path(tempfile.mkdtemp(prefix="first-gguf-sandbox-"))
    try:
        return _run_in(workdir, code, timeout, memory_mb)
    finally:
        shutil.rmtree(workdir)


def run_programs(codes: Iterable[str], timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int = 1) -> list[Outcome]:
    """Run several programs, each in its own sandboxed process (see :func:`run_program`).

    Args:
        codes: the program texts.
        timeout: per program, as in :func:`run_program`.
        memory_mb: per process, as in :func:`run_program`.
        workers: how many programs run at once (threads, each waiting on its own child).

    Returns:
        One :class:`Outcome` per program, in the order of ``codes``.
    """
    if workers < 1:
        raise FirstError(f"sandbox needs workers >= 1, got {workers}")
    codes = list(codes)
    if workers == 1:
        return [run_program(c, timeout, memory_mb) for c in codes]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_program(c, timeout, memory_mb), codes))


def _run_in(workdir: Path, code: str, timeout: float, memory_mb: int) -> Outcome:
    program = workdir / PROGRAM_NAME
    program.write_text(code, encoding="utf-8")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
           "LC_ALL": "C.UTF-8"}
    # stdout is never read; stderr goes to a file (bounded by RLIMIT_FSIZE) rather than a pipe,
    # so a flood cannot fill our memory and a surviving grandchild cannot hold a pipe open.
    with open(workdir / STDERR_NAME, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(program), *_limits(timeout, memory_mb)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Always, not only on timeout: children the program left behind die with it.
        _kill_group(proc.pid)
        proc.wait()
    return _classify(proc.returncode, timed_out, timeout, _tail(workdir / STDERR_NAME))


def _limits(timeout: float, memory_mb: int) -> list[str]:
    """``NAME:soft:hard`` for the launcher, capped at the evaluator's own hard limits."""
    cpu = math.ceil(timeout) + 1
    wanted = {"RLIMIT_AS": (memory_mb * 2**20,) * 2,
              "RLIMIT_CPU": (cpu, cpu + 1),           # soft first: SIGXCPU, then SIGKILL
              "RLIMIT_FSIZE": (FILE_LIMIT_BYTES,) * 2,
              "RLIMIT_CORE": (0, 0)}
    specs = []
    for name, (soft, hard) in wanted.items():
        cap = resource.getrlimit(getattr(resource, name))[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        specs.append(f"{name}:{soft}:{hard}")
    return specs


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * DETAIL_CHARS))
        return f.read().decode("utf-8", errors="replace")[-DETAIL_CHARS:].strip()


def _classify(returncode: int, timed_out: bool, timeout: float, stderr: str) -> Outcome:
    if timed_out:
        return Outcome("timeout", f"timed out after {timeout:g} s\n{stderr}".strip())
    if returncode == 0:
        return Outcome("passed", stderr)
    if returncode > 0:
        return Outcome("failed", f"exit code {returncode}\n{stderr}".strip())
    try:
        name = signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        name = f"signal {-returncode}"
    # The CPU-time limit is a timeout too (a multi-threaded program can reach it first).
    status: Status = "timeout" if -returncode == signal.SIGXCPU else "crashed"
    return Outcome(status, f"killed by {name}\n{stderr}".strip())
