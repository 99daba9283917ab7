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

    spec = results["spec"]
    save_reward_curves(curves, figures / "curves.png", f"mean oracle reward ({spec['split']} curve prompts)",
                       curves and next(iter(curves.values()))[0]["mean"], prompts=spec["curve_prompts"],
                       x_key="compute", xlabel="training compute (DPO-step equivalents, FLOPs)")
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
    budget = json.loads(layout.budget.read_text())
    lines = [
        "# ncppo toy world report",
        "",
        "The paper's whole story at toy scale, offline, with the project's real code paths: a base model pretrained",
        "on procedural captioned images, Pick-a-Pic-format preference data from simulated annotators, the NCP",
        "filter, the methods trained through `ncppo.training.Trainer` at equal compute, and paired",
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
        f"(when it was pretrained); loss {base['loss_first_10pct']:.3f} (first 10% of steps) -> "
        f"{base['loss_last_10pct']:.3f} (last 10%)" + (", EMA weights" if base["config"].get("ema_decay") else ""),
        f"- {'shipped with the package' if '/ncppo/toy/base_models/' in base.get('path', '') else 'cached'} at "
        f"`{base.get('path', '?')}` (config hash {base['fingerprint']})",
        "",
        "## Preference data (Pick-a-Pic v2 schema, `pairs/`)",
        "",
        f"- {pairs['rows']} rows over {pairs['prompts']} prompts: {pairs['pairs']} decided pairs and {pairs['ties']} ties",
        f"- {pairs['unique_images']} images, {pairs['images_both_winner_and_loser']} of them both a winner and a "
        "loser (contradictory votes)",
        "- mean oracle reward of the pooled images by generator: " + ", ".join(
            f"{g} {v:.3f}" for g, v in pairs["oracle_mean_by_generator"].items()),
        "",
        "## NCP filter (`filtered/`)",
        "",
        f"- {before['absolute_winners']} absolute winners (no loss, no draw, at least "
        f"{filtered['rule']['min_wins']} win(s)); kept {after['rows']} pairs over {after['prompts']} prompts from "
        f"{before['pairs']} decided pairs ({before['pairs'] / max(after['rows'], 1):.1f}x fewer); rule: "
        f"{json.dumps(filtered['rule'])}",
        "",
        "## Training (equal compute)",
        "",
        f"Every run: LoRA rank {cfg.train.lora_rank}, batch {cfg.train.batch_size} pairs, AdamW lr "
        f"{cfg.train.learning_rate:g}, beta {cfg.train.beta_noise:g} (noise space) / {cfg.train.beta_perceptual} "
        f"(NCP), checkpoints for the curves. Budget: the FLOPs of {budget['budget_dpo_steps']} DPO steps "
        f"({budget['budget_dpo_steps'] * budget['flops_per_step']['dpo'] / 1e9:.1f} GFLOP, counted by "
        "`torch.utils.flop_counter` on the first batch), so the step counts do not depend on the machine:",
        "",
        "| method | GFLOP per step | / DPO | steps |",
        "|---|---|---|---|",
        *[f"| {m} | {f / 1e9:.2f} | {f / budget['flops_per_step']['dpo']:.2f} | {budget['steps'][m]} |"
          for m, f in budget["flops_per_step"].items()],
        "",
        "Wall time is recorded beside it:",
        "",
        *_run_table(layout, config),
        "",
        "## Evaluation",
        "",
        f"The **{spec['split']}** split: {spec['prompts']} held-out captions (compositions the preference data never",
        f"shows; `ncppo.toy.splits`) x {spec['images_per_prompt']} image(s), seed per (prompt, image) shared by every "
        f"model (paired), {spec['num_inference_steps']} DDIM steps, guidance {spec['guidance_scale']:g}; the seeds are",
        "not those the preference data was sampled with. Win rates count ties half; intervals are 95% percentile",
        "bootstraps over prompts.",
        "",
        "The base model on both held-out splits:",
        "",
        "| split | images | mean reward | object colour | background | shape | quality |",
        "|---|---|---|---|---|---|---|",
        *[f"| {split} | {b['images']} | {b['mean']:.4f} | {b['components']['object_colour']:.3f} | "
          f"{b['components']['background']:.3f} | {b['components']['shape']:.3f} | {b['components']['quality']:.3f} |"
          for split, b in results["base_by_split"].items()],
        "",
        f"Every model on the {spec['split']} split:",
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
        lines += ["", "Compute to quality: the training FLOPs NCP-X needed to reach X's final mean reward (on the curve",
                  "prompts, interpolated between checkpoints), as a fraction of X's budget (the paper claims NCP-DPO",
                  "needs 40-62% less compute than DPO, i.e. a fraction of 0.38-0.60):", ""]
        for r in ttq:
            value = r["time_to_quality"]
            if not isinstance(value, str):
                value = "never reached within its budget" if value is None else f"{value:.2f}"
            lines.append(f"- {r['b']} vs {r['a']}: {value}")
    lines += [
        "",
        "![reward vs training compute](figures/curves.png)",
        "",
        "![win rates](figures/win_rates.png)",
        "",
        "## Samples (same prompt and seed per column)",
        "",
        "![samples](figures/samples.png)",
        "",
    ]
    atomic_write_text(layout.report, "\n".join(lines))
