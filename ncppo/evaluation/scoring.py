"""Scoring image sets and comparing two of them: ``ncppo score`` and ``ncppo compare``.

Scores go beside the manifest as ``scores/<reward>.json`` ({"reward", "weights", "scores": {image id:
score}}), written atomically. A comparison pairs the images of two sets by (prompt, seed), which
``ncppo generate`` makes equal across models, and reports per reward the win rate of B over A (ties
half) with a bootstrap 95% interval over prompts, the mean and median of each side, and a per-category
breakdown when every prompt has a ``Category`` (PartiPrompts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ncppo.errors import StateError, UsageError
from ncppo.evaluation.image_sets import Pairing, load_image, pair_image_sets, print_note, read_manifest
from ncppo.evaluation.stats import WinRate, paired_win_rate
from ncppo.io import atomic_write_text


def score_image_set(folder: str | Path, reward, weights: str | None = None, batch_size: int = 32,
                    progress: bool = True) -> Path:
    """Score every image of an ``ncppo generate`` folder; returns the scores file."""
    folder = Path(folder)
    records = read_manifest(folder)
    scores: dict[str, float] = {}
    for start in tqdm(range(0, len(records), batch_size), desc=f"score {reward.name}", disable=not progress):
        chunk = records[start:start + batch_size]
        values = reward([load_image(folder, r) for r in chunk], [r.prompt for r in chunk])
        scores.update({r.id: float(v) for r, v in zip(chunk, values)})
    path = folder / "scores" / f"{reward.name}.json"
    atomic_write_text(path, json.dumps({"reward": reward.name, "weights": weights, "scores": scores}, indent=1))
    return path


def read_scores(folder: str | Path) -> dict[str, dict[str, float]]:
    """Every reward's scores of a folder, by reward name then image id."""
    out = {}
    for path in sorted((Path(folder) / "scores").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            out[data["reward"]] = data["scores"]
        except (ValueError, KeyError, TypeError) as err:
            raise StateError(f"{path} is not a scores file ({err!r}); score the folder again (`ncppo score`)") from err
    return out


def paired_scores(a_dir, b_dir, reward: str, pairing: Pairing | None = None):
    """Aligned score arrays of two sets for ``reward`` by (prompt, seed), with the record of each pair and the
    count of unpaired images (``pairing``: an earlier :func:`pair_image_sets` of the two, else paired here)."""
    pairing = pairing or pair_image_sets(a_dir, b_dir, notify=None)
    a_scores, b_scores = read_scores(a_dir).get(reward), read_scores(b_dir).get(reward)
    for folder, found in ((a_dir, a_scores), (b_dir, b_scores)):
        if found is None:
            raise FileNotFoundError(f"{folder} has no {reward} scores; run `ncppo score --reward {reward} ... {folder}`")
    pairs = pairing.pairs
    missing = [ra.id for ra, rb in pairs if ra.id not in a_scores] + [rb.id for ra, rb in pairs if rb.id not in b_scores]
    if missing:
        raise StateError(f"{len(missing)} paired images have no {reward} score (first: {missing[0]}); score both sets again")
    a = np.array([a_scores[ra.id] for ra, _ in pairs])
    b = np.array([b_scores[rb.id] for _, rb in pairs])
    return a, b, [ra for ra, _ in pairs], pairing.unpaired


def compare_image_sets(a_dir, b_dir, rewards: list[str] | None = None, n_boot: int = 2000,
                       category_key: str = "Category", json_path: str | Path | None = None,
                       allow_mismatch: bool = False, notify=print_note) -> dict:
    """Per reward: the paired win rate of B over A, the means and medians, and per-category rates
    (also written to ``json_path`` when given).

    The sets are paired by :func:`ncppo.evaluation.image_sets.pair_image_sets`: refused when their generation
    settings differ in anything but the model and LoRA (unless ``allow_mismatch``); its notes (unpaired images,
    differing settings) go to ``notify`` and into the result's ``notes``.
    """
    for folder in (a_dir, b_dir):
        read_manifest(folder)  # both must be generation outputs: say so before anything else
    pairing = pair_image_sets(a_dir, b_dir, allow_mismatch=allow_mismatch, notify=notify)
    shared = sorted(set(read_scores(a_dir)) & set(read_scores(b_dir))) if rewards is None else rewards
    if not shared:
        raise UsageError(f"{a_dir} and {b_dir} have no reward scored on both; run `ncppo score` on each")
    result = {"a": str(a_dir), "b": str(b_dir), "unpaired": {"a": len(pairing.unpaired_a), "b": len(pairing.unpaired_b)},
              "settings_differences": {k: list(v) for k, v in pairing.differences.items()},
              "notes": pairing.notes(), "rewards": {}}
    for reward in shared:
        a, b, records, unpaired = paired_scores(a_dir, b_dir, reward, pairing)
        prompts = np.array([r.prompt for r in records])
        win = paired_win_rate(a, b, groups=prompts, n_boot=n_boot)
        entry = {"win_rate": win.to_dict(), "pairs": len(a), "unpaired_images": unpaired,
                 "a": {"mean": float(a.mean()), "median": float(np.median(a))},
                 "b": {"mean": float(b.mean()), "median": float(np.median(b))}}
        categories = [(r.metadata or {}).get(category_key) for r in records]
        if all(c not in (None, "") for c in categories):
            entry["by_category"] = {}
            for category in sorted(set(categories)):
                mask = np.array([c == category for c in categories])
                entry["by_category"][category] = paired_win_rate(a[mask], b[mask], groups=prompts[mask],
                                                                 n_boot=n_boot).to_dict()
        result["rewards"][reward] = entry
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=1))
    return result


def comparison_markdown(result: dict) -> str:
    """A :func:`compare_image_sets` result as Markdown tables (what ``ncppo compare`` prints)."""
    unpaired = result.get("unpaired", {})
    lines = [f"B = `{result['b']}` vs A = `{result['a']}`"
             + (f" ({unpaired['a']} images of A and {unpaired['b']} of B unpaired, left out)" if any(unpaired.values()) else ""),
             "",
             "| reward | pairs | win rate of B [95% CI] | W/T/L | mean A -> B | median A -> B |", "|---|---|---|---|---|---|"]
    for reward, e in result["rewards"].items():
        w = WinRate.from_dict(e["win_rate"])
        lines.append(f"| {reward} | {e['pairs']} | {w} | {w.counts} | {e['a']['mean']:.4f} -> {e['b']['mean']:.4f} | "
                     f"{e['a']['median']:.4f} -> {e['b']['median']:.4f} |")
    for reward, e in result["rewards"].items():
        if "by_category" in e:
            lines += ["", f"By category ({reward}):", "", "| category | prompts | win rate of B [95% CI] |", "|---|---|---|"]
            for category, w in e["by_category"].items():
                lines.append(f"| {category} | {w['prompts']} | {WinRate.from_dict(w)} |")
    return "\n".join(lines) + "\n"
