"""Does NCP help? NCP-X vs X for DPO, CPO and SFT on the toy world, at equal compute, selected on
validation captions and seeds and judged on held-out test captions and seeds.

Protocol (fixed before any number was seen):

- World: the toy world's default config (base model, Pick-a-Pic-format pairs, ties dropped: the
  ``original`` dataset), built once and reused. Every run trains through the project's Trainer.
- Split: the toy world's own held-out split (``ncppo.toy.splits``): the preference data is made for the
  ``train`` captions; selection uses the ``validation`` captions and the verdict the ``test`` captions
  (56 each, compositions the pairs never show); validation images use evaluation seed 1001, test images
  seed 2002, neither used by the pair generator.
- Grid: baselines ``dpo``, ``cpo``, ``sft`` (beta 5000) and, for each, ``ncp-X`` under the settings
  ``paper`` (the paper's exact loss, beta 5000) and ``conditioned`` (``scale: noise`` plus ``beta: auto``;
  SFT has no beta) x features ``last``, ``mid``, ``all``; learning rates ``LEARNING_RATES``. The base
  model is strong (oracle 0.73), so a learning rate that suits a weak one can only damage it: every
  method gets its own learning rate, chosen on validation.
- Budget: equal compute, not wall time: each run gets ``round(dpo_steps * FLOPs(DPO step) / FLOPs(its
  step))`` steps, FLOPs counted once per config by ``torch.utils.flop_counter`` on a real batch. Wall time
  is recorded beside it.
- Selection (training seed 0, validation captions and seeds), in two stages to stay within a session:
  (1) each baseline and each NCP setting at features ``last`` at every learning rate; its best learning
  rate is kept; (2) the NCP settings' other features at their setting's learning rate. For each X, the
  baseline's best learning rate, and the NCP setting x features x learning rate with the highest
  validation oracle reward. Verdict (training seeds 1, 2, 3, which the selection never saw;
  test captions and seeds, 1 image per caption): X, the selected NCP-X and, for DPO, the paper-exact
  and the well-conditioned NCP-DPO (features ``last``, reported whether selected or not); win rates of NCP-X over X pooled over seeds with 95% bootstrap intervals over
  (seed, caption) units; NCP-DPO's time to quality (the share of its compute at which it reaches DPO's
  final test reward, linear between base, a half-budget checkpoint and the end).
- Diagnostics per run from its own logs: sigmoid-argument RMS, saturated fraction, PL/L by timestep quarter,
  gradient norm, the share of updates under AdamW's eps, the trainer's warnings.

Resumable run by run, across machines and sessions: each run's record (``result.json``: validation rewards,
diagnostics; ``test.json``: test rewards) goes to ``--records`` (committed,
``benchmarks/results/ncp_ablation_runs/<name>/seed-<s>/``) with the digest of the world's preference data it
trained on, and is reused; the run's own folder (checkpoints, logs) stays under ``--work``. A test seed whose
record exists but whose checkpoints are gone (another machine) before its test is retrained. Records made on
other preference data (another world, another code version's pairs) stop the run, naming them.

    python benchmarks/ncp_ablation.py                       # writes benchmarks/results/ncp_ablation.{json,md}
    python benchmarks/ncp_ablation.py --quick --test-seeds 1 --dpo-steps 2 --work /tmp/abl --out /tmp/abl.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.records import code_version, reuse  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402

BASELINES = ("dpo", "cpo", "sft")
SETTINGS = {"paper": {"scale": "paper"}, "conditioned": {"scale": "noise", "beta": "auto"}}
FEATURES = ("last", "mid", "all")
SPLIT_SEEDS = {"validation": 1001, "test": 2002}
PAPER_AT_TEST = ("dpo",)
LEARNING_RATES = (2e-5, 6e-5, 2e-4)  # 2e-4 was the toy world's default before the strong base model
TEST_IMAGES = 2  # images per test caption (x 3 training seeds x 56 captions = 336 paired units)
RECORDS = Path(__file__).parent / "results" / "ncp_ablation_runs"
STALE_HINT = "move the records away (or pass another --records) to start the ablation afresh on this world"


def grid() -> dict[str, dict]:
    """Run name -> objective options."""
    runs = {x: {"name": x} for x in BASELINES}
    for x in BASELINES:
        for setting, options in SETTINGS.items():
            for features in FEATURES:
                opts = {k: v for k, v in options.items() if not (x == "sft" and k == "beta")}
                runs[f"ncp-{x}/{setting}/{features}"] = {"name": f"ncp-{x}", "features": features, **opts}
    return runs


def split_captions() -> dict[str, tuple[list[str], list[int]]]:
    from ncppo.toy.splits import split_captions as toy_split
    from ncppo.toy.world import all_scenes

    every = [s.caption for s in all_scenes()]
    return {split: (toy_split(split), [every.index(c) for c in toy_split(split)]) for split in SPLIT_SEEDS}


def spec(split: str, images: int):
    from ncppo.evaluation import GenerationSpec
    from ncppo.toy.config import EvalConfig

    captions, ids = split_captions()[split]
    e = EvalConfig()
    return GenerationSpec(tuple(captions), images, SPLIT_SEEDS[split], e.num_inference_steps, e.guidance_scale,
                          e.batch_size, prompt_ids=tuple(ids))


def build_world(work: Path, quick: bool = False, backbone: str = "unet"):
    """The toy world's preference data (default or quick config, on the ``backbone``'s base model) under
    ``work/world``; stages already there are reused."""
    import dataclasses

    from ncppo.toy.config import QUICK_CONFIG, ToyConfig
    from ncppo.toy.stages import ToyWorld

    config = QUICK_CONFIG if quick else ToyConfig()
    config = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, backbone=backbone))
    world = ToyWorld(work / "world", config)
    world.run(stages=("pretrain", "pairs", "filter"))
    return world


def label(name: str, lr: float) -> str:
    return f"{name}@{lr:g}"


def train_values(world, objective: dict, seed: int, steps: int, run_dir: Path, lr: float) -> dict:
    from ncppo.toy.training import train_values as toy_values

    cfg = world.config.train
    values = toy_values(cfg, objective["name"], world.dataset_path("original"), world.base_model_path(), run_dir,
                        world.config.pretrain.image_size, steps)
    values.update(seed=seed, checkpoint_every_steps=max(1, steps // 2), keep_last_checkpoints=4,
                  overwrite_output_dir=True)
    values["optim"]["learning_rate"] = lr
    values["objective"] = {"beta": cfg.beta_noise, **objective}
    if objective["name"].endswith("sft"):
        values["objective"].pop("beta")
    return values


def step_flops(world, objective: dict) -> int:
    """FLOPs of one training step (forward, backward) of ``objective`` on the world's first batch."""
    from ncppo.objectives import make_objective
    from ncppo.toy.budget import first_batch, training_step_flops

    global _FLOP_MODEL
    if "_FLOP_MODEL" not in globals():
        cfg = world.config
        _FLOP_MODEL = first_batch(world.base_model_path(), world.dataset_path("original"), cfg.train.batch_size,
                                  cfg.pretrain.image_size, cfg.train.lora_rank)
    model, batch = _FLOP_MODEL
    return training_step_flops(model, make_objective(**{k: v for k, v in objective.items() if k != "beta"}), batch)


def evaluate(run_dir: Path | None, world, generation_spec, checkpoint=None) -> dict:
    from ncppo.evaluation import generate_samples, make_reward
    from ncppo.evaluation.runs import apply_checkpoint, load_run_model, run_checkpoints
    from ncppo.models.loading import load_pipeline

    if run_dir is None:
        pipe = load_pipeline(world.base_model_path())
    else:
        model = load_run_model(run_dir)
        ckpts = run_checkpoints(run_dir)
        apply_checkpoint(model, checkpoint or ckpts[-1])
        pipe = model.pipeline
    samples = generate_samples(pipe, generation_spec, progress=False)
    rewards = make_reward("oracle")(samples.images, samples.prompts)
    return {"mean": float(np.mean(rewards)), "rewards": [float(r) for r in rewards],
            "prompt_ids": samples.prompt_ids.tolist(), "seeds": samples.seeds.tolist()}


def diagnostics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for key in ("argument_rms", "saturated_frac", "grad_norm", "eps_dominated_frac", "loss",
                "pl_over_l_t0", "pl_over_l_t1", "pl_over_l_t2", "pl_over_l_t3"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        if values:
            out[key] = {"median": float(statistics.median(values)), "last": float(values[-1])}
    summary = json.loads((run_dir / "summary.json").read_text())
    out["warnings"] = summary.get("warnings", [])
    config = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    out["beta"] = config.get("resolved", {}).get("beta", config["objective"].get("beta"))
    return out


def world_digest(world) -> str:
    """A digest of the preference data the runs train on (every column's values, not the files' bytes, which
    carry the writer's version), so records from another machine are pooled only when they trained on the same
    pairs."""
    import hashlib

    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for path in sorted(world.dataset_path("original").glob("*.parquet")):
        table = pq.read_table(path)
        for column in sorted(table.column_names):
            digest.update(column.encode())
            digest.update(repr(table.column(column).to_pylist()).encode())
    return digest.hexdigest()[:16]


def run_key(name: str, lr: float, seed: int) -> Path:
    return Path(f"{name.replace('/', '-')}-lr{lr:g}") / f"seed-{seed}"


def train_and_validate(world, work: Path, name: str, objective: dict, seed: int, steps: int, flops: int | None,
                       lr: float, validate: bool = True, folder: Path | None = None, records: Path | None = None,
                       digest: str | None = None, need_checkpoints: bool = False, validation_images: int = 1) -> dict:
    """One run trained (into ``work/runs/<key>/run``) and scored on validation, its record written to
    ``records/<key>/result.json``; or that record when it exists (and, with ``need_checkpoints``, its run
    folder still holds them). A ``digest`` of the preference data is checked against the record's and kept in
    it. ``world`` may be a callable that builds the world (only when needed)."""
    from ncppo.evaluation.runs import run_checkpoints
    from ncppo.training import Trainer, load_config

    key = run_key(name, lr, seed)
    folder = folder or work / "runs" / key
    result_path = (records / key if records else folder) / "result.json"
    run_dir = folder / "run"
    record = reuse(result_path, {"world_digest": digest} if digest else {}, STALE_HINT)
    if record is not None:
        if not need_checkpoints or (Path(record["run_dir"]).is_dir() and run_checkpoints(Path(record["run_dir"]))):
            return record
        print(f"[run] {label(name, lr)} seed {seed}: recorded, but its checkpoints are not on this machine; "
              "retraining it for its test", flush=True)
    world = world() if callable(world) else world
    start = time.perf_counter()
    result = Trainer(load_config(None, **train_values(world, objective, seed, steps, run_dir, lr))).train()
    train_wall = time.perf_counter() - start
    record = {"name": name, "lr": lr, "seed": seed, "objective": objective, "steps": result.steps,
              "flops_per_step": flops,
              "train_wall_seconds": train_wall, "train_seconds": result.train_seconds,
              "validation": evaluate(run_dir, world, spec("validation", validation_images)) if validate else None,
              "diagnostics": diagnostics(run_dir),
              "run_dir": str(run_dir), "world_digest": digest, "code": code_version()}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path, json.dumps(record))
    print(f"[run] {label(name, lr)} seed {seed}: {result.steps} steps, {train_wall:.0f} s, "
          + (f"validation reward {record['validation']['mean']:.4f}" if validate else "(test seed)"), flush=True)
    return record


def test_path(records: Path, name: str, lr: float, seed: int) -> Path:
    return records / run_key(name, lr, seed) / "test.json"


def test_record(world, path: Path, record: dict, half: bool = True) -> dict:
    """The run's test rewards (final, and the half-budget checkpoint's with ``half``), written to ``path``."""
    from ncppo.evaluation.runs import run_checkpoints

    if path.is_file():
        return json.loads(path.read_text())
    run_dir = Path(record["run_dir"])
    ckpts = run_checkpoints(run_dir)
    final = evaluate(run_dir, world, spec("test", TEST_IMAGES))
    half = evaluate(run_dir, world, spec("test", TEST_IMAGES), checkpoint=ckpts[0]) if half and len(ckpts) > 1 else None
    out = {"final": final, "half": half, "half_step": ckpts[0].step if half else None, "steps": record["steps"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    return out


def time_to_quality(base_mean: float, ncp: dict, target: float) -> float | None:
    """Fraction of NCP-X's compute at which its reward reaches ``target`` (linear between base, half, final)."""
    points = [(0.0, base_mean)]
    if ncp["half"] is not None:
        points.append((ncp["half_step"] / ncp["steps"], ncp["half"]["mean"]))
    points.append((1.0, ncp["final"]["mean"]))
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= target:
            return x0 if y0 >= target else x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return None


def pooled_win(a_records: list[dict], b_records: list[dict]):
    from ncppo.evaluation import paired_win_rate

    ra, rb, groups = [], [], []
    for a, b in zip(a_records, b_records, strict=True):
        if a["final"]["seeds"] != b["final"]["seeds"]:
            raise ValueError("unpaired test samples")
        ra += a["final"]["rewards"]
        rb += b["final"]["rewards"]
        groups += [f"{a['seed']}-{p}" for p in a["final"]["prompt_ids"]]
    return paired_win_rate(ra, rb, groups=groups, n_boot=2000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection-seed", type=int, default=0)
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dpo-steps", type=int, default=None,
                        help="the budget, as steps of noise-space DPO (default: the toy world's train.budget_dpo_steps)")
    parser.add_argument("--work", default="outputs/ncp_ablation", help="run folders: checkpoints and logs (not kept)")
    parser.add_argument("--records", default=str(RECORDS), help="each run's record (kept: commit it)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ncp_ablation.json"))
    parser.add_argument("--quick", action="store_true", help="the quick toy world (a smoke test of this script)")
    args = parser.parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, records = Path(args.work), Path(args.records)
    start = time.perf_counter()
    world = build_world(work, args.quick)
    digest = world_digest(world)
    print(f"[ablation] preference data digest {digest}; records in {records}", flush=True)
    runs = grid()
    records.mkdir(parents=True, exist_ok=True)
    flops_path = records / "flops.json"
    flops = json.loads(flops_path.read_text()) if flops_path.is_file() else {}
    for name, objective in runs.items():
        if name not in flops:
            flops[name] = step_flops(world, objective)
            atomic_write_text(flops_path, json.dumps(flops, indent=1))
    if args.dpo_steps is None:
        args.dpo_steps = world.config.train.budget_dpo_steps
    steps = {name: max(1, round(args.dpo_steps * flops["dpo"] / flops[name])) for name in runs}
    first_stage = [n for n in runs if "/" not in n or n.endswith("/last")]
    print(f"[ablation] selection stage 1: {len(first_stage)} configs x learning rates {LEARNING_RATES} at training "
          f"seed {args.selection_seed}; steps at equal compute: " + ", ".join(f"{n}={s}" for n, s in steps.items()),
          flush=True)
    selection = {}
    for name in first_stage:
        for lr in LEARNING_RATES:
            selection[label(name, lr)] = train_and_validate(world, work, name, runs[name], args.selection_seed,
                                                            steps[name], flops[name], lr, records=records,
                                                            digest=digest)
    validation = {key: r["validation"]["mean"] for key, r in selection.items()}

    def best_lr(name: str) -> float:
        return max(LEARNING_RATES, key=lambda lr: validation[label(name, lr)])

    setting_lr = {n: best_lr(n) for n in first_stage}
    for name in runs:
        if name not in first_stage:  # stage 2: the other features at their setting's learning rate
            lr = setting_lr[name.rsplit("/", 1)[0] + "/last"]
            record = selection[label(name, lr)] = train_and_validate(world, work, name, runs[name],
                                                                     args.selection_seed, steps[name], flops[name], lr,
                                                                     records=records, digest=digest)
            validation[label(name, lr)] = record["validation"]["mean"]
    chosen = {x: (x, setting_lr[x]) for x in BASELINES}
    for x in BASELINES:
        key = max((k for k in selection if k.startswith(f"ncp-{x}/")), key=lambda k: validation[k])
        chosen[f"ncp-{x}"] = (selection[key]["name"], selection[key]["lr"])
    selected = {x: label(*chosen[f"ncp-{x}"]) for x in BASELINES}
    print(f"[ablation] selected on validation: {chosen}", flush=True)

    base_path = records / "base.json"
    if not base_path.is_file():
        atomic_write_text(base_path, json.dumps({split: evaluate(None, world, spec(split, 1 if split == "validation" else TEST_IMAGES))
                                                 for split in SPLIT_SEEDS}))
    base = json.loads(base_path.read_text())
    tested: dict[str, list] = {}

    def run_tests(name: str, lr: float) -> bool:
        """Train and test ``name`` at ``lr`` on every test seed (reused when done); whether it was new."""
        key = label(name, lr)
        new = key not in tested
        if new:
            tested[key] = []
            for seed in args.test_seeds:
                path = test_path(records, name, lr, seed)
                record = train_and_validate(world, work, name, runs[name], seed, steps[name], flops[name], lr,
                                            validate=False, records=records, digest=digest,
                                            need_checkpoints=not path.is_file())
                tested[key].append({**test_record(world, path, record, half=name.startswith("ncp-dpo")),
                                    "seed": seed, "record": record})
        return new

    def verdict_rows() -> list[dict]:
        rows = []
        for x in BASELINES:
            x_key = label(*chosen[x])
            candidates = [("selected", selected[x])] + [
                (f"{s} (features last)", label(f"ncp-{x}/{s}/last", setting_lr[f"ncp-{x}/{s}/last"])) for s in SETTINGS]
            for which, ncp_key in candidates:
                if x_key not in tested or ncp_key not in tested or any(r["ncp"] == ncp_key for r in rows):
                    continue
                tests_x, tests_n = tested[x_key], tested[ncp_key]
                on_base = [{"final": base["test"], "seed": t["seed"]} for t in tests_x]
                ttq = [time_to_quality(base["test"]["mean"], n, t["final"]["mean"]) for t, n in zip(tests_x, tests_n)]
                rows.append({"family": x, "x": x_key, "ncp": ncp_key, "which": which,
                             "win_rate": pooled_win(tests_x, tests_n).to_dict(),
                             "ncp_vs_base": pooled_win(on_base, tests_n).to_dict(),
                             "x_vs_base": pooled_win(on_base, tests_x).to_dict(),
                             "test_mean_x": statistics.mean(t["final"]["mean"] for t in tests_x),
                             "test_mean_ncp": statistics.mean(t["final"]["mean"] for t in tests_n),
                             "time_to_quality_per_seed": ttq,
                             "x_beats_base_per_seed": [t["final"]["mean"] > base["test"]["mean"] for t in tests_x]})
        return rows

    def write(complete: bool) -> None:
        summary = lambda r: {k: r[k] for k in ("name", "lr", "seed", "steps", "train_wall_seconds", "diagnostics")} | {  # noqa: E731
            "validation_mean": r["validation"]["mean"] if r["validation"] else None}
        record = {"command": "python benchmarks/ncp_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "complete": complete,
                  "protocol": __doc__.split("Resumable")[0].strip(), "selection_seed": args.selection_seed,
                  "test_seeds": args.test_seeds, "dpo_steps": args.dpo_steps, "steps": steps,
                  "flops_per_step": {n: flops[n] for n in runs}, "base": {s: base[s]["mean"] for s in base},
                  "learning_rates": LEARNING_RATES, "validation_mean": validation, "selected": selected,
                  "chosen": {k: {"name": n, "lr": lr} for k, (n, lr) in chosen.items()}, "verdicts": verdict_rows(),
                  "selection_runs": {n: summary(r) for n, r in selection.items()},
                  "test_runs": {n: [summary(t["record"]) | {"test_mean": t["final"]["mean"]} for t in ts]
                                for n, ts in tested.items()},
                  "wall_seconds_this_invocation": time.perf_counter() - start}
        atomic_write_text(args.out, json.dumps(record, indent=1))
        atomic_write_text(Path(args.out).with_suffix(".md"), markdown(record))

    # each family's selected pair first (results are written after each, so an interrupted run has its
    # verdicts so far), then the paper-exact and well-conditioned NCP-DPO at features last (the paper's
    # headline method; for CPO and SFT the selection table compares the settings on validation)
    for x in BASELINES:
        if run_tests(*chosen[x]) | run_tests(*chosen[f"ncp-{x}"]):  # both run; written when either was new
            write(complete=False)
    for x in PAPER_AT_TEST:
        for setting in SETTINGS:
            run_tests(f"ncp-{x}/{setting}/last", setting_lr[f"ncp-{x}/{setting}/last"])
    write(complete=True)
    print(f"wrote {args.out}")
    return 0


def markdown(r: dict) -> str:
    lines = ["# NCP ablation on the toy world", "", f"Command: `{r['command']}`", "",
             *([] if r.get("complete", True) else ["**Incomplete**: the run stopped before every test run was done; "
                                                   "the verdicts below are those finished so far.", ""]),
             f"Base model oracle reward: validation {r['base']['validation']:.4f}, test {r['base']['test']:.4f}.", "",
             f"## Selection: validation captions and seeds, training seed {r['selection_seed']}", "",
             "| run | lr | steps (equal compute) | validation reward | arg RMS (median) | PL/L t0..t3 (median) | "
             "eps-dominated |", "|---|---|---|---|---|---|---|"]
    for name, rec in r["selection_runs"].items():
        def med(key, d=rec["diagnostics"]):
            return d.get(key, {}).get("median")
        pl = " / ".join(f"{med(f'pl_over_l_t{q}'):.2g}" if med(f"pl_over_l_t{q}") is not None else "-" for q in range(4))
        arg = f"{med('argument_rms'):.3g}" if med("argument_rms") is not None else "-"
        eps = f"{med('eps_dominated_frac'):.2f}" if med("eps_dominated_frac") is not None else "-"
        lines.append(f"| {rec['name']} | {rec['lr']:g} | {r['steps'][rec['name']]} | {r['validation_mean'][name]:.4f} | "
                     f"{arg} | {pl} | {eps} |")
    lines += ["", f"Selected: {r['selected']}", "",
              f"## Verdict: test captions and seeds, training seeds {r['test_seeds']} (pooled)", "",
              "| X | NCP-X | which | win rate of NCP-X over X [95% CI] | X vs base | NCP-X vs base | test reward X -> NCP-X | "
              "time to quality |", "|---|---|---|---|---|---|---|---|"]
    for v in r["verdicts"]:
        w, b = v["win_rate"], v["ncp_vs_base"]
        beats = v.get("x_beats_base_per_seed", [True] * len(v["time_to_quality_per_seed"]))
        times = ["X not above base" if not up else "never" if t is None else f"{t:.2f}"
                 for t, up in zip(v["time_to_quality_per_seed"], beats)]
        ttq = ", ".join(times) if v["family"] == "dpo" else "-"
        xb = v["x_vs_base"]
        lines.append(f"| {v['x']} | {v['ncp']} | {v['which']} | {100 * w['rate']:.1f}% "
                     f"[{100 * w['low']:.1f}, {100 * w['high']:.1f}] | {100 * xb['rate']:.1f}% | {100 * b['rate']:.1f}% | "
                     f"{v['test_mean_x']:.4f} -> {v['test_mean_ncp']:.4f} | {ttq} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
