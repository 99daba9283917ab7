"""``ncppo study create | invite | serve | results | simulate``."""

from __future__ import annotations

import json


def _create(args) -> int:
    from ncppo.study.create import create_study

    store = create_study(args.a, args.b, args.out, votes_per_item=args.votes, sample=args.sample, seed=args.seed,
                         timeout_s=args.timeout, overwrite=args.overwrite, allow_mismatch=args.allow_mismatch)
    print(f"study {args.out}: {len(store.items())} items x {store.votes_per_item} votes")
    print(f"admin token (results, invites): {store.meta('admin_token')}")
    return 0


def _invite(args) -> int:
    from ncppo.study.create import open_study

    for token in open_study(args.study).invite(args.n):
        print(f"{args.base_url.rstrip('/')}/?token={token}")
    return 0


def _serve(args) -> int:
    from ncppo.study.server import serve

    serve(args.study, host=args.host, port=args.port)
    return 0


def _results(args) -> int:
    from pathlib import Path

    from ncppo.study.create import open_study
    from ncppo.study.results import write_results

    out = Path(args.out or Path(args.study) / "results")
    result = write_results(open_study(args.study), out)
    print(f"{result['items_complete']} of {result['items']} items complete ({result['votes']} votes)")
    for q, e in result["questions"].items():
        if "win" in e:
            print(f"{q.upper()} {e['question']}: B wins {100 * e['win']:.1f}%, ties {100 * e['tie']:.1f}%, loses "
                  f"{100 * e['loss']:.1f}%; win rate (ties half) {100 * e['win_rate_ties_half']:.1f}% "
                  f"[{100 * e['win_rate_ties_half_interval'][0]:.1f}, {100 * e['win_rate_ties_half_interval'][1]:.1f}]; "
                  f"full agreement {100 * e['full_agreement']:.0f}%, Fleiss' kappa {e['fleiss_kappa']:.2f}")
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
    results.set_defaults(func=_results)
    simulate = s.add_parser("simulate", help="fill the votes from a reward (offline runs of the whole study)")
    simulate.add_argument("study")
    simulate.add_argument("--reward", default="oracle")
    simulate.add_argument("--weights")
    simulate.add_argument("--annotators", type=int, help="default: votes per item")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.set_defaults(func=_simulate)
