"""``ncppo report``: Markdown, PNG and a self-contained HTML page for generated, scored image sets.

The report states every generation setting of every set (model, LoRA, sampler, steps, guidance,
resolution, seeds, prompt set and count), each set's mean reward with its interval, and the paired win
rates of every pair of sets (by default each later set against each earlier one, so that
``ncppo report base dpo ncp-dpo`` has NCP-DPO vs DPO, the paper's Table 1, beside both against the
base), with a chart; a grid shows the same prompt and seed across sets, with the prompts and scores
under it; an ``ncppo curve`` output adds its reward-vs-time plot. Pairing goes through
:func:`ncppo.evaluation.image_sets.pair_image_sets`: sets generated with other settings are refused
unless ``allow_mismatch``, and its notes (unpaired images) are in the report.

The page is built once as a list of blocks (headings, paragraphs, tables, figures) and written both as
Markdown and as HTML, so the two say the same; inline Markdown (`` `code` ``, ``**bold**``) is rendered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ncppo.errors import UsageError
from ncppo.evaluation.image_sets import (
    load_image,
    print_note,
    read_manifest,
    read_settings,
    settings_differences,
)
from ncppo.evaluation.scoring import compare_image_sets, read_scores
from ncppo.evaluation.stats import WinRate, mean_interval
from ncppo.io import atomic_directory, atomic_write_text, guard_output_dir, mark_output_dir
from ncppo.reporting import write_blocks

SETTING_COLUMNS = ["set", "model", "LoRA", "sampler", "dtype", "steps", "guidance", "resolution", "seeds",
                   "prompts", "images"]


# -- what the report says ---------------------------------------------------------------------------------
def _resolution(folder: Path, records, spec: dict) -> str:
    from PIL import Image

    size = ""
    if records:
        try:
            with Image.open(folder / records[0].path) as image:
                size = f"{image.width}x{image.height}"
        except OSError:
            size = ""
    if spec.get("height") is None and spec.get("width") is None:
        return f"{size} (model default)" if size else "model default"
    return f"{spec.get('width') or '?'}x{spec.get('height') or '?'}"


def _settings_row(label: str, folder: Path, records) -> list[str]:
    settings = read_settings(folder)
    if settings is None:
        return [label, f"`{folder}`: no generation.json"] + ["?"] * (len(SETTING_COLUMNS) - 3) + [str(len(records))]
    spec = settings.get("spec", {})
    prompts = f"`{settings.get('prompt_source', '?')}` ({settings.get('prompts', '?')})"
    seeds = f"base seed {spec.get('seed', '?')}, {spec.get('images_per_prompt', '?')} per prompt"
    return [label, f"`{settings.get('model') or '?'}`", f"`{settings['lora']}`" if settings.get("lora") else "none",
            str(settings.get("scheduler", "?")), str(settings.get("dtype", "?")), str(spec.get("num_inference_steps", "?")),
            f"{spec.get('guidance_scale', '?')}", _resolution(folder, records, spec), seeds, prompts, str(len(records))]


def _pairs_to_compare(labels: list[str], pairs: list[tuple[str, str]] | None) -> list[tuple[int, int]]:
    """(index of B, index of A): the given ``(B, A)`` labels, or every later set against every earlier one."""
    if pairs is None:
        return [(j, i) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    out = []
    for b, a in pairs:
        for name in (b, a):
            if name not in labels:
                raise UsageError(f"--pair names {name!r}, which is no set of the report (sets: {', '.join(labels)})")
        if a == b:
            raise UsageError(f"--pair {b}:{a} compares a set with itself")
        out.append((labels.index(b), labels.index(a)))
    return out


def write_eval_report(sets: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
                      curves_dir: str | Path | None = None, grid_prompts: int = 8,
                      pairs: list[tuple[str, str]] | None = None, allow_mismatch: bool = False,
                      n_boot: int = 2000, overwrite: bool = False) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained), ``comparisons.json`` and the figures to ``out_dir``,
    as one folder in one atomic step (a rerun replaces its own earlier report; any other non-empty folder,
    or one inside an input, is refused unless ``overwrite``).

    ``pairs``: the comparisons as ``(B label, A label)``, win rates of B over A (default: every later set
    against every earlier one); ``allow_mismatch``: compare sets generated with other settings (named in
    the report) instead of refusing.
    """
    final = guard_output_dir(out_dir, "report", inputs=[*sets, *([curves_dir] if curves_dir else [])],
                             overwrite=overwrite)
    with atomic_directory(final) as out:
        mark_output_dir(out, "report")
        _write_report(sets, out, labels, curves_dir, grid_prompts, pairs, allow_mismatch, n_boot)
    return final / "report.md"


def _write_report(sets, out: Path, labels, curves_dir, grid_prompts: int, pairs, allow_mismatch: bool,
                  n_boot: int) -> Path:
    from ncppo.plots import (
        model_style,
        save_image_grid,
        save_mean_rewards,
        save_win_rate_bars,
    )

    sets = [Path(s) for s in sets]
    labels = labels or [s.name for s in sets]
    if len(labels) != len(sets):
        raise UsageError(f"{len(labels)} labels for {len(sets)} image sets")
    if len(set(labels)) != len(labels):
        raise UsageError(f"the sets need distinct labels (got {', '.join(labels)}); pass --label for each set")
    records = [read_manifest(s) for s in sets]
    scores = [read_scores(s) for s in sets]
    colours = [model_style(i)["color"] for i in range(len(sets))]
    blocks: list[tuple] = [("h1", "ncppo evaluation report"),
                           ("p", f"{len(sets)} image sets: " + ", ".join(f"**{lab}** (`{s}`)" for lab, s in zip(labels, sets))
                            + ". Intervals are 95% percentile bootstraps over prompts (a prompt's images are not "
                              "independent); win rates count ties half.")]

    # settings
    blocks += [("h2", "Generation settings"),
               ("table", SETTING_COLUMNS, [_settings_row(lab, s, r) for lab, s, r in zip(labels, sets, records)])]
    differing: dict[str, set] = {}
    found = [read_settings(s) for s in sets]
    if all(f is not None for f in found):
        for i in range(1, len(sets)):
            for key in settings_differences(found[0], found[i], records[0], records[i]):
                differing.setdefault(key, set()).update({labels[0], labels[i]})
    if differing:
        blocks.append(("p", "**Settings differ** between sets (beyond model and LoRA): "
                       + "; ".join(f"`{k}` ({', '.join(sorted(v))})" for k, v in differing.items())
                       + ". Comparisons across them are not like for like."))
    else:
        blocks.append(("p", "Every set was generated with the same settings but the model and LoRA, from the same "
                            "prompts and seeds: the comparisons below are paired image by image."
                       if all(f is not None for f in found) else
                       "Some sets have no generation.json: their settings could not be checked."))

    # means
    rewards = list(dict.fromkeys(r for s in scores for r in s))
    means: dict[str, dict[str, dict]] = {}
    mean_rows = []
    for label, recs, sc in zip(labels, records, scores):
        for reward in rewards:
            if reward not in sc:
                continue
            scored = [r for r in recs if r.id in sc[reward]]
            if not scored:
                continue
            values = np.array([sc[reward][r.id] for r in scored])
            m = mean_interval(values, [r.prompt for r in scored], n_boot=n_boot)
            means.setdefault(reward, {})[label] = m.to_dict()
            mean_rows.append([label, reward, str(len(values)), str(m.prompts), str(m), f"{np.median(values):.4g}"])
    if mean_rows:
        save_mean_rewards(means, out / "means.png", labels)
        blocks += [("h2", "Mean reward"),
                   ("table", ["set", "reward", "images", "prompts", "mean [95% CI]", "median"], mean_rows),
                   ("figure", "means.png", "Mean reward per set with its 95% interval over prompts; each set keeps "
                                           "its colour and marker in every figure.")]

    # paired win rates
    comparisons, win_rows, bars, notes = [], [], [], []
    for j, i in _pairs_to_compare(labels, pairs):
        collected: list[str] = []

        def note(line: str, collected=collected) -> None:
            collected.append(line)
            print_note(line)

        result = compare_image_sets(sets[i], sets[j], n_boot=n_boot, allow_mismatch=allow_mismatch, notify=note)
        comparisons.append({**result, "b": labels[j], "a": labels[i], "b_dir": result["b"], "a_dir": result["a"]})
        notes += [f"{labels[j]} vs {labels[i]}: {line}" for line in collected]
        for reward, e in result["rewards"].items():
            w = WinRate.from_dict(e["win_rate"])
            win_rows.append([f"**{labels[j]}** vs {labels[i]}", reward, str(e["pairs"]), str(w.prompts), str(w), w.counts,
                             f"{e['a']['mean']:.4g} -> {e['b']['mean']:.4g}"])
            bars.append({"b": labels[j], "a": labels[i], "reward": reward, "prompts": w.prompts, **w.to_dict()})
    if win_rows:
        save_win_rate_bars(bars, out / "win_rates.png", "paired win rates, 95% bootstrap intervals over prompts")
        blocks += [("h2", "Paired win rates"),
                   ("p", "Images are paired by prompt and seed; the win rate is the first-named set's share of pairs "
                         "with the higher reward."),
                   ("table", ["B vs A", "reward", "pairs", "prompts", "win rate of B [95% CI]", "W/T/L",
                              "mean A -> B"], win_rows),
                   ("figure", "win_rates.png", "Win rate of B over A per reward (bar) with its 95% interval (line); "
                                               "50% is no difference.")]
        if notes:
            blocks.append(("list", notes))
        blocks += _category_blocks(comparisons)

    # the grid, with the prompts and scores under it
    keyed = [{(r.prompt, r.seed): r for r in recs} for recs in records]
    shared = [k for k in ((r.prompt, r.seed) for r in records[0]) if all(k in d for d in keyed)]
    picks = [shared[i] for i in np.linspace(0, len(shared) - 1, min(grid_prompts, len(shared))).round().astype(int)] \
        if shared else []
    if picks:
        main_reward = rewards[0] if rewards else None
        rows = [np.stack([load_image(folder, d[k]) for k in picks]) for folder, d in zip(sets, keyed)]
        notes_grid = [[f"{main_reward} {sc[main_reward][d[k].id]:.4g}" if main_reward in sc and d[k].id in sc[main_reward]
                       else "" for k in picks] for d, sc in zip(keyed, scores)] if main_reward else None
        save_image_grid(rows, labels, out / "grid.png", column_titles=[f"{c + 1}. {p}" for c, (p, _) in enumerate(picks)],
                        cell_notes=notes_grid, colours=colours)
        header = ["column", "prompt", "seed"] + [f"{lab}: {rw}" for lab in labels for rw in rewards]
        table = []
        for c, key in enumerate(picks):
            cells = [f"{sc[rw][d[key].id]:.4g}" if rw in sc and d[key].id in sc[rw] else "-"
                     for d, sc in zip(keyed, scores) for rw in rewards]
            table.append([str(c + 1), key[0], str(key[1])] + cells)
        blocks += [("h2", "Same prompt and seed across sets"),
                   ("figure", "grid.png", f"One row per set, one column per (prompt, seed); under each image its "
                                          f"{main_reward or 'score'}."),
                   ("table", header, table)]

    # curves
    if curves_dir is not None:
        blocks += _curve_blocks(Path(curves_dir), out, labels)

    atomic_write_text(out / "comparisons.json", json.dumps(comparisons, indent=1))
    return write_blocks(blocks, out, "ncppo evaluation report")


def _category_blocks(comparisons: list[dict]) -> list[tuple]:
    """Per reward, a table of win rates by prompt category (rows) and comparison (columns), when there are any."""
    blocks = []
    rewards = list(dict.fromkeys(r for c in comparisons for r, e in c["rewards"].items() if "by_category" in e))
    for reward in rewards:
        having = [c for c in comparisons if "by_category" in c["rewards"].get(reward, {})]
        categories = sorted({k for c in having for k in c["rewards"][reward]["by_category"]})
        rows = []
        for category in categories:
            cells = [c["rewards"][reward]["by_category"].get(category) for c in having]
            prompts = next(w["prompts"] for w in cells if w is not None)
            rows.append([category, str(prompts)] + [str(WinRate.from_dict(w)) if w else "-" for w in cells])
        blocks += [("h3", f"Win rates by prompt category ({reward})"),
                   ("table", ["category", "prompts"] + [f"{c['b']} vs {c['a']}" for c in having], rows)]
    return blocks


def _curve_blocks(curves: Path, out: Path, labels: list[str]) -> list[tuple]:
    from ncppo.plots import save_reward_curves

    if not (curves / "curves.json").is_file():
        raise FileNotFoundError(f"{curves} has no curves.json (an `ncppo curve` output folder)")
    record = json.loads((curves / "curves.json").read_text())
    reward, runs = record["reward"], record["curves"]
    base = next(iter(runs.values()))[0]["mean"] if runs else None
    save_reward_curves(runs, out / "curves.png", f"mean {reward}", base, prompts=record.get("prompts"),
                       title=f"{reward} against training time",
                       style_index={name: labels.index(name) for name in runs if name in labels})
    spec = record.get("spec", {})
    said = (f"Prompts: `{record['prompt_source']}` ({record['prompts']}); steps {spec.get('num_inference_steps')}, "
            f"guidance {spec.get('guidance_scale')}, base seed {spec.get('seed')}, "
            f"{spec.get('images_per_prompt')} image(s) per prompt." if "spec" in record else
            "This curves folder predates recorded settings; rerun `ncppo curve` to have them stated.")
    rows = [[name, str(len(points) - 1), f"{points[-1]['train_seconds']:.0f}", f"{points[0]['mean']:.4g}",
             f"{points[-1]['mean']:.4g}" + (f" [{points[-1]['low']:.4g}, {points[-1]['high']:.4g}]"
                                            if "low" in points[-1] else "")] for name, points in runs.items()]
    return [("h2", f"Reward ({reward}) against training time"), ("p", said),
            ("table", ["run", "checkpoints", "last at (s)", "base mean", "last mean [95% CI]"], rows),
            ("figure", "curves.png", "Mean reward of each run's checkpoints against training time; band: 95% "
                                     "interval over prompts; dotted: the base model.")]

