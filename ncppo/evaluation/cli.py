"""``ncppo generate | score | compare | curve``: evaluation of real (or toy) models from the command line."""

from __future__ import annotations

from pathlib import Path

from ncppo.evaluation.generation import GenerationSpec
from ncppo.evaluation.sampling import DTYPES, SCHEDULERS


def _spec_options(args) -> dict:
    return {"images_per_prompt": args.images_per_prompt, "seed": args.seed, "num_inference_steps": args.steps,
            "guidance_scale": args.guidance, "batch_size": args.batch_size, "height": args.height, "width": args.width}


def _generate(args) -> int:
    from ncppo.evaluation.sampling import generate_from_files

    counts = generate_from_files(args.model, args.prompts, args.out, lora=args.lora, scheduler=args.scheduler,
                                 dtype=args.dtype, limit=args.limit, overwrite=args.overwrite, **_spec_options(args))
    print(f"{args.out}: {counts['generated']} generated, {counts['reused']} already there, {counts['total']} in all")
    return 0


def _score(args) -> int:
    from ncppo.evaluation.rewards import make_reward
    from ncppo.evaluation.scoring import score_image_set

    reward = make_reward(args.reward, args.weights)
    for folder in args.dirs:
        print(f"scores: {score_image_set(folder, reward, args.weights, batch_size=args.batch_size)}")
    return 0


def _compare(args) -> int:
    from ncppo.evaluation.scoring import compare_image_sets, comparison_markdown

    result = compare_image_sets(args.a, args.b, args.reward or None, n_boot=args.bootstrap, json_path=args.json,
                                allow_mismatch=args.allow_mismatch)
    print(comparison_markdown(result), end="")
    return 0


def _curve(args) -> int:
    from ncppo.evaluation.sampling import curves_from_files

    curves = curves_from_files(args.runs, args.prompts, args.reward, args.out, weights=args.weights, limit=args.limit,
                               overwrite=args.overwrite, **_spec_options(args))
    for name, points in curves.items():
        print(name + ": " + ", ".join(f"{p['train_seconds']:.0f}s {p['mean']:.4f}" for p in points))
    print(f"plot: {Path(args.out) / 'curves.png'}")
    return 0


def _report(args) -> int:
    from ncppo.errors import UsageError
    from ncppo.evaluation.report import write_eval_report

    pairs = None
    if args.pair:
        pairs = []
        for text in args.pair:
            b, sep, a = text.partition(":")
            if not sep or not a or not b:
                raise UsageError(f"--pair {text!r}: expected B:A (two set labels; the win rate of B over A)")
            pairs.append((b, a))
    path = write_eval_report(args.sets, args.out, args.label, args.curves, pairs=pairs, allow_mismatch=args.allow_mismatch,
                             overwrite=args.overwrite)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


def _sampling_options(p) -> None:
    p.add_argument("--prompts", required=True,
                   help="a packaged set (partiprompts, pickapic, hpdv2) or a file: .txt (one a line), .csv/.tsv "
                        "(a prompt column), .json or .jsonl")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    d = GenerationSpec  # the defaults live in the library
    p.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds per (prompt, image) derive from it: equal across models")
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help=f"denoising steps (default {d.num_inference_steps})")
    p.add_argument("--guidance", type=float, default=d.guidance_scale,
                   help=f"classifier-free guidance (default {d.guidance_scale:g})")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8: real models on one GPU)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)


def _mismatch_option(p) -> None:
    p.add_argument("--allow-mismatch", action="store_true",
                   help="compare sets whose generation settings (generation.json) differ in more than the model and "
                        "LoRA (refused by default; the differences are printed)")


def add_eval_commands(sub) -> None:
    from ncppo.evaluation.rewards import reward_names

    REWARD_NAMES = reward_names()  # noqa: N806 (every registered reward, the toy world's oracle too)

    gen = sub.add_parser("generate", help="images for a prompt file, paired by seed across models (resumable)")
    gen.add_argument("--model", required=True, help="a diffusers pipeline folder")
    gen.add_argument("--lora", help="a LoRA folder (diffusers format, e.g. a run's lora/)")
    gen.add_argument("--out", required=True)
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the pipeline's own")
    gen.add_argument("--dtype", choices=DTYPES, default="fp32")
    gen.add_argument("--overwrite", action="store_true", help="remove an existing --out folder first")
    _sampling_options(gen)
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="score generated images with a reward model from local weights")
    score.add_argument("--reward", required=True, choices=REWARD_NAMES)
    score.add_argument("--weights", help="the reward's local weights (a folder or file; see the README)")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument("dirs", nargs="+", help="ncppo generate output folders")
    score.set_defaults(func=_score)

    compare = sub.add_parser("compare", help="paired win rates of B over A per reward, with bootstrap intervals")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--reward", action="append", help="only these rewards (default: every reward both have)")
    compare.add_argument("--bootstrap", type=int, default=2000)
    compare.add_argument("--json", help="also write the full result here")
    _mismatch_option(compare)
    compare.set_defaults(func=_compare)

    curve = sub.add_parser("curve", help="reward against training time from runs' checkpoints (the paper's Fig 4)")
    curve.add_argument("runs", nargs="+", help="ncppo train output folders")
    curve.add_argument("--reward", required=True, choices=REWARD_NAMES)
    curve.add_argument("--weights")
    curve.add_argument("--out", required=True)
    curve.add_argument("--overwrite", action="store_true",
                       help="replace an --out folder that `ncppo curve` did not write (its own is resumed)")
    _sampling_options(curve)
    curve.set_defaults(func=_curve)

    report = sub.add_parser("report", help="Markdown + PNG + self-contained HTML for generated, scored image sets")
    report.add_argument("sets", nargs="+", help="ncppo generate folders (e.g. base dpo ncp-dpo)")
    report.add_argument("--out", required=True)
    report.add_argument("--overwrite", action="store_true",
                        help="replace an --out folder that `ncppo report` did not write (its own is replaced)")
    report.add_argument("--label", action="append", help="a display name per set, in order (default: folder names)")
    report.add_argument("--curves", help="an ncppo curve output folder to include")
    report.add_argument("--pair", action="append", metavar="B:A",
                        help="compare only these sets (labels), win rate of B over A; repeatable "
                             "(default: every later set against every earlier one)")
    _mismatch_option(report)
    report.set_defaults(func=_report)
