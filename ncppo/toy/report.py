"""The toy world's report (``report.md`` and a self-contained ``report.html``, the same form as ``ncppo
report``'s): every number is read from the files the stages wrote in the folder."""

from __future__ import annotations

import json
import statistics

import numpy as np

from ncppo.evaluation.stats import WinRate
from ncppo.plots import save_image_grid, save_reward_curves, save_win_rate_bars
from ncppo.reporting import write_blocks
from ncppo.toy.config import ToyConfig
from ncppo.toy.layout import ToyLayout

GRID_COLUMNS = 8
COMPONENTS = ("object_colour", "background", "shape", "quality")


def _verdict(row: dict) -> str:
    if row["low"] > 0.5:
        return "B better (interval above 50%)"
    if row["high"] < 0.5:
        return "**B worse** (interval below 50%)"
    return "no clear difference (interval contains 50%)"


def _run_rows(layout: ToyLayout, config: ToyConfig) -> list[list[str]]:
    rows = []
    for name in config.train.run_names():
        run = layout.run_dir(name)
        history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
        k = max(1, len(history) // 10)
        head = statistics.fmean(h["loss"] for h in history[:k])
        tail = statistics.fmean(h["loss"] for h in history[-k:])
        acc = statistics.fmean(h.get("implicit_acc", float("nan")) for h in history[-k:])
        # the change printed too: an NCP loss near log 2 moves in the 5th digit and must not look dead
        rows.append([name, str(summary["steps"]), f"{summary['train_seconds']:.1f}",
                     f"{statistics.median(h['seconds_per_step'] for h in history):.3f}",
                     f"{head:.4f} -> {tail:.4f} ({tail - head:+.2e})", f"{acc:.2f}"])
    return rows


def _comparison_row(row: dict) -> list[str]:
    win = WinRate.from_dict(row)
    return [f"{row['b']} vs {row['a']}", row["kind"], str(win), win.counts, f"{row['mean_a']:.4f} -> {row['mean_b']:.4f}",
            _verdict(row)]


def _model_row(label: str, record: dict, *extra: str) -> list[str]:
    c = record["components"]
    return [label, *extra, f"{record['mean']:.4f}", *[f"{c[k]:.3f}" for k in COMPONENTS]]


def _figures(layout: ToyLayout, results: dict) -> None:
    models, curves, spec = results["models"], results["curves"], results["spec"]
    figures = layout.figures
    figures.mkdir(exist_ok=True)
    save_reward_curves(curves, figures / "curves.png", f"mean oracle reward ({spec['split']} curve prompts)",
                       curves and next(iter(curves.values()))[0]["mean"], prompts=spec["curve_prompts"],
                       x_key="compute", xlabel="training compute (DPO-step equivalents, FLOPs)")
    save_win_rate_bars(results["comparisons"], figures / "win_rates.png", "paired win rates (oracle reward)")
    n_prompts = spec["prompts"]
    columns = np.linspace(0, n_prompts - 1, min(GRID_COLUMNS, n_prompts)).round().astype(int)
    rows = [np.load(layout.eval_images(name))["images"][columns * spec["images_per_prompt"]] for name in models]
    save_image_grid(rows, list(models), figures / "samples.png")



def _backbone(config: dict) -> str:
    """The base model's denoiser in words (records older than the DiT option are U-Nets)."""
    if config.get("backbone", "unet") == "dit":
        return f"DiT ({config['dit_layers']} blocks of width {config['dit_width']}, patch 2)"
    return "U-Net"


def write_report(layout: ToyLayout, config: ToyConfig) -> None:
    """``report.md``, ``report.html`` and the figures from the files the earlier stages wrote in ``layout``."""
    cfg = config
    results = json.loads(layout.results.read_text())
    base = json.loads(layout.base_model_record.read_text())
    pairs = json.loads(layout.pairs_stats.read_text())
    filtered = json.loads((layout.filtered / "stats.json").read_text())
    stages = json.loads(layout.stages_file.read_text())
    budget = json.loads(layout.budget.read_text())
    models, comparisons, spec = results["models"], results["comparisons"], results["spec"]
    _figures(layout, results)
    before, after = filtered["before"], filtered["after"]
    shipped = "/ncppo/toy/base_models/" in base.get("path", "")
    dpo_flops = budget["flops_per_step"]["dpo"]
    blocks = [
        ("h1", "ncppo toy world report"),
        ("p", "The paper's whole story at toy scale, offline, with the project's real code paths: a base model "
              "pretrained on procedural captioned images, Pick-a-Pic-format preference data from simulated annotators, "
              "the NCP filter, the methods trained through `ncppo.training.Trainer` at equal compute, and paired "
              "evaluation on held-out captions by the world's programmatic reward (the **oracle**: object colour, "
              "background colour, shape and cleanliness, in [0, 1]). Every number below is read from the files of "
              "this folder."),
        ("h2", "Stages"),
        ("table", ["stage", "seconds"], [[name, f"{record['seconds']:.0f}"] for name, record in stages.items()]),
        ("p", "(`pretrain` is near 0 s when the shipped or cached base model was used.)"),
        ("h2", "Base model"),
        ("list", [
            f"pixel-space {_backbone(base['config'])}, {base['unet_parameters'] / 1e6:.2f} M parameters, "
            f"{base['config'].get('prediction_type', 'v_prediction').replace('_', '-')}, "
            f"{base['config']['steps']} steps of batch {base['config']['batch_size']} in {base['seconds']:.0f} s "
            f"(when it was pretrained); loss {base['loss_first_10pct']:.3f} (first 10% of steps) -> "
            f"{base['loss_last_10pct']:.3f} (last 10%)" + (", EMA weights" if base["config"].get("ema_decay") else ""),
            f"{'shipped with the package' if shipped else 'cached'} at `{base.get('path', '?')}` (config hash "
            f"`{base['fingerprint']}`; made by {base.get('code_version') or 'an earlier ncppo'})"]),
        ("p", "Its reward on both held-out splits (the test split's row is the `base` row below):"),
        ("table", ["split", "images", "mean reward", *COMPONENTS],
         [_model_row(split, record, str(record["images"])) for split, record in results["base_by_split"].items()]),
        ("h2", "Preference data (Pick-a-Pic v2 schema, `pairs/`)"),
        ("list", [
            f"{pairs['rows']} rows over {pairs['prompts']} prompts: {pairs['pairs']} decided pairs and {pairs['ties']} ties",
            "made for the **train** split's captions only (`ncppo.toy.splits`)",
            f"{pairs['unique_images']} images, {pairs['images_both_winner_and_loser']} of them both a winner and a "
            "loser (contradictory votes)",
            "mean oracle reward of the pooled images by generator: " + ", ".join(
                f"{g} {v:.3f}" for g, v in pairs["oracle_mean_by_generator"].items())]),
        ("h2", "NCP filter (`filtered/`)"),
        ("list", [f"{before['absolute_winners']} absolute winners (no loss, no draw, at least "
                  f"{filtered['rule']['min_wins']} win(s)); kept {after['rows']} pairs over {after['prompts']} prompts "
                  f"from {before['pairs']} decided pairs ({before['pairs'] / max(after['rows'], 1):.1f}x fewer); rule: "
                  f"`{json.dumps(filtered['rule'])}`"]),
        ("h2", "Training (equal compute)"),
        ("p", f"Every run: LoRA rank {cfg.train.lora_rank}, batch {cfg.train.batch_size} pairs, AdamW lr "
              f"{cfg.train.learning_rate:g}, beta {cfg.train.beta_noise:g} (noise space) / {_number(cfg.train.beta_perceptual)} "
              f"(NCP, scale `{cfg.train.perceptual_scale}`), checkpoints for the curves. Budget: the FLOPs of "
              f"{budget['budget_dpo_steps']} DPO steps ({budget['budget_dpo_steps'] * dpo_flops / 1e9:.1f} GFLOP, "
              "counted by `torch.utils.flop_counter` on the first batch), so the step counts do not depend on the "
              "machine:"),
        ("table", ["method", "GFLOP per step", "/ DPO", "steps"],
         [[m, f"{f / 1e9:.2f}", f"{f / dpo_flops:.2f}", str(budget["steps"][m])]
          for m, f in budget["flops_per_step"].items()]),
        ("p", "Wall time is recorded beside it:"),
        ("table", ["run", "steps", "training s", "median s/step", "loss (first 10% -> last 10%)",
                   "implicit acc (last 10%)"], _run_rows(layout, config)),
        ("h2", "Evaluation"),
        ("p", f"The **{spec['split']}** split: {spec['prompts']} held-out captions (compositions the preference data "
              f"never shows) x {spec['images_per_prompt']} image(s), seed per (prompt, image) shared by every model "
              f"(paired), {spec['num_inference_steps']} DDIM steps, guidance {spec['guidance_scale']:g}; the seeds are "
              "not those the preference data was sampled with. Win rates count ties half; intervals are 95% "
              "percentile bootstraps over prompts."),
        ("table", ["model", "mean reward", *COMPONENTS], [_model_row(name, m) for name, m in models.items()]),
        ("table", ["B vs A", "kind", "win rate of B [95% CI]", "W/T/L", "mean A -> B", "verdict"],
         [_comparison_row(row) for row in comparisons]),
    ]
    ttq = [r for r in comparisons if "time_to_quality" in r]
    if ttq:
        blocks += [("p", "Compute to quality: the training FLOPs NCP-X needed to reach X's final mean reward (on the "
                         "curve prompts, interpolated between checkpoints), as a fraction of X's budget (the paper "
                         "claims NCP-DPO needs 40-62% less compute than DPO, i.e. a fraction of 0.38-0.60):"),
                   ("list", [f"{r['b']} vs {r['a']}: {_fraction(r['time_to_quality'])}" for r in ttq])]
    blocks += [
        ("figure", "figures/curves.png", "Reward against training compute, from the checkpoints (the paper's Fig 4)."),
        ("figure", "figures/win_rates.png", "Paired win rates with 95% intervals."),
        ("h2", "Samples"),
        ("figure", "figures/samples.png", "One row per model, the same prompt and seed per column."),
    ]
    write_blocks(blocks, layout.root, "ncppo toy world report")


def _fraction(value) -> str:
    if isinstance(value, str):
        return value
    return "never reached within its budget" if value is None else f"{value:.2f}"


def _number(value) -> str:
    return value if isinstance(value, str) else f"{value:g}"
