"""``ncppo estimate`` for the paper's setups, next to the paper's GPU-hours, and checked on CPU-sized U-Nets.

The paper (arXiv 2406.17636) trains on 4x H100 with Diffusion-DPO's hyper-parameters (effective batch 2048
pairs, 2000 steps, LoRA rank 64, 8-bit AdamW, half-precision frozen weights) and reports NCP-DPO beating
the published DPO models within 3.5 GPU-hours (SD1.5, 512 px) and 12 GPU-hours (SDXL, 1024 px). The
estimate gives the GPU-hours of the configs in ``configs/`` and the optimiser steps those GPU-hours buy.

The validation rows run the real step on the CPU at two sizes of the tiny U-Net family: CPU time ratios
between methods against the estimated FLOP ratios, and the peak memory of the step (torch's CPU memory
profiler) against the estimated activation peak.

    python benchmarks/estimates.py            # writes benchmarks/results/estimates.json (~30 min on 2 loaded cores)
"""

from __future__ import annotations

import argparse
import json
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
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.objectives import make_objective  # noqa: E402
from ncppo.planning import estimate_run  # noqa: E402
from ncppo.planning.estimate import AbstractRun  # noqa: E402
from ncppo.planning.measure import measured_step, timed_step  # noqa: E402
from ncppo.training.config import load_config  # noqa: E402

PAPER = {"sd15": {"config": "configs/sd15-ncp-dpo.yaml", "paper_gpu_hours": 3.5},
         "sdxl": {"config": "configs/sdxl-ncp-dpo.yaml", "paper_gpu_hours": 12.0}}
PAPER_GPUS = 4


def paper_setups(utilization: float) -> list[dict]:
    rows = []
    for preset, spec in PAPER.items():
        start = time.perf_counter()
        r = estimate_run(load_config(ROOT / spec["config"]), model=preset, gpu_name="h100", num_gpus=PAPER_GPUS,
                         utilization=utilization, check_fit=False)
        f = r["flops_per_micro_step"]
        micro = r["gradient_accumulation_steps"] * r["gpus"]
        peak = r["gpu"]["peak_tflops"] * 1e12 * utilization
        step_gpu_seconds = {"ncp-dpo": (f["total"] + f["data_encoding"]) * micro / peak,
                            "ncp-dpo, latent cache": f["total"] * micro / peak,
                            "dpo": (r["counterpart"]["flops_per_micro_step"] + f["data_encoding"]) * micro / peak,
                            "dpo, latent cache": r["counterpart"]["flops_per_micro_step"] * micro / peak}
        hours = spec["paper_gpu_hours"]
        rows.append({
            "setup": preset, "config": spec["config"], "estimate": r, "estimate_seconds": time.perf_counter() - start,
            "paper_gpu_hours": hours,
            "gpu_hours_for_max_steps": {k: v * r["max_steps"] / 3600 for k, v in step_gpu_seconds.items()},
            "optimizer_steps_in_paper_gpu_hours": {k: hours * 3600 / v for k, v in step_gpu_seconds.items()},
            "pairs_in_paper_gpu_hours": {k: hours * 3600 / v * r["effective_batch"] for k, v in step_gpu_seconds.items()},
            "reading": "the paper's GPU-hours are the time NCP-DPO took to beat the published DPO model, not a full "
                       "2000-step run: at this utilisation they buy the optimiser steps listed",
        })
        print(f"{preset}: {rows[-1]['gpu_hours_for_max_steps']['ncp-dpo']:.0f} GPU-hours for {r['max_steps']} steps; "
              f"{hours} GPU-hours = {rows[-1]['optimizer_steps_in_paper_gpu_hours']['ncp-dpo']:.0f} steps "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def _batch(size: int, b: int, seed: int = 0) -> PreferenceBatch:
    g = torch.Generator().manual_seed(seed)
    return PreferenceBatch(latents_w=torch.randn(b, 4, size, size, generator=g),
                           latents_l=torch.randn(b, 4, size, size, generator=g),
                           prompt_embeds=torch.randn(b, 77, 32, generator=g), ids=list(range(b)))


def validation(reps: int) -> list[dict]:
    names = ("sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo")
    rows = []
    for channels, image_size in (((32, 64), 32), ((64, 128, 256), 32), ((64, 128, 256), 64)):
        pipe = build_tiny_pipeline("sd15", block_out_channels=channels, image_size=image_size)
        model = PreferenceModel(pipe, lora=LoraSettings(rank=8))
        model.unet.train()
        batch = _batch(image_size // pipe.vae_scale_factor, 2)
        run = AbstractRun(None, lora=LoraSettings(rank=8), batch_size=2, resolution=image_size,
                          pipeline=build_tiny_pipeline("sd15", block_out_channels=channels, image_size=image_size))
        counted = {n: run.count(make_objective(n), False) for n in names}
        times = {n: [] for n in names}
        for n in names:
            timed_step(model, make_objective(n), batch)
        for _ in range(reps):
            for n in names:
                times[n].append(timed_step(model, make_objective(n), batch))
        measured = {n: measured_step(model, make_objective(n), batch)["peak_bytes"] for n in ("dpo", "ncp-dpo")}
        median = {n: statistics.median(v) for n, v in times.items()}
        rows.append({
            "block_out_channels": list(channels), "image_size": image_size, "batch_pairs": 2, "reps": reps,
            "flops": {n: c.total for n, c in counted.items()},
            "flop_ratio_to_dpo": {n: counted[n].total / counted["dpo"].total for n in names},
            "cpu_time_ratio_to_dpo": {n: median[n] / median["dpo"] for n in names},
            "median_cpu_seconds": median,
            "activation_peak_bytes": {n: {"estimated": counted[n].peak_bytes, "measured": measured[n],
                                          "ratio": counted[n].peak_bytes / measured[n]} for n in measured},
        })
        print(f"{channels}@{image_size}: flop/time ratio ncp-dpo "
              f"{rows[-1]['flop_ratio_to_dpo']['ncp-dpo']:.2f}/{rows[-1]['cpu_time_ratio_to_dpo']['ncp-dpo']:.2f}, "
              f"sft {rows[-1]['flop_ratio_to_dpo']['sft']:.2f}/{rows[-1]['cpu_time_ratio_to_dpo']['sft']:.2f}; "
              f"memory est/measured {rows[-1]['activation_peak_bytes']['dpo']['ratio']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utilization", type=float, default=0.35)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-paper", action="store_true", help="only the CPU validation rows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimates.json"))
    args = parser.parse_args(argv)
    report = {
        "benchmark": "estimates",
        "command": "python benchmarks/estimates.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__},
        "paper": {"gpus": f"{PAPER_GPUS}x NVIDIA H100", "effective_batch": 2048, "max_steps": 2000,
                  "source": "arXiv 2406.17636 Sec. 6 and abstract; METHOD.md 'The paper's headline numbers'"},
        "validation": {"what": "CPU time ratios between methods vs estimated FLOP ratios (interleaved steps, "
                               "process time, median); activation peak of a real CPU step (torch.profiler "
                               "profile_memory, running sum of allocation records) vs the fake-tensor estimate",
                       "rows": validation(args.reps)},
    }
    if not args.skip_paper:
        report["paper_setups"] = paper_setups(args.utilization)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
