"""``ncppo toy STAGE`` and ``ncppo demo``: the toy world from the command line."""

from __future__ import annotations

import argparse

from ncppo.toy.config import load_toy_config
from ncppo.toy.stages import STAGES

__all__ = ["add_toy_commands", "load_toy_config"]


def _run(args, stages) -> int:
    from ncppo.toy.stages import ToyWorld

    report = ToyWorld(args.out, load_toy_config(args.config, args.overrides, args.quick)).run(stages, force=args.force)
    print(f"report: {report}" if "report" in stages else f"done: {', '.join(stages)} in {args.out}")
    return 0


def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"the toy world's folder (default: {default_out})")
    p.add_argument("--config", help="a toy-world YAML config (see configs/world/toy.yaml)")
    p.add_argument("--quick", action="store_true", help="every stage at tiny sizes (about 2 minutes; for tests)")
    p.add_argument("--force", action="store_true", help="redo the stages even when their outputs are up to date")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.budget_dpo_steps=30 eval.prompts=56")


def add_toy_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the toy world end to end (pretrain, pairs, filter, train, evaluate, report)")
    _add_common(demo, "outputs/demo")
    demo.set_defaults(func=lambda args: _run(args, STAGES))

    toy = sub.add_parser("toy", help="the toy world stage by stage; each reuses the previous one's output")
    toy_sub = toy.add_subparsers(dest="stage", required=True)
    for stage in (*STAGES, "all"):
        p = toy_sub.add_parser(stage, help="every stage in order" if stage == "all" else f"the {stage} stage")
        _add_common(p, "outputs/demo")
        p.set_defaults(func=lambda args, stage=stage: _run(args, STAGES if stage == "all" else (stage,)))
