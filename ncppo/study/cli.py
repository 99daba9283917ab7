"""``ncppo study create | invite | serve | results | simulate``."""

from __future__ import annotations

import json


def _create(args) -> int:
    from ncppo.study.create import create_study

    store = create_study(args.a, args.b, args.out, votes_per_item=args.votes, sample=args.sample, seed=args.seed,
                         timeout_s=args.timeout, overwrite=args.overwrite, allow_mismatch=args.allow_mismatch,
                         instructions=args.instructions, gold=args.gold)
    n_gold = len(store.gold())
    print(f"study {args.out}: {len(store.items()) - n_gold} items x {store.votes_per_item} votes"
          + (f", {n_gold} gold items for every annotator" if n_gold else ""))
    print(f"admin token (results, invites): {store.meta('admin_token')}")
    return 0


def _invite(args) -> int:
    from ncppo.study.create import open_study

    for token in open_study(args.study).invite(args.n):
        print(f"{args.base_url.rstrip('/')}/?token={token}")
    return 0


def _serve(args) -> int:
    from ncppo.study.server import serve

    serve(args.study, host=args.host, port=args.port)  # prints the study, its items and the admin links first
    return 0


def _results(args) -> int:
    from pathlib import Path

    from ncppo.study.create import open_study
    from ncppo.study.results import model_names, write_results

    out = Path(args.out or Path(args.study) / "results")
    result = write_results(open_study(args.study), out, overwrite=args.overwrite)
    a, b = model_names(result)
    print(f"A = {a}, B = {b}: {result['items_complete']} of {result['items']} items complete ({result['votes']} votes)")
    for q, e in result["questions"].items():
        if "win" in e:
            print(f"{q.upper()} {e['question']}: B ({b}) wins {100 * e['win']:.1f}%, ties {100 * e['tie']:.1f}%, loses "
                  f"{100 * e['loss']:.1f}%; win rate (ties half) {100 * e['win_rate_ties_half']:.1f}% "
                  f"[{100 * e['win_rate_ties_half_interval'][0]:.1f}, {100 * e['win_rate_ties_half_interval'][1]:.1f}]; "
                  f"full agreement {100 * e['full_agreement']:.0f}%, Fleiss' kappa {e['fleiss_kappa']:.2f}")
    for q, bias in result["position_bias"].items():
        if bias["left_share_of_decisive"] is not None:
            lo, hi = bias["interval"]
            flag = "  <- annotators favour a side" if bias["p_value"] < 0.05 else ""
            print(f"{q.upper()} position: left chosen in {100 * bias['left_share_of_decisive']:.1f}% "
                  f"[{100 * lo:.1f}, {100 * hi:.1f}] of {bias['left'] + bias['right']} decisive votes, "
                  f"p = {bias['p_value']:.3f} (sides are random: 50% expected){flag}")
    for name, entry in result["annotators"].items():
        agree = entry["agreement_with_majority"]
        gold = entry["gold_accuracy"]
        print(f"{name}: {entry['votes']} votes; agrees with the majority in "
              + (f"{100 * agree:.0f}%" if agree is not None else "-")
              + (f"; gold accuracy {100 * gold:.0f}% ({entry['gold_correct']}/{entry['gold_answers']})"
                 if gold is not None else ""))
    print(f"written: {out}/results.json, results.png, votes.csv, votes.parquet")
    return 0


def _simulate(args) -> int:
    from ncppo.evaluation.rewards import make_reward
    from ncppo.study.create import open_study
    from ncppo.study.simulate import simulate_study

    done = simulate_study(open_study(args.study), args.study, make_reward(args.reward, args.weights),
                          annotators=args.annotators, seed=args.seed)
    print(json.dumps(done))
    return 0


def add_study_commands(sub) -> None:
    study = sub.add_parser("study", help="the human side-by-side study (three questions, majority of N votes)")
    s = study.add_subparsers(dest="study_command", required=True)
    create = s.add_parser("create", help="pair two `ncppo generate` outputs by prompt and seed into a study")
    create.add_argument("--a", required=True, help="generation output of model A (e.g. the baseline)")
    create.add_argument("--b", required=True, help="generation output of model B")
    create.add_argument("--out", required=True)
    create.add_argument("--votes", type=int, default=3, help="distinct annotators per item (default 3)")
    create.add_argument("--sample", type=int, help="a random sample of this many pairs")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--timeout", type=float, default=600.0, help="seconds before an unanswered item is released")
    create.add_argument("--overwrite", action="store_true",
                        help="replace an existing study in --out (its votes are lost); by default it is refused")
    create.add_argument("--instructions", metavar="FILE",
                        help="a text file of instructions shown to the annotators (blank lines: paragraphs)")
    create.add_argument("--gold", metavar="FILE.jsonl",
                        help='gold items, one {"prompt", "better", "worse"[, "questions"]} per line, paths relative to '
                             "the file; every annotator gets them, the results give each one's accuracy")
    create.add_argument("--allow-mismatch", action="store_true",
                        help="pair sets whose generation settings differ in more than the model and LoRA (refused by default)")
    create.set_defaults(func=_create)
    invite = s.add_parser("invite", help="add annotators and print their links")
    invite.add_argument("study")
    invite.add_argument("--n", type=int, default=1)
    invite.add_argument("--base-url", default="http://127.0.0.1:8000")
    invite.set_defaults(func=_invite)
    serve = s.add_parser("serve", help="serve the annotation page")
    serve.add_argument("study")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)
    results = s.add_parser("results", help="majority votes, win rates with intervals, agreement, chart, exports")
    results.add_argument("study")
    results.add_argument("--out", help="default: STUDY/results")
    results.add_argument("--overwrite", action="store_true",
                         help="replace an existing --out folder that is not an earlier `study results` output")
    results.set_defaults(func=_results)
    simulate = s.add_parser("simulate", help="fill the votes from a reward (offline runs of the whole study)")
    simulate.add_argument("study")
    simulate.add_argument("--reward", default="oracle")
    simulate.add_argument("--weights")
    simulate.add_argument("--annotators", type=int, help="default: votes per item")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(func=_simulate)
