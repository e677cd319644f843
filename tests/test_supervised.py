"""Routers fitted to damage labels: they learn which prompts make a layer expensive, and export exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from first_gguf.train.supervised import FitConfig, cross_validate, fit, predict, targets


def _prompts(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Two kinds of prompt: kind 1 marks the inputs of layers 1-2 (dim 0) and makes layer 1 costly, layer 2 cheap."""
    rng = np.random.default_rng(seed)
    states, kl, kind = [], [], []
    for j in range(n):
        k = j % 2
        h = rng.normal(size=(4, int(rng.integers(5, 12)), 16)).astype(np.float32)
        h[1:3, :, 0] += 4.0 if k else -4.0  # the residual stream carries the kind to both layers
        states.append(h)
        kl.append([np.nan, 0.3 if k else 0.003, 0.003 if k else 0.3, np.nan])
        kind.append(k)
    return states, np.array(kl), np.array(kind)


def test_targets():
    y = targets(np.array([[np.nan, 0.0, 0.03, 0.09]]), 0.03)
    assert np.isnan(y[0, 0]) and y[0, 1:].tolist() == pytest.approx([0.0, 0.5, 0.75])


def test_fit_follows_the_damage_per_prompt_and_exports_exactly():
    states, kl, _ = _prompts(32, seed=0)
    cfg = dataclasses.replace(FitConfig(), hidden_size=8, epochs=40, batch=8, lr=1e-2)
    model, hist = fit(states, kl, protected=[0, 3], cfg=cfg)
    floor = 2 * float(torch.nn.functional.binary_cross_entropy(torch.tensor(0.909), torch.tensor(0.909)))
    assert hist["loss"][-1] - floor < 0.25 * (hist["loss"][0] - floor)  # most of the way to the targets' entropy
    held, held_kl, kind = _prompts(8, seed=1)
    p = predict(model, held)
    costly = np.where(kind[:, None] == 1, [1, 2], [2, 1])  # per prompt: (costly layer, cheap layer)
    for row, (hi, lo) in zip(p, costly):
        assert row[hi] > 0.5 > row[lo], row  # threshold 0.5 keeps the costly layer and skips the cheap one
    routers = model.to_routers(0.5, [0, 3], "test")
    with torch.no_grad():
        for h, row in zip(held, p):
            exported = [float(routers.layer_prob(i, torch.from_numpy(h[i])[None])) for i in range(4)]
            assert exported == pytest.approx(row.tolist(), abs=1e-6)
    rs = routers.to_router_set()
    assert rs.threshold == 0.5 and rs.protected_layers == [0, 3] and rs.hidden_size == 8


def test_cross_validation_beats_a_constant_only_where_the_prompt_tells():
    states, kl, _ = _prompts(24, seed=2)
    cfg = dataclasses.replace(FitConfig(), hidden_size=8, epochs=20, batch=8, lr=1e-2)
    sources = [f"p{i}" for i in range(len(states))]
    informative, pred = cross_validate(states, kl, sources, [0, 3], cfg, folds=3)
    assert informative["bce"] < 0.8 * informative["bce_constant"]
    shuffled = kl[np.random.default_rng(0).permutation(len(kl))]  # labels no longer follow the states
    blind, _ = cross_validate(states, shuffled, sources, [0, 3], cfg, folds=3)
    assert blind["bce"] > 0.95 * blind["bce_constant"]
