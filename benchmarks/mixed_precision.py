"""Does the perceptual path keep its signal under the trainer's mixed precision? (issue: NCP numerics)

For tiny SD1.5-class and SDXL-class pipelines, the NCP-DPO LoRA gradient of each formulation
(``distance`` x ``encoder_dtype``) under bf16 and fp16 is compared with the exact float32 gradient of the
same loss, by cosine, over several batches: at the calibrated beta (``beta: auto``, what training sees)
and at beta 1, where no pair's sigmoid weight moves and the cosine measures the loss's gradient alone. The half-precision set-up is the trainer's own:
``PreferenceModel.set_frozen_dtype`` (frozen weights in half precision, LoRA in float32) and autocast
(``Accelerator.autocast`` for bf16; on CPU accelerate does not autocast fp16, so fp16 uses
``torch.autocast("cpu", float16)`` with a static loss scale, as the GradScaler would on a GPU). Noise-space
DPO is the control. It also counts the FLOPs of each formulation's step (``FlopCounterMode``) and times
the steps, and estimates the GPU cost from the FLOPs at H100 peak rates (half-precision work at the bf16
rate, float32 encoder work at the TF32 and at the plain FP32 rate).

    python benchmarks/mixed_precision.py                      # writes benchmarks/results/mixed_precision.json
    python benchmarks/mixed_precision.py --kinds sd15 --batches 2 --out /tmp/mp.json

On a GPU the same script runs with real half-precision kernels (``--device cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncppo.batch import Condition, EncodedPairs  # noqa: E402
from ncppo.calibration import calibrate_beta  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.preference_model import LoraSettings, PreferenceModel  # noqa: E402
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.objectives import make_objective  # noqa: E402
from ncppo.step import training_step  # noqa: E402

FORMULATIONS = {  # name -> objective options
    "exact/model (paper)": dict(distance="exact", encoder_dtype="model"),
    "exact/fp32": dict(distance="exact", encoder_dtype="fp32"),
    "linear/model": dict(distance="linear", encoder_dtype="model"),
    "linear/fp32": dict(distance="linear", encoder_dtype="fp32"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**12
# H100 SXM dense peak rates (TFLOP/s), NVIDIA's data sheet: bf16/fp16 tensor cores, TF32 tensor cores, FP32
H100_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}


def _pairs(model, batch_pairs: int, size: int, seed: int) -> EncodedPairs:
    """Random latents and conditions, drawn on the CPU (the same on every device) and moved to the model's."""
    g = torch.Generator().manual_seed(seed)
    channels = model.unet.config.in_channels
    lat = lambda: torch.randn(batch_pairs, channels, size, size, generator=g)  # noqa: E731
    embeds = torch.randn(batch_pairs, 77, model.unet.config.cross_attention_dim, generator=g)
    if model.kind == "sdxl":
        pooled = torch.randn(batch_pairs, model.pipeline.text_encoder_2.config.projection_dim, generator=g)
        time_ids = model.default_time_ids(lat())
        cond = Condition(embeds, pooled, time_ids)
    else:
        cond = Condition(embeds)
    device = model.unet.device
    cond = cond.map(lambda v: v.to(device))
    return EncodedPairs(lat().to(device), lat().to(device), cond, cond)


def _model(pipe, precision: str | None, device: str, lora_b_scale: float = 0.02,
           reference_pass: str = "auto") -> PreferenceModel:
    torch.manual_seed(0)  # peft draws the LoRA A matrices from the global generator: the same for every copy
    model = PreferenceModel(copy.deepcopy(pipe), lora=LoraSettings(rank=8), reference_pass=reference_pass)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy away from its reference, as after some training
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * lora_b_scale)
    model.set_frozen_dtype(DTYPES.get(precision))
    return model.to(device)


def _precision(precision: str | None, device: str):
    """The trainer's autocast: accelerate's for bf16 (and for fp16 on a GPU); plain autocast for CPU fp16."""
    if precision is None:
        return contextlib.nullcontext(), 1.0
    if device == "cpu" and precision == "fp16":
        return torch.autocast("cpu", dtype=torch.float16), FP16_LOSS_SCALE
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    return acc.autocast(), FP16_LOSS_SCALE if precision == "fp16" else 1.0  # accelerate's scaler starts at 2^16


def _gradient(model, objective, pairs, seed: int, precision: str | None, device: str) -> tuple[torch.Tensor, float]:
    """The LoRA gradient of one step; under fp16 the loss scale halves on overflow, as a GradScaler's does."""
    autocast, loss_scale = _precision(precision, device)
    params = model.trainable_parameters()
    while True:
        for p in params:
            p.grad = None
        start = time.perf_counter()
        with autocast:
            out = training_step(model, objective, pairs, generator=torch.Generator().manual_seed(seed))
        (out.loss * loss_scale).backward()
        if torch.cuda.is_available() and device != "cpu":
            torch.cuda.synchronize()  # kernels run asynchronously: time the work, not its launch
        seconds = time.perf_counter() - start
        grad = torch.cat([p.grad.flatten().double() for p in params]) / loss_scale
        if bool(torch.isfinite(grad).all()) or loss_scale <= 1.0:
            return grad, seconds
        loss_scale /= 16.0


def _flops(model, objective, pairs) -> dict:
    from ncppo.flops import FlopCounterMode  # with CPU flash attention counted, as every other count

    counter = FlopCounterMode(display=False)
    with counter:
        out = training_step(model, objective, pairs, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
    return int(counter.get_total_flops())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def bench_kind(kind: str, batches: int, batch_pairs: int, image_size: int, device: str, scale: str,
               reference_pass: str = "auto") -> dict:
    pipe = build_tiny_pipeline(kind, image_size=image_size, seed=0)
    size = image_size // pipe.vae_scale_factor
    reference = _model(pipe, None, device)
    rows = []
    names = {"dpo (control)": ("dpo", {})} | {f"ncp-dpo {k}": ("ncp-dpo", v) for k, v in FORMULATIONS.items()}
    # beta as `beta: auto` sets it (calibrated on the float32 model), so that no formulation saturates
    calibration = [_pairs(reference, batch_pairs, size, seed=900 + b) for b in range(2)]
    beta, _ = calibrate_beta(reference, make_objective("ncp-dpo", beta="auto", scale=scale), calibration,
                             [torch.Generator().manual_seed(b) for b in range(2)])
    beta = beta.preference.beta
    ncp = lambda options, beta_=beta: make_objective("ncp-dpo", beta=beta_, scale=scale, **options)  # noqa: E731
    # at a small beta no pair's sigmoid weight moves: the cosine then measures the perceptual path alone
    small = {"dpo": make_objective("dpo", beta=1.0), "ncp": ncp({}, 1.0)}
    truths = []
    for b in range(batches):
        pairs = _pairs(reference, batch_pairs, size, seed=100 + b)
        truths.append({"ncp": _gradient(reference, ncp({}), pairs, b, None, device)[0],
                       "dpo": _gradient(reference, make_objective("dpo"), pairs, b, None, device)[0],
                       "ncp_small": _gradient(reference, small["ncp"], pairs, b, None, device)[0],
                       "dpo_small": _gradient(reference, small["dpo"], pairs, b, None, device)[0]})
    fp32_seconds = {}
    for label, (name, options) in names.items():
        objective = ncp(options) if name.startswith("ncp") else make_objective(name)
        seconds = [_gradient(reference, objective, _pairs(reference, batch_pairs, size, 100 + b), b, None, device)[1]
                   for b in range(batches)]
        fp32_seconds[label] = statistics.median(seconds)
    for precision in DTYPES:
        model = _model(pipe, precision, device, reference_pass=reference_pass)
        for label, (name, options) in names.items():
            space = "ncp" if name.startswith("ncp") else "dpo"
            objective = ncp(options) if space == "ncp" else make_objective(name)
            objective_small = ncp(options, 1.0) if space == "ncp" else small["dpo"]
            cosines, cosines_small, seconds = [], [], []
            for b in range(batches):
                pairs = _pairs(reference, batch_pairs, size, seed=100 + b)
                grad, sec = _gradient(model, objective, pairs, b, precision, device)
                cosines.append(_cos(grad, truths[b][space]))
                seconds.append(sec)
                cosines_small.append(_cos(_gradient(model, objective_small, pairs, b, precision, device)[0],
                                          truths[b][f"{space}_small"]))
            rows.append({"precision": precision, "objective": label, "cosine_min": min(cosines),
                         "cosine_median": statistics.median(cosines), "cosine_small_beta_min": min(cosines_small),
                         "cosine_small_beta_median": statistics.median(cosines_small),
                         "seconds_per_step_median": statistics.median(seconds),
                         "fp32_seconds_per_step_median": fp32_seconds[label]})
            print(f"{kind} {precision} {label:28s} cos min {min(cosines):.5f} median {statistics.median(cosines):.5f}"
                  f" | beta 1: min {min(cosines_small):.5f} median {statistics.median(cosines_small):.5f}")
    # exact float32 on its own: linearisation error only
    linear = ncp({"distance": "linear"})
    lin_cos = [_cos(_gradient(reference, linear, _pairs(reference, batch_pairs, size, 100 + b), b, None, device)[0],
                    truths[b]["ncp"]) for b in range(batches)]
    pairs = _pairs(reference, batch_pairs, size, seed=100)
    flops = {"dpo": _flops(reference, make_objective("dpo"), pairs)}
    for label, options in FORMULATIONS.items():
        if options["encoder_dtype"] == "model":
            flops[label.split(" ")[0]] = _flops(reference, ncp(options), pairs)
    gpu = {}
    for label, options in FORMULATIONS.items():
        distance = options["distance"]
        encoder = flops[f"{distance}/model"] - flops["dpo"]
        base = flops["dpo"]
        if options["encoder_dtype"] == "model":
            estimate = {"all_bf16": (base + encoder) / (H100_TFLOPS["bf16"] * 1e12)}
        else:
            estimate = {"encoder_tf32": base / (H100_TFLOPS["bf16"] * 1e12) + encoder / (H100_TFLOPS["tf32"] * 1e12),
                        "encoder_fp32": base / (H100_TFLOPS["bf16"] * 1e12) + encoder / (H100_TFLOPS["fp32"] * 1e12)}
        gpu[label] = {k: v / (base / (H100_TFLOPS["bf16"] * 1e12)) for k, v in estimate.items()}
    return {"kind": kind, "image_size": image_size, "batch_pairs": batch_pairs, "batches": batches, "scale": scale,
            "ncp_beta_auto": beta,
            "rows": rows, "fp32_linearisation_cosine_min": min(lin_cos),
            "flops_per_step": {k.replace("/model", ""): v for k, v in flops.items()},
            "estimated_h100_step_time_vs_dpo_at_peak": gpu}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-pairs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--scale", default="noise", choices=("paper", "noise"))
    parser.add_argument("--reference-pass", default="auto", choices=("auto", "separate", "difference"),
                        help="the half-precision models' model.reference_pass (auto: the difference pass in bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed_precision.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    results = [bench_kind(k, args.batches, args.batch_pairs, args.image_size, args.device, args.scale,
                          args.reference_pass) for k in args.kinds]
    record = {"command": "python benchmarks/mixed_precision.py " + " ".join(argv or sys.argv[1:]),
              "device": args.device, "machine": platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start,
              "reference_pass": args.reference_pass,
              "h100_peak_tflops_assumed": H100_TFLOPS, "results": results}
    atomic_write_text(args.out, json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
