"""Figures shared by the demo, the trainer's validation and reports (matplotlib, no display).

Every model keeps one colour and one marker across a report's figures (:func:`model_style`, by its
position in the report's list of sets), and every figure that shows an estimate shows its 95% interval
and the number of prompts it rests on.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")  # tab10 reordered so that the first three (base, DPO, NCP-DPO) are far apart
REWARD_COLOURS = ("#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3", "#a6d854", "#ffd92f")  # bars by reward: no model's colour


def model_style(index: int) -> dict:
    """The colour and marker of the ``index``-th model of a figure (the same in every figure of a report).
    Past the tenth model the marker shifts by one per round of colours, so the first 100 pairs are distinct
    (the toy reproduction draws 14 runs)."""
    return {"color": COLOURS[index % len(COLOURS)],
            "marker": MARKERS[(index + index // len(COLOURS)) % len(MARKERS)]}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(rows: list[np.ndarray], labels: list[str], path: str | Path, column_titles: list[str] | None = None,
                    cell_notes: list[list[str]] | None = None, colours: list[str] | None = None) -> None:
    """Rows of uint8 images ``(n, H, W, 3)``, one labelled row per model: same column = same prompt/seed.

    ``column_titles``: a text per column (the prompt), wrapped above it; ``cell_notes``: a text under each
    image (``cell_notes[row][column]``, e.g. its scores); ``colours``: a colour per row label.
    """
    plt = _pyplot()
    n = rows[0].shape[0]
    width = 1.6 if column_titles or cell_notes else 1.4
    title_lines = 4 if column_titles else 0
    fig, axes = plt.subplots(len(rows), n, figsize=(width * n + 0.4, (1.5 + (0.3 if cell_notes else 0)) * len(rows)
                                                     + 0.13 * title_lines), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if cell_notes is not None:
                ax.set_xlabel(cell_notes[r][c], fontsize=6.5)
            if r == 0 and column_titles is not None:
                wrapped = textwrap.wrap(column_titles[c], 26)
                text = "\n".join(wrapped[:title_lines]) + (" ..." if len(wrapped) > title_lines else "")
                ax.set_title(text, fontsize=6, loc="left")
        axes[r][0].set_ylabel(label, fontsize=8, color=colours[r] if colours else "black",
                              fontweight="bold" if colours else "normal")
    fig.tight_layout()
    fig.savefig(path, dpi=90 if column_titles or cell_notes else 80)
    plt.close(fig)


def save_reward_curves(curves: dict[str, list[dict]], path: str | Path, ylabel: str = "mean reward",
                       baseline: float | None = None, prompts: int | None = None, title: str | None = None,
                       style_index: dict[str, int] | None = None, x_key: str = "train_seconds",
                       xlabel: str = "training time (s)",
                       band_label: str = "bands: 95% bootstrap interval over prompts") -> None:
    """Reward against training time, one line per run (points: ``x_key``, ``mean``, and optionally
    ``low``/``high``, drawn as a band described by ``band_label``): the paper's Fig 4. Each run has its own colour and marker
    (``style_index``: a run's :func:`model_style` index, to match a report's other figures)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    banded = False
    used = set((style_index or {}).values())
    free = (i for i in range(1, 1000) if i not in used)  # 0 is the base model's
    for name, points in curves.items():
        style = model_style((style_index or {}).get(name) if name in (style_index or {}) else next(free))
        x = [p[x_key] for p in points]
        ax.plot(x, [p["mean"] for p in points], "-", color=style["color"], marker=style["marker"], label=name,
                markersize=5, linewidth=1.6)
        if all("low" in p and "high" in p for p in points):
            banded = True
            ax.fill_between(x, [p["low"] for p in points], [p["high"] for p in points], color=style["color"],
                            alpha=0.15, linewidth=0)
    if baseline is not None:
        ax.axhline(baseline, color=model_style(0)["color"], linewidth=1, linestyle=":", label="base model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    parts = [title] if title else []
    if prompts is not None:
        parts.append(f"{prompts} prompts")
    if banded:
        parts.append(band_label)
    if parts:
        ax.set_title("; ".join(parts), fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_win_rate_bars(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Horizontal bars of win rates with their 95% intervals, one bar per row (``rate``, ``low``, ``high``, the
    label from ``b`` and ``a``, optionally ``reward`` and ``prompts``); the colour is the reward, named in the
    legend, and each bar carries its value and interval as text."""
    plt = _pyplot()
    rewards = list(dict.fromkeys(r.get("reward", "") for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.6))
    y = np.arange(len(rows))
    rates = np.array([r["rate"] for r in rows]) * 100
    err = np.array([[r["rate"] - r["low"], r["high"] - r["rate"]] for r in rows]).T * 100
    colours = {reward: REWARD_COLOURS[i % len(REWARD_COLOURS)] for i, reward in enumerate(rewards)}
    for reward in rewards:
        idx = [i for i, r in enumerate(rows) if r.get("reward", "") == reward]
        ax.barh(y[idx], rates[idx], xerr=err[:, idx], color=colours[reward], capsize=3, height=0.7,
                label=f"reward: {reward}" if reward else "win rate of B", error_kw={"linewidth": 1})
    for i, r in enumerate(rows):
        ax.text(101, i, f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]", va="center", fontsize=7)
    ax.axvline(50, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['b']} vs {r['a']}" + (f" ({r['prompts']} prompts)" if "prompts" in r else "")
                        for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("win rate of the first-named model, % (ties count half); line: 95% interval; dashed: 50%",
                  fontsize=8)
    ax.set_title(title, fontsize=9, pad=22)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(rewards), 4), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_mean_rewards(means: dict[str, dict[str, dict]], path: str | Path, labels: list[str]) -> None:
    """Each set's mean reward with its 95% interval, one panel per reward: ``means[reward][label]`` holds
    ``mean``, ``low``, ``high`` and ``prompts``; each set keeps its colour and marker (its place in ``labels``)."""
    plt = _pyplot()
    rewards = list(means)
    fig, axes = plt.subplots(1, len(rewards), figsize=(3.4 * len(rewards) + 1.6, 0.45 * len(labels) + 1.4),
                             squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for index, label in enumerate(labels):
            m = means[reward].get(label)
            if m is None:
                continue
            style = model_style(index)
            ax.errorbar([m["mean"]], [index], xerr=[[m["mean"] - m["low"]], [m["high"] - m["mean"]]], fmt=style["marker"],
                        color=style["color"], capsize=3, markersize=6, label=label)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        prompts = {m["prompts"] for m in means[reward].values()}
        ax.set_title(f"{reward} ({', '.join(map(str, sorted(prompts)))} prompts)", fontsize=9)
        ax.set_xlabel(f"mean {reward}, 95% interval", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="x", labelsize=7)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
