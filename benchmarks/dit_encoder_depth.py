"""How deep should NCP's encoder be on a transformer? NCP-DPO on the toy world's DiT at several encoder depths.

Protocol (fixed before any number was seen):

- World: the toy world's default config with the DiT base model (``pretrain.backbone: dit``, 8 blocks),
  the ``original`` preference data (ties dropped), built once under ``--work`` and reused.
- Runs: NCP-DPO at the toy reproduction's settings (``ncppo.toy.training.objective_values``: beta 5000,
  ``scale: noise``, features ``last``, learning rate 2e-4) with ``objective.encoder_blocks`` in ``DEPTHS``
  (fractions of the blocks: 2, 3, 4, 5 and 8 of 8; the default is half), and noise-space DPO beside them;
  each at equal compute (``round(dpo_steps * FLOPs(DPO step) / FLOPs(its step))`` steps, FLOPs counted by
  ``torch.utils.flop_counter``), so a deeper encoder buys fewer steps.
- Judged on the **validation** captions and seeds only (evaluation seed 1001, 2 images per caption, training
  seeds 0 1 2): this chooses a setting, so the test split stays unseen. Win rates of each depth over the
  default (half) and over DPO, pooled over (seed, caption) units with 95% bootstrap intervals.

Resumable run by run, across machines and sessions: each run's record goes to ``--records`` (committed,
``benchmarks/results/dit_encoder_depth_runs/``) with the digest of the preference data it trained on, and is
reused. Writes ``benchmarks/results/dit_encoder_depth.{json,md}``.

    python benchmarks/dit_encoder_depth.py          # about 1 CPU-hour after the world's pairs (about 4 min)
    python benchmarks/dit_encoder_depth.py --quick --seeds 0 --dpo-steps 2 --work /tmp/depth --records /tmp/depth/records --out /tmp/depth.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ncp_ablation as ablation  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402

DEPTHS = (0.25, 1 / 3, 0.5, 2 / 3, 1.0)
DEFAULT_DEPTH = 0.5  # ncppo.perception.DEFAULT_BLOCKS, what the toy reproduction's DiT verdict uses
VALIDATION_IMAGES = 2
RESULTS = Path(__file__).parent / "results"


def runs() -> dict[str, dict]:
    """Run name -> objective options (the toy reproduction's, with the encoder depth varied)."""
    from ncppo.toy.config import TrainStageConfig
    from ncppo.toy.training import objective_values

    cfg = TrainStageConfig()
    out = {"dpo": objective_values(cfg, "dpo")}
    for depth in DEPTHS:
        out[f"ncp-dpo/blocks-{depth:.3g}"] = {**objective_values(cfg, "ncp-dpo"), "encoder_blocks": depth}
    return out


def pooled(a: list[dict], b: list[dict]) -> dict:
    """B's win rate over A on validation, pooled over (seed, caption)."""
    as_final = lambda records: [{"final": r["validation"], "seed": r["seed"]} for r in records]  # noqa: E731
    return ablation.pooled_win(as_final(a), as_final(b)).to_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--dpo-steps", type=int, default=None,
                        help="the budget, as steps of noise-space DPO (default: the toy world's train.budget_dpo_steps)")
    parser.add_argument("--work", default="outputs/dit_encoder_depth", help="the world and run folders (not kept)")
    parser.add_argument("--records", default=str(RESULTS / "dit_encoder_depth_runs"), help="each run's record (commit it)")
    parser.add_argument("--out", default=str(RESULTS / "dit_encoder_depth.json"))
    parser.add_argument("--quick", action="store_true", help="the quick toy world (a smoke test of this script)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, records = Path(args.work), Path(args.records)
    start = time.perf_counter()
    world = ablation.build_world(work, args.quick, backbone="dit")
    digest = ablation.world_digest(world)
    grid = runs()
    lr = world.config.train.learning_rate
    dpo_steps = args.dpo_steps or world.config.train.budget_dpo_steps
    flops = {name: ablation.step_flops(world, objective) for name, objective in grid.items()}
    steps = {name: max(1, round(dpo_steps * flops["dpo"] / flops[name])) for name in grid}
    depth = world.config.pretrain.dit_layers
    print(f"[depth] DiT of {depth} blocks; preference data digest {digest}; training seeds {args.seeds}; steps at "
          "equal compute: " + ", ".join(f"{n}={s}" for n, s in steps.items()), flush=True)
    done = {name: [ablation.train_and_validate(world, work, name, objective, seed, steps[name], flops[name], lr,
                                               records=records, digest=digest, validation_images=VALIDATION_IMAGES)
                   for seed in args.seeds] for name, objective in grid.items()}
    default = f"ncp-dpo/blocks-{DEFAULT_DEPTH:.3g}"
    from ncppo.perception import block_indices

    rows = [{"run": name, "blocks": None if name == "dpo" else len(block_indices(grid[name]["encoder_blocks"], depth, "all")),
             "steps": steps[name], "flops_per_step_vs_dpo": flops[name] / flops["dpo"],
             "validation_mean": statistics.fmean(r["validation"]["mean"] for r in recs),
             "validation_mean_per_seed": [r["validation"]["mean"] for r in recs],
             "vs_default": None if name in ("dpo", default) else pooled(done[default], recs),
             "vs_dpo": None if name == "dpo" else pooled(done["dpo"], recs),
             "argument_rms": statistics.median(r["diagnostics"]["argument_rms"]["median"] for r in recs)
             if all("argument_rms" in r["diagnostics"] for r in recs) else None}
            for name, recs in done.items()]
    base = ablation.evaluate(None, world, ablation.spec("validation", VALIDATION_IMAGES))["mean"]
    summary = {"command": "python benchmarks/dit_encoder_depth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "protocol": __doc__.split("Resumable")[0].strip(), "dit_blocks": depth, "seeds": args.seeds,
               "learning_rate": lr, "dpo_steps": dpo_steps, "validation_images": VALIDATION_IMAGES,
               "world_digest": digest, "base_validation_mean": base, "rows": rows,
               "wall_seconds_this_invocation": time.perf_counter() - start}
    atomic_write_text(args.out, json.dumps(summary, indent=1))
    atomic_write_text(Path(args.out).with_suffix(".md"), markdown(summary))
    print(markdown(summary))
    return 0


def markdown(s: dict) -> str:
    def rate(w):
        return "-" if w is None else f"{100 * w['rate']:.1f}% [{100 * w['low']:.1f}, {100 * w['high']:.1f}]"

    lines = ["# NCP's encoder depth on the toy world's DiT (validation split)", "", f"Command: `{s['command']}`", "",
             f"DiT of {s['dit_blocks']} blocks; training seeds {s['seeds']}; {s['validation_images']} images per "
             f"validation caption; learning rate {s['learning_rate']:g}; budget {s['dpo_steps']} DPO-step equivalents "
             f"(FLOPs). Base model: validation reward {s['base_validation_mean']:.4f}.", "",
             "| run | encoder blocks | FLOPs/step vs DPO | steps | validation reward (mean of seeds) | per seed | "
             "win rate vs half depth | win rate vs DPO | argument RMS (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        per_seed = ", ".join(f"{v:.4f}" for v in r["validation_mean_per_seed"])
        arg = "-" if r["argument_rms"] is None else f"{r['argument_rms']:.3g}"
        lines.append(f"| {r['run']} | {r['blocks'] or '-'} | {r['flops_per_step_vs_dpo']:.2f} | {r['steps']} | "
                     f"{r['validation_mean']:.4f} | {per_seed} | {rate(r['vs_default'])} | {rate(r['vs_dpo'])} | {arg} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
