"""Figures for Experiment 1: learned vs target weights, per attribute, and recovery over training.

Uses the Agg backend so figures render without a display (clusters, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from selfinterp.analysis import pearson_r  # noqa: E402
from selfinterp.atomic import atomic_path  # noqa: E402

LIMIT = 105  # weights lie in -100..100; a small margin keeps points on the edge visible


def _r_text(r: float | None) -> str:
    return "r undefined" if r is None else f"r = {r:.3f}"


def _weight_axes(ax: Axes, learned: np.ndarray, targets: np.ndarray) -> None:
    """Scatter learned (y) against target (x) weights with the identity line, on -100..100 axes."""
    ax.plot([-100, 100], [-100, 100], color="grey", linestyle="--", linewidth=1)
    ax.scatter(targets, learned, s=12, alpha=0.6)
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xlabel("target weight")
    ax.set_ylabel("learned weight")


def _fit_rows(learned: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only the scenarios with learned weights (dropped ones are NaN rows)."""
    learned, targets = np.asarray(learned, dtype=float), np.asarray(targets, dtype=float)
    keep = ~np.isnan(learned).any(axis=1)
    return learned[keep], targets[keep]


def weight_comparison_figure(learned: np.ndarray, targets: np.ndarray, r: float | None) -> Figure:
    """All learned vs target weights in one scatter, with the pooled r in the title."""
    learned, targets = _fit_rows(learned, targets)
    fig, ax = plt.subplots(figsize=(5, 5))
    _weight_axes(ax, learned.ravel(), targets.ravel())
    ax.set_title(f"Learned vs target weights\n{_r_text(r)}, {len(learned)} scenarios")
    fig.tight_layout()
    return fig


def per_attribute_figure(learned: np.ndarray, targets: np.ndarray) -> Figure:
    """One panel per attribute position, each with its own r across scenarios."""
    learned, targets = _fit_rows(learned, targets)
    n = learned.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    for k, ax in enumerate(np.atleast_1d(axes)):
        _weight_axes(ax, learned[:, k], targets[:, k])
        ax.set_title(f"attribute {k + 1} ({_r_text(pearson_r(learned[:, k], targets[:, k]))})")
    fig.tight_layout()
    return fig


def recovery_curve_figure(
    epochs: Sequence[int], r: Sequence[float | None], agreement: Sequence[float | None],
    auc: Sequence[float | None] | None = None,
) -> Figure:
    """Pooled r, agreement with the target rule and (when given) the AUC of P(B) against training epoch.

    Epoch 0 is the base model.
    """

    def values(xs: Sequence[float | None]) -> np.ndarray:
        return np.array([np.nan if x is None else x for x in xs], dtype=float)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, values(r), marker="o", label="r (learned vs target weights)")
    ax.plot(epochs, values(agreement), marker="s", label="agreement with target rule")
    if auc is not None and any(a is not None for a in auc):
        ax.plot(epochs, values(auc), marker="^", label="AUC of P(B) for the rule's choice")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch (0 = base model)")
    ax.set_ylabel("value")
    ax.set_xticks(list(epochs))
    ax.set_title("Preference instillation over training")
    ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Save atomically (format from the suffix, since the temporary name ends in .tmp) and close the figure."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=150)
    finally:
        plt.close(fig)
