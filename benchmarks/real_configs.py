"""The real SD1.5 and SDXL U-Nets (random weights) on the CPU: the encoder against the hooked full forward,
and one training step of DPO and NCP-DPO at a small resolution, with seconds per step and peak memory.

Too slow for the test suite (building SD1.5 takes about a minute here, a step tens of seconds; SDXL more):
``tests/test_real_configs.py`` runs the same code paths on fake tensors. SD1.5 runs in float32 (3.4 GB of
weights), SDXL in bf16 with CPU autocast (5.1 GB; float32 would be 10 GB), both under 12 GB of memory.

    python benchmarks/real_configs.py      # writes benchmarks/results/real_configs.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_step import bench  # noqa: E402

from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.perception import FEATURE_CHOICES, NoiseConditionedEncoder, feature_names  # noqa: E402
from ncppo.planning.measure import hooked_levels  # noqa: E402

SETUPS = (("sd15", "no"), ("sdxl", "bf16"))


def encoder_equals_forward(model, batch) -> dict:
    """Every feature choice of the encoder against the full forward's hooked tensors (exact equality)."""
    pairs = model.encode_batch(batch)
    x, t = pairs.latents_w, torch.full((pairs.batch_size,), 500)
    dtype = model.unet.dtype
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    result = {}
    with torch.no_grad(), autocast, model.frozen_unet() as unet:
        full = hooked_levels(unet, x.to(dtype), t, pairs.condition_w)
        for features in FEATURE_CHOICES:
            feats = NoiseConditionedEncoder(features)(unet, x, t, **pairs.condition_w.unet_kwargs())
            names = feature_names(features, len(unet.down_blocks))
            result[features] = {"equal": all(torch.equal(f, full[n]) for f, n in zip(feats, names)),
                                "shapes": [list(f.shape) for f in feats]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64, help="pixels (64: 8x8 latents)")
    parser.add_argument("--presets", nargs="+", default=[p for p, _ in SETUPS])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_configs.json"))
    args = parser.parse_args(argv)
    rows = []
    for preset, precision in SETUPS:
        if preset not in args.presets:
            continue
        row = bench(preset, precision, device="cpu", resolution=args.resolution, batch_pairs=1, steps=1,
                    gradient_checkpointing=False, toy=False, warmup=0, check=encoder_equals_forward)
        row["max_rss_gib_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(row)
        m = row["methods"]
        print(f"{preset} ({precision}) {args.resolution}px: encoder equal to the full forward for "
              f"{sum(v['equal'] for v in row['check'].values())}/{len(row['check'])} feature choices; "
              f"dpo {m['dpo']['seconds_per_step']:.1f} s, ncp-dpo {m['ncp-dpo']['seconds_per_step']:.1f} s per step; "
              f"step peak {m['dpo']['step_peak_bytes'] / 2**20:.0f} / {m['ncp-dpo']['step_peak_bytes'] / 2**20:.0f} "
              f"MiB (estimate {row['estimate']['step_peak_bytes']['dpo'] / 2**20:.0f} / "
              f"{row['estimate']['step_peak_bytes']['ncp-dpo'] / 2**20:.0f}); max RSS {row['max_rss_gib_so_far']:.1f} GiB",
              flush=True)
    report = {"benchmark": "real_configs", "command": "python benchmarks/real_configs.py " + " ".join(argv or sys.argv[1:]),
              "torch": torch.__version__, "note": "CPU process time of one profiled step (forward and backward); "
              "peak: torch's CPU memory profiler during the step (weights excluded)", "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
