"""The model card of a run: ``OUTPUT_DIR/README.md`` (Hugging Face model-card layout, YAML front matter).

It says what the weights are (base model, method and its settings, data), how they were trained (batch,
learning rate as used, steps, time), the final metrics, and how to load them with diffusers, with
``ncppo generate`` and in AUTOMATIC1111 / ComfyUI (the kohya-format file). Written from ``summary.json``'s
values at the end of every run.
"""

from __future__ import annotations

import math
from pathlib import Path

from ncppo.training.config import is_hub_id

_METHODS = {
    "sft": "supervised fine-tuning on the preferred images",
    "dpo": "Diffusion-DPO (preference optimisation in noise space)",
    "cpo": "Diffusion-CPO (contrastive preference optimisation in noise space)",
    "ncp-sft": "NCPPO's supervised fine-tuning in the U-Net encoder's perceptual space",
    "ncp-dpo": "NCPPO-DPO: Diffusion-DPO in the U-Net encoder's perceptual space (arXiv 2406.17636)",
    "ncp-cpo": "NCPPO-CPO: Diffusion-CPO in the U-Net encoder's perceptual space (arXiv 2406.17636)",
}
_METRICS = ("loss", "implicit_acc", "reward_margin", "argument_rms", "saturated_frac", "grad_norm", "eps_dominated_frac")


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def model_card(summary: dict, config: dict, run_name: str) -> str:
    """The README.md of a run folder from its summary (:func:`ncppo.training.report.summary`) and its config dict."""
    import ncppo

    model, data, optim, objective = config["model"], config["data"], config["optim"], config["objective"]
    lora = model["finetune"] == "lora"
    base = model["pretrained"]
    out = Path(summary["weights"]).parent
    kohya = Path(summary["weights_kohya"]).name if summary.get("weights_kohya") else None
    kind = "stable-diffusion-xl" if (summary.get("export") or {}).get("model_kind") == "sdxl" else "stable-diffusion"
    tags = ["text-to-image", "diffusers", kind, "ncppo", objective["name"], "preference-optimization"]
    if lora:
        tags.insert(2, "lora")
    front = ["---"]
    if is_hub_id(str(base)):
        front.append(f"base_model: {base}")
    front += ["library_name: diffusers", "tags:", *(f"- {t}" for t in tags), "---", ""]

    settings = {k: v for k, v in (summary.get("objective") or {}).items() if k not in ("name", "beta_used")}
    beta = (summary.get("objective") or {}).get("beta_used")
    method = f"{objective['name']}: {_METHODS.get(objective['name'], objective['name'])}"
    data_source = data["cache"] or data["source"]
    skips = summary["data"].get("skips", {})
    lr = (f"{summary['learning_rate']:g} ({optim['learning_rate']:g} x effective batch {summary['effective_batch']}, "
          "scale_lr)" if optim["scale_lr"] else f"{summary['learning_rate']:g}")
    rows = [
        ("base model", f"`{base}`"),
        ("method", method),
        ("objective settings", ", ".join(f"{k}={v}" for k, v in settings.items()) + (f"; beta used {beta:g}" if beta else "")),
        ("data", f"{summary['data']['pairs']:,} pairs from `{data_source}` ({skips.get('total', 0)} skipped)"),
        ("weights", f"LoRA rank {model['lora_rank']}, alpha {model['lora_alpha'] or model['lora_rank']:g}, on "
                    f"{', '.join(model['lora_targets'])}" if lora else "full U-Net fine-tune"),
        ("steps", f"{summary['steps']} optimiser steps (stopped by {summary['stopped_by']}), "
                  f"{summary['train_seconds']:.0f} s of training"),
        ("effective batch", f"{summary['effective_batch']} pairs ({summary['batch_size_per_process']} per process x "
                            f"{summary['gradient_accumulation_steps']} accumulation x {summary['num_processes']} "
                            "process(es))"),
        ("learning rate", lr),
        ("optimiser", f"{optim['optimizer']}, {optim['lr_scheduler']} ({optim['lr_warmup_steps']} warm-up steps), "
                      f"weight decay {optim['weight_decay']:g}, clip {optim['max_grad_norm']:g}"),
        ("resolution", f"{data['resolution']} px (random crop {str(data['random_crop']).lower()}, flip "
                       f"{str(data['random_flip']).lower()}, prompt dropout {data['prompt_dropout']:g})"),
        ("precision", config["mixed_precision"]),
        ("seed", str(config["seed"])),
        ("ncppo", ncppo.__version__),
    ]
    lines = [*front, f"# {run_name}", ""]
    what = "A LoRA" if lora else "A fine-tuned U-Net"
    lines += [f"{what} for `{base}`, trained with [ncppo](https://arxiv.org/abs/2406.17636) by {method} on "
              f"{summary['data']['pairs']:,} preference pairs.", "", "## Training", "", "| setting | value |",
              "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    final = summary.get("final_metrics") or {}
    mean = summary.get("mean_metrics") or {}
    shown = [k for k in _METRICS if k in final or k in mean]
    lines += ["## Final metrics", ""]
    if shown:
        lines += ["| metric | last logged step | mean over the run |", "|---|---|---|"]
        lines += [f"| {k} | {_number(final.get(k, ''))} | {_number(mean.get(k, ''))} |" for k in shown]
    else:
        lines.append("No metrics were logged.")
    if summary.get("warnings"):
        lines += ["", "Warnings during training:", *(f"- {w['message']}" for w in summary["warnings"])]
    lines.append("")

    if lora:
        lines += ["## Use with diffusers", "", "```python", "import torch",
                  "from diffusers import AutoPipelineForText2Image", "",
                  f'pipe = AutoPipelineForText2Image.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
                  f'pipe.load_lora_weights("{out / "lora"}")  # or a checkpoint: "{out / "checkpoints"}/step-N"',
                  'image = pipe("a photo of a cat").images[0]', "```", "",
                  "or with ncppo:", "", "```bash", f"{summary['sample_command']}", "```", ""]
        if kohya:
            lines += ["## Use in AUTOMATIC1111 / ComfyUI", "",
                      f"`lora/{kohya}` holds the same LoRA in the kohya key format, with the training settings in "
                      "its safetensors header (`ss_*`, `modelspec.*` and `ncppo.*` keys).", "",
                      f"- AUTOMATIC1111 / Forge / SD.Next: copy it into `models/Lora/` and add "
                      f"`<lora:{Path(kohya).stem}:1>` to the prompt.",
                      "- ComfyUI: copy it into `models/loras/` and load it with a `LoraLoaderModelOnly` (or "
                      "`LoraLoader`) node.",
                      "- diffusers reads it too: `pipe.load_lora_weights(\"lora/" + kohya + "\")`.", ""]
    else:
        lines += ["## Use with diffusers", "", "```python", "from diffusers import AutoPipelineForText2Image, "
                  "UNet2DConditionModel", "", f'unet = UNet2DConditionModel.from_pretrained("{out / "unet"}")',
                  f'pipe = AutoPipelineForText2Image.from_pretrained("{base}", unet=unet)', "```", ""]
    lines += ["## Files", "",
              "- `lora/pytorch_lora_weights.safetensors`: the LoRA in diffusers format" if lora else
              "- `unet/`: the fine-tuned U-Net in diffusers format",
              *([f"- `lora/{kohya}`: the LoRA in kohya / A1111 / ComfyUI format"] if kohya else []),
              "- `checkpoints/step-N/`: checkpoints for resuming" + (" (each is also a diffusers LoRA)" if lora else ""),
              "- `config.yaml`: the resolved configuration; `summary.json`: the run's record; "
              "`metrics.jsonl` / `metrics.csv`: per-step metrics; `validation/`: sample grids", ""]
    return "\n".join(lines)
