"""Per-step time, peak memory and NCP-DPO / DPO of the real SD1.5 and SDXL U-Nets (random weights) on a GPU.

The set-up is the trainer's on a GPU: frozen U-Net weights in the half precision, the LoRA (rank 64 on the
attention projections) in float32, autocast, cached latents and prompt embeddings (no VAE or text
encoder), one step = forward, backward and an AdamW update. Each row also carries ``ncppo estimate``'s
figures for the same shapes, so the estimate can be checked on the GPU it was made for.

    python benchmarks/gpu_step.py                        # cuda; writes benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --device cpu --toy     # the tiny U-Nets on the CPU (what the tests run)
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncppo.batch import PreferenceBatch  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.preference_model import LoraSettings, PreferenceModel  # noqa: E402
from ncppo.objectives import make_objective  # noqa: E402
from ncppo.planning.architectures import build_abstract_pipeline, read_configs  # noqa: E402
from ncppo.planning.estimate import AbstractRun  # noqa: E402
from ncppo.planning.measure import measured_step  # noqa: E402
from ncppo.precision import HALF_DTYPES as HALF  # noqa: E402

DTYPES = {**HALF, "no": torch.float32}
METHODS = ("dpo", "ncp-dpo")


def _configs(preset: str, toy: bool) -> dict:
    """The preset's configs; with ``toy`` its U-Net is the tiny one of :mod:`ncppo.models.tiny` (same layout)."""
    configs = read_configs(preset)
    if toy:
        from ncppo.models.tiny import tiny_unet

        configs = {**configs, "unet": dict(tiny_unet(preset).config)}
    return configs


def _pipeline(preset: str, precision: str, device: str, toy: bool, seed: int = 0):
    return build_abstract_pipeline(_configs(preset, toy), random_unet=DTYPES[precision], seed=seed, device=device)


def _batch(model, b: int, size: int, device: str) -> PreferenceBatch:
    unet = model.unet.config
    g = torch.Generator().manual_seed(0)
    text = model.pipeline.text_encoder.config.max_position_embeddings
    pooled = None
    if unet.addition_embed_type == "text_time":
        pooled = torch.randn(b, unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim, generator=g)
    batch = PreferenceBatch(latents_w=torch.randn(b, unet.in_channels, size, size, generator=g),
                            latents_l=torch.randn(b, unet.in_channels, size, size, generator=g),
                            prompt_embeds=torch.randn(b, text, unet.cross_attention_dim, generator=g),
                            pooled_prompt_embeds=pooled, ids=list(range(b)))
    return batch.replace(**{k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(preset: str, precision: str, *, device: str, resolution: int, batch_pairs: int, steps: int,
          gradient_checkpointing: bool, toy: bool, warmup: int = 1, check=None) -> dict:
    """One row: each method's seconds per step and peak memory, and the estimate's figures. On the CPU the
    timed steps are the profiled ones (torch's CPU memory profiler; its overhead is in the time; forward and
    backward, no optimiser update).
    ``check(model, batch)`` runs on the built model first and its result is stored as ``row["check"]``."""
    pipe = _pipeline(preset, precision, device, toy)
    model = PreferenceModel(pipe, lora=LoraSettings(rank=8 if toy else 64))
    model.set_frozen_dtype(HALF.get(precision))
    model.unet.to(device)
    model.schedule = model.schedule.to(device)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.unet.train()
    size = resolution // pipe.vae_scale_factor
    batch = _batch(model, batch_pairs, size, device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    autocast = torch.autocast(device.split(":")[0], dtype=HALF.get(precision, torch.bfloat16),
                              enabled=precision in HALF)
    row = {"preset": preset, "toy": toy, "precision": precision, "device": device, "resolution": resolution,
           "latent_size": size, "batch_pairs": batch_pairs, "gradient_checkpointing": gradient_checkpointing,
           "unet_params": sum(p.numel() for n, p in model.unet.named_parameters() if "lora" not in n),
           "lora_params": sum(p.numel() for p in model.trainable_parameters()), "methods": {}}
    if check is not None:
        row["check"] = check(model, batch)
    for name in METHODS:
        objective = make_objective(name)
        step = functools.partial(_step, model, objective, batch, optimizer, autocast)
        for _ in range(warmup):  # kernels, allocator, peft
            step()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            seconds = []
            for _ in range(steps):
                _synchronize(device)
                start = time.perf_counter()
                loss = step()
                _synchronize(device)
                seconds.append(time.perf_counter() - start)
            peak, step_peak = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - before
        else:
            with autocast:
                measured = [measured_step(model, objective, batch) for _ in range(steps)]
            seconds, step_peak = [m["cpu_seconds"] for m in measured], max(m["peak_bytes"] for m in measured)
            peak = step_peak + sum(p.numel() * p.element_size() for p in model.unet.parameters())
            loss = measured[-1]["loss"]
        row["methods"][name] = {"seconds_per_step": statistics.median(seconds), "seconds": seconds,
                                "peak_bytes": peak, "step_peak_bytes": step_peak, "loss": loss}
    m = row["methods"]
    row["ncp_dpo_over_dpo"] = m["ncp-dpo"]["seconds_per_step"] / m["dpo"]["seconds_per_step"]
    row["estimate"] = _estimate(preset, precision, resolution, batch_pairs, gradient_checkpointing, toy)
    return row


def _step(model, objective, batch, optimizer, autocast) -> float:
    """One optimisation step: forward and backward of the training step, AdamW update."""
    from ncppo.step import training_step

    with autocast:
        out = training_step(model, objective, batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def _estimate(preset, precision, resolution, batch_pairs, gradient_checkpointing, toy) -> dict:
    """``ncppo estimate``'s FLOPs and activation peak for the same shapes (fake tensors, on the CPU)."""
    run = AbstractRun(_configs(preset, toy), lora=LoraSettings(rank=8 if toy else 64), mixed_precision=precision,
                      batch_size=batch_pairs, resolution=resolution)
    counts = {n: run.count(make_objective(n), gradient_checkpointing) for n in METHODS}
    return {"flops": {n: c.total for n, c in counts.items()}, "step_peak_bytes": {n: c.peak_bytes for n, c in counts.items()},
            "ncp_dpo_over_dpo_flops": counts["ncp-dpo"].total / counts["dpo"].total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--resolution", type=int, help="pixels (default: 512 for sd15, 1024 for sdxl; 128 with --toy)")
    parser.add_argument("--batch-pairs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--toy", action="store_true", help="the tiny U-Nets of ncppo.models.tiny (CPU smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_step.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --device cpu --toy")
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            resolution = args.resolution or (128 if args.toy else {"sd15": 512, "sdxl": 1024}[preset])
            row = bench(preset, precision, device=args.device, resolution=resolution, batch_pairs=args.batch_pairs,
                        steps=args.steps, gradient_checkpointing=args.gradient_checkpointing, toy=args.toy)
            rows.append(row)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            m = row["methods"]
            print(f"{preset} {precision} {resolution}px: dpo {m['dpo']['seconds_per_step']:.3f} s/step, peak "
                  f"{m['dpo']['peak_bytes'] / 2**30:.2f} GiB; ncp-dpo {m['ncp-dpo']['seconds_per_step']:.3f} s/step, "
                  f"peak {m['ncp-dpo']['peak_bytes'] / 2**30:.2f} GiB; ncp-dpo/dpo {row['ncp_dpo_over_dpo']:.2f}x "
                  f"(FLOPs {row['estimate']['ncp_dpo_over_dpo_flops']:.2f}x)", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    report = {"benchmark": "gpu_step", "command": "python benchmarks/gpu_step.py " + " ".join(argv or sys.argv[1:]),
              "device": device_name, "torch": torch.__version__, "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
