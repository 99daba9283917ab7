"""Where does DPO itself gain on the toy world? Noise-space DPO (and SFT) by preference data x budget x beta
x learning rate, on the validation split only (a search for a regime, so nothing here is a verdict; the
held-out test split is left to the benchmarks that compare methods).

The NCP ablation (``benchmarks/ncp_ablation.py``) found that at the toy world's budget (the FLOPs of 60 DPO
steps) no method moves the strong base model by more than about 0.001 of oracle reward, so NCP-X vs X
there compares noise. This script asks which knob moves DPO: the budget (steps), beta, the learning rate,
and the data (``DATA``): how the pool images are stored (JPEG before, lossless PNG now), how noisy the
annotators are, how large the pools are, and a rival model in the pools. Same base model and validation
images as the ablation (training seed 0, validation seed 1001, 1 image per caption); every run through
the project's Trainer.

    python benchmarks/toy_regime.py --work outputs/ncp_ablation_v2   # writes benchmarks/results/toy_regime.{json,md}

Resumable run by run (``--work``, default the ablation's world under ``outputs/ncp_ablation``); each data
variant's world is built under ``WORK/data/<variant>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ncp_ablation as ablation  # noqa: E402

from ncppo.io import atomic_write_text  # noqa: E402


def clean(**pairs):
    """Annotators that err less: a sharper Bradley-Terry choice and fewer coin flips."""
    return {"annotators": {"temperature": 0.01, "careless_rate": 0.02, **pairs.pop("annotators", {})}, **pairs}


# the preference data each run trains on: the toy world's ``pairs`` section ("jpeg": the ablation's own world,
# made before the pairs were stored losslessly)
DATA = {
    "jpeg": {"image_format": "jpeg"},
    "png": {"image_format": "png"},
    "png-clean-30": clean(image_format="png", annotators={"comparisons_per_prompt": 30}),
    "png-clean-16img-60": clean(image_format="png", images_per_prompt=16, annotators={"comparisons_per_prompt": 60}),
    "png-rival4-20": {"image_format": "png", "rival": {"images_per_prompt": 4}, "annotators": {"comparisons_per_prompt": 20}},
}
GRID = [  # (data, method, steps, beta, learning rate)
    ("jpeg", "dpo", 60, 5000.0, 2e-4), ("jpeg", "dpo", 60, 50000.0, 2e-4), ("jpeg", "dpo", 300, 5000.0, 2e-4),
    ("jpeg", "dpo", 300, 50000.0, 2e-4), ("jpeg", "dpo", 300, 5000.0, 1e-3),
    ("png", "dpo", 300, 5000.0, 2e-4), ("png", "sft", 300, None, 2e-4),
    ("png-clean-30", "dpo", 300, 5000.0, 2e-4), ("png-clean-16img-60", "dpo", 300, 5000.0, 2e-4),
    ("png-clean-16img-60", "dpo", 300, 5000.0, 1e-3),
    ("png-rival4-20", "dpo", 60, 5000.0, 2e-4), ("png-rival4-20", "dpo", 300, 5000.0, 2e-4),
    ("png-rival4-20", "sft", 300, None, 2e-5),
]


def data_world(work: Path, data: str):
    """The world whose ``original`` pairs a run of ``data`` trains on (the same base model for every one)."""
    from ncppo.toy.config import toy_config_from_dict
    from ncppo.toy.stages import ToyWorld

    world = ToyWorld(work / "data" / data / "world", toy_config_from_dict({"pairs": DATA[data]}))
    world.run(stages=("pretrain", "pairs", "filter"))
    return world


def run(work: Path, data: str, method: str, steps: int, beta: float | None, lr: float, seed: int = 0) -> dict:
    """One run, trained and scored on validation (reused when its record exists)."""
    name = f"{method}-steps{steps}" + (f"-beta{beta:g}" if beta is not None else "") + f"-lr{lr:g}"
    folder = work / "regime" / ("" if data == "jpeg" else data) / name / f"seed-{seed}"
    objective = {"name": method, **({"beta": beta} if beta is not None else {})}
    record = ablation.train_and_validate(lambda: data_world(work, data), work, name, objective, seed, steps, None, lr,
                                         folder=folder)
    return {"data": data, "method": method, "beta": beta, **record}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/ncp_ablation")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "toy_regime.json"))
    args = parser.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    base_path = work / "base_validation.json"
    if not base_path.is_file():
        world = ablation.build_world(work)
        atomic_write_text(base_path, json.dumps(ablation.evaluate(None, world, ablation.spec("validation", 1))))
    base = json.loads(base_path.read_text())
    rows = [run(work, *point) for point in GRID]
    record = {"command": "python benchmarks/toy_regime.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "split": "validation", "base_validation_mean": base["mean"],
              "data": {k: v for k, v in DATA.items()},
              "runs": [{"data": r.get("data", "jpeg"), "method": r.get("method", "dpo")}
                       | {k: r[k] for k in ("steps", "beta", "lr", "seed", "train_wall_seconds")}
                       | {"validation_mean": r["validation"]["mean"],
                          "loss_median": r["diagnostics"].get("loss", {}).get("median"),
                          "argument_rms_median": r["diagnostics"].get("argument_rms", {}).get("median")}
                       for r in rows]}
    atomic_write_text(args.out, json.dumps(record, indent=1))
    lines = ["# Where does DPO gain on the toy world? (validation split only)", "",
             f"Command: `{record['command']}`. Base model: validation {base['mean']:.4f}. Training seed 0, "
             "56 validation captions x 1 image (seed 1001).", "",
             "| data | method | steps | beta | lr | validation reward | minus base | loss (median) | argument RMS (median) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        rms = "-" if r["argument_rms_median"] is None else f"{r['argument_rms_median']:.3g}"
        lines.append(f"| {r['data']} | {r['method']} | {r['steps']} | {beta} | {r['lr']:g} | {r['validation_mean']:.4f} | "
                     f"{r['validation_mean'] - base['mean']:+.4f} | {r['loss_median']:.3f} | "
                     f"{rms} | {r['train_wall_seconds']:.0f} |")
    lines += ["", "Data variants (the toy world's `pairs` section; every other key at its default):", ""]
    lines += [f"- `{name}`: `{json.dumps(section)}`" for name, section in DATA.items()]
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
