"""``first-gguf eval``: every strategy on the real runtime, interleaved, resumable.

One FiRST-GGUF, one set of strategies (``strategies.py``), three tasks:

- ``humaneval``: pass@1 (greedy, raw completion of the problem's prompt, ``humaneval.py``),
  the generated code scored in a sandboxed process (``sandbox.py``).
- ``tf``: teacher-forced quality on held-out built-in prompts (code, instruct, prose; never
  training files): top-1 agreement and KL against the full model along the full model's own
  greedy continuation, and perplexity of the real text that follows the prompt.
- ``chat``: greedy output agreement with the full model on held-out chat-formatted requests.

Strategies run interleaved item by item (their order rotates), so the decode and prefill
speeds of the generation tasks are measured side by side in the same run. Every finished
(task, item, strategy) row is appended to ``<out>/rows.jsonl`` at once: an interrupted run
resumes where it stopped; ``results.json`` and the report are rebuilt from the rows.

A run directory is bound to the settings rows depend on (``EvalConfig.key``), not to the
set of strategies, tasks or problems: a later command may add strategies or problems and
only the missing rows run. The report covers the requested strategies plus every earlier
one whose rows are complete for the requested tasks and problems; ``config.json`` lists
every command that wrote rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import FirstError
from . import humaneval, metrics
from .strategies import KINDS, Strategy, block_influence, build_strategies, static_order, strategy_from_name

TASKS = ("humaneval", "tf", "chat")
SELECTORS = ("tasks", "kinds", "ks", "thresholds", "random_seeds", "limit")  # which rows, not how


@dataclass
class EvalConfig:
    """What one command evaluates; ``key()`` (stored in ``<out>/config.json``) binds the directory."""

    model: str
    tasks: tuple[str, ...] = TASKS
    kinds: tuple[str, ...] = KINDS
    ks: tuple[int, ...] = (4,)
    thresholds: tuple[float | None, ...] = (None,)
    random_seeds: int = 2
    limit: int | None = None          # HumanEval problems (default all 164)
    n_per_family: int = 16            # held-out prompts per family for ``tf``
    n_chat: int = 16                  # chat prompts
    n_static: int = 8                 # training prompts per family for the block influence
    max_prompt_tokens: int = 96
    cont_tokens: int = 32             # teacher-forced continuation length
    chat_tokens: int = 64
    max_new_tokens: int = 384         # HumanEval completion budget
    timeout: float = 10.0             # per HumanEval program
    threads: int | None = None
    seed: int = 0

    def key(self) -> dict:
        """The settings every row of a run directory shares: all but what selects rows and the threads."""
        d = dataclasses.asdict(self)
        for name in SELECTORS + ("threads",):
            d.pop(name)
        path = Path(self.model)  # the file by name and size: reports carry no machine paths
        d["model"] = {"name": path.name, "bytes": path.stat().st_size}
        return json.loads(json.dumps(d))  # tuples as lists, as config.json holds them


@dataclass
class Item:
    """One unit of work of a task: a prompt (and what is compared on it)."""

    task: str
    id: str
    prompt: list[int]
    family: str = ""
    response: list[int] = field(default_factory=list)   # tf: the real continuation (perplexity)
    problem: Any = None                                  # humaneval: the Problem


# --- tokenizer adapter: the built-in data families (train/data.py) on llama.cpp's tokenizer ----

class LlamaTokenizer:
    """The slice of the HF tokenizer interface ``train/data.py`` uses, on a ``Llama``."""

    def __init__(self, llm) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        self.chat_template = template
        self._chat = None
        if template:
            vocab = llm._model
            eos = vocab.token_get_text(vocab.token_eos()) if vocab.token_eos() >= 0 else ""
            bos = vocab.token_get_text(vocab.token_bos()) if vocab.token_bos() >= 0 else ""
            self._chat = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.llm.tokenize(text.encode(), add_bos=add_special_tokens, special=True)}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if self._chat is None:
            raise FirstError(f"{self.llm.model_path}: the GGUF has no chat template")
        return self._chat(messages=messages).prompt


# --- generation and scoring on the runtime --------------------------------------------------

def _last_logits(llm) -> np.ndarray:
    from llama_cpp import llama_cpp as lc

    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def generate(llm, prompt: Sequence[int], max_new: int, stop: Any = None) -> dict:
    """Greedy generation with timing: the prefill, then decode steps one token at a time.

    Args:
        llm: A configured ``FirstModel``.
        prompt: Token ids.
        max_new: Token budget.
        stop: ``f(text) -> bool`` called on the decoded text after each token.

    Returns:
        ``{"tokens", "text", "t_prefill", "t_decode", "n_decode", "skipped"}``.
    """
    from llama_cpp import llama_cpp as lc

    vocab = llm._model.vocab
    t0 = time.perf_counter()
    report = llm.prefill(list(prompt))
    t1 = time.perf_counter()
    tokens: list[int] = []
    n_decode = 0
    text = ""
    while True:
        tok = int(np.argmax(_last_logits(llm)))
        if lc.llama_vocab_is_eog(vocab, tok):
            break
        tokens.append(tok)
        text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
        if len(tokens) >= max_new or (stop and stop(text)):
            break
        llm.eval([tok])
        n_decode += 1
    t2 = time.perf_counter()
    return {"tokens": tokens, "text": text, "t_prefill": t1 - t0, "t_decode": t2 - t1, "n_decode": n_decode,
            "skipped": list(report.skipped)}


def _stop_humaneval(text: str) -> bool:
    return humaneval.truncate_completion(text) != text


# --- the run ---------------------------------------------------------------------------------

class Evaluation:
    """A resumable evaluation run writing into ``out``."""

    def __init__(self, cfg: EvalConfig, out: Path, log=None, command: str | None = None) -> None:
        self.cfg, self.out, self.command = cfg, Path(out), command
        # rows of one command share a run stamp: speeds are compared only within one run
        self.run_id = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}/{cfg.threads or os.cpu_count()}t"
        self.log = log or (lambda msg: print(f"[first-gguf eval] {msg}", file=sys.stderr, flush=True))
        self.rows_path = self.out / "rows.jsonl"
        self.done: dict[tuple[str, str, str], dict] = {}  # the latest row of each (task, item, strategy)
        self.references: dict[tuple[str, str, str | None], dict] = {}  # full's rows by (task, item, run)
        self._check_config()
        self._load_rows()

    # bookkeeping

    def _check_config(self) -> None:
        path = self.out / "config.json"
        want = self.cfg.key()
        commands: list[str] = []
        if path.is_file():
            try:
                have = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise FirstError(f"{path}: not JSON ({e})") from None
            diff = sorted(k for k in want if have.get(k) != want[k])
            if diff:
                raise FirstError(f"{self.out}: holds a run with other settings ({', '.join(diff)}); "
                                 f"use another --out directory or the same settings to resume or extend it")
            commands = list(have.get("commands", []))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.command and self.command not in commands:
            commands.append(self.command)
        self.commands = commands
        path.write_text(json.dumps({**want, "commands": commands}, indent=1) + "\n")

    def _load_rows(self) -> None:
        if not self.rows_path.is_file():
            return
        lines = self.rows_path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a row cut by an interruption: drop it, it is redone
                    self.rows_path.write_text("".join(line + "\n" for line in lines[:-1]))
                    break
                raise FirstError(f"{self.rows_path}: line {n} is not JSON") from None
            self._index(row)
        self.log(f"resuming: {len(self.done)} rows in {self.rows_path}")

    def _index(self, row: dict) -> None:
        self.done[(row["task"], row["id"], row["strategy"])] = row
        if row["strategy"] == "full" and "t_decode" in row:
            self.references[(row["task"], row["id"], row.get("run"))] = row

    def _write(self, row: dict) -> None:
        self._index(row)
        with self.rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    # models

    def _open(self, n_ctx: int, logits_all: bool = False):
        from ..runtime import FirstModel

        return FirstModel(self.cfg.model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=logits_all,
                          n_threads=self.cfg.threads or os.cpu_count() or 1)

    def run(self) -> dict:
        """Run every missing row, then return the summary (also written to ``results.json``)."""
        from ..format import read_routers

        cfg = self.cfg
        routers = read_routers(Path(cfg.model))
        llm = self._open(n_ctx=2048)
        try:
            n_layer = llm.n_layer
            protected = list(routers.protected_layers)
            order = self._static_order(llm, protected)
            strategies = build_strategies(n_layer, protected, order, cfg.ks, cfg.thresholds, cfg.random_seeds,
                                          cfg.kinds)
            tok = LlamaTokenizer(llm)
            items: dict[str, list[Item]] = {}
            if "humaneval" in cfg.tasks:
                items["humaneval"] = self._humaneval_items(llm)
                self._generation_task(llm, strategies, items["humaneval"], cfg.max_new_tokens, _stop_humaneval)
                self._score_humaneval()
            if "chat" in cfg.tasks:
                items["chat"] = self._chat_items(tok)
                self._generation_task(llm, strategies, items["chat"], cfg.chat_tokens, None)
            if "tf" in cfg.tasks:
                items["tf"] = self._tf_items(tok)
        finally:
            llm.close()
        if items.get("tf"):
            tf = self._open(n_ctx=cfg.max_prompt_tokens + max(cfg.cont_tokens, 64) + 8, logits_all=True)
            try:
                self._tf_task(tf, strategies, items["tf"])
            finally:
                tf.close()
        strategies = strategies + self._earlier_strategies(strategies, items, n_layer, protected, order)
        self.strategies = strategies
        current = {(task, it.id) for task, its in items.items() for it in its}
        rows = [r for r in self.done.values() if (r["task"], r["id"]) in current]
        result = summarize(rows, strategies, self.meta(order, n_layer, protected), self.references)
        (self.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        return result

    def _earlier_strategies(self, strategies: list[Strategy], items: dict[str, list[Item]], n_layer: int,
                            protected: list[int], order: list[int]) -> list[Strategy]:
        """Strategies of earlier commands whose rows cover every item of this one (scored, for HumanEval)."""
        asked = {s.name for s in strategies}
        names = list(dict.fromkeys(name for _, _, name in self.done if name not in asked))

        def complete(name: str) -> bool:
            return all((task, it.id, name) in self.done and (task != "humaneval" or "status" in self.done[
                (task, it.id, name)]) for task, its in items.items() for it in its)

        try:
            return [strategy_from_name(n, n_layer, protected, order) for n in names if complete(n)]
        except FirstError as e:
            raise FirstError(f"{self.rows_path}: {e}") from None

    def meta(self, order: list[int], n_layer: int, protected: list[int]) -> dict:
        return {"model": Path(self.cfg.model).name, "config": self.cfg.key(), "limit": self.cfg.limit,
                "commands": self.commands,
                "threads": self.cfg.threads or os.cpu_count(), "n_layer": n_layer, "protected": protected,
                "static_order": order, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "strategies": {s.name: {"kind": s.kind, "skip": list(s.skip), "prefill": s.prefill,
                                        "threshold": s.threshold} for s in self.strategies}}

    # static mask: block influence on training prompts

    def _static_order(self, llm, protected: list[int]) -> list[int]:
        path = self.out / "static.json"
        if path.is_file():
            return json.loads(path.read_text())["order"]
        from ..train.data import FAMILIES, Limits, build_examples

        cfg = self.cfg
        tok = LlamaTokenizer(llm)
        limits = Limits(cfg.max_prompt_tokens, 2, llm.n_ctx())
        examples = build_examples(tok, limits, tasks=FAMILIES, n_examples=cfg.n_static * len(FAMILIES),
                                  seed=cfg.seed + 1, split="train")
        self.log(f"block influence on {len(examples)} training prompts")
        inputs = [layer_inputs(llm, ex.prompt) for ex in examples]
        bi = block_influence(inputs)
        order = static_order(bi, protected)
        path.write_text(json.dumps({"order": order, "block_influence": [float(x) for x in bi[:-1]],
                                    "prompts": len(examples)}, indent=1) + "\n")
        return order

    # items

    def _humaneval_items(self, llm) -> list[Item]:
        problems = humaneval.load_problems(self.cfg.limit)
        return [Item("humaneval", p.task_id, llm.tokenize(p.prompt.encode(), add_bos=True), "humaneval", problem=p)
                for p in problems]

    def _heldout(self, tok, families: Sequence[str], n: int, max_response: int):
        from ..train.data import Limits, build_examples

        limits = Limits(self.cfg.max_prompt_tokens, max_response, 4096)
        return build_examples(tok, limits, tasks=families, n_examples=n * len(families), seed=self.cfg.seed,
                              split="heldout")

    def _chat_items(self, tok) -> list[Item]:
        exs = self._heldout(tok, ["instruct"], self.cfg.n_chat, 8)
        return [Item("chat", f"chat/{i}", list(ex.prompt), "chat") for i, ex in enumerate(exs)]

    def _tf_items(self, tok) -> list[Item]:
        from ..train.data import FAMILIES

        exs = self._heldout(tok, FAMILIES, self.cfg.n_per_family, self.cfg.cont_tokens)
        return [Item("tf", f"{ex.family}/{i}", list(ex.prompt), ex.family, list(ex.response))
                for i, ex in enumerate(exs)]

    # tasks

    def _rotated(self, strategies: list[Strategy], n: int) -> list[Strategy]:
        r = n % len(strategies)
        return strategies[r:] + strategies[:r]

    def _generation_task(self, llm, strategies: list[Strategy], items: list[Item], max_new: int, stop) -> None:
        from tqdm import tqdm

        todo = [it for it in items if any((it.task, it.id, s.name) not in self.done for s in strategies)]
        if not todo:
            return
        task = items[0].task
        for s in strategies:  # warm-up: every graph built and the weights paged in before timing
            s.apply(llm)
            generate(llm, todo[0].prompt[:16], 2)
        bar = tqdm(total=len(todo) * len(strategies), desc=task, file=sys.stderr)
        for n, it in enumerate(todo):
            # speeds compare within one run only: full runs again beside strategies new to this item
            retime = strategies[0].name == "full" and (it.task, it.id, self.run_id) not in self.references
            for s in self._rotated(strategies, n):
                if (it.task, it.id, s.name) in self.done and not (retime and s.name == "full"):
                    bar.update()
                    continue
                s.apply(llm)
                g = generate(llm, it.prompt, max_new, stop)
                before = self.done.get((it.task, it.id, s.name))
                if before is not None and before["tokens"] != g["tokens"]:
                    self.log(f"warning: {s.name} on {it.id} generated other tokens than in an earlier run")
                row = {"task": it.task, "id": it.id, "strategy": s.name, "family": it.family,
                       "n_prompt": len(it.prompt), "run": self.run_id, **g}
                if it.problem is not None:
                    row["completion"] = humaneval.truncate_completion(g["text"])
                self._write(row)
                bar.update()
        bar.close()

    def _score_humaneval(self) -> None:
        rows = [r for r in self.done.values() if r["task"] == "humaneval" and "status" not in r]
        if not rows:
            return
        problems = {p.task_id: p for p in humaneval.load_problems(None)}
        self.log(f"running {len(rows)} HumanEval programs in the sandbox")
        outcomes = humaneval.score([problems[r["id"]] for r in rows], [r["completion"] for r in rows],
                                   timeout=self.cfg.timeout)
        for row, outcome in zip(rows, outcomes):
            self._write({**row, "status": outcome.status})

    def _tf_task(self, llm, strategies: list[Strategy], items: list[Item]) -> None:
        """Teacher-forced rows: one prefill per prompt serves every full-depth strategy.

        The prompt's KV is the same under ``full``, ``first``, ``static``, ``random`` and
        ``early-exit`` (all run it at full depth), so one ``first``-mode fork scores them all,
        each as a branch under its own decode mask; ``pruned`` strategies fork their own
        masked prefill. Every branch equals that strategy's own prefill + decode bit for bit.
        """
        from tqdm import tqdm

        todo = [it for it in items if any(("tf", it.id, s.name) not in self.done for s in strategies)]
        bar = tqdm(total=len(todo), desc="tf", file=sys.stderr)
        full = strategies[0]
        for it in todo:
            full.apply(llm)
            cont = generate(llm, it.prompt, self.cfg.cont_tokens)["tokens"]
            if len(cont) < 2:
                bar.update()
                continue
            everything = [True] * llm.n_layer
            llm.configure(mode="first")
            llm.reset_threshold()
            llm.fork(it.prompt)
            ref = llm.branch_logits(cont, everything)
            missing = [s for s in strategies if ("tf", it.id, s.name) not in self.done]
            for s in sorted(missing, key=lambda s: s.prefill == "masked"):  # the shared fork first
                if s.prefill == "masked":
                    s.apply(llm)
                    llm.fork(it.prompt)
                mask = llm.router_mask(s.threshold) if s.mode == "first" else (s.mask(llm.n_layer) or everything)
                q = metrics.teacher_forced(ref, ref if s is full else llm.branch_logits(cont, mask), np.array(cont))
                nll = metrics.nll(llm.branch_logits(it.response, mask), it.response)
                self._write({"task": "tf", "id": it.id, "strategy": s.name, "family": it.family,
                             "n": len(cont), "top1": q["top1"], "kl": q["kl"], "nll": nll,
                             "n_real": len(it.response), "skipped": [i for i, m in enumerate(mask) if not m]})
            bar.update()
        bar.close()


def layer_inputs(llm, prompt: Sequence[int]) -> np.ndarray:
    """[n_layer, n_tokens, n_embd]: the hidden state entering each layer (full depth)."""
    from ..runtime._lib import layer_input_fns

    set_inp, get_inp = layer_input_fns()
    n_layer, n_embd = llm.n_layer, llm.n_embd()
    llm.configure(mode="full")
    for il in range(n_layer):
        set_inp(llm.ctx, il, True)
    try:
        llm.prefill(list(prompt))
        n = len(prompt)
        return np.stack([np.ctypeslib.as_array(get_inp(llm.ctx, il), shape=(n * n_embd,)).reshape(n, n_embd).copy()
                         for il in range(n_layer)])
    finally:
        for il in range(n_layer):
            set_inp(llm.ctx, il, False)


# --- summary ---------------------------------------------------------------------------------

def summarize(rows: Iterable[dict], strategies: list[Strategy], meta: dict,
              references: dict[tuple[str, str, str | None], dict] | None = None) -> dict:
    """Per strategy (random seeds pooled under ``random-K``): quality, speed, skipped layers.

    ``references`` holds full's generation rows by (task, item, run); speeds compare a row with
    full's row of the same item and run (default: full's rows among ``rows``).
    """
    rows = list(rows)
    by: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], {}).setdefault(r["task"], []).append(r)
    fams = list(dict.fromkeys(s.family for s in strategies))
    out: dict[str, dict] = {}
    for fam in fams:
        names = [s.name for s in strategies if s.family == fam]
        tasks: dict[str, list[dict]] = {}
        for name in names:
            for task, rs in by.get(name, {}).items():
                tasks.setdefault(task, []).extend(rs)
        out[fam] = _strategy_summary(tasks, by.get("full", {}), references)
        out[fam]["members"] = names
    return {**meta, "summary": out, "skip_heatmap": _skip_heatmap(rows, strategies, meta["n_layer"])}


def _strategy_summary(tasks: dict[str, list[dict]], full: dict[str, list[dict]],
                      references: dict[tuple[str, str, str | None], dict] | None = None) -> dict:
    s: dict[str, Any] = {}
    he = [r for r in tasks.get("humaneval", []) if "status" in r]
    if he:
        passed = {name: sorted(r["id"] for r in he if r["strategy"] == name and r["status"] == "passed")
                  for name in dict.fromkeys(r["strategy"] for r in he)}
        s["humaneval"] = {"pass@1": float(np.mean([r["status"] == "passed" for r in he])), "n": len(he),
                          "skipped": float(np.mean([len(r["skipped"]) for r in he])), "passed": passed}
    tf = tasks.get("tf", [])
    if tf:
        w = np.array([r["n"] for r in tf], dtype=float)
        wr = np.array([r["n_real"] for r in tf], dtype=float)
        s["tf"] = {"top1": float(np.average([r["top1"] for r in tf], weights=w)),
                   "kl": float(np.average([r["kl"] for r in tf], weights=w)),
                   "ppl": float(np.exp(np.average([r["nll"] for r in tf], weights=wr))), "n": len(tf)}
        for fam in dict.fromkeys(r["family"] for r in tf):
            sub = [r for r in tf if r["family"] == fam]
            s["tf"][fam] = {"top1": float(np.average([r["top1"] for r in sub], weights=[r["n"] for r in sub])),
                            "kl": float(np.average([r["kl"] for r in sub], weights=[r["n"] for r in sub])),
                            "skipped": float(np.mean([len(r["skipped"]) for r in sub]))}
    chat = tasks.get("chat", [])
    if chat:
        ref = {r["id"]: r["tokens"] for r in full.get("chat", [])}
        agree = [metrics.greedy_agreement(ref[r["id"]], r["tokens"]) for r in chat if r["id"] in ref]
        if agree:
            s["chat"] = {"prefix_fraction": float(np.mean([a["prefix_fraction"] for a in agree])),
                         "exact": float(np.mean([a["exact"] for a in agree])), "n": len(agree)}
    # speeds: each row against full's row of the same item from the same run (command); a run
    # directory can hold rows of several commands. The median over items is robust to a stretch
    # of the run that shared the cores with other work, which a ratio of summed times is not.
    if references is None:
        references = {(r["task"], r["id"], r.get("run")): r for task in ("humaneval", "chat")
                      for r in full.get(task, [])}
    pairs = [(r, references[(r["task"], r["id"], r.get("run"))]) for r in tasks.get("humaneval", []) + chat
             if (r["task"], r["id"], r.get("run")) in references]
    if pairs:
        s["speed"] = _speeds(pairs)
    every = [r for rs in tasks.values() for r in rs]
    if every:
        s["skipped"] = float(np.mean([len(r["skipped"]) for r in every]))
    return s


MIN_DECODE = 8  # decode speeds of items where both sides generated at least this many tokens


def _speeds(pairs: list[tuple[dict, dict]]) -> dict:
    """Median over items of tok/s and of the ratio to full's row of the item, with its quartiles."""
    out: dict[str, Any] = {"n_items": len(pairs)}
    for key, n, t, least in (("decode", "n_decode", "t_decode", MIN_DECODE), ("prefill", "n_prompt", "t_prefill", 1)):
        ok = [(r[n] / r[t], f[n] / f[t]) for r, f in pairs
              if r[n] >= least and f[n] >= least and r[t] > 0 and f[t] > 0]
        if not ok:
            out.update({f"{key}_tok_s": None, f"{key}_x": None, f"{key}_x_iqr": None})
            continue
        mine, ratio = np.array([a for a, _ in ok]), np.array([a / b for a, b in ok])
        out[f"{key}_tok_s"] = float(np.median(mine))
        out[f"{key}_x"] = float(np.median(ratio))
        out[f"{key}_x_iqr"] = [float(np.quantile(ratio, 0.25)), float(np.quantile(ratio, 0.75))]
    return out


def _skip_heatmap(rows: list[dict], strategies: list[Strategy], n_layer: int) -> dict:
    """For each ``first`` strategy: per task family, the fraction of prompts skipping each layer."""
    out: dict[str, dict[str, list[float]]] = {}
    for s in strategies:
        if s.kind != "first":
            continue
        groups: dict[str, list[list[int]]] = {}
        for r in rows:
            if r["strategy"] == s.name:
                groups.setdefault(r["family"] or r["task"], []).append(r["skipped"])
        out[s.name] = {g: [float(np.mean([il in sk for sk in v])) for il in range(n_layer)]
                       for g, v in groups.items()}
    return out


def run_eval(model: str | None = None, out: Path | None = None, **options: Any) -> tuple[dict, Path]:
    """Evaluate a FiRST-GGUF (or a zoo model with its routers) and write its report.

    Args:
        model: FiRST-GGUF path or zoo name (default: the default zoo model).
        out: Run directory (default ``eval/<model file stem>``); an existing run resumes.
        **options: ``EvalConfig`` fields.

    Returns:
        (results, path of ``report.md``).
    """
    from .. import models
    from ..demo import demo_first_gguf
    from ..format import is_first_gguf
    from .results import write_report

    name = model or models.DEFAULT_MODEL
    path = Path(name)
    if not path.exists():
        if name not in models.MODELS:
            raise FirstError(f"{name}: no such file, and not a zoo model ({', '.join(models.MODELS)})")
        path = demo_first_gguf(name)
    elif not is_first_gguf(path):
        raise FirstError(f"{path}: not a FiRST-GGUF (no routers); attach routers first (first-gguf attach)")
    cfg = EvalConfig(model=str(path.resolve()), **options)
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise FirstError(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    out = Path(out) if out else Path("eval") / path.name.removesuffix(".gguf")
    command = "first-gguf eval " + " ".join(sys.argv[2:]) if Path(sys.argv[0]).name == "first-gguf" else None
    result = Evaluation(cfg, out, command=command).run()
    return result, write_report(result, out)
