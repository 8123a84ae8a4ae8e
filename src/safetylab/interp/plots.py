"""Figures of the interpretability results: activation-patching heat maps (positions labelled with their
tokens) and the steering figure (the gold judge's rates with and without steering, and the addition curve).
Matplotlib's ``Figure`` API only (no pyplot state), written atomically by :func:`save_figure`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from safetylab.core.errors import SafetylabError
from safetylab.core.io import save_figure
from safetylab.interp.patching import PatchingResult
from safetylab.interp.steering import SteeringResult


def _heat_map(fig: Figure, ax, result: PatchingResult, title: str, labels: Sequence[str] | None) -> None:
    scores = result.scores.numpy()
    limit = max(1.0, float(abs(scores).max()))
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(result.names)), result.names, fontsize=7)
    columns = labels or result.labels or [str(i) for i in range(scores.shape[1])]
    if len(columns) != scores.shape[1]:
        raise SafetylabError(f"plot_patching: {len(columns)} labels for {scores.shape[1]} {result.axis}s; expected "
                             "one label a column")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)


def plot_patching(results: dict[str, PatchingResult], path: str | os.PathLike, title: str = "Activation patching",
                  labels: Sequence[str] | None = None) -> Path:
    """One heat map a result (title: its key), rows the hook points, columns the positions (labelled with the
    clean prompt's tokens, ``labels`` or each result's own) or the heads; colour the normalised score
    (1: the clean run's metric, 0: the corrupted run's)."""
    if not results:
        raise SafetylabError("plot_patching: no patching results to plot")
    fig = Figure(figsize=(max(5.0, 0.45 * max(r.scores.shape[1] for r in results.values()) + 2.5),
                          sum(1.2 + 0.3 * len(r.names) for r in results.values())))
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, (name, result) in zip(axes, results.items()):
        _heat_map(fig, ax, result, f"{name} ({result.mode}, {int(result.clean.shape[0])} pairs)",
                  labels if result.axis == "position" else None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_steering(result: SteeringResult, path: str | os.PathLike,
                  title: str = "Refusal direction: ablation and addition") -> Path:
    """Left: the gold judge's rates (harmful compliance, jailbreak success, over-refusal, accuracy) with no
    steering, with the direction ablated and with it added. Right: over-refusal and accuracy (left axis) and
    the per-token KL cost (right axis) against the addition scale."""
    fig = Figure(figsize=(10, 4.2))
    bars, curve = fig.subplots(1, 2)
    metrics = ("harmful_compliance", "jailbreak_success", "harmful_refusal", "over_refusal", "accuracy")
    width = 0.8 / len(result.conditions)
    for i, row in enumerate(result.conditions):
        values = [row[m] if row[m] is not None else 0.0 for m in metrics]
        name = row["condition"] if row.get("scale") is None else f"{row['condition']} ×{row['scale']:g}"
        bars.bar([j + i * width for j in range(len(metrics))], values, width,
                 label=f"{name} (KL {row['kl_per_token']:.3f}/token)")
    bars.set_xticks([j + width * (len(result.conditions) - 1) / 2 for j in range(len(metrics))],
                    [m.replace("_", "\n") for m in metrics], fontsize=8)
    bars.set(ylim=(0, 1.05), ylabel="rate (gold judge)", title=f"held-out prompts, layer {result.layer}")
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(result.conditions))
    sweep = sorted(result.sweep, key=lambda r: r["scale"])
    if sweep:
        scales = [r["scale"] for r in sweep]
        curve.plot(scales, [r["over_refusal"] or 0.0 for r in sweep], "o-", label="over-refusal")
        curve.plot(scales, [r["accuracy"] or 0.0 for r in sweep], "s-", label="accuracy")
        curve.axvline(result.scale, color="black", linewidth=0.6, linestyle=":", label="chosen on validation")
        kl = curve.twinx()
        kl.plot(scales, [r["kl_per_token"] for r in sweep], "^--", color="gray", label="KL per token")
        kl.set_ylabel("KL(steered ‖ unsteered) per token")
        kl.legend(fontsize=7, loc="center right")
        curve.set(xlabel="addition scale α", ylabel="rate on harmless prompts", ylim=(0, 1.05),
                  title="activation addition")
        curve.legend(fontsize=7, loc="upper left")
    else:
        curve.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["plot_patching", "plot_steering"]
