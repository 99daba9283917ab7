"""Figures shared by the demo, the trainer's validation and reports (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_image_grid(rows: list[np.ndarray], labels: list[str], path: str | Path) -> None:
    """Rows of uint8 images ``(n, H, W, 3)``, one labelled row per model: same column = same prompt/seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
