"""``ncppo study results``: majority votes, win rates of B over A with bootstrap intervals (the paper's
Fig 5), agreement between annotators, checks of the annotators, a bar chart and vote exports.

The output folder (``STUDY/results`` by default) is written whole and atomically and follows
:func:`ncppo.io.guard_output_dir`: an earlier results folder is replaced, any other non-empty folder, a file,
or a folder holding the study itself is refused (``overwrite`` replaces the first).

Per item and question, the majority of its votes decides (A, B or tie; no majority is a tie). Only
items with all their votes count; gold items never count towards A and B. Agreement: the share of items
where every annotator agreed, and Fleiss' kappa over the three answer categories.

Checks: **position bias**, per question, the share of decisive votes (not ties) for the left image, with
its 95% Wilson interval and an exact two-sided binomial test against 1/2 (sides are drawn at random, so a
share far from 1/2 means annotators favour a side); **per annotator**, the share of their answers on
complete items that equal the item's majority (their own vote included), and their accuracy on gold
items (answers on the questions each gold item checks).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ncppo.io import atomic_directory, guard_output_dir, mark_output_dir, unmarked_output
from ncppo.study.store import QUESTION_TEXT, QUESTIONS

CATEGORIES = ("B", "tie", "A")
COMMAND = "study results"
RESULT_FILES = ("results.json", "results.png", "votes.csv", "votes.parquet")


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


def binomial_p_value(k: int, n: int) -> float:
    """Exact two-sided binomial test of ``k`` successes in ``n`` against p = 1/2."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def position_bias(votes: list[dict]) -> dict:
    out = {}
    for q in QUESTIONS:
        counts = Counter(v[q] for v in votes)
        n = counts["left"] + counts["right"]
        out[q] = {"left": counts["left"], "right": counts["right"], "tie": counts["tie"],
                  "left_share_of_decisive": counts["left"] / n if n else None,
                  "interval": wilson_interval(counts["left"], n), "p_value": binomial_p_value(counts["left"], n)}
    return out


def annotator_checks(votes: list[dict], complete: dict[int, list[dict]], gold: dict[int, list[str]]) -> dict:
    """Per annotator: agreement with the majority on complete items, and accuracy on gold items."""
    majorities = {(i, q): majority([v[f"{q}_ab"] for v in vs]) for i, vs in complete.items() for q in QUESTIONS}
    out: dict[str, dict] = {}
    for v in votes:
        entry = out.setdefault(v["annotator_name"], {"votes": 0, "agreed": 0, "compared": 0, "gold_answers": 0,
                                                     "gold_correct": 0})
        entry["votes"] += 1
        if v["item_id"] in gold:
            checked = gold[v["item_id"]]
            entry["gold_answers"] += len(checked)
            entry["gold_correct"] += sum(v[f"{q}_ab"] == "A" for q in checked)  # A is the better image
        elif v["item_id"] in complete:
            entry["compared"] += len(QUESTIONS)
            entry["agreed"] += sum(v[f"{q}_ab"] == majorities[(v["item_id"], q)] for q in QUESTIONS)
    for entry in out.values():
        entry["agreement_with_majority"] = entry["agreed"] / entry["compared"] if entry["compared"] else None
        entry["gold_accuracy"] = entry["gold_correct"] / entry["gold_answers"] if entry["gold_answers"] else None
    return out


def _models(store) -> dict:
    try:
        models = json.loads((Path(store.path).parent / "study.json").read_text()).get("models")
    except (OSError, ValueError):
        models = None
    return models or {"A": {"name": "A"}, "B": {"name": "B"}}


def study_results(store, n_boot: int = 2000, seed: int = 0) -> dict:
    from datetime import datetime, timezone

    need = store.votes_per_item
    gold = store.gold()
    votes = store.votes()
    by_item: dict[int, list[dict]] = {}
    for vote in votes:
        if vote["item_id"] not in gold:
            by_item.setdefault(vote["item_id"], []).append(vote)
    complete = {i: v for i, v in by_item.items() if len(v) >= need}
    regular = [v for vs in by_item.values() for v in vs]
    result = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
              "models": _models(store), "items": len(store.items()) - len(gold), "gold_items": len(gold),
              "items_complete": len(complete), "votes": len(regular), "votes_per_item": need,
              "undone_answers": len(store.undone()), "questions": {}, "position_bias": position_bias(regular),
              "annotators": annotator_checks(votes, complete, gold)}
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


def model_names(result: dict) -> tuple[str, str]:
    models = result.get("models") or {}
    return tuple(models.get(k, {}).get("name") or k for k in ("A", "B"))


def save_results_chart(result: dict, path: str | Path) -> None:
    from ncppo.plots import _pyplot

    a, b = model_names(result)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    labels = []
    for row, q in enumerate(QUESTIONS):
        e = result["questions"][q]
        labels.append(f"{q.upper()}: {e['question']}")
        left = 0.0
        for key, colour, name in (("win", "tab:blue", f"{b} (B) wins"), ("tie", "lightgrey", "tie"),
                                  ("loss", "tab:orange", f"{a} (A) wins")):
            share = 100 * e.get(key, 0.0)
            ax.barh(row, share, left=left, color=colour, label=name if row == 0 else None)
            if share >= 6:
                ax.text(left + share / 2, row, f"{share:.0f}%", ha="center", va="center", fontsize=8)
            left += share
        if "win_rate_ties_half" in e:  # B's win rate with ties as half, and its bootstrap interval
            lo, hi = (100 * x for x in e["win_rate_ties_half_interval"])
            rate = 100 * e["win_rate_ties_half"]
            ax.errorbar(rate, row + 0.32, xerr=[[rate - lo], [hi - rate]], fmt="D", color="black", ms=4, capsize=3,
                        label="B win rate, ties half (95% CI)" if row == 0 else None)
    ax.axvline(50, color="black", lw=0.6, ls=":")
    ax.set_yticks(range(len(QUESTIONS)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of {result['items_complete']} items (majority of {result['votes_per_item']} votes)")
    ax.set_title(f"{b} (B) against {a} (A)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, frameon=False)
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
    with open(folder / "votes.csv", "w", newline="") as f:  # in write_results' scratch folder: no temporary of its own
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(votes)
    table = pa.Table.from_pylist(votes) if votes else pa.table({c: pa.array([], pa.string()) for c in columns})
    pq.write_table(table, folder / "votes.parquet")
    return [folder / "votes.csv", folder / "votes.parquet"]


def _earlier_results(folder: Path) -> bool:
    """A results folder from before outputs were marked: a study's ``results.json`` and only this command's files
    (with the temporaries an older, killed export left)."""
    return unmarked_output(folder, "results.json", ("questions", "position_bias", "items_complete"),
                           lambda n: n in RESULT_FILES or n in (".tmp-votes.csv", ".tmp-votes.parquet"))


def write_results(store, folder: str | Path, overwrite: bool = False) -> dict:
    """Results of ``store`` into ``folder`` (see the module docstring): ``results.json``, ``results.png`` and the
    votes as CSV and parquet, put in place together."""
    study = store.path.parent
    target = guard_output_dir(folder, COMMAND, inputs=[store.path, study / "images"],
                              overwrite=overwrite or _earlier_results(Path(folder)))
    result = study_results(store)
    with atomic_directory(target) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=2))
        save_results_chart(result, tmp / "results.png")
        export_votes(store, tmp)
        mark_output_dir(tmp, COMMAND)
    return result
