"""The toy world's ``report.md``: every number is read from the files the stages wrote in the folder."""

from __future__ import annotations

import json
import statistics

import numpy as np

from ncppo.evaluation.stats import WinRate
from ncppo.io import atomic_write_text
from ncppo.plots import save_image_grid, save_reward_curves, save_win_rate_bars
from ncppo.toy.config import ToyConfig
from ncppo.toy.layout import ToyLayout

GRID_COLUMNS = 8


def _verdict(row: dict) -> str:
    if row["low"] > 0.5:
        return "B better (interval above 50%)"
    if row["high"] < 0.5:
        return "**B worse** (interval below 50%)"
    return "no clear difference (interval contains 50%)"


def _run_table(layout: ToyLayout, config: ToyConfig) -> list[str]:
    lines = ["| run | steps | training s | median s/step | loss (first 10% -> last 10%) | implicit acc (last 10%) |",
             "|---|---|---|---|---|---|"]
    for name in config.train.run_names():
        run = layout.run_dir(name)
        history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
        k = max(1, len(history) // 10)
        head = statistics.fmean(h["loss"] for h in history[:k])
        tail = statistics.fmean(h["loss"] for h in history[-k:])
        acc = statistics.fmean(h.get("implicit_acc", float("nan")) for h in history[-k:])
        lines.append(f"| {name} | {summary['steps']} | {summary['train_seconds']:.1f} | "
                     f"{statistics.median(h['seconds_per_step'] for h in history):.3f} | {head:.4f} -> {tail:.4f} | "
                     f"{acc:.2f} |")
    return lines


def write_report(layout: ToyLayout, config: ToyConfig) -> None:
    """``report.md`` and its figures from the files the earlier stages wrote in ``layout``."""
    cfg = config
    results = json.loads(layout.results.read_text())
    base = json.loads(layout.base_model_record.read_text())
    pairs = json.loads(layout.pairs_stats.read_text())
    filtered = json.loads((layout.filtered / "stats.json").read_text())
    stages = json.loads(layout.stages_file.read_text())
    models, curves, comparisons = results["models"], results["curves"], results["comparisons"]
    figures = layout.figures
    figures.mkdir(exist_ok=True)

    save_reward_curves(curves, figures / "curves.png", "mean oracle reward (curve prompts)", curves and
                       next(iter(curves.values()))[0]["mean"])
    save_win_rate_bars(comparisons, figures / "win_rates.png", "paired win rates (oracle reward)")
    names = ["base"] + [n for n in models if n != "base"]
    n_prompts = results["spec"]["prompts"]
    columns = np.linspace(0, n_prompts - 1, min(GRID_COLUMNS, n_prompts)).round().astype(int)
    rows = []
    for name in names:
        images = np.load(layout.eval_images(name))["images"]
        rows.append(images[columns * results["spec"]["images_per_prompt"]])
    save_image_grid(rows, names, figures / "samples.png")

    before, after = filtered["before"], filtered["after"]
    spec = results["spec"]
    lines = [
        "# ncppo toy world report",
        "",
        "The paper's whole story at toy scale, offline, with the project's real code paths: a base model pretrained",
        "on procedural captioned images, Pick-a-Pic-format preference data from simulated annotators, the NCP",
        "filter, the methods trained through `ncppo.training.Trainer` at equal time budgets, and paired",
        "evaluation by the world's programmatic reward (the *oracle*: object colour, background colour, shape",
        "and cleanliness, in [0, 1]). Every number below is read from the files of this folder.",
        "",
        "## Stages",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {record['seconds']:.0f} |" for name, record in stages.items()],
        "",
        "(`pretrain` is near 0 s when the cached base model was reused.)",
        "",
        "## Base model",
        "",
        f"- pixel-space U-Net, {base['unet_parameters'] / 1e6:.2f} M parameters, v-prediction, "
        f"{base['config']['steps']} steps of batch {base['config']['batch_size']} in {base['seconds']:.0f} s "
        f"(when it was pretrained); loss {base['loss_first_50']:.3f} (first 50 steps) -> {base['loss_last_50']:.3f} (last 50)",
        f"- cached at `{base.get('path', '?')}`",
        "",
        "## Preference data (Pick-a-Pic v2 schema, `pairs/`)",
        "",
        f"- {pairs['rows']} rows over {pairs['prompts']} prompts: {pairs['pairs']} decided pairs and {pairs['ties']} ties",
        f"- {pairs['unique_images']} images, {pairs['images_both_winner_and_loser']} of them both a winner and a "
        f"loser (contradictory votes); {pairs['absolute_winners']} absolute winners (min_wins={pairs['min_wins']})",
        "- mean oracle reward of the pooled images by generator: " + ", ".join(
            f"{g} {v:.3f}" for g, v in pairs["oracle_mean_by_generator"].items()),
        "",
        "## NCP filter (`filtered/`)",
        "",
        f"- kept {after['rows']} pairs over {after['prompts']} prompts from {before['pairs']} decided pairs "
        f"({before['pairs'] / max(after['rows'], 1):.1f}x fewer); rule: {json.dumps(filtered['rule'])}",
        "",
        "## Training (equal time budgets)",
        "",
        f"Every run: LoRA rank {cfg.train.lora_rank}, batch {cfg.train.batch_size} pairs, AdamW lr "
        f"{cfg.train.learning_rate:g}, beta {cfg.train.beta_noise:g} (noise space) / {cfg.train.beta_perceptual:g} "
        f"(NCP), budget {cfg.train.minutes_per_run * 60:.0f} s of training time, checkpoints for the curves.",
        "",
        *_run_table(layout, config),
        "",
        "## Evaluation",
        "",
        f"{spec['prompts']} prompts x {spec['images_per_prompt']} image(s), seed per (prompt, image) shared by every "
        f"model (paired), {spec['num_inference_steps']} DDIM steps, guidance {spec['guidance_scale']:g}; the seeds are",
        "not those the preference data was sampled with. Win rates count ties half; intervals are 95% percentile",
        "bootstraps over prompts.",
        "",
        "| model | mean reward | median | object colour | background | shape | quality |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        m = models[name]
        c = m["components"]
        lines.append(f"| {name} | {m['mean']:.4f} | {m['median']:.4f} | {c['object_colour']:.3f} | "
                     f"{c['background']:.3f} | {c['shape']:.3f} | {c['quality']:.3f} |")
    lines += ["", "| B vs A | kind | win rate of B [95% CI] | W/T/L | mean A -> B | verdict |", "|---|---|---|---|---|---|"]
    for row in comparisons:
        win = WinRate.from_dict(row)
        lines.append(f"| {row['b']} vs {row['a']} | {row['kind']} | {win} | {win.counts} | "
                     f"{row['mean_a']:.4f} -> {row['mean_b']:.4f} | {_verdict(row)} |")
    ttq = [r for r in comparisons if "time_to_quality" in r]
    if ttq:
        lines += ["", "Time to quality: the training time NCP-X needed to reach X's final mean reward (on the curve",
                  "prompts, interpolated between checkpoints), as a fraction of X's budget (the paper claims NCP-DPO",
                  "needs 40-62% less compute than DPO, i.e. a fraction of 0.38-0.60):", ""]
        for r in ttq:
            value = r["time_to_quality"]
            if not isinstance(value, str):
                value = "never reached within its budget" if value is None else f"{value:.2f}"
            lines.append(f"- {r['b']} vs {r['a']}: {value}")
    lines += [
        "",
        "![reward vs training time](figures/curves.png)",
        "",
        "![win rates](figures/win_rates.png)",
        "",
        "## Samples (same prompt and seed per column)",
        "",
        "![samples](figures/samples.png)",
        "",
    ]
    atomic_write_text(layout.report, "\n".join(lines))
