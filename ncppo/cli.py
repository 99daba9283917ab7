"""The ``ncppo`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from ncppo.demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=args.out, objective=args.objective, steps=args.steps, seed=args.seed)
    if args.quick:
        cfg.steps, cfg.batch_size = min(cfg.steps, 4), 2
    report = run_demo(cfg)
    print(f"report: {report}")
    return 0


def _tiny_model(args) -> int:
    from ncppo.models.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.out_dir, args.kind, image_size=args.image_size,
                              prediction_type=args.prediction_type, seed=args.seed)
    print(f"saved a tiny {args.kind} pipeline to {path}")
    return 0


def _train(args) -> int:
    from ncppo.training import Trainer, load_config

    config = load_config(args.config, args.overrides)
    result = Trainer(config).train()
    print(f"trained {result.steps} steps in {result.train_seconds:.1f} s ({result.stopped_by}); outputs in {result.output_dir}")
    return 0


def _objectives(_args) -> int:
    from ncppo.objectives import OBJECTIVE_NAMES, make_objective

    for name in OBJECTIVE_NAMES:
        o = make_objective(name)
        print(f"{name:8s} space={type(o.space).__name__:15s} reference={'yes' if o.needs_reference_prediction else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ncppo.objectives import OBJECTIVE_NAMES

    parser = argparse.ArgumentParser(prog="ncppo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="end to end on a tiny offline pipeline, with a report")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--objective", default="ncp-dpo", choices=OBJECTIVE_NAMES)
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps only (used by the tests)")
    demo.set_defaults(func=_demo)

    tiny = sub.add_parser("tiny-model", help="save a tiny SD1.5-/SDXL-class pipeline (random weights) to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--kind", choices=("sd15", "sdxl"), default="sd15")
    tiny.add_argument("--image-size", type=int, default=32)
    tiny.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_model)

    train = sub.add_parser("train", help="train with a YAML config and key=value overrides")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. objective.beta=2500 max_steps=100")
    train.set_defaults(func=_train)

    objectives = sub.add_parser("objectives", help="list the six objectives")
    objectives.set_defaults(func=_objectives)

    from ncppo.data.cli import add_data_commands

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ncppo.models.loading import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:  # user errors (DataError too): one line
        print(f"ncppo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
