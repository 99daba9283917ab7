"""Median time per training step of the six objectives, interleaved in one run, on two U-Net sizes and two
tiny transformers (``dit``: a PixArt-Sigma-class DiT with DDPM; ``mmdit``: an SD3-class MMDiT with flow matching).

Each step is a full optimisation step (forward, backward, AdamW) on cached latents and prompt
embeddings (the VAE and text encoders are not timed). Sizes are image sizes of the tiny pipelines,
whose VAE downsamples by 2: a 64x64 image is a 32x32 latent. Objectives run in a shuffled order within each
repetition so machine noise hits all of them alike; ratios to DPO are also taken per repetition.
It also times the encoder ``f`` alone (a transformer's: its first half of blocks, the default depth) against a
full forward of the denoiser on the same inputs.

    python benchmarks/step_cost.py                 # the U-Nets: writes benchmarks/results/step_cost.json
    python benchmarks/step_cost.py --configs dit@32 mmdit@32 --reps 3 \
        --out benchmarks/results/step_cost_transformers.json
    python benchmarks/step_cost.py --reps 5 --out /tmp/quick.json --configs tiny@32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncppo.batch import Condition, EncodedPairs, PreferenceBatch  # noqa: E402
from ncppo.flops import FlopCounterMode  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.preference_model import LoraSettings, PreferenceModel  # noqa: E402
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.objectives import OBJECTIVE_NAMES, make_objective  # noqa: E402
from ncppo.perception import NoiseConditionedEncoder  # noqa: E402
from ncppo.step import training_step  # noqa: E402

UNETS = {"tiny": (32, 64), "small": (64, 128, 256)}
TRANSFORMERS = {"dit": "pixart", "mmdit": "sd3"}  # the tiny pipelines' transformers (ncppo.models.transformers_tiny)
PROMPTS = ["a red circle", "a blue square", "a green star", "a pink ring"]


def _pairs(model, batch_pairs: int, size: int, seed: int) -> EncodedPairs:
    g = torch.Generator().manual_seed(seed)
    lat = lambda: torch.randn(batch_pairs, 4, size, size, generator=g)  # noqa: E731
    if model.backbone.family != "unet":  # the model's own text condition (pooled embeddings, T5 mask)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_pairs)]
        return model.encode_batch(PreferenceBatch(latents_w=lat(), latents_l=lat(), prompts=prompts))
    cond = Condition(torch.randn(batch_pairs, 77, model.unet.config.cross_attention_dim, generator=g))
    return EncodedPairs(lat(), lat(), cond, cond)


def _pipeline(name: str, image_size: int, seed: int):
    if name in TRANSFORMERS:
        return build_tiny_pipeline(TRANSFORMERS[name], image_size=image_size, seed=seed)
    if name not in UNETS:
        raise SystemExit(f"unknown denoiser {name!r}; expected one of {', '.join([*UNETS, *TRANSFORMERS])}")
    return build_tiny_pipeline("sd15", block_out_channels=UNETS[name], seed=seed)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _flops(fn) -> int:
    """FLOPs of one call: unlike seconds, independent of the machine's load."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_config(unet_name: str, image_size: int, reps: int, batch_pairs: int, lora_rank: int, seed: int) -> dict:
    pipe = _pipeline(unet_name, image_size, seed)
    model = PreferenceModel(pipe, lora=LoraSettings(rank=lora_rank))
    model.unet.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    size = image_size // pipe.vae_scale_factor
    pairs = _pairs(model, batch_pairs, size, seed)
    objectives = {name: make_objective(name) for name in OBJECTIVE_NAMES}
    generator = torch.Generator().manual_seed(seed)

    def step(name):
        out = training_step(model, objectives[name], pairs, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    for name in OBJECTIVE_NAMES:  # warm-up: allocator, kernels, peft hooks
        step(name)
        step(name)
    times = {name: [] for name in OBJECTIVE_NAMES}
    rng = random.Random(seed)
    for _ in range(reps):
        order = list(OBJECTIVE_NAMES)
        rng.shuffle(order)
        for name in order:
            times[name].append(_timed(lambda n=name: step(n)))

    # where NCP-DPO's extra time goes: the encoder passes it adds, timed alone on the same inputs
    n = 2 * batch_pairs
    x = torch.randn(n, 4, size, size)
    t = model.schedule.model_timestep(torch.randint(0, 1000, (n,)), x)  # DDPM: t itself; flow: sigma(t) T
    cond = Condition.cat([pairs.condition_w, pairs.condition_l])
    cond2 = cond.repeat(2)
    encoder = NoiseConditionedEncoder("last")

    def encoder_with_grad():
        xg = x.clone().requires_grad_(True)
        with model.frozen_unet() as frozen:
            feats = encoder(frozen, xg, t, **cond.unet_kwargs())
        feats[0].pow(2).mean().backward()

    fwd, enc, enc_frozen, enc_grad = [], [], [], []
    for _ in range(max(5, reps)):
        with torch.no_grad(), model.frozen_unet() as frozen:
            fwd.append(_timed(lambda: model.backbone.forward(frozen, x, t, cond)))
            enc.append(_timed(lambda: encoder(frozen, x, t, **cond.unet_kwargs())))
            # target + reference embeddings: one no-grad pass over 2 x 2B images
            enc_frozen.append(_timed(lambda: encoder(frozen, torch.cat([x, x]), t.repeat(2), **cond2.unet_kwargs())))
        enc_grad.append(_timed(encoder_with_grad))  # the policy's embedding, forward and backward

    step_flops = {name: _flops(lambda n=name: step(n)) for name in OBJECTIVE_NAMES}
    with torch.no_grad(), model.frozen_unet() as frozen:
        forward_flops = _flops(lambda: model.backbone.forward(frozen, x, t, cond))
        encoder_flops = _flops(lambda: encoder(frozen, x, t, **cond.unet_kwargs()))

    medians = {n: statistics.median(v) for n, v in times.items()}
    paired = {n: statistics.median(a / b for a, b in zip(times[n], times["dpo"])) for n in OBJECTIVE_NAMES}
    return {
        "unet": unet_name,  # the denoiser's name: a U-Net size, or dit / mmdit
        "kind": model.kind,
        "block_out_channels": list(UNETS[unet_name]) if unet_name in UNETS else None,
        "encoder_blocks": None if unet_name in UNETS else encoder.levels(model.unet),
        "unet_params": sum(p.numel() for n, p in model.unet.named_parameters() if "lora" not in n),
        "image_size": image_size,
        "latent_size": size,
        "batch_pairs": batch_pairs,
        "lora_rank": lora_rank,
        "reps": reps,
        "median_seconds_per_step": medians,
        "ratio_to_dpo_of_medians": {n: medians[n] / medians["dpo"] for n in OBJECTIVE_NAMES},
        "median_paired_ratio_to_dpo": paired,
        "encoder_fraction_of_unet_forward": statistics.median(enc) / statistics.median(fwd),  # of the denoiser's
        "flops_per_step": step_flops,
        "flops_ratio_to_dpo": {n: step_flops[n] / step_flops["dpo"] for n in OBJECTIVE_NAMES},
        "encoder_flops_fraction_of_forward": encoder_flops / forward_flops,
        "ncp_dpo_extra_seconds": medians["ncp-dpo"] - medians["dpo"],
        "encoder_passes_seconds": {
            "frozen_target_and_reference_4B": statistics.median(enc_frozen),
            "policy_forward_backward_2B": statistics.median(enc_grad),
        },
        "ncp_dpo_floor_ratio": (medians["dpo"] + statistics.median(enc_frozen) + statistics.median(enc_grad))
        / medians["dpo"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny@32", "tiny@64", "small@32", "small@64"],
                        help="DENOISER@IMAGE_SIZE with DENOISER a U-Net, tiny (32,64) or small (64,128,256), or a "
                             "tiny transformer, dit (PixArt-Sigma-class) or mmdit (SD3-class)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch-pairs", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    results = []
    for spec in args.configs:
        name, size = spec.split("@")
        row = bench_config(name, int(size), args.reps, args.batch_pairs, args.lora_rank, args.seed)
        results.append(row)
        ratios = ", ".join(f"{n} {r:.2f}x" for n, r in row["median_paired_ratio_to_dpo"].items())
        print(f"{spec}: dpo {row['median_seconds_per_step']['dpo'] * 1e3:.0f} ms/step; {ratios}; "
              f"encoder/forward {row['encoder_fraction_of_unet_forward']:.2f} "
              f"(FLOPs {row['encoder_flops_fraction_of_forward']:.2f}); "
              f"NCP-DPO/DPO FLOPs {row['flops_ratio_to_dpo']['ncp-dpo']:.2f}x; "
              f"floor from encoder passes alone {row['ncp_dpo_floor_ratio']:.2f}x", flush=True)

    import diffusers
    import peft

    report = {
        "benchmark": "step_cost",
        "command": "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "peft": peft.__version__},
        "results": results,
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
