"""Load on a ``first-gguf serve`` server: a server subprocess on loopback, and N requests from C clients.

Used by the server's load test and by ``examples/serve_bench.py``. The clients are the
``openai`` package (the ``test`` extra), one thread each; every response is checked to be
well formed (text, a finish reason, the ``first`` object), half of the requests stream.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from .errors import FirstError

PROMPTS = (
    "Write a Python function that reverses a string.",
    "What does the `yield` keyword do in Python?",
    "Explain a hash map in one sentence.",
    "Write a SQL query that counts the rows of a table named users.",
    "How do I read a file line by line in Python?",
    "Give a regular expression that matches an email address.",
    "What is the difference between a list and a tuple?",
    "Write a bash command that lists files by size.",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(model: str | None = None, *, threads: int = 1, n_ctx: int = 2048, log: IO | None = None,
                   extra: tuple[str, ...] = (), timeout: float = 300.0) -> Iterator[str]:
    """Run ``first-gguf serve`` on a free loopback port; yield its base URL (``.../v1``) once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "first_gguf.cli", "serve", *([model] if model else []), "--port", str(port),
           "--threads", str(threads), "--ctx", str(n_ctx), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise FirstError(f"the server exited with code {proc.returncode} before answering")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise FirstError(f"the server did not answer within {timeout:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class LoadResult:
    """What a load run saw: per request latency (s) and the ``first`` object, or the error."""

    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    firsts: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def percentile(self, q: float, xs: list[float] | None = None) -> float:
        """The q-th percentile (nearest rank) of the latencies, or of ``xs``."""
        xs = sorted(self.latencies if xs is None else xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")

    @property
    def service(self) -> list[float]:
        """Seconds each generation held the model, on the server's clock (latency less the queue)."""
        return [f["t_end"] - f["t_start"] for f in self.firsts]

    def merge(self, other: LoadResult) -> LoadResult:
        return LoadResult(self.wall + other.wall, self.latencies + other.latencies, self.firsts + other.firsts,
                          self.errors + other.errors)


def one_request(client, model_id: str, i: int, stream: bool, max_tokens: int, extra: dict) -> dict:
    """Chat request ``i`` (a prompt from PROMPTS); returns its ``first`` object after checking the response."""
    kw = dict(model=model_id, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
              max_tokens=max_tokens, temperature=0, extra_body=extra)
    if not stream:
        r = client.chat.completions.create(**kw)
        choice = r.choices[0]
        if not isinstance(choice.message.content, str) or choice.finish_reason not in ("stop", "length"):
            raise FirstError(f"malformed response: {r}")
        return r.model_extra["first"]
    text, last = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        last = chunk
    if last is None or last.choices[0].finish_reason not in ("stop", "length") or "first" not in last.model_extra:
        raise FirstError(f"malformed stream: its last chunk is {last}")
    return last.model_extra["first"]


def run_load(base_url: str, model_id: str, n_requests: int = 200, concurrency: int = 8, max_tokens: int = 6,
             extra: dict | None = None, timeout: float = 300.0) -> LoadResult:
    """``n_requests`` chat requests from ``concurrency`` clients, every other one streamed."""
    from openai import OpenAI

    local = threading.local()

    def client():
        if not hasattr(local, "c"):  # one client (one connection pool) per thread
            local.c = OpenAI(base_url=base_url, api_key="none", timeout=timeout, max_retries=0)
        return local.c

    def task(i: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        first = one_request(client(), model_id, i, stream=i % 2 == 1, max_tokens=max_tokens, extra=extra or {})
        return time.perf_counter() - t0, first

    result = LoadResult()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for fut in [pool.submit(task, i) for i in range(n_requests)]:
            try:
                latency, first = fut.result()
                result.latencies.append(latency)
                result.firsts.append(first)
            except Exception as exc:  # every failure counts: the caller asserts there are none
                result.errors.append(f"{type(exc).__name__}: {exc}")
    result.wall = time.perf_counter() - t0
    return result


def format_load(rows: dict[str, LoadResult]) -> str:
    """A table per named run: requests/s, client latency percentiles, server time per request, layers skipped."""
    lines = [f"{'run':<6} {'ok':>4} {'err':>4} {'req/s':>6} {'p50 s':>6} {'p90 s':>6} {'p99 s':>6} "
             f"{'server p50 s':>12} {'skipped':>7}"]
    for name, r in rows.items():
        skipped = sum(len(f["skipped"]) for f in r.firsts) / len(r.firsts) if r.firsts else float("nan")
        lines.append(f"{name:<6} {len(r.latencies):>4} {len(r.errors):>4} {r.rps:>6.2f} {r.percentile(50):>6.2f} "
                     f"{r.percentile(90):>6.2f} {r.percentile(99):>6.2f} {r.percentile(50, r.service):>12.3f} "
                     f"{skipped:>7.2f}")
    return "\n".join(lines)
