"""``ncppo estimate CONFIG.yaml [key=value ...]``: parse, call :func:`ncppo.planning.estimate_run`, print."""

from __future__ import annotations

import json

from ncppo.planning.hardware import DEFAULT_UTILIZATION, GPUS

_PHASES = (("policy", "policy U-Net forward"), ("reference", "reference U-Net forward (no grad)"),
           ("encoder", "encoder passes f and loss"), ("backward", "backward"), ("total", "total"))


def add_planning_commands(sub) -> None:
    est = sub.add_parser("estimate", help="FLOPs, memory and time of a training config's run, without loading weights")
    est.add_argument("config", help="a training YAML config (as for ncppo train)")
    est.add_argument("overrides", nargs="*", help="section.key=value, as for ncppo train (e.g. batch_size=4)")
    est.add_argument("--model", help="a preset (sd15, sdxl) or a pipeline folder instead of model.pretrained; "
                                     "only the components' config.json files are read")
    est.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    est.add_argument("--gpus", type=int, default=1, help="GPUs (data-parallel processes) of the run")
    est.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                     help="the fraction of the GPU's peak throughput the run reaches")
    est.add_argument("--json", action="store_true", help="print the estimate as JSON")
    est.set_defaults(func=_estimate)


def _estimate(args) -> int:
    from ncppo.planning import estimate_run
    from ncppo.training.config import load_config

    config = load_config(args.config, args.overrides)
    result = estimate_run(config, model=args.model, gpu_name=args.gpu, num_gpus=args.gpus,
                          utilization=args.utilization)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _tf(flops: float) -> str:
    scale, unit = next((s, u) for s, u in ((1e12, "TFLOP"), (1e9, "GFLOP"), (0, "MFLOP")) if flops >= s)
    return f"{flops / (scale or 1e6):10.2f} {unit}"


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.2f} MiB"


def format_table(r: dict) -> str:
    """The estimate as a plain-text table."""
    f, m, g = r["flops_per_micro_step"], r["memory_bytes"], r["gpu"]
    tuned = f"LoRA rank {r['lora_rank']}" if r["finetune"] == "lora" else "full fine-tune"
    lines = [f"{r['objective']} on {r['model']} ({r['pipeline']}, {tuned}), {r['resolution']} px = "
             f"{r['latent_size']}x{r['latent_size']} latents, mixed precision {r['mixed_precision']}, gradient "
             f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, {r['optimizer']}",
             "",
             f"FLOPs per micro-step ({r['batch_size_per_gpu']} pairs per GPU; counted on the real step):"]
    fused = r["reference_pass"] == "difference"  # the reference rides in the policy's pass
    lines += [f"  {'policy + reference (difference pass)' if fused and key == 'policy' else label:36s}{_tf(f[key])}"
              for key, label in _PHASES if not (fused and key == "reference")]
    lines.append(f"  {'data encoding (VAE, text encoders)':36s}{_tf(f['data_encoding'])}   {r['data']}")
    c = r["counterpart"]
    lines.append(f"  {c['objective'] + ' on the same setup':36s}{_tf(c['flops_per_micro_step'])}   "
                 f"NCP-X / X = {r['ncp_ratio']:.2f}x")
    w = m["weights"]
    lines += ["", "Memory per GPU:",
              f"  {'weights: U-Net (frozen part)':36s}{_gib(w['unet_frozen'])}",
              f"  {'weights: trained (float32)':36s}{_gib(w['trainable'])}"]
    if w["reference_copy"]:
        lines.append(f"  {'weights: frozen reference copy':36s}{_gib(w['reference_copy'])}")
    lines += [f"  {'weights: VAE and text encoders':36s}{_gib(w['vae_and_text_encoders'])}",
              f"  {'gradients (float32)':36s}{_gib(m['gradients'])}",
              f"  {'optimizer state (' + r['optimizer'] + ')':36s}{_gib(m['optimizer_state'])}",
              f"  {'activations (checkpointing off)':36s}{_gib(m['activations_gradient_checkpointing_off'])}",
              f"  {'activations (checkpointing on)':36s}{_gib(m['activations_gradient_checkpointing_on'])}",
              f"  {'total as configured':36s}{_gib(m['total'])}   of {g['usable_memory_gib']:.0f} GiB usable on "
              f"a {g['name']} ({g['memory_reserve']:.0%} reserved); largest batch that fits: {r['largest_batch']}",
              "",
              f"Time on {r['gpus']} x {g['name']} at {g['peak_tflops']:g} TFLOP/s peak ({g['precision']}), "
              f"utilisation {g['utilization']:.2f}:",
              f"  optimizer step (effective batch {r['effective_batch']} = {r['batch_size_per_gpu']} x "
              f"{r['gradient_accumulation_steps']} accumulation x {r['gpus']} GPUs): {r['seconds_per_optimizer_step']:.3g} s",
              f"  run ({r['max_steps']} steps): {r['run_hours']:.3g} h = {r['gpu_hours']:.3g} GPU-hours",
              "", "Assumptions:"]
    lines += [f"  - {a}" for a in r["assumptions"]]
    return "\n".join(lines)
