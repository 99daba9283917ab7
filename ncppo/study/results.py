"""``ncppo study results``: majority votes, win rates of B over A with bootstrap intervals (the paper's
Fig 5), agreement between annotators, a bar chart and vote exports.

Per item and question, the majority of its votes decides (A, B or tie; no majority is a tie). Only
items with all their votes count. Agreement: the share of items where every annotator agreed, and
Fleiss' kappa over the three answer categories.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ncppo.io import atomic_write_text
from ncppo.study.store import QUESTION_TEXT, QUESTIONS

CATEGORIES = ("B", "tie", "A")


def majority(answers: list[str]) -> str:
    counts = Counter(answers).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0]


def fleiss_kappa(table: np.ndarray) -> float:
    """Fleiss' kappa of an (items x categories) count table with the same number of raters per item."""
    n = table.sum(axis=1)[0]
    if len(table) == 0 or n < 2:
        return float("nan")
    p_j = table.sum(axis=0) / table.sum()
    p_i = ((table * (table - 1)).sum(axis=1)) / (n * (n - 1))
    p_e = (p_j**2).sum()
    return float((p_i.mean() - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def study_results(store, n_boot: int = 2000, seed: int = 0) -> dict:
    need = store.votes_per_item
    by_item: dict[int, list[dict]] = {}
    for vote in store.votes():
        by_item.setdefault(vote["item_id"], []).append(vote)
    complete = {i: v for i, v in by_item.items() if len(v) >= need}
    result = {"items": len(store.items()), "items_complete": len(complete), "votes": sum(len(v) for v in by_item.values()),
              "votes_per_item": need, "questions": {}}
    rng = np.random.default_rng(seed)
    for q in QUESTIONS:
        outcomes = np.array([majority([v[f"{q}_ab"] for v in votes]) for votes in complete.values()])
        entry = {"question": QUESTION_TEXT[q]}
        if len(outcomes):
            shares = {c: float((outcomes == c).mean()) for c in CATEGORIES}
            draws = outcomes[rng.integers(len(outcomes), size=(n_boot, len(outcomes)))]
            intervals = {c: [float(np.quantile((draws == c).mean(axis=1), x)) for x in (0.025, 0.975)] for c in CATEGORIES}
            score = np.where(outcomes == "B", 1.0, np.where(outcomes == "tie", 0.5, 0.0))
            boot = score[rng.integers(len(score), size=(n_boot, len(score)))].mean(axis=1)
            table = np.array([[sum(v[f"{q}_ab"] == c for v in votes[:need]) for c in CATEGORIES] for votes in complete.values()])
            entry.update(win=shares["B"], tie=shares["tie"], loss=shares["A"], intervals=intervals,
                         win_rate_ties_half=float(score.mean()),
                         win_rate_ties_half_interval=[float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                         full_agreement=float((table.max(axis=1) == need).mean()), fleiss_kappa=fleiss_kappa(table))
        result["questions"][q] = entry
    return result


def save_results_chart(result: dict, path: str | Path) -> None:
    from ncppo.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 2.6))
    labels = []
    for row, q in enumerate(QUESTIONS):
        e = result["questions"][q]
        labels.append(f"{q.upper()}: {e['question']}")
        left = 0.0
        for key, colour in (("win", "tab:blue"), ("tie", "lightgrey"), ("loss", "tab:orange")):
            share = 100 * e.get(key, 0.0)
            ax.barh(row, share, left=left, color=colour, label=key if row == 0 else None)
            if share >= 6:
                ax.text(left + share / 2, row, f"{share:.0f}%", ha="center", va="center", fontsize=8)
            left += share
    ax.set_yticks(range(len(QUESTIONS)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of {result['items_complete']} items (majority of {result['votes_per_item']} votes): B win / tie / B loss")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_votes(store, folder: str | Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    votes = store.votes()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(votes[0]) if votes else ["id", "item_id", "annotator_name", "q1", "q2", "q3"]
    tmp = folder / ".tmp-votes.csv"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(votes)
    tmp.replace(folder / "votes.csv")
    table = pa.Table.from_pylist(votes) if votes else pa.table({c: pa.array([], pa.string()) for c in columns})
    pq.write_table(table, folder / ".tmp-votes.parquet")
    (folder / ".tmp-votes.parquet").replace(folder / "votes.parquet")
    return [folder / "votes.csv", folder / "votes.parquet"]


def write_results(store, folder: str | Path) -> dict:
    folder = Path(folder)
    result = study_results(store)
    atomic_write_text(folder / "results.json", json.dumps(result, indent=2))
    save_results_chart(result, folder / "results.png")
    export_votes(store, folder)
    return result
