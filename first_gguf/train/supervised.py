"""Routers that follow the damage: fit p_i to each prompt's measured cost of skipping layer i.

The target of router i on a prompt is ``y_i = d_i / (d_i + d_ref)``, where d_i is the damage
label (``damage.py``: the mean KL to the full model when layer i alone is skipped along the
full model's own continuation) and ``d_ref`` the damage that maps to p = 0.5. The runtime's
rule "run layer i when p_i >= threshold" then reads "skip the layers whose predicted damage
is below d_ref * T / (1 - T)": how much a prompt skips follows how cheap its layers are, not
which template it was written in.

The routers read the hidden states the runtime itself computes (llama.cpp's layer-input
capture at full depth), so there is no gap between the states they were fitted on and the
states they see. p_i is the mean of a per-token router over the prompt, exactly as at run
time; the loss is binary cross-entropy between p_i and y_i (soft targets).
"""

from __future__ import annotations

import math
import sys
import warnings
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FirstError
from ..router import FirstRouters


@dataclass(frozen=True)
class FitConfig:
    """Fit settings; the defaults had the lowest cross-validated loss on the default model's
    144 labelled prompts (docs/TRAINING.md: wider routers or longer fits memorize them)."""

    hidden_size: int = 16
    d_ref: float = 0.03
    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 0.05
    batch: int = 16
    seed: int = 0
    heldout_percent: int = 10


def targets(kl: np.ndarray, d_ref: float) -> np.ndarray:
    """y = d / (d + d_ref) per (prompt, layer); NaN (unmeasured, protected) stays NaN."""
    d = np.maximum(kl, 0.0)
    return d / (d + d_ref)


def capture_states(model_path: str | Path, prompts: Sequence[Sequence[int]], threads: int | None = None,
                   dtype=np.float16) -> list[np.ndarray]:
    """[n_layer, T, n_embd] hidden states entering each layer, per prompt, from the runtime."""
    from tqdm import tqdm

    from ..runtime import FirstModel

    n_ctx = max(len(p) for p in prompts) + 8
    llm = FirstModel(model_path, mode="full", n_ctx=n_ctx, n_batch=512, n_threads=threads)
    return [llm.layer_inputs(list(p)).astype(dtype) for p in tqdm(prompts, desc="states", file=sys.stderr)]


class _Stacked(torch.nn.Module):
    """All routers as stacked tensors, so one call scores every layer of a prompt."""

    def __init__(self, n_layer: int, n_embd: int, hidden: int, eps: float, bias_init: torch.Tensor, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.eps = eps
        self.g = torch.nn.Parameter(torch.ones(n_layer, n_embd))
        self.w1 = torch.nn.Parameter(torch.randn(n_layer, hidden, n_embd, generator=gen) / math.sqrt(n_embd))
        self.b1 = torch.nn.Parameter(torch.zeros(n_layer, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(n_layer, hidden, generator=gen) / math.sqrt(hidden) * 0.1)
        self.b2 = torch.nn.Parameter(bias_init.clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [n_layer, T, n_embd] -> p [n_layer], the mean over tokens of each router."""
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.g[:, None, :]
        z = F.silu(torch.einsum("ltd,lhd->lth", x, self.w1) + self.b1[:, None, :])
        logits = torch.einsum("lth,lh->lt", z, self.w2) + self.b2[:, None]
        return torch.sigmoid(logits).mean(-1)

    def to_routers(self, threshold: float, protected: Sequence[int], source: str) -> FirstRouters:
        n_layer, hidden, n_embd = self.w1.shape
        r = FirstRouters(n_layer, n_embd, hidden, self.eps, threshold, protected, source)
        with torch.no_grad():
            for i, router in enumerate(r.routers):
                router.g.copy_(self.g[i])
                router.w1.weight.copy_(self.w1[i])
                router.w1.bias.copy_(self.b1[i])
                router.w2.weight.copy_(self.w2[i][None, :])
                router.w2.bias.copy_(self.b2[i][None])
        return r


def split_heldout(sources: Sequence[str], percent: int) -> np.ndarray:
    """True for the rows held out of the fit (by a hash of the source: stable across runs)."""
    import zlib

    return np.array([zlib.crc32(s.encode()) % 100 < percent for s in sources])


def fit(states: list[np.ndarray], kl: np.ndarray, protected: Sequence[int], cfg: FitConfig,
        norm_eps: float = 1e-6, log=None) -> tuple[_Stacked, dict]:
    """Fit stacked routers to the damage targets; returns the model and per-epoch losses."""
    n, n_layer = kl.shape
    y = torch.from_numpy(np.nan_to_num(targets(kl, cfg.d_ref), nan=1.0)).float()
    measured = torch.from_numpy(~np.isnan(kl))
    if measured.sum() == 0:
        raise FirstError("no layer has a damage label")
    prior = torch.nanmean(torch.where(measured, y, torch.nan), 0)
    bias = torch.logit(torch.nan_to_num(prior, nan=0.5).clamp(0.02, 0.98))
    model = _Stacked(n_layer, states[0].shape[-1], cfg.hidden_size, norm_eps, bias, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = np.random.default_rng(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        t0, total = time.perf_counter(), 0.0
        order = gen.permutation(n)
        for start in range(0, n, cfg.batch):
            idx = order[start:start + cfg.batch]
            opt.zero_grad()
            loss = 0.0
            for j in idx:
                p = model(torch.from_numpy(states[j]).float())
                loss = loss + F.binary_cross_entropy(p[measured[j]], y[j][measured[j]], reduction="sum")
            loss = loss / len(idx)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        history.append(total / n)
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / n:.4f} ({time.perf_counter() - t0:.1f} s)")
    return model, {"loss": history}


@torch.no_grad()
def predict(model: _Stacked, states: list[np.ndarray]) -> np.ndarray:
    return np.stack([model(torch.from_numpy(s).float()).numpy() for s in states])


def bce(y: np.ndarray, p: np.ndarray) -> float:
    """Binary cross-entropy of predictions ``p`` against soft targets ``y``, summed over layers, mean over rows."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(np.nansum(-(y * np.log(p) + (1 - y) * np.log(1 - p)), axis=1).mean())


def cross_validate(states: list[np.ndarray], kl: np.ndarray, sources: Sequence[str], protected: Sequence[int],
                   cfg: FitConfig, folds: int = 4) -> tuple[dict, np.ndarray]:
    """K-fold cross-validation (folds by a hash of the source): held-out BCE of the fitted routers
    and of a constant per layer (the training folds' mean target), and every row's held-out p."""
    import zlib

    fold = np.array([zlib.crc32(s.encode()) % folds for s in sources])
    pred = np.full(kl.shape, np.nan)
    fitted, constant = [], []
    for f in range(folds):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model, _ = fit([states[i] for i in train], kl[train], protected, cfg)
        pred[test] = predict(model, [states[i] for i in test])
        y, y_train = targets(kl[test], cfg.d_ref), targets(kl[train], cfg.d_ref)
        fitted.append(bce(y, pred[test]))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the protected layers
            mean = np.nanmean(y_train, 0)
        constant.append(bce(y, np.broadcast_to(mean, y.shape)))
    return {"bce": float(np.mean(fitted)), "bce_constant": float(np.mean(constant))}, pred


def fit_routers(model_path: str | Path, labels: str | Path, out: str | Path, cfg: FitConfig = FitConfig(),
                threshold: float = 0.5, threads: int | None = None, force: bool = False, log=None,
                cv: int = 0) -> dict:
    """Fit routers to a damage label file and write them as a router file.

    Args:
        model_path: The GGUF the labels were measured on (its runtime computes the states).
        labels: A ``damage.make_labels`` file.
        out: Router file to write (.safetensors).
        cfg: Fit settings.
        threshold: The decision threshold stored in the file.

    Returns:
        ``{"out", "history", "heldout"}``: the held-out rows' predictions against their labels.
    """
    from ..format import save_router_file
    from ..damage import kl_matrix, read_labels

    head, rows = read_labels(labels)
    if not rows:
        raise FirstError(f"{labels}: no labelled prompts")
    if cv == 1 or cv > len(rows):
        raise FirstError(f"--cv {cv}: needs 2 to {len(rows)} folds (or 0 for none)")
    kl = kl_matrix(rows)
    protected = [i for i in range(kl.shape[1]) if np.isnan(kl[:, i]).all()]
    states = capture_states(model_path, [r["prompt"] for r in rows], threads)
    if cv:
        scores, pred = cross_validate(states, kl, [r["source"] for r in rows], protected, cfg, cv)
        if log:
            log(f"{cv}-fold cross-validation: BCE {scores['bce']:.3f} (a constant per layer: "
                f"{scores['bce_constant']:.3f})")
            for line in heldout_lines(pred, kl, kl, protected, (0.35, 0.4, 0.45, 0.5)):
                log(line.replace("held-out", "cross-validated"))
    held = split_heldout([r["source"] for r in rows], cfg.heldout_percent)
    train_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
    model, hist = fit([states[i] for i in train_idx], kl[train_idx], protected, cfg, log=log)
    pred = predict(model, [states[i] for i in held_idx]) if len(held_idx) else np.zeros((0, kl.shape[1]))
    if log and len(held_idx):
        for line in heldout_lines(pred, kl[held_idx], kl[train_idx], protected):
            log(line)
    source = f"damage-supervised: {Path(labels).name}, d_ref {cfg.d_ref}, {len(train_idx)} prompts"
    routers = model.to_routers(threshold, protected, source)
    path = save_router_file(routers.to_router_set(), out, force=force)
    return {"out": path, "history": hist["loss"], "heldout": {"p": pred.tolist(), "kl": kl[held_idx].tolist(),
                                                              "family": [rows[i]["family"] for i in held_idx]}}


def heldout_lines(pred: np.ndarray, kl: np.ndarray, train_kl: np.ndarray, protected: Sequence[int],
                  thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7)) -> list[str]:
    """Held-out prompts per threshold: layers skipped, and the summed single-layer damage of the
    routers' choice against the same number of layers in the training prompts' mean-damage order."""
    free = [i for i in range(kl.shape[1]) if i not in set(protected)]
    order = [free[j] for j in np.argsort(np.nanmean(train_kl[:, free], 0), kind="stable")]  # measured layers only
    lines = []
    for t in thresholds:
        chosen = [[i for i in free if p[i] < t] for p in pred]
        routed = np.mean([np.nansum(d[c]) for d, c in zip(kl, chosen)])
        static = np.mean([np.nansum(d[order[:len(c)]]) for d, c in zip(kl, chosen)])
        lines.append(f"held-out, threshold {t}: {np.mean([len(c) for c in chosen]):.2f} layers skipped, summed "
                     f"damage {routed:.4f} (routers) vs {static:.4f} (fixed order, same counts)")
    return lines
