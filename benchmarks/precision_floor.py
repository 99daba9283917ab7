"""Where does the half-precision floor of DPO-family gradients come from? The policy's distance from its reference.

``benchmarks/mixed_precision.py`` finds that at the calibrated beta, noise-space DPO and NCP-DPO alike keep a
bf16 gradient cosine of only 0.95-0.98 with float32 (0.9995 at beta 1). The argument of the sigmoid is a
difference of the policy's and the reference's losses, two separate half-precision U-Net passes: their
activations differ by the LoRA's small contribution, which bf16 (8 significant bits) rounds against the
activations themselves. This script varies that distance (the LoRA B matrices drawn at a scale of 0.002,
0.02 and 0.2: a policy just after the start of training, the benchmark's default, and one far from its
reference) and measures the cosine of each objective's LoRA gradient under the trainer's bf16 and fp16
set-ups with the float32 gradient, at the objective's training beta (DPO 5000; NCP-DPO the calibrated one),
with the reference as a separate pass and with the difference pass (``model.reference_pass``), which carries
the policy's difference from the reference through the network and so keeps it in half precision. It also
times one training step of each (the same batch, alternated, median of the repeats) in float32.

    python benchmarks/precision_floor.py           # writes benchmarks/results/precision_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixed_precision as mp  # noqa: E402

from ncppo.calibration import calibrate_beta  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.objectives import make_objective  # noqa: E402

LORA_B_SCALES = (0.002, 0.02, 0.2)
REFERENCE_PASSES = ("separate", "difference")


def floor(kind: str, batches: int, image_size: int, device: str) -> list[dict]:
    pipe = build_tiny_pipeline(kind, image_size=image_size, seed=0)
    size = image_size // pipe.vae_scale_factor
    rows = []
    for scale in LORA_B_SCALES:
        reference = mp._model(pipe, None, device, scale)
        calibration = [mp._pairs(reference, 2, size, seed=900 + b) for b in range(2)]
        ncp, _ = calibrate_beta(reference, make_objective("ncp-dpo", beta="auto", scale="noise"), calibration,
                                [torch.Generator().manual_seed(b) for b in range(2)])
        objectives = {"dpo": make_objective("dpo"), "ncp-dpo (linear, encoder in half)": ncp}
        pairs = [mp._pairs(reference, 2, size, seed=100 + b) for b in range(batches)]
        truth = {name: [mp._gradient(reference, obj, p, b, None, device)[0] for b, p in enumerate(pairs)]
                 for name, obj in objectives.items()}
        for precision in mp.DTYPES:
            for reference_pass in REFERENCE_PASSES:
                model = mp._model(pipe, precision, device, scale, reference_pass)
                for name, obj in objectives.items():
                    cos = [mp._cos(mp._gradient(model, obj, p, b, precision, device)[0], truth[name][b])
                           for b, p in enumerate(pairs)]
                    rows.append({"kind": kind, "lora_b_scale": scale, "precision": precision, "objective": name,
                                 "reference_pass": reference_pass,
                                 "cosine_min": min(cos), "cosine_median": statistics.median(cos)})
                    print(f"{kind} B~{scale:g} {precision} {reference_pass:10s} {name:34s} cos min {min(cos):.4f} "
                          f"median {statistics.median(cos):.4f}", flush=True)
    return rows


def step_seconds(kind: str, image_size: int, device: str, repeats: int) -> dict:
    """Median float32 seconds of one DPO and one NCP-DPO step (forward and backward) by reference pass, the two
    passes alternated on one batch so that the machine's load falls on both alike."""
    pipe = build_tiny_pipeline(kind, image_size=image_size, seed=0)
    size = image_size // pipe.vae_scale_factor
    models = {rp: mp._model(pipe, None, device, 0.02, rp) for rp in REFERENCE_PASSES}
    pairs = mp._pairs(models["separate"], 2, size, seed=100)
    out = {}
    for name in ("dpo", "ncp-dpo"):
        objective = make_objective(name, beta=5000.0)
        times = {rp: [] for rp in REFERENCE_PASSES}
        for _ in range(repeats):
            for rp, model in models.items():
                times[rp].append(mp._gradient(model, objective, pairs, 0, None, device)[1])
        medians = {rp: statistics.median(t) for rp, t in times.items()}
        out[name] = {**{f"{rp}_seconds": v for rp, v in medians.items()},
                     "difference_over_separate": medians["difference"] / medians["separate"]}
        print(f"{kind} {name}: step {medians['separate']:.3f} s separate, {medians['difference']:.3f} s difference "
              f"({out[name]['difference_over_separate']:.2f}x)", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per reference pass and objective")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_floor.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [row for kind in args.kinds for row in floor(kind, args.batches, args.image_size, args.device)]
    seconds = {kind: step_seconds(kind, args.image_size, args.device, args.repeats) for kind in args.kinds}
    record = {"command": "python benchmarks/precision_floor.py " + " ".join(argv or sys.argv[1:]),
              "device": args.device, "torch": torch.__version__, "wall_seconds": time.perf_counter() - start,
              "rows": rows, "step_seconds_fp32": seconds}
    atomic_write_text(args.out, json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
