"""Goodhart curves: how the proxy reward and the gold utility move as optimisation spends KL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from safetylab.align.best_of_n import RewardFn, best_of_n
from safetylab.align.evaluate import summarize
from safetylab.align.overopt import GoodhartFit
from safetylab.core.io import save_figure
from safetylab.core.seeding import seed_everything
from safetylab.world.judge import GoldJudge
from safetylab.world.requests import Request


def best_of_n_curve(policy, tokenizer, judge: GoldJudge, requests: Sequence[Request], reward: RewardFn,
                    sizes: Sequence[int], kl_samples: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """For each n: mean proxy reward and gold metrics of the kept responses, the KL bound and the
    KL estimate (see :mod:`safetylab.align.best_of_n`). Each n starts from the same seed."""
    rows = []
    for n in sizes:
        seed_everything(seed)
        result = best_of_n(policy, tokenizer, [r.prompt for r in requests], reward, n, kl_samples)
        gold = summarize([judge.score(q, text).to_dict() for q, text in zip(requests, result.responses)])
        rows.append({"n": n, "proxy": round(result.proxy.mean().item(), 6), "gold_utility": gold["gold_utility"],
                     "harmful_compliance": gold["harmful_compliance"], "accuracy": gold["accuracy"],
                     "kl_bound": round(result.kl_bound, 6),
                     "kl_estimate": None if result.kl is None else round(result.kl.mean().item(), 6)})
    return rows


def plot_curve(rows: Sequence[dict[str, Any]], path: Path, title: str = "Best-of-n: proxy against gold") -> Path:
    """Change in proxy reward and in gold utility against √KL (the bound), from n = the first row."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    root_kl = [r["kl_bound"] ** 0.5 for r in rows]
    ax.plot(root_kl, [r["proxy"] - rows[0]["proxy"] for r in rows], "o-", label="proxy reward (change)")
    ax.plot(root_kl, [(r["gold_utility"] or 0) - (rows[0]["gold_utility"] or 0) for r in rows], "s-",
            label="gold utility (change)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(xlabel="√KL (bound)", title=title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_overoptimization(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Gold change against √KL, one panel per labeler and amount of comparisons, one colour per reward-model
    depth: the measured best-of-n points and the fitted d(α − βd) (the overoptimization stage's results)."""
    panels = list(dict.fromkeys((r["labeler"], r["pairs"]) for r in results))
    fig = Figure(figsize=(4 * len(panels), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    depths = sorted({r["depth"] for r in results})
    colours = {d: f"C{i}" for i, d in enumerate(depths)}
    for ax, (labeler, pairs) in zip(axes, panels):
        for r in (r for r in results if (r["labeler"], r["pairs"]) == (labeler, pairs)):
            d = np.array([row["d"] for row in r["curve"]])
            gold = np.array([row["gold"] - r["curve"][0]["gold"] for row in r["curve"]])
            smooth = np.linspace(0, d.max(), 50)
            ax.plot(d, gold, "o", color=colours[r["depth"]], label=f"{r['depth']} block(s)")
            ax.plot(smooth, GoodhartFit(**r["fit"]).predict(smooth), "-", color=colours[r["depth"]], alpha=0.7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(xlabel="√KL", title=f"{labeler} labels, {pairs} comparisons")
    axes[0].set_ylabel("gold utility (change)")
    axes[0].legend(title="proxy reward model")
    fig.tight_layout()
    return save_figure(fig, path)
