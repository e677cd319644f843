"""Teacher-forced logits from one library in one process (tests compare libraries side by side).

``python tests/llama_worker.py SPEC.json OUT.npz`` runs the spec in a fresh process, so the
stock library (``LLAMA_CPP_LIB_PATH``) and the patched one never share a process.
Spec keys: path, prompt, continuation (token lists), engine ("plain" = llama_cpp.Llama,
"first" = FirstModel), and for "first": mode, mask, prefill, threshold; n_ubatch, n_batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

N_THREADS = 2


def run_spec(spec: dict) -> dict[str, np.ndarray]:
    """Evaluate the spec in this process; returns logits (and the FiRST report)."""
    kw = dict(n_ctx=spec.get("n_ctx", 1024), n_threads=N_THREADS, logits_all=True, verbose=False,
              n_batch=spec.get("n_batch", 512), n_ubatch=spec.get("n_ubatch", 512))
    prompt, cont = list(spec["prompt"]), list(spec.get("continuation", []))
    if spec.get("engine", "plain") == "plain":
        from llama_cpp import Llama

        llm = Llama(spec["path"], **kw)
        llm.eval(prompt)
        if cont:
            llm.eval(cont)
        return {"logits": np.array(llm.scores[: llm.n_tokens], dtype=np.float32)}
    from first_gguf.runtime import FirstModel

    llm = FirstModel(spec["path"], mode=spec.get("mode"), mask=spec.get("mask"),
                     prefill=spec.get("prefill", "full"), threshold=spec.get("threshold"), **kw)
    logits = llm.teacher_forced_logits(prompt, cont)
    rep = llm.last_prefill
    out = {"logits": logits, "mask": np.array(rep.mask, dtype=bool)}
    if rep.probs is not None:
        out["probs"] = np.array(rep.probs, dtype=np.float64)
    return out


def run_in_subprocess(spec: dict, tmp: Path, lib_path: Path | None = None) -> dict[str, np.ndarray]:
    """``run_spec`` in a fresh process, optionally on another libllama (``LLAMA_CPP_LIB_PATH``)."""
    spec_file, out_file = tmp / f"spec-{os.getpid()}-{id(spec)}.json", tmp / f"out-{id(spec)}.npz"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    if lib_path:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_path)
    proc = subprocess.run([sys.executable, __file__, str(spec_file), str(out_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with np.load(out_file) as data:
        return {k: data[k] for k in data.files}


def compare(name: str, got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Print and return (max abs diff, NMSE) of two logit arrays, with the first bad row."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    nmse = float(np.sum(diff ** 2) / max(np.sum(want.astype(np.float64) ** 2), 1e-30))
    rows = np.nonzero(diff.max(axis=-1) > 0)[0]
    first = int(rows[0]) if len(rows) else None
    print(f"{name}: max abs diff {diff.max():.3g}, NMSE {nmse:.3g}, first differing position {first}")
    return float(diff.max()), nmse


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    np.savez(sys.argv[2], **run_spec(spec))
