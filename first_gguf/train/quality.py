"""Quality of routers under the hard rule, against the full model and input-agnostic masks.

Protocol (issue 7, "Done when"): held-out prompts of each family (``data.build_examples``,
split ``heldout``: files never trained on); the full model's own greedy continuation of each
(HF ``generate``, cached on disk); every configuration is teacher-forced along that
continuation and compared with the full model position by position: top-1 agreement
(same argmax) and KL(full || configuration), pooled over the tokens of a family.
Row 0 of every continuation is the distribution after the prompt, so it is exact wherever the
prompt runs at full depth and counts against ``prefill=masked``: it is what a user gets.

Configurations:
- FiRST at each threshold of a sweep: the prompt at full depth, the mask the routers choose
  from it (``m_i = protected or p_i >= t``), decode with that mask (``decode_hard``; the same
  as ``first_generate_logits(mode="first")`` with the routers' threshold set to t).
- The best input-agnostic mask of each size k, chosen on *training* examples by greedy search
  on the KL (the prompt at full depth, ``mode="mask"``), evaluated with ``prefill=full`` and
  with ``prefill=masked`` (what a GGUF with those blocks removed computes).

``evaluate_routers`` returns every number and writes a JSON report and two PNGs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..format import RouterSet, load_router_file
from ..log import logger
from ..paths import cache_dir
from ..router import FirstRouters, decode_hard, first_generate_logits, prefill
from . import recipe
from .data import FAMILIES, Example, Limits, build_examples
from .report import write_training_report
from .base import context_length, load_base, set_threads

AUTO_SKIPS = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6)  # mean skipped layers the auto sweep aims at
ROUND_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)          # also in the default sweep: candidates for a default


@dataclass
class Scores:
    """Pooled token statistics of one configuration on one family."""

    agree: float = 0.0     # sum over tokens of [argmax equal]
    kl: float = 0.0        # sum over tokens of KL(full || configuration)
    tokens: int = 0
    skipped: float = 0.0   # sum over examples of skipped layers
    examples: int = 0

    def add(self, agree: torch.Tensor, kl: torch.Tensor, skipped: int) -> None:
        self.agree += float(agree.sum())
        self.kl += float(kl.sum())
        self.tokens += int(agree.numel())
        self.skipped += skipped
        self.examples += 1

    def summary(self) -> dict[str, float]:
        return {"top1": self.agree / max(self.tokens, 1), "kl": self.kl / max(self.tokens, 1),
                "skipped": self.skipped / max(self.examples, 1), "tokens": self.tokens, "examples": self.examples}


def compare(full_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: top-1 agreement and KL(full || other), from (T, vocab) logits."""
    ref, cur = torch.log_softmax(full_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return ref.argmax(-1) == cur.argmax(-1), (ref.exp() * (ref - cur)).sum(-1)


_log = logger("train")


# --- data ------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_continuations(model, tokenizer, examples: list[Example], n_tokens: int,
                         cache_key: str | None = None) -> list[Example]:
    """The examples with their response replaced by the full model's greedy continuation.

    Continuations stop early at the end-of-sequence token; those shorter than 2 tokens are
    dropped. With ``cache_key`` the result is cached under the first-gguf cache directory.
    """
    def generate() -> list[list[int]]:
        conts, device = [], next(model.parameters()).device
        for ex in examples:
            ids = torch.tensor([ex.prompt], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            conts.append(gen[0, ids.shape[1]:].tolist())
        return conts

    key = [n_tokens, [ex.prompt for ex in examples]]
    conts = generate() if cache_key is None else _cached(f"greedy-{cache_key}", key, generate)
    return [replace(ex, response=tuple(c)) for ex, c in zip(examples, conts) if len(c) >= 2]


def _cached(kind: str, key: object, compute):
    """A JSON-able result cached under the first-gguf cache directory by ``kind`` and ``key``."""
    digest = hashlib.sha256(json.dumps([kind, key]).encode()).hexdigest()[:16]
    path = cache_dir() / "eval" / f"{kind.split('-')[0]}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = json.loads(json.dumps(compute()))  # the same types as a cache hit (string keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


# --- input-agnostic masks ----------------------------------------------------------------------

def _mask(n_layer: int, skip: Sequence[int]) -> torch.Tensor:
    keep = torch.ones(n_layer, dtype=torch.bool)
    keep[list(skip)] = False
    return keep


@torch.no_grad()
def search_static_masks(model, examples: list[Example], candidates: Sequence[int], max_size: int,
                        n_layer: int, beam: int = 8) -> dict:
    """Greedy search for the input-agnostic skip set of each size with the least mean KL.

    Every single layer of ``candidates`` is scored first; sets then grow one layer at a time
    among the ``beam`` best single layers (the prompt at full depth, ``mode="mask"``).

    Returns:
        {"single": {layer: KL}, "sets": {k: {"skip": [...], "kl": KL}}} on these examples.
    """
    prepared = []
    for ex in examples:
        pre = prefill(model, None, torch.tensor([ex.prompt]))
        cont = torch.tensor([ex.response[:-1]])
        full = decode_hard(model, pre, cont, _mask(n_layer, []))[0]
        prepared.append((pre, cont, full))

    def cost(skip: Sequence[int]) -> float:
        kls = [compare(full, decode_hard(model, pre, cont, _mask(n_layer, skip))[0])[1].mean().item()
               for pre, cont, full in prepared]
        return float(np.mean(kls))

    t0 = time.monotonic()
    single = {i: cost([i]) for i in candidates}
    _log(f"static search: {len(candidates)} single layers scored in {time.monotonic() - t0:.0f} s")
    pool = sorted(single, key=single.get)[:beam]
    sets, chosen = {}, []
    for k in range(1, max_size + 1):
        options = {c: (single[c] if k == 1 else cost(chosen + [c])) for c in pool if c not in chosen}
        if not options:
            break
        best = min(options, key=options.get)
        chosen = chosen + [best]
        sets[k] = {"skip": sorted(chosen), "kl": options[best]}
        _log(f"static search: best {k}-layer skip set {sorted(chosen)}, train KL {options[best]:.4f}")
    return {"single": single, "sets": sets}


# --- the sweep ----------------------------------------------------------------------------------

def auto_thresholds(p_routable: np.ndarray, skips: Sequence[float] = AUTO_SKIPS) -> list[float]:
    """Thresholds at which the mean number of skipped layers over these prompts is each of ``skips``.

    Args:
        p_routable: (n_examples, n_routable) router probabilities of the layers that may skip.
    """
    values = np.sort(p_routable.ravel())
    n_ex, out = p_routable.shape[0], []
    for s in skips:
        k = int(round(s * n_ex))
        if 0 < k < values.size:
            out.append(float((values[k - 1] + values[k]) / 2))
    return sorted(set(out))


@torch.no_grad()
def score_examples(model, routers: FirstRouters, examples: list[Example], prefills: list,
                   thresholds: Sequence[float], static_sets: dict[int, list[int]]) -> tuple[dict, dict]:
    """Scores of every configuration per family, and each example's p and family.

    Args:
        prefills: ``prefill(model, routers, prompt)`` of each example.

    Returns:
        (scores[config][family] -> Scores, {"p": (n, n_layer) array, "family": [...]}) where
        config is ``("first", t)``, ``("static-full", k)`` or ``("static-masked", k)``.
    """
    scores: dict = {}
    info = {"p": [], "family": []}
    n_layer = routers.n_layer
    protected = routers.protected()
    for ex, pre in zip(examples, prefills):
        prompt, cont = torch.tensor([ex.prompt]), torch.tensor([ex.response])
        p = pre.p[0]
        info["p"].append(p.numpy().copy())
        info["family"].append(ex.family)
        rows = {}

        def run(keep: torch.Tensor) -> torch.Tensor:
            key = tuple(keep.tolist())
            if key not in rows:
                body = decode_hard(model, pre, cont[:, :-1], keep)[0] if cont.shape[1] > 1 else pre.last_logits[:0]
                rows[key] = torch.cat([pre.last_logits, body])
            return rows[key]

        full = run(torch.ones(n_layer, dtype=torch.bool))
        configs = [(("first", t), protected | (p >= t)) for t in thresholds]
        configs += [(("static-full", k), _mask(n_layer, s)) for k, s in static_sets.items()]
        for name, keep in configs:
            agree, kl = compare(full, run(keep))
            _add(scores, name, ex.family, agree, kl, int((~keep).sum()))
        for k, skip in static_sets.items():
            keep = _mask(n_layer, skip)
            logits, _, _ = first_generate_logits(model, None, prompt, cont, mode="mask", mask=keep, prefill="masked")
            agree, kl = compare(full, logits)
            _add(scores, ("static-masked", k), ex.family, agree, kl, len(skip))
    info["p"] = np.stack(info["p"])
    return scores, info


def _add(scores: dict, name, family: str, agree, kl, skipped: int) -> None:
    for fam in (family, "all"):
        scores.setdefault(name, {}).setdefault(fam, Scores()).add(agree, kl, skipped)


def skip_table(protected: Sequence[int], p: np.ndarray, families: Sequence[str],
               threshold: float) -> dict[str, list[float]]:
    """Per family (and "all"): for each layer, the fraction of prompts that skip it.

    Args:
        protected: Layers that always run.
        p: (n_examples, n_layer) router probabilities of the prompts.
        families: The family of each prompt.
        threshold: The decision threshold.
    """
    keep = _keep(protected, p, threshold)
    fams = np.array(families)
    table = {fam: (~keep[fams == fam]).mean(0).tolist() for fam in dict.fromkeys(families)}
    table["all"] = (~keep).mean(0).tolist()
    return table


def _keep(protected: Sequence[int], p: np.ndarray, threshold: float) -> np.ndarray:
    keep = np.asarray(p) >= threshold
    keep[:, list(protected)] = True
    return keep


def distinct_masks(protected: Sequence[int], p: np.ndarray, families: Sequence[str],
                   threshold: float) -> dict[str, int]:
    """Per family: how many different masks its prompts get."""
    keep, fams = _keep(protected, p, threshold), np.array(families)
    return {fam: len({tuple(row) for row in keep[fams == fam]}) for fam in dict.fromkeys(families)}


# --- the entry point --------------------------------------------------------------------------

def evaluate_routers(base: str, routers: str | RouterSet, tasks: Sequence[str] = FAMILIES,
                     n_per_family: int = 12, search_per_family: int = 4, cont_tokens: int = 32,
                     thresholds: Sequence[float] | None = None, static_sizes: int = 4,
                     report_threshold: float | None = None, seed: int = 0,
                     max_prompt_tokens: int = recipe.MAX_PROMPT_TOKENS,
                     max_response_tokens: int = recipe.MAX_RESPONSE_TOKENS,
                     out_dir: str | None = "docs", name: str = "first", threads: int | None = None,
                     model_and_tokenizer=None) -> dict:
    """Measure routers under the hard rule (module docstring) and write the report.

    Args:
        base: The base model the routers belong to (as for ``train_routers``).
        routers: A router file or a RouterSet.
        tasks: Built-in families to evaluate.
        n_per_family: Held-out prompts per family.
        search_per_family: Training examples per family on which static masks are chosen.
        cont_tokens: Length of the greedy continuations.
        thresholds: The sweep; default the routers' own threshold, ``ROUND_THRESHOLDS``, and
            the thresholds at which the mean skip count is each of ``AUTO_SKIPS`` on these prompts.
        static_sizes: Largest input-agnostic mask size searched (1..static_sizes).
        report_threshold: Threshold of the per-family skip table (default the routers' own).
        seed: Which examples are drawn.
        max_prompt_tokens, max_response_tokens: As in training (prompts, search responses).
        out_dir: Where ``<name>-eval.json``, ``<name>-quality.png`` and ``<name>-skips.png``
            go (None: write nothing).
        threads: torch CPU threads (see ``train_routers``).
        model_and_tokenizer: An already loaded (model, tokenizer) of ``base``.

    Returns:
        {"sweep": [...], "static": {...}, "skip_table": {...}, ...} (also the JSON report).
    """
    set_threads(threads)
    rs = routers if isinstance(routers, RouterSet) else load_router_file(routers)
    r = FirstRouters.from_router_set(rs).eval().requires_grad_(False)
    model, tokenizer = model_and_tokenizer or load_base(base)
    limits = Limits(max_prompt_tokens, max_response_tokens, context_length(model))
    held = build_examples(tokenizer, limits, None, tasks, n_per_family * len(tasks), seed, "heldout")
    held = greedy_continuations(model, tokenizer, held, cont_tokens, cache_key=f"{base}")
    search = build_examples(tokenizer, limits, None, tasks, search_per_family * len(tasks), seed, "train")
    candidates = [i for i in range(r.n_layer) if i not in r.protected_layers]
    t0 = time.monotonic()
    static = _cached(f"static-{base}", [[ex.prompt, ex.response] for ex in search] + [candidates, static_sizes],
                     lambda: search_static_masks(model, search, candidates, static_sizes, r.n_layer))
    with torch.no_grad():
        prefills = [prefill(model, r, torch.tensor([ex.prompt])) for ex in held]
    p_all = np.stack([pre.p[0].numpy() for pre in prefills])
    sweep = sorted(set(thresholds or ([rs.threshold, *ROUND_THRESHOLDS] + auto_thresholds(p_all[:, candidates]))))
    sets = {k: v["skip"] for k, v in static["sets"].items()}
    scores, info = score_examples(model, r, held, prefills, sweep, sets)
    _log(f"scored {len(held)} held-out examples in {time.monotonic() - t0:.0f} s")
    result = _result(scores, info, static, sweep, r, rs, report_threshold, held)
    if out_dir is not None:
        write_training_report(result, Path(out_dir), name)
    return result


def _result(scores, info, static, sweep, r, rs, report_threshold, held) -> dict:
    summary = {f"{kind}:{arg}": {fam: s.summary() for fam, s in by_fam.items()}
               for (kind, arg), by_fam in scores.items()}
    t_report = rs.threshold if report_threshold is None else report_threshold
    return {
        "sweep": [{"threshold": t, **summary[f"first:{t}"]["all"], "families": summary[f"first:{t}"]} for t in sweep],
        "static": {k: {"skip": v["skip"], "train_kl": v["kl"], "full": summary[f"static-full:{k}"],
                       "masked": summary[f"static-masked:{k}"]} for k, v in static["sets"].items()},
        "single_layer_train_kl": static["single"],
        "skip_table": {"threshold": t_report,
                       "layers": skip_table(r.protected_layers, info["p"], info["family"], t_report)},
        "distinct_masks": distinct_masks(r.protected_layers, info["p"], info["family"], t_report),
        "p_mean": {fam: info["p"][np.array(info["family"]) == fam].mean(0).tolist()
                   for fam in dict.fromkeys(info["family"])},
        "examples": {fam: sum(ex.family == fam for ex in held) for fam in dict.fromkeys(ex.family for ex in held)},
        "protected_layers": list(r.protected_layers),
        "train_source": rs.train_source,
        "per_example": {"family": info["family"], "source": [ex.source for ex in held], "p": info["p"].tolist()},
    }
