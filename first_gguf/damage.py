"""Damage labels: what skipping each layer costs the full model's own continuation of a prompt.

For every prompt the full model writes its greedy continuation (``cont_tokens`` tokens);
then, on one full-depth prefill of the prompt, each candidate layer is skipped alone in the
decode of that continuation (teacher-forced, ``FirstModel.branch_logits``), and its damage
is the mean KL(full || skipped) over the continuation, with the top-1 agreement beside it.
These are measured on the patched runtime, so they are the damage of the weights that run.

The labels are the supervised target of ``train --objective damage`` (``routers that
follow the damage``) and the measure behind the ``static-kl`` control. One JSON line per
prompt, appended as it finishes: an interrupted run resumes where it stopped. No torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .constants import default_protected_layers
from .errors import FirstError

LABEL_VERSION = 1


@dataclass(frozen=True)
class LabelConfig:
    """What a label file is bound to (stored in its first line); a later run may add prompts."""

    model: str            # the GGUF's file name
    model_sha256: str     # of its first MiB and size: a cheap identity check
    families: tuple[str, ...]
    max_prompt_tokens: int
    cont_tokens: int
    seed: int
    split: str = "train"


def model_identity(path: Path) -> str:
    """sha256 over the file size and its first MiB (the header: architecture, tensor table)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


def layer_damage(llm, prompt: Sequence[int], cont: Sequence[int], layers: Sequence[int]) -> dict[str, list]:
    """KL and top-1 of skipping each of ``layers`` alone, along ``cont``, on one prefill of ``prompt``."""
    from .evaluation import metrics

    everything = [True] * llm.n_layer
    llm.fork(list(prompt))
    ref = llm.branch_logits(list(cont), everything)
    targets = np.array(cont)
    kl: list[float | None] = [None] * llm.n_layer
    top1: list[float | None] = [None] * llm.n_layer
    for il in layers:
        mask = list(everything)
        mask[il] = False
        q = metrics.teacher_forced(ref, llm.branch_logits(list(cont), mask), targets)
        kl[il], top1[il] = round(q["kl"], 6), round(q["top1"], 4)
    return {"kl": kl, "top1": top1}


def _config(cfg: LabelConfig) -> dict:
    return {**cfg.__dict__, "families": list(cfg.families)}


def _resume(path: Path, cfg: LabelConfig) -> list[dict]:
    """The rows of an existing label file measured with ``cfg``; a new file gets its header line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": LABEL_VERSION, "config": _config(cfg)}) + "\n")
        return []
    text = path.read_text()
    if not text.endswith("\n"):  # a line cut by an interrupted run: measured again
        path.write_text(text[: text.rfind("\n") + 1])
    head, rows = read_labels(path)
    if head.get("config") != _config(cfg):
        raise FirstError(f"{path}: labels measured with other settings ({head.get('config')}); "
                         "choose another output file or the same settings")
    return rows


def make_labels(model_path: str | Path, out: str | Path, families: Sequence[str] = ("code", "instruct", "prose"),
                n_per_family: int = 100, max_prompt_tokens: int = 160, cont_tokens: int = 32, seed: int = 1,
                threads: int | None = None) -> Path:
    """Measure damage labels for ``n_per_family`` training prompts per family into ``out`` (JSONL).

    Args:
        model_path: A GGUF (plain or FiRST: the routers are not used; labels bind to the file).
        out: The label file; an existing one with the same settings is resumed or extended.
        families: Built-in prompt families (``first_gguf.prompts``), training split only.
        n_per_family: Prompts per family.
        max_prompt_tokens: Longest prompt drawn.
        cont_tokens: Length of the full model's greedy continuation the damage is measured on.
        seed: Which prompts are drawn.
        threads: llama.cpp threads.

    Returns:
        The label file (resumed if it exists with the same settings).
    """
    from tqdm import tqdm

    from .evaluation.items import LlamaTokenizer
    from .prompts import Limits, builtin_examples
    from .runtime import FirstModel
    from .runtime.greedy import greedy

    path, out = Path(model_path), Path(out)
    cfg = LabelConfig(path.name, model_identity(path), tuple(families), max_prompt_tokens, cont_tokens, seed)
    done = {r["source"] for r in _resume(out, cfg)}
    llm = FirstModel(path, mode="full", n_ctx=max_prompt_tokens + cont_tokens + 8, n_batch=512,
                     n_threads=threads, logits_all=True)
    protected = llm.routers.protected_layers if llm.routers else default_protected_layers(llm.n_layer)
    layers = [i for i in range(llm.n_layer) if i not in set(protected)]
    limits = Limits(max_prompt_tokens, cont_tokens, 4096)
    examples = builtin_examples(LlamaTokenizer(llm), limits, families, n_per_family, seed=seed, split=cfg.split)
    todo = [ex for ex in examples if ex.source not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="damage", file=sys.stderr)
    with out.open("a") as f:
        for ex in todo:
            t0 = time.perf_counter()
            llm.configure(mode="full")
            cont = greedy(llm, ex.prompt, cont_tokens).tokens
            if len(cont) < 2:
                bar.update()
                continue
            row = {"source": ex.source, "family": ex.family, "prompt": list(ex.prompt), "cont": cont,
                   **layer_damage(llm, ex.prompt, cont, layers), "seconds": round(time.perf_counter() - t0, 2)}
            f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update()
    bar.close()
    return out


def read_labels(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, rows) of a label file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, IndexError, json.JSONDecodeError) as exc:
        raise FirstError(f"{path}: cannot read damage labels ({exc})") from None
    if head.get("version") != LABEL_VERSION:
        raise FirstError(f"{path}: damage label version {head.get('version')}, expected {LABEL_VERSION}")
    return head, rows


def kl_matrix(rows: Sequence[dict]) -> np.ndarray:
    """[n_rows, n_layer] damage labels, NaN where a layer was not measured (the protected ones)."""
    return np.array([[np.nan if v is None else v for v in r["kl"]] for r in rows], dtype=np.float64)


def mean_damage(rows: Sequence[dict], n_layer: int) -> np.ndarray:
    """Mean KL per layer over the rows (NaN for layers never measured: the protected ones)."""
    kl = kl_matrix(rows)
    if kl.shape[1:] != (n_layer,):
        raise FirstError(f"labels have {kl.shape[1:]} layers, the model {n_layer}")
    if not len(kl):
        return np.full(n_layer, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the protected layers
        return np.nanmean(kl, axis=0)


def damage_order(rows: Sequence[dict], n_layer: int, protected: Sequence[int]) -> list[int]:
    """Non-protected layers, least mean measured damage first: the ``static-kl`` control's order."""
    mean = mean_damage(rows, n_layer)
    return [int(i) for i in np.argsort(np.nan_to_num(mean, nan=np.inf), kind="stable")
            if int(i) not in set(protected) and np.isfinite(mean[i])]
