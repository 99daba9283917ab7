"""Figures shared by the demo, the trainer's validation and reports (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_image_grid(rows: list[np.ndarray], labels: list[str], path: str | Path) -> None:
    """Rows of uint8 images ``(n, H, W, 3)``, one labelled row per model: same column = same prompt/seed."""
    plt = _pyplot()
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.5 * len(rows)), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            axes[r][c].imshow(images[c])
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_reward_curves(curves: dict[str, list[dict]], path: str | Path, ylabel: str = "mean reward",
                       baseline: float | None = None) -> None:
    """Reward against training time, one line per run (points: ``train_seconds``, ``mean``): the paper's Fig 4."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours: dict[str, str] = {}
    for name, points in curves.items():
        # X and NCP-X share a colour (by method and data); noise space dashed, NCP solid
        family = name.replace("ncp-", "")
        colour = colours.setdefault(family, f"C{len(colours) % 10}")
        ax.plot([p["train_seconds"] for p in points], [p["mean"] for p in points], "-o" if "ncp-" in name else "--o",
                color=colour, label=name, markersize=3)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linewidth=0.8, label="base model")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_win_rate_bars(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Horizontal bars of win rates (``rate``, ``low``, ``high``, label from ``b`` and ``a``) with 95% intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    y = np.arange(len(rows))
    rates = np.array([r["rate"] for r in rows]) * 100
    err = np.array([[r["rate"] - r["low"], r["high"] - r["rate"]] for r in rows]).T * 100
    ax.barh(y, rates, xerr=err, color=["tab:blue" if r["rate"] >= 0.5 else "tab:orange" for r in rows], capsize=3)
    ax.axvline(50, color="black", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['b']} vs {r['a']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate % (ties half), 95% bootstrap interval")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
