"""Operating points for any FiRST-GGUF, chosen by measurement (``first-gguf tune``).

The zoo's points were chosen by hand from long HumanEval runs. ``tune`` gives a converted
model the same kinds of points in minutes, from measurements on the machine that runs it:

1. damage labels (``damage.make_labels``: what skipping each layer alone costs on training
   prompts) order the layers, least damaging first (the ``static-kl`` order);
2. the decode-only stand-ins are added to a working copy: IQ4_NL copies of every FFN
   (``train.thin``) and a short output vocabulary (``train.vocab``), unless the file has them;
3. every candidate (the first 0..``max_skip`` layers of the order skipped, or a FiRST-GGUF's
   own routers at each of ``thresholds``; with or without the copies, with or without the short
   vocabulary; with ``warmup``, a skipping one also after that many full-depth decode steps) is
   measured against ``full``: quality
   teacher-forced along full's own greedy continuation of held-out prompts of each family the
   model's template allows (never HumanEval), decode speed as the median of interleaved
   repeats in one process;
4. the candidates no other candidate beats on both counts (less damage and faster, by at least
   ``min_gain``) and damaging at most ``max_point_kl`` become the points, named as the zoo's
   are; the default is the fastest of them whose damage is within ``max_kl``.

The default ``max_kl`` (0.05 nats) is where the zoo's HumanEval runs put the edge: measured
by ``tune`` on the 0.5B, the configurations that keep >= 90% of full's pass@1 lie at
0.003-0.041, the two-layer skip set that keeps 76% at 0.072 (docs/TRAINING.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import FirstError

FAST, SHORT, WARM = "fast", "short", "warm"
SKIP_NAMES = {1: "quality", 2: "balanced"}  # more layers: skipN


@dataclass(frozen=True)
class TuneConfig:
    """What ``tune`` measures and how it chooses (docs/FORMAT.md section 9)."""

    max_skip: int = 2            # candidates skip 0..max_skip layers of the damage order
    thresholds: tuple[float, ...] = (0.25, 0.5)  # routed candidates: the file's own routers at these thresholds
    warmup: int = 0              # skipping candidates also with this many full-depth decode steps first (0: not)
    copies: str | None = "IQ4_NL"  # ggml type of the decode-only FFN copies (None: no copies)
    vocab_size: int = 49152      # short output vocabulary size (0: none)
    text_mb: float = 30.0        # megabytes of local text counted for the short vocabulary
    label_prompts: int = 16      # damage labels: training prompts per family (when measured here)
    label_tokens: int = 32       # damage labels: full's greedy continuation each is measured on
    eval_prompts: int = 8        # quality: held-out prompts per family
    cont_tokens: int = 48        # quality: full's greedy continuation scored per prompt
    max_prompt_tokens: int = 160
    repeats: int = 5             # speed: interleaved repeats
    decode_tokens: int = 64      # speed: greedy tokens per repeat
    max_kl: float = 0.05         # the default: the fastest point whose damage is within this
    min_gain: float = 0.02       # a point decodes at least this much faster (relative) than the one before
    max_point_kl: float = 0.1    # no point damages more than this (a faster point past it is not offered)
    seed: int = 0


@dataclass
class Candidate:
    """One configuration of the tuned file and what it measured."""

    name: str
    skip: list[int]
    fast: bool
    short: bool
    thin: list[int] = field(default_factory=list)  # the layers decoded with their FFN copies
    threshold: float | None = None  # a routed candidate: the routers choose the skip set per prompt
    warmup: int = 0                # decode steps after the prompt at full depth before the candidate's decode
    mean_skip: float = float("nan")  # layers skipped, mean over the held-out prompts
    kl: float = float("nan")       # mean KL(full || candidate) over the candidate's possible tokens (nats)
    top1: float = float("nan")     # fraction of positions whose argmax is full's
    outside: float = 0.0           # full's mean probability on tokens the candidate cannot produce
    speed: float = float("nan")    # decode x full, median of the repeats
    spread: list[float] = field(default_factory=list)  # the repeats' 25th and 75th percentiles

    @property
    def damage(self) -> float:
        """What the choice weighs: ``kl`` plus ``outside`` (a token the candidate cannot write
        counts in full: greedy decoding there leaves full's answer)."""
        return self.kl + self.outside


def candidate_name(k: int, fast: bool, short: bool, warm: bool = False) -> str:
    """The zoo's names: quality (1 layer), balanced (2), skipN beyond; ``fast-`` with the FFN
    copies, ``-warm`` after a warm-up, ``-short`` with the short vocabulary (``fast-quality-short``,
    ``balanced-warm``, ``short``, ...)."""
    parts = (([FAST] if fast else []) + ([SKIP_NAMES.get(k, f"skip{k}")] if k else []) + ([WARM] if warm else [])
             + ([SHORT] if short else []))
    return "-".join(parts)


def routed_name(threshold: float, fast: bool, short: bool, warm: bool = False) -> str:
    """``routed25`` for the routers at 0.25, with ``fast-``, ``-warm`` and ``-short`` as ``candidate_name``'s."""
    return "-".join(([FAST] if fast else []) + [f"routed{round(threshold * 100):02d}"] + ([WARM] if warm else [])
                    + ([SHORT] if short else []))


def front(cands: Sequence[Candidate], min_gain: float = 0.0, max_damage: float = float("inf")) -> list[Candidate]:
    """The candidates no other beats on both counts: by damage ascending, each faster than every
    candidate kept before it and than ``full`` (1.0) by more than ``min_gain`` (relative: a step
    within the noise of the speed measurement is not worth a point); none damaging more than
    ``max_damage``."""
    out, best = [], 1.0
    for c in sorted(cands, key=lambda c: (c.damage, -c.speed)):
        if c.damage <= max_damage and c.speed > best * (1.0 + min_gain):
            out.append(c)
            best = c.speed
    return out


def choose_default(points: Sequence[Candidate], max_kl: float) -> Candidate | None:
    """The fastest point whose damage is within ``max_kl`` (None when none is)."""
    ok = [c for c in points if c.damage <= max_kl]
    return max(ok, key=lambda c: c.speed) if ok else None


def tune(model: str | os.PathLike, out: str | os.PathLike, cfg: TuneConfig = TuneConfig(),
         labels: str | os.PathLike | None = None, threads: int | None = None, force: bool = False,
         log: Callable[[str], None] | None = None) -> dict:
    """Measure candidates on ``model`` and write it to ``out`` with the chosen operating points.

    Args:
        model: A GGUF (a plain one gets the untrained keep-every-layer routers) or a FiRST-GGUF.
        out: The FiRST-GGUF to write (never ``model``; an existing one only with ``force``).
            Work files, the damage labels and ``tune.json`` (every measurement) go to
            ``<out>.tune/``, and a run there resumes: labels, copies and counts are reused.
        cfg: What to measure and how to choose.
        labels: Damage labels of this model (``first-gguf damage``); None: measured here.
        threads: llama.cpp threads (default: all cores).

    Returns:
        The report written to ``<out>.tune/tune.json``.
    """
    from .paths import check_output_path

    log = log or (lambda msg: None)
    src, out = Path(model), Path(out)
    if not src.is_file():
        raise FirstError(f"{src}: no such file")
    check_output_path(out, force=force, inputs=[src])
    if cfg.max_skip < 0:
        raise FirstError(f"max_skip must be >= 0, got {cfg.max_skip}")
    if any(not 0.0 < t < 1.0 for t in cfg.thresholds):
        raise FirstError(f"thresholds must lie in (0, 1), got {list(cfg.thresholds)}")
    if len({routed_name(t, False, False) for t in cfg.thresholds}) < len(cfg.thresholds):
        raise FirstError(f"thresholds {list(cfg.thresholds)} give two candidates one name (names keep two decimals)")
    if not 0.0 < cfg.max_kl:
        raise FirstError(f"max_kl must be > 0, got {cfg.max_kl}")
    if cfg.min_gain < 0:
        raise FirstError(f"min_gain must be >= 0, got {cfg.min_gain}")
    if cfg.max_point_kl < cfg.max_kl:
        raise FirstError(f"max_point_kl ({cfg.max_point_kl}) must be >= max_kl ({cfg.max_kl})")
    if cfg.repeats < 1 or cfg.decode_tokens < 2 or cfg.eval_prompts < 1 or cfg.cont_tokens < 2:
        raise FirstError("repeats, eval_prompts must be >= 1 and decode_tokens, cont_tokens >= 2")
    if not 0 <= cfg.warmup < min(cfg.cont_tokens, cfg.decode_tokens):
        raise FirstError(f"warmup must be 0 or more and fewer than the {min(cfg.cont_tokens, cfg.decode_tokens)} "
                         f"decode steps measured, got {cfg.warmup}")
    run = out.parent / f"{out.name}.tune"
    run.mkdir(parents=True, exist_ok=True)
    _claim(run, src)
    t0 = time.perf_counter()

    routed = _with_routers(src, run, log)
    n_layer, protected, thin, has_short = _parts(routed)
    if cfg.max_skip == 0 and not (cfg.copies or thin) and not (cfg.vocab_size or has_short):
        raise FirstError(f"{src}: nothing to choose from (max_skip 0, no FFN copies, no short vocabulary)")
    labels = Path(labels) if labels is not None else _measure_labels(routed, run, cfg, threads, log)
    order = _order(labels, n_layer, protected)
    if cfg.max_skip > len(order):
        raise FirstError(f"{labels}: {len(order)} layers measured, fewer than max_skip {cfg.max_skip}")
    work, made = _stand_ins(routed, run, cfg, threads, log)

    cands = _candidates(work, order, cfg.max_skip, cfg.thresholds if routed == src else (), cfg.warmup)
    log(f"{len(cands)} candidates over layers {order[:cfg.max_skip]} (damage order)"
        f"{', the routers at ' + ', '.join(map(str, cfg.thresholds)) if routed == src and cfg.thresholds else ''}"
        f"{f', with and without a warm-up of {cfg.warmup} steps' if cfg.warmup else ''}, "
        f"{'with' if any(c.fast for c in cands) else 'without'} FFN copies, "
        f"{'with' if any(c.short for c in cands) else 'without'} a short vocabulary")
    _measure_quality(work, cands, cfg, threads)
    idle = [c.name for c in cands if c.threshold is not None and c.mean_skip == 0]
    if idle:  # routers that keep every layer there: the candidate is the one without routers
        log(f"the routers skip nothing at these thresholds on the held-out prompts: dropped {', '.join(idle)}")
        cands = [c for c in cands if c.name not in idle]
    _measure_speed(work, cands, cfg, threads)

    chosen = front(cands, cfg.min_gain, cfg.max_point_kl)
    default = choose_default(chosen, cfg.max_kl)
    final = _assemble(routed, work, run, made, need_fast=any(c.fast for c in chosen),
                      need_short=any(c.short for c in chosen), cfg=cfg)
    points = _points(chosen, default)
    from .format import stamp_points

    stamp_points(final, points, out, force=force)
    config = asdict(cfg) | {"thresholds": list(cfg.thresholds)}  # as JSON gives it back
    report = {"model": src.name, "out": out.name, "config": config, "labels": labels.name, "order": order,
              "candidates": [asdict(c) | {"damage": c.damage} for c in cands], "points": [c.name for c in chosen],
              "default": default.name if default else None, "seconds": round(time.perf_counter() - t0, 1)}
    (run / "tune.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# --- the steps -----------------------------------------------------------------------------

def _claim(run: Path, src: Path) -> None:
    """The work directory serves one input: its files are reused only for the model they came from."""
    from .damage import model_identity

    mark, me = run / "source.json", {"model": src.name, "identity": model_identity(src)}
    if mark.is_file():
        was = json.loads(mark.read_text())
        if was.get("identity") != me["identity"]:
            raise FirstError(f"{run} holds the work of another model ({was.get('model')}); remove it or write "
                             f"the output elsewhere")
    else:
        mark.write_text(json.dumps(me) + "\n")


def _with_routers(src: Path, run: Path, log) -> Path:
    """``src`` if it is a FiRST-GGUF, else a copy with the recipe's keep-every-layer routers."""
    from . import format as fmt

    if fmt.is_first_gguf(src):
        fmt.read_first_parts(src, deep=False)  # a clear error now for a broken one
        return src
    info = fmt.inspect_gguf(src)
    dst = run / "routed.gguf"
    if not dst.is_file():
        log(f"{src.name} has no routers: attaching the untrained ones that keep every layer")
        fmt.attach_routers(src, fmt.make_identity_routers(info["n_layer"], info["n_embd"]), dst, force=True)
    return dst


def families(path: Path) -> tuple[str, ...]:
    """The built-in prompt families the model can be measured on: chat-templated requests
    (``instruct``) only when its GGUF has a chat template."""
    from .format.header import read_header
    from .prompts import FAMILIES

    has_template = "tokenizer.chat_template" in read_header(path).fields
    return tuple(f for f in FAMILIES if f != "instruct" or has_template)


def _measure_labels(path: Path, run: Path, cfg: TuneConfig, threads: int | None, log) -> Path:
    from .damage import make_labels

    out = run / "damage.jsonl"
    fams = families(path)
    log(f"damage labels: {cfg.label_prompts} training prompts per family ({', '.join(fams)}) -> {out}")
    return make_labels(path, out, families=fams, n_per_family=cfg.label_prompts,
                       max_prompt_tokens=cfg.max_prompt_tokens, cont_tokens=cfg.label_tokens, threads=threads)


def _order(labels: Path, n_layer: int, protected: Sequence[int]) -> list[int]:
    from .damage import damage_order, read_labels

    _, rows = read_labels(labels)
    if not rows:
        raise FirstError(f"{labels}: no labelled prompts")
    if len(rows[0]["kl"]) != n_layer:
        raise FirstError(f"{labels}: labels for {len(rows[0]['kl'])} layers, the model has {n_layer}")
    return damage_order(rows, n_layer, protected)


def _parts(path: Path) -> tuple[int, list[int], tuple[int, ...], bool]:
    """(layers, protected layers, the layers with decode-only FFN stand-ins, whether there is a
    short vocabulary) of a FiRST-GGUF."""
    from .format import read_first_parts

    p = read_first_parts(path, deep=False)
    thin = tuple(p.thin.layers) if p.thin is not None else ()
    return p.routers.n_layer, list(p.routers.protected_layers), thin, p.vocab is not None


def _stand_ins(path: Path, run: Path, cfg: TuneConfig, threads: int | None, log) -> tuple[Path, set[str]]:
    """A working file with every stand-in ``cfg`` asks for; which of them were made here."""
    from .train.thin import thin_model
    from .train.vocab import vocab_model

    _, _, thin, has_short = _parts(path)
    made: set[str] = set()
    work = path
    if cfg.copies and not thin:
        dst = run / f"copies-{cfg.copies.lower()}.gguf"
        if not dst.is_file():
            log(f"decode-only {cfg.copies} copies of every FFN -> {dst.name}")
            thin_model(work, dst, None, qtype=cfg.copies, threads=threads, force=True)
        work, made = dst, made | {FAST}
    if cfg.vocab_size and not has_short:
        dst = run / f"{'copies-' if FAST in made else ''}vocab-{cfg.vocab_size}-{cfg.text_mb:g}mb.gguf"
        if not dst.is_file():
            log(f"short output vocabulary of {cfg.vocab_size} tokens ({cfg.text_mb:g} MB of local text) -> {dst.name}")
            vocab_model(work, dst, cfg.vocab_size, limit_bytes=int(cfg.text_mb * 1e6), counts=_counts(run, cfg),
                        force=True)
        work, made = dst, made | {SHORT}
    return work, made


def _candidates(work: Path, order: Sequence[int], max_skip: int, thresholds: Sequence[float] = (),
                warmup: int = 0) -> list[Candidate]:
    """Skip sets of 0..``max_skip`` layers of ``order`` and the routers at ``thresholds``, each with
    and without the FFN copies and the short vocabulary the file has (not ``full`` itself), the
    skipping ones also after ``warmup`` full-depth decode steps (when not 0)."""
    _, _, thin, has_short = _parts(work)
    stand_ins = [(fast, short) for fast in ((False, True) if thin else (False,))
                 for short in ((False, True) if has_short else (False,))]
    warms = (0, warmup) if warmup else (0,)
    out = []
    for k in range(max_skip + 1):
        skip = sorted(order[:k])
        for w in warms if k else (0,):
            for fast, short in stand_ins:
                if k or fast or short:
                    out.append(Candidate(candidate_name(k, fast, short, bool(w)), skip, fast, short,
                                         thin=[i for i in thin if i not in skip] if fast else [], mean_skip=k,
                                         warmup=w))
    for t in thresholds:
        for w in warms:
            for fast, short in stand_ins:
                out.append(Candidate(routed_name(t, fast, short, bool(w)), [], fast, short,
                                     thin=list(thin) if fast else [], threshold=float(t), warmup=w))
    return out


def _configure(llm, c: Candidate | None) -> None:
    """``full`` for None, else the candidate: ``first`` mode at its threshold (routed) or ``mask``
    mode (its skip set), the prompt at full depth either way, with its warm-up."""
    if c is None:
        llm.configure(mode="full", thin=(), vocab=False, warmup=0)
    elif c.threshold is not None:
        llm.configure(mode="first", threshold=c.threshold, prefill="full", thin=c.thin, vocab=c.short,
                      warmup=c.warmup)
    else:
        llm.configure(mode="mask", mask=[i not in c.skip for i in range(llm.n_layer)], prefill="full",
                      thin=c.thin, vocab=c.short, warmup=c.warmup)


def _measure_quality(work: Path, cands: Sequence[Candidate], cfg: TuneConfig, threads: int | None) -> None:
    """Teacher-forced KL and top-1 of every candidate along full's greedy continuation.

    One full-depth prefill per prompt serves every candidate (``fork`` / ``branch_logits``: each
    branch equals that configuration's own prefill and decode), the short-vocabulary candidates
    first, while the prompt's tokens the fork gave the short vocabulary still stand. With routed
    candidates the fork runs in ``first`` mode (the same prompt KV) and each takes the mask its
    routers choose there at its threshold (``router_mask``). A warm-up applies per branch, as in
    that configuration's own decode (its first steps at full depth)."""
    from tqdm import tqdm

    from .evaluation.items import LlamaTokenizer, tf_items
    from .runtime import FirstModel
    from .runtime.greedy import greedy

    llm = FirstModel(work, mode="full", logits_all=True, n_ctx=cfg.max_prompt_tokens + cfg.cont_tokens + 8,
                     n_batch=512, n_threads=threads, n_threads_batch=threads)
    short = any(c.short for c in cands)
    routed = any(c.threshold is not None for c in cands)
    ordered = sorted(cands, key=lambda c: not c.short)
    try:
        items = tf_items(LlamaTokenizer(llm), cfg.eval_prompts, cfg.max_prompt_tokens, 8, cfg.seed, families(work))
        rows: dict[str, list[tuple[float, float, float]]] = {c.name: [] for c in cands}
        skips: dict[str, list[int]] = {c.name: [] for c in cands}
        for it in tqdm(items, desc="quality", file=sys.stderr):
            _configure(llm, None)
            cont = greedy(llm, it.prompt, cfg.cont_tokens).tokens
            if len(cont) < 2:
                continue
            everything = [True] * llm.n_layer
            if routed:
                llm.configure(mode="first", prefill="full", thin=(), vocab=short)
            else:
                llm.configure(mode="mask", mask=everything, prefill="full", thin=(), vocab=short)
            llm.fork(it.prompt)
            got = {}
            for c in ordered:
                if not c.short and llm.vocab:
                    llm.configure(vocab=False)
                llm.configure(thin=c.thin, warmup=c.warmup)
                run = (list(llm.router_mask(c.threshold)) if c.threshold is not None
                       else [i not in c.skip for i in range(llm.n_layer)])
                skips[c.name].append(run.count(False))
                got[c.name] = llm.branch_logits(cont, run)
            llm.configure(thin=(), vocab=False, warmup=0)
            ref = llm.branch_logits(cont, everything)
            for c in cands:
                rows[c.name].append(compare(ref, got[c.name]))
        for c in cands:
            if not rows[c.name]:
                raise FirstError(f"{work}: the full model ended every held-out prompt at once; nothing to score")
            c.kl, c.top1, c.outside = (float(x) for x in np.mean(rows[c.name], axis=0))
            c.mean_skip = float(np.mean(skips[c.name]))
    finally:
        llm.close()


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(KL, top-1, outside) of ``got`` against ``ref`` ([n, vocab] logits of the same positions).

    A short-vocabulary decode gives the tokens it cannot produce a logit of -inf: the KL is
    taken over the tokens it can produce, ``ref`` renormalised there, and ``outside`` is the
    probability ``ref`` put on the others (mean over positions)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    ok = np.isfinite(got)
    if not ok.any(axis=1).all() or not np.isfinite(ref).all():
        raise FirstError("a row of logits has no finite entry (or the reference is not finite)")
    p = np.exp(ref - ref.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    outside = (p * ~ok).sum(axis=1)
    q = np.where(ok, got, -np.inf)
    lq = q - q.max(axis=1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(axis=1, keepdims=True))
    pin = np.where(ok, p, 0.0) / (1.0 - outside)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pin > 0, pin * (np.log(pin) - np.where(ok, lq, 0.0)), 0.0)
    kl = terms.sum(axis=1)
    top1 = (got.argmax(axis=1) == ref.argmax(axis=1))
    return float(kl.mean()), float(top1.mean()), float(outside.mean())


def _measure_speed(work: Path, cands: Sequence[Candidate], cfg: TuneConfig, threads: int | None) -> None:
    """Decode x full per candidate: medians of interleaved repeats in one process, each repeat on
    one held-out prompt (a family's each in turn: routed candidates skip what the routers choose there)."""
    from tqdm import tqdm

    from .evaluation.items import LlamaTokenizer, tf_items
    from .runtime import FirstModel
    from .runtime.greedy import greedy

    llm = FirstModel(work, mode="full", n_ctx=cfg.max_prompt_tokens + cfg.decode_tokens + 8, n_batch=512,
                     n_threads=threads, n_threads_batch=threads)
    try:
        prompts = [it.prompt for it in tf_items(LlamaTokenizer(llm), 1, cfg.max_prompt_tokens, 8, cfg.seed + 1,
                                               families(work))]
        order: list[Candidate | None] = [None, *cands]
        rates: dict[str, list[float]] = {c.name: [] for c in cands}
        for r in tqdm(range(cfg.repeats), desc="speed", file=sys.stderr):
            got = {}
            k, prompt = r % len(order), prompts[r % len(prompts)]
            for c in order[k:] + order[:k]:
                _configure(llm, c)
                g = greedy(llm, prompt, cfg.decode_tokens, eog=False)
                got["" if c is None else c.name] = g.n_decode / g.t_decode
            for c in cands:
                rates[c.name].append(got[c.name] / got[""])
        for c in cands:
            v = np.array(rates[c.name])
            c.speed = float(np.median(v))
            c.spread = [float(np.percentile(v, 25)), float(np.percentile(v, 75))]
    finally:
        llm.close()


def _assemble(routed: Path, work: Path, run: Path, made: set[str], need_fast: bool, need_short: bool,
              cfg: TuneConfig) -> Path:
    """The file the points go into: the routed input with the stand-ins made here that a point
    uses (stand-ins the input already had stay)."""
    from .train.vocab import vocab_model

    keep_fast, keep_short = FAST in made and need_fast, SHORT in made and need_short
    if (FAST in made) == keep_fast and (SHORT in made) == keep_short:
        return work
    if keep_fast:  # the copies without the vocabulary
        return run / f"copies-{cfg.copies.lower()}.gguf"
    if not keep_short:
        return routed
    dst = run / f"vocab-{cfg.vocab_size}-{cfg.text_mb:g}mb.gguf"  # the vocabulary without the copies (counted already)
    if not dst.is_file():
        vocab_model(routed, dst, cfg.vocab_size, limit_bytes=int(cfg.text_mb * 1e6), counts=_counts(run, cfg),
                    force=True)
    return dst


def _counts(run: Path, cfg: TuneConfig) -> Path:
    return run / f"counts-{cfg.text_mb:g}mb.npz"


def _points(chosen: Sequence[Candidate], default: Candidate | None):
    from .format import Point, Points

    items = [Point(c.name, threshold=c.threshold, skip=tuple(c.skip) if c.skip else None,
                   thin=tuple(c.thin) if c.fast else None, vocab=c.short, warmup=c.warmup) for c in chosen]
    return Points(tuple(items), default.name if default else None)


def table(report: dict) -> str:
    """The candidates as a text table, the points marked (* the default)."""
    lines = [f"{'candidate':<26} {'skip':<16} {'damage':>7} {'KL':>7} {'outside':>8} {'top-1':>6} "
             f"{'decode x full':>19}  point"]
    for c in sorted(report["candidates"], key=lambda c: c["damage"]):
        mark = "*" if c["name"] == report["default"] else ("+" if c["name"] in report["points"] else "")
        skip = str(c["skip"]) if c.get("threshold") is None else f"p<{c['threshold']:g}: {c['mean_skip']:.1f}"
        skip += f" w{c['warmup']}" if c.get("warmup") else ""
        lines.append(f"{c['name']:<26} {skip:<16} {c['damage']:7.4f} {c['kl']:7.4f} {c['outside']:8.4f} "
                     f"{c['top1']:6.3f} "
                     f"{c['speed']:6.3f} ({c['spread'][0]:.2f}-{c['spread'][1]:.2f})  {mark}")
    lines.append(f"points: {', '.join(report['points']) or 'none'}; default: {report['default'] or 'none'} "
                 f"(the fastest point of damage <= {report['config']['max_kl']}); {report['seconds']:.0f} s")
    return "\n".join(lines)
