"""Goodhart curves: how the proxy reward and the gold utility move as optimisation spends KL."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from safetylab.align.best_of_n import RewardFn, best_of_n
from safetylab.align.evaluate import summarize
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
