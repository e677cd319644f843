"""``first-gguf eval``: every strategy on the real runtime, interleaved, resumable.

One FiRST-GGUF, one set of strategies (``strategies.py``), four tasks:

- ``humaneval``: pass@1 (greedy, raw completion of the problem's prompt, ``humaneval.py``),
  the generated code scored in a sandboxed process (``sandbox.py``).
- ``humaneval-chat``: pass@1 on the same problems asked through the model's chat template, the
  code taken from the answer's first Python block (``humaneval_chat.py``). Not in the default
  tasks: its answers restate the prompt, so it costs more than raw HumanEval.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from ..errors import FirstError
from . import doctests, humaneval, humaneval_chat, metrics
from .items import (Item, LlamaTokenizer, chat_items, doctest_items, humaneval_chat_items, humaneval_items, tf_items,
                    training_prompts)
from .strategies import (KINDS, POINTS, Controls, Strategy, block_influence, build_strategies, draft_of,
                         draft_strategy, static_order, strategy_from_name)
from .controls import bind_points, load_controls
from ..format.points import size_without_points
from .summary import summarize

TASKS = ("humaneval", "humaneval-chat", "doctest", "tf", "chat")
DEFAULT_TASKS = ("humaneval", "tf", "chat")
SELECTORS = ("tasks", "kinds", "ks", "masks", "thresholds", "random_seeds", "limit", "labels", "heals",
             "points", "drafts", "draft_tokens", "draft_on")  # which rows, not how


@dataclass
class EvalConfig:
    """What one command evaluates; ``key()`` (stored in ``<out>/config.json``) binds the directory."""

    model: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    kinds: tuple[str, ...] = KINDS
    ks: tuple[int, ...] = (4,)
    masks: tuple[tuple[int, ...], ...] = ()  # fixed skip sets given by hand: one ``mask:A+B`` strategy each
    thresholds: tuple[float | None, ...] = (None,)
    random_seeds: int = 2
    limit: int | None = None          # first problems of each scored task (default all)
    n_per_family: int = 16            # held-out prompts per family for ``tf``
    n_chat: int = 16                  # chat prompts
    n_static: int = 8                 # training prompts per family for the block influence
    max_prompt_tokens: int = 96
    cont_tokens: int = 32             # teacher-forced continuation length
    chat_tokens: int = 64
    max_new_tokens: int = 384         # HumanEval completion budget (humaneval-chat: beyond the restated prompt)
    timeout: float = 10.0             # per HumanEval program
    threads: int | None = None
    seed: int = 0
    labels: str | None = None         # damage labels for static-kl (default: the ones shipped for the model)
    heals: tuple[str, ...] = ()       # healing adapters: one ``heal-K`` strategy each
    points: tuple[str, ...] = ()      # operating points of the file: one ``point:NAME`` strategy each
    drafts: tuple[str, ...] = ()      # draft models (FILE or FILE@POINT): one ``draft:NAME@POINT`` strategy each
    draft_tokens: int = 4             # at most this many drafted tokens per verification
    draft_on: tuple[str, ...] = ("full",)  # what the drafts draft for: full, or operating points of the file

    def key(self) -> dict:
        """The settings every row of a run directory shares: all but what selects rows and the threads."""
        d = dataclasses.asdict(self)
        for name in SELECTORS + ("threads",):
            d.pop(name)
        path = Path(self.model)  # the file by name and size: reports carry no machine paths
        # named points are their own strategies (points.json binds them): a file's identity is
        # its size without them, so stamping points keeps its run directories valid
        d["model"] = {"name": path.name, "bytes": size_without_points(path)}
        return json.loads(json.dumps(d))  # tuples as lists, as config.json holds them


def _stop_humaneval(text: str) -> bool:
    return humaneval.truncate_completion(text) != text


class _Scored(NamedTuple):
    """A task the sandbox scores: its items, stop rule, answer -> scored code, (problem, code) -> program, problems."""

    items: Callable[..., list[Item]]
    stop: Callable[[str], bool]
    completion: Callable[[str], str]
    program: Callable[[humaneval.Problem, str], str]
    problems: Callable[[], list[humaneval.Problem]] = humaneval.load_problems


SCORED_TASKS = {"humaneval": _Scored(humaneval_items, _stop_humaneval, humaneval.truncate_completion,
                                     humaneval.program),
                "humaneval-chat": _Scored(humaneval_chat_items, humaneval_chat.block_closed,
                                          humaneval_chat.extract_code, humaneval_chat.program),
                "doctest": _Scored(doctest_items, _stop_humaneval, humaneval.truncate_completion, doctests.program,
                                   doctests.load_problems)}


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

        # mode full: every strategy configures itself; the file's default point (and any adapter it names) stays out
        return FirstModel(self.cfg.model, mode="full", n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=logits_all,
                          heal=list(self.cfg.heals) or None,
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
            controls = self._controls(llm, protected)
            points = list(dict.fromkeys((*(llm.points.names if POINTS in cfg.kinds else ()), *cfg.points)))
            controls = dataclasses.replace(controls, points=bind_points(self.out, self.cfg.model, llm.points, points))
            strategies = build_strategies(n_layer, protected, order, cfg.ks, cfg.thresholds, cfg.random_seeds,
                                          [k for k in cfg.kinds if k != POINTS], controls, points, cfg.masks)
            self.drafts = self._open_drafts(llm)
            on = [t for t in cfg.draft_on if t != "full"]
            if on:
                controls = dataclasses.replace(controls, points=bind_points(self.out, self.cfg.model, llm.points,
                                                                            list(dict.fromkeys([*points, *on]))))
            strategies += [draft_strategy(name + ("" if t == "full" else f"+{t}"), controls.points)
                           for name in self.drafts for t in cfg.draft_on]
            tok = LlamaTokenizer(llm)
            items: dict[str, list[Item]] = {}
            for task in [t for t in SCORED_TASKS if t in cfg.tasks]:
                items[task] = SCORED_TASKS[task].items(llm, cfg.limit)
                self._generation_task(llm, strategies, items[task], cfg.max_new_tokens, SCORED_TASKS[task].stop)
                self._score(task)
            if "chat" in cfg.tasks:
                items["chat"] = chat_items(tok, cfg.n_chat, cfg.max_prompt_tokens, cfg.seed)
                self._generation_task(llm, strategies, items["chat"], cfg.chat_tokens, None)
            if "tf" in cfg.tasks:
                items["tf"] = tf_items(tok, cfg.n_per_family, cfg.max_prompt_tokens, cfg.cont_tokens, cfg.seed)
        finally:
            llm.close()
            for d in getattr(self, "drafts", {}).values():
                d.model.close()
        if items.get("tf"):
            tf = self._open(n_ctx=cfg.max_prompt_tokens + max(cfg.cont_tokens, 64) + 8, logits_all=True)
            try:
                self._tf_task(tf, strategies, items["tf"])
            finally:
                tf.close()
        strategies = strategies + self._earlier_strategies(strategies, items, n_layer, protected, order, controls)
        self.strategies = strategies
        current = {(task, it.id) for task, its in items.items() for it in its}
        rows = [r for r in self.done.values() if (r["task"], r["id"]) in current]
        result = summarize(rows, strategies, self.meta(order, n_layer, protected), self.references)
        (self.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        return result

    def _earlier_strategies(self, strategies: list[Strategy], items: dict[str, list[Item]], n_layer: int,
                            protected: list[int], order: list[int], controls: Controls) -> list[Strategy]:
        """Strategies of earlier commands whose rows cover every item of this one (scored, for HumanEval tasks)."""
        asked = {s.name for s in strategies}
        names = list(dict.fromkeys(name for _, _, name in self.done if name not in asked))

        def complete(name: str) -> bool:
            return all((task, it.id, name) in self.done and (task not in SCORED_TASKS or "status" in self.done[
                (task, it.id, name)]) for task, its in items.items() for it in its)

        try:
            return [strategy_from_name(n, n_layer, protected, order, controls) for n in names if complete(n)]
        except FirstError as e:
            raise FirstError(f"{self.rows_path}: {e}") from None

    def meta(self, order: list[int], n_layer: int, protected: list[int]) -> dict:
        return {"model": Path(self.cfg.model).name, "config": self.cfg.key(), "limit": self.cfg.limit,
                "commands": self.commands,
                "threads": self.cfg.threads or os.cpu_count(), "n_layer": n_layer, "protected": protected,
                "static_order": order, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "strategies": {s.name: {"kind": s.kind, "skip": list(s.skip), "prefill": s.prefill,
                                        "threshold": s.threshold, "thin": list(s.thin), "vocab": s.vocab} for s in self.strategies}}

    # static mask: block influence on training prompts

    def _static_order(self, llm, protected: list[int]) -> list[int]:
        path = self.out / "static.json"
        if path.is_file():
            return json.loads(path.read_text())["order"]
        cfg = self.cfg
        examples = training_prompts(llm, cfg.n_static, cfg.max_prompt_tokens, cfg.seed + 1)
        self.log(f"block influence on {len(examples)} training prompts")
        inputs = [llm.layer_inputs(ex.prompt) for ex in examples]
        bi = block_influence(inputs)
        order = static_order(bi, protected)
        path.write_text(json.dumps({"order": order, "block_influence": [float(x) for x in bi[:-1]],
                                    "prompts": len(examples)}, indent=1) + "\n")
        return order

    # controls: the measured-damage order and the routers' modal masks (kept in the run directory)

    def _controls(self, llm, protected: list[int]) -> Controls:
        return load_controls(self.out, self.cfg, llm, protected, self.log)

    def _open_drafts(self, llm) -> dict:
        """Each ``--draft`` (FILE or zoo name, optionally @POINT) as a ``FirstDraft``, by strategy name."""
        from ..runtime.speculative import FirstDraft
        from ..shipped import resolve_model

        out = {}
        threads = self.cfg.threads or os.cpu_count() or 1
        for spec in self.cfg.drafts:
            model, _, point = spec.partition("@")
            path = resolve_model(model)
            d = FirstDraft.open(path, point=point or None, max_tokens=self.cfg.draft_tokens, n_ctx=llm.n_ctx(),
                                n_batch=512, n_threads=threads, n_threads_batch=threads)
            d.check(llm)  # before any row runs
            name = f"draft:{path.name.removesuffix('.gguf').removesuffix('.first')}@{d.model.point or d.model.mode}"
            out[name] = d
        return out

    def _generate(self, llm, s: Strategy, prompt: list[int], max_new: int, stop):
        from ..runtime.greedy import drafted, greedy

        if not s.draft:
            return greedy(llm, prompt, max_new, stop)
        llm.use_draft(self.drafts[draft_of(s.name)])
        try:
            return drafted(llm, prompt, max_new, stop)
        finally:
            llm.use_draft(None)

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
            self._generate(llm, s, todo[0].prompt[:16], 2, None)
        bar = tqdm(total=len(todo) * len(strategies), desc=task, file=sys.stderr)
        for n, it in enumerate(todo):
            # speeds compare within one run only: full runs again beside strategies new to this item
            retime = strategies[0].name == "full" and (it.task, it.id, self.run_id) not in self.references
            for s in self._rotated(strategies, n):
                if (it.task, it.id, s.name) in self.done and not (retime and s.name == "full"):
                    bar.update()
                    continue
                s.apply(llm)
                g = self._generate(llm, s, it.prompt, max_new + it.restated, stop).row()
                if g.get("healed", False) != s.heal:
                    raise FirstError(f"{s.name}: the decode ran {'with' if g.get('healed') else 'without'} "
                                     f"a healing adapter")
                before = self.done.get((it.task, it.id, s.name))
                if before is not None and before["tokens"] != g["tokens"]:
                    self.log(f"warning: {s.name} on {it.id} generated other tokens than in an earlier run")
                row = {"task": it.task, "id": it.id, "strategy": s.name, "family": it.family,
                       "n_prompt": len(it.prompt), "run": self.run_id, **g}
                if it.problem is not None:
                    row["completion"] = SCORED_TASKS[it.task].completion(g["text"])
                self._write(row)
                bar.update()
        bar.close()

    def _score(self, task: str) -> None:
        rows = [r for r in self.done.values() if r["task"] == task and "status" not in r]
        if not rows:
            return
        problems = {p.task_id: p for p in SCORED_TASKS[task].problems()}
        self.log(f"running {len(rows)} {task} programs in the sandbox")
        outcomes = humaneval.score([problems[r["id"]] for r in rows], [r["completion"] for r in rows],
                                   timeout=self.cfg.timeout, build=SCORED_TASKS[task].program)
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

        from ..runtime.greedy import greedy

        strategies = [s for s in strategies if not s.draft]  # a draft changes how full decodes, not its logits
        todo = [it for it in items if any(("tf", it.id, s.name) not in self.done for s in strategies)]
        bar = tqdm(total=len(todo), desc="tf", file=sys.stderr)
        full = strategies[0]
        for s in strategies:
            if s.point is not None and s.heal:  # a point's adapter loads when the point is first chosen
                s.apply(llm)
        for it in todo:
            full.apply(llm)
            cont = greedy(llm, it.prompt, self.cfg.cont_tokens).tokens
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
                healed = s.heal
                q = metrics.teacher_forced(ref, ref if s is full else llm.branch_logits(cont, mask, heal=healed),
                                           np.array(cont))
                nll = metrics.nll(llm.branch_logits(it.response, mask, heal=healed), it.response)
                self._write({"task": "tf", "id": it.id, "strategy": s.name, "family": it.family,
                             "n": len(cont), "top1": q["top1"], "kl": q["kl"], "nll": nll,
                             "n_real": len(it.response), "skipped": [i for i, m in enumerate(mask) if not m]})
            bar.update()
        bar.close()


def run_eval(model: str | None = None, out: Path | None = None, command: str | None = None,
             **options: Any) -> tuple[dict, Path]:
    """Evaluate a FiRST-GGUF (or a zoo model with its routers) and write its report.

    Args:
        model: FiRST-GGUF path or zoo name (default: the default zoo model).
        out: Run directory (default ``eval/<model file stem>``); an existing run resumes.
        command: The command line that asked for this run, recorded in ``config.json`` and the report.
        **options: ``EvalConfig`` fields.

    Returns:
        (results, path of ``report.md``).
    """
    from .. import shipped
    from ..format import is_first_gguf
    from .results import write_report

    path = shipped.resolve_model(model)
    if not is_first_gguf(path):
        raise FirstError(f"{path}: not a FiRST-GGUF (no routers); attach routers first (first-gguf attach)")
    if options.get("heals") and "heal" not in options.get("kinds", KINDS):
        options["kinds"] = (*options.get("kinds", KINDS), "heal")
    cfg = EvalConfig(model=str(path.resolve()), **options)
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise FirstError(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    out = Path(out) if out else Path("eval") / path.name.removesuffix(".gguf")
    result = Evaluation(cfg, out, command=command).run()
    return result, write_report(result, out)
