"""The ``ncppo`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys


def _tiny_model(args) -> int:
    from ncppo.models.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.out_dir, args.kind, image_size=args.image_size,
                              prediction_type=args.prediction_type, seed=args.seed, overwrite=args.overwrite)
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


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None/False, the option is required, or its help names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """``--help`` of every command shows the defaults (subcommand parsers are of the parent's class)."""

    def __init__(self, *args, formatter_class=_DefaultsHelp, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class _KeysHelp(_DefaultsHelp, argparse.RawDescriptionHelpFormatter):
    """Defaults, and the epilog (``ncppo train``'s config keys) laid out as written."""


def build_parser() -> argparse.ArgumentParser:
    from ncppo import __version__
    from ncppo.training.reference import describe_options

    parser = _Parser(prog="ncppo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="save a tiny SD1.5-/SDXL-/SD3-/FLUX-/PixArt-class pipeline (random weights) to a folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--kind", choices=("sd15", "sdxl", "sd3", "flux", "flux-schnell", "pixart", "pixel-dit"),
                      default="sd15",
                      help="sd3: an MMDiT transformer with flow matching; flux: FLUX.1-dev-like (guidance "
                           "embedding), flux-schnell: without it; pixart: PixArt-Sigma's DiT (DDPM, learned variance); "
                           "pixel-dit: the toy world's DiT class (a PixArt transformer on pixels, no VAE)")
    tiny.add_argument("--image-size", type=int, default=32)
    tiny.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder that is not a tiny model")
    tiny.set_defaults(func=_tiny_model)

    train = sub.add_parser("train", help="train with a YAML config and key=value overrides", formatter_class=_KeysHelp,
                           epilog=describe_options())
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. objective.beta=2500 max_steps=100")
    train.set_defaults(func=_train)

    objectives = sub.add_parser("objectives", help="list the six objectives")
    objectives.set_defaults(func=_objectives)

    from ncppo.data.cli import add_data_commands
    from ncppo.evaluation.cli import add_eval_commands
    from ncppo.planning.cli import add_planning_commands
    from ncppo.study.cli import add_study_commands
    from ncppo.toy.cli import add_toy_commands

    add_toy_commands(sub)
    add_data_commands(sub)
    add_eval_commands(sub)
    add_study_commands(sub)
    add_planning_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command; user errors (:data:`ncppo.errors.USER_ERRORS`) print one line and return 2."""
    from ncppo.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:  # NcppoError and the OS's file errors: one line; anything else is a bug (traceback)
        print(f"ncppo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
