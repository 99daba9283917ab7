"""What a run tells its user: the start banner, the end summary (``summary.json``) and its text, and the
training record written into the exported LoRA. Each function reads a :class:`~ncppo.training.Trainer`."""

from __future__ import annotations

import math
import time
from pathlib import Path

from ncppo.training.diagnostics import Diagnostics
from ncppo.training.output import normal_path


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}} = {v}" for k, v in rows)])


def model_name(t) -> str:
    return t.config.model.pretrained or "a model passed to the Trainer"


def banner(t) -> str:
    """diffusers' "***** Running training *****": data, batch sizes, the resolved learning rate, the objective."""
    cfg, acc, d = t.config, t.accelerator, t.derived
    data = t.data.summary()
    per_epoch = t.batches.per_epoch * acc.num_processes
    budget = f"{cfg.max_train_minutes:g} min of training" if cfg.max_train_minutes is not None else "none"
    lr = (f"{cfg.optim.learning_rate:g} x {d.effective_batch} (scale_lr: x effective batch) = {d.learning_rate:g}"
          if cfg.optim.scale_lr else f"{d.learning_rate:g} (scale_lr: false)")
    precision = cfg.mixed_precision + ("" if acc.device.type != "cpu" else " (CPU: frozen weights stay float32)")
    options = {k: v for k, v in cfg.objective.options().items() if k != "name"}
    beta = getattr(t.objective.preference, "beta", None)
    options["beta"] = beta if beta is not None else options["beta"]
    if t.model.lora is not None:
        lora = t.model.lora
        model = f"{model_name(t)} (LoRA rank {lora.rank}, alpha {lora.alpha or lora.rank:g})"
    else:
        model = f"{model_name(t)} (full fine-tune)"
    trainable = sum(p.numel() for p in t.params)
    if t.folder.resume_from is not None:
        start = (f"resuming from step {t.step} ({t.folder.resume_from}, {t.train_seconds:.1f} s of training so far)")
    else:
        start = "a new run"
    checkpoints = [f"every {cfg.checkpoint_every_steps} steps"] if cfg.checkpoint_every_steps else []
    checkpoints += [f"every {cfg.checkpoint_every_minutes:g} min"] if cfg.checkpoint_every_minutes else []
    rows = [
        ("output folder", f"{t.out} ({start})"),
        ("model", model),
        ("trainable parameters", f"{trainable:,}"),
        ("data", f"{data['pairs']:,} pairs from {data['source']}"),
        ("data skipped", t.data.skip_report()),
        ("batches per epoch", f"{per_epoch:,} of {cfg.batch_size} pairs"),
        ("processes", str(acc.num_processes)),
        ("per-process batch", f"{cfg.batch_size} pairs"),
        ("gradient accumulation", f"{d.gradient_accumulation_steps} micro-steps"),
        ("effective batch", f"{d.effective_batch} pairs per optimiser step"),
        ("optimiser steps", f"{cfg.max_steps:,} (max_steps)"),
        ("time budget", budget),
        ("learning rate", lr),
        ("optimiser", f"{cfg.optim.optimizer} (betas {cfg.optim.adam_beta1:g}, {cfg.optim.adam_beta2:g}, eps "
                      f"{cfg.optim.adam_epsilon:g}, weight decay {cfg.optim.weight_decay:g}, clip "
                      f"{cfg.optim.max_grad_norm:g}), {cfg.optim.lr_scheduler} with {cfg.optim.lr_warmup_steps} "
                      "warm-up steps"),
        ("precision", precision),
        ("objective", f"{cfg.objective.name} ({', '.join(f'{k}={v}' for k, v in options.items())})"),
        ("checkpoints", (", ".join(checkpoints) or "at the end only") + f", the newest {cfg.keep_last_checkpoints} kept"),
        ("seed", str(cfg.seed)),
    ]
    return _table("***** Running training *****", rows)


def progress_bar(t, timed: bool, budget: float):
    """tqdm over the real bound: the training-time budget in seconds when there is one (not an ETA from
    ``max_steps``), else the steps."""
    from tqdm.auto import tqdm

    cfg = t.config
    disable = not t.accelerator.is_main_process
    if timed:
        return tqdm(total=budget, initial=min(t.train_seconds, budget), unit="s",
                    desc=f"train {cfg.objective.name} (budget {cfg.max_train_minutes:g} min)",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
                    disable=disable)
    return tqdm(total=cfg.max_steps, initial=t.step, unit="step", desc=f"train {cfg.objective.name}", disable=disable)


def bar_postfix(metrics: dict, step: int, max_steps: int, timed: bool) -> dict:
    postfix = {"step": f"{step}/{max_steps}"} if timed else {}
    postfix["loss"] = f"{metrics.get('loss', float('nan')):.6g}"  # near log 2 (0.693147) the change is in the 5th digit
    if "argument_rms" in metrics:
        postfix["arg_rms"] = f"{metrics['argument_rms']:.2g}"
    if "implicit_acc" in metrics:
        postfix["acc"] = f"{metrics['implicit_acc']:.2f}"
    return postfix


def summary(t, stopped_by: str, checksums: list) -> dict:
    """What ``summary.json`` holds: the run's end, final and mean metrics, diagnostics, where the weights are."""
    cfg, d = t.config, t.derived
    rows = t.logger.rows
    lora = t.model.lora is not None
    weights = (t.out / ("lora" if lora else "unet")).absolute()
    if lora:
        sample = (f"ncppo generate --model {model_name(t)} --lora {weights} --prompts PROMPTS.txt "
                  f"--out {t.out / 'samples'}")
    else:
        sample = (f"load {weights} with diffusers' UNet2DConditionModel.from_pretrained and put it in the "
                  f"pipeline of {model_name(t)}")
    finite = [r for r in rows if not r.get("skipped")]
    mean = {}
    for key in sorted({k for r in finite for k in r} - {"step"}):
        values = [float(r[key]) for r in finite if key in r and math.isfinite(float(r[key]))]
        if values:
            mean[key] = sum(values) / len(values)
    resumed = t.folder.resume_from
    return {
        "steps": t.step, "train_seconds": t.train_seconds, "wall_seconds": time.perf_counter() - t.wall_start,
        "stopped_by": stopped_by,
        "resumed_from": None if resumed is None else {"step": int(t.folder.resume_state["step"]),
                                                      "checkpoint": str(resumed),
                                                      "changed_settings": t.resume_differences},
        "effective_batch": d.effective_batch, "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "num_processes": d.num_processes, "batch_size_per_process": d.batch_size_per_process,
        "learning_rate": d.learning_rate, "resolved": t.resolved(),
        "objective": {**cfg.objective.options(), "beta_used": getattr(t.objective.preference, "beta", None)},
        "data": t.data.summary(),
        "skipped_steps": dict(t.diagnostics.counts),
        "final_metrics": finite[-1] if finite else None, "mean_metrics": mean,
        "diagnostics": Diagnostics.summarise(rows), "warnings": t.diagnostics.warnings,
        "notes": t.folder.notes + t.logger.notes,
        "weights": str(weights), "sample_command": sample,
        "weights_kohya": str(t.kohya_file.absolute()) if lora and t.kohya_file else None,
        "model_card": str((t.out / "README.md").absolute()), "run_name": t.run_name,
        "export": export_info(t) if lora else None,
        "param_checksums_per_rank": checksums,
    }


def end_text(summary: dict, skip_report: str, out: Path) -> str:
    """"***** Training finished *****": how it stopped, final metrics, where the weights are, how to sample."""
    final = summary["final_metrics"] or {}
    shown = [f"{k} {final[k]:.6g}" for k in ("loss", "implicit_acc", "reward_margin", "grad_norm") if k in final]
    diag = [f"{k} {v['final']:.3g} (mean {v['mean']:.3g})" for k, v in summary["diagnostics"].items()
            if k in ("argument_rms", "saturated_frac", "eps_dominated_frac", "grad_norm_clipped")]
    skipped = summary["skipped_steps"]
    rows = [
        ("stopped by", f"{summary['stopped_by']} after {summary['steps']} steps ({skipped['no_valid_pair']} without a "
                       f"valid pair, {skipped['nonfinite']} non-finite)"),
        ("training time", f"{summary['train_seconds']:.1f} s (this session's wall time {summary['wall_seconds']:.1f} s)"),
        ("final metrics", ", ".join(shown) or "none logged"),
        ("diagnostics", ", ".join(diag) or "none"),
        ("data skipped", skip_report),
        ("warnings", "; ".join(w["message"] for w in summary["warnings"]) or "none"),
        ("weights", summary["weights"] + (f" (A1111/ComfyUI: {Path(summary['weights_kohya']).name})"
                                          if summary["weights_kohya"] else "")),
        ("sample from it", summary["sample_command"]),
        ("summary", f"{out / 'summary.json'}; model card {out / 'README.md'}"),
    ]
    return _table("***** Training finished *****", rows)


def export_info(t) -> dict:
    """The training record written into the exported LoRA's safetensors header (``ncppo.<key>``)."""
    import ncppo

    cfg, d, lora = t.config, t.derived, t.model.lora
    beta = getattr(t.objective.preference, "beta", None)
    source = t.data.summary()["source"]
    return {"version": ncppo.__version__, "base_model": normal_path("model.pretrained", model_name(t)),
            "objective": cfg.objective.name, "objective_settings": cfg.objective.options(), "beta": beta,
            "steps": t.step, "data_source": normal_path("data.source", source),
            "pairs": t.data.summary()["pairs"], "effective_batch": d.effective_batch,
            "learning_rate": d.learning_rate, "lora_rank": lora.rank, "lora_alpha": lora.alpha or lora.rank,
            "lora_targets": list(lora.target_modules), "resolution": cfg.data.resolution, "seed": cfg.seed,
            "mixed_precision": cfg.mixed_precision, "run_name": t.run_name, "model_kind": t.model.kind}


def export_kohya(t) -> Path:
    """``lora/<run_name>_kohya.safetensors``: the LoRA in kohya/A1111/ComfyUI keys, with :func:`export_info`."""
    from ncppo.models.lora_export import export_kohya as export
    from ncppo.models.lora_export import kohya_file_name, training_metadata

    lora = t.model.lora
    meta = training_metadata(kind=t.model.kind, base_model=model_name(t), rank=lora.rank,
                             alpha=lora.alpha or lora.rank, title=t.run_name, info=export_info(t))
    for old in (t.out / "lora").glob("*_kohya.safetensors"):
        old.unlink()  # a resumed run under another run_name
    return export(t.out / "lora", t.out / "lora" / kohya_file_name(t.run_name), meta)
