"""``ncppo report``: Markdown, PNG and a self-contained HTML page for generated image sets.

Sets are compared to the first one (the baseline) for every reward both have scores for; a grid shows
the same prompt and seed across sets; an ``ncppo curve`` output adds its reward-vs-time plot.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from ncppo.errors import UsageError
from ncppo.evaluation.image_sets import load_image, read_manifest
from ncppo.evaluation.scoring import compare_image_sets, read_scores
from ncppo.evaluation.stats import WinRate
from ncppo.io import atomic_write_text


def _table_md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_eval_report(sets: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
                      curves_dir: str | Path | None = None, grid_prompts: int = 8) -> Path:
    from ncppo.plots import save_image_grid

    sets = [Path(s) for s in sets]
    labels = labels or [s.name for s in sets]
    if len(labels) != len(sets):
        raise UsageError(f"{len(labels)} labels for {len(sets)} image sets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[str], list[list[str]]]] = []

    summary_rows = []
    for label, folder in zip(labels, sets):
        for reward, scores in read_scores(folder).items():
            values = np.array(list(scores.values()))
            summary_rows.append([label, reward, str(len(values)), f"{values.mean():.4f}", f"{np.median(values):.4f}"])
    sections.append(("Mean and median reward", ["set", "reward", "images", "mean", "median"], summary_rows))

    compare_rows, comparisons = [], []
    for label, folder in zip(labels[1:], sets[1:]):
        result = compare_image_sets(sets[0], folder)
        comparisons.append({"b": label, "a": labels[0], **result})
        for reward, e in result["rewards"].items():
            w = WinRate.from_dict(e["win_rate"])
            compare_rows.append([f"{label} vs {labels[0]}", reward, str(e["pairs"]), str(w), w.counts])
    if compare_rows:
        sections.append(("Paired win rates (ties half, 95% bootstrap interval over prompts)",
                         ["B vs A", "reward", "pairs", "win rate of B", "W/T/L"], compare_rows))

    records = [read_manifest(s) for s in sets]
    keyed = [{(r.prompt, r.seed): r for r in recs} for recs in records]
    shared = [k for k in ((r.prompt, r.seed) for r in records[0]) if all(k in d for d in keyed)]
    picks = [shared[i] for i in np.linspace(0, len(shared) - 1, min(grid_prompts, len(shared))).round().astype(int)]
    figures = []
    if picks:
        rows = [np.stack([load_image(folder, d[k]) for k in picks]) for folder, d in zip(sets, keyed)]
        save_image_grid(rows, labels, out / "grid.png")
        figures.append(("Same prompt and seed across sets", "grid.png", [p for p, _ in picks]))
    if curves_dir is not None:
        curves = Path(curves_dir)
        if not (curves / "curves.png").is_file():
            raise FileNotFoundError(f"{curves} has no curves.png (an `ncppo curve` output folder)")
        (out / "curves.png").write_bytes((curves / "curves.png").read_bytes())
        reward = json.loads((curves / "curves.json").read_text())["reward"]
        figures.append((f"Reward ({reward}) against training time", "curves.png", []))

    md = ["# ncppo evaluation report", "", "Sets: " + ", ".join(f"{lab} (`{s}`)" for lab, s in zip(labels, sets)), ""]
    page = ["<!doctype html><meta charset='utf-8'><title>ncppo evaluation report</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style>",
            "<h1>ncppo evaluation report</h1>", "<p>" + html.escape(md[2]) + "</p>"]
    for title, header, rows in sections:
        md += [f"## {title}", "", *_table_md(header, rows), ""]
        page += [f"<h2>{html.escape(title)}</h2>", _table_html(header, rows)]
    for title, name, prompts in figures:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
        page += [f"<h2>{html.escape(title)}</h2>", f"<img src='{_embed(out / name)}' alt='{html.escape(title)}'>"]
        if prompts:
            md += ["Prompts, left to right: " + "; ".join(f"`{p}`" for p in prompts), ""]
            page.append("<p>Prompts, left to right: " + "; ".join(html.escape(p) for p in prompts) + "</p>")
    atomic_write_text(out / "comparisons.json", json.dumps(comparisons, indent=1))
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", "\n".join(page))
    return out / "report.md"
