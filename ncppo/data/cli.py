"""``ncppo data filter | stats | cache``: thin wrappers over :mod:`ncppo.data`."""

from __future__ import annotations

import json


def _columns(args):
    from ncppo.data.formats import ColumnMapping

    return ColumnMapping(**{role: getattr(args, f"{role}_column") for role in ROLES})


ROLES = ("caption", "image_0", "image_1", "label_0", "label_1", "uid_0", "uid_1", "chosen", "rejected")

def _print_stats(title: str, stats: dict) -> None:
    print(title)
    for key, value in stats.items():
        print(f"  {key:30s} {value}")


def _filter(args) -> int:
    from ncppo.data.writer import filter_dataset

    stats = filter_dataset(args.input, args.output, min_wins=args.min_wins, pairs=args.pairs, variant=args.variant,
                           on_bad_row=args.on_bad_row, split=args.split, image_dir=args.image_dir,
                           overwrite=args.overwrite, max_image_pixels=args.max_image_pixels,
                           columns=_columns(args))
    _print_stats("before", stats["before"])
    _print_stats("after", stats["after"])
    print(f"selection: {json.dumps(stats['selection'])}")
    print(f"skipped rows: {stats['skipped']['total']} {json.dumps(stats['skipped']['by_reason'])}")
    bad = stats["bad_images"]
    print(f"bad images copied (by header; readers skip them): {bad['total']} {json.dumps(bad['by_reason'])}"
          + (f" e.g. {bad['examples'][next(iter(bad['examples']))][0]}" if bad["total"] else ""))
    print(f"wrote {args.output} (statistics in {args.output}/stats.json)")
    return 0


def _stats(args) -> int:
    from ncppo.data.filter import dataset_stats
    from ncppo.data.pairs import PreferencePairs

    pairs = PreferencePairs(args.input, tie_policy="keep", on_bad_row=args.on_bad_row, split=args.split,
                            image_dir=args.image_dir, max_image_pixels=args.max_image_pixels, columns=_columns(args))
    stats = dataset_stats(pairs.meta, min_wins=args.min_wins, skipped_rows=pairs.skips.total)
    if args.check_images:  # decode every image: corrupt files, one uid with two different images
        for start in range(0, len(pairs), 64):
            pairs.collate(range(start, min(start + 64, len(pairs))), resolution=8)
    stats["skipped"] = pairs.skips.as_dict()
    _print_stats(f"{args.input}", {k: v for k, v in stats.items() if k != "skipped"})
    print(pairs.skips.summary())
    if args.json:
        from ncppo.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(stats, indent=2))
    return 0


def _cache(args) -> int:
    import torch
    from accelerate import PartialState

    from ncppo.data.cache import build_cache
    from ncppo.data.pairs import PreferencePairs
    from ncppo.models.preference_model import PreferenceModel

    # without cpu=True accelerate ignores a multi-process CPU launch (torchrun, accelerate launch)
    state = PartialState(cpu=not torch.cuda.is_available())
    model = PreferenceModel.from_pretrained(args.model, finetune="none")
    model.to(state.device)
    pairs = PreferencePairs(args.input, tie_policy=args.ties, on_bad_row=args.on_bad_row, split=args.split,
                            image_dir=args.image_dir, max_image_pixels=args.max_image_pixels, columns=_columns(args))
    index = build_cache(model, pairs, args.output, resolution=args.resolution, batch_size=args.batch_size,
                        pairs_per_shard=args.pairs_per_shard, dtype="float16" if args.fp16 else "float32",
                        model_name=str(args.model), state=state, overwrite=args.overwrite, verify=args.verify)
    if index is not None:
        print(f"cached {index['cached_pairs']} pairs in {index['num_shards']} shards to {args.output}; "
              f"skipped {index['skipped_pairs']} (bad images); {pairs.skips.summary()}")
    return 0


def add_data_commands(sub) -> None:
    from ncppo.data.filter import PAIR_CHOICES, VARIANTS
    from ncppo.data.images import MAX_IMAGE_PIXELS
    from ncppo.data.schema import BAD_ROW_POLICIES, TIE_POLICIES

    data = sub.add_parser("data", help="preference data: filter, stats, cache")
    dsub = data.add_subparsers(dest="data_command", required=True)

    def overwrite(p, what):
        p.add_argument("--overwrite", action="store_true",
                       help=f"{what} (never the input, nor a folder inside or around it)")

    def common(p):
        p.add_argument("input", help="parquet file/folder, save_to_disk folder, .csv, .json/.jsonl (HPDv3, TRL "
                                     "prompt/chosen/rejected), a folder with w/ and l/ images, or a hub id")
        p.add_argument("--split", default="train", help="split of a DatasetDict or hub dataset (default train)")
        p.add_argument("--image-dir", default=None,
                       help="image folder of the authors' .csv (default: images/ beside it); for sources with "
                            "image paths, what relative paths are relative to (default: the file's folder)")
        for role in ROLES:  # as diffusers' training scripts' --caption_column
            what = {"chosen": "the winning image (winner-first shape, no labels)", "rejected": "the losing image",
                    "caption": "the prompt"}.get(role, role.replace("_", " ").replace("uid", "image uid"))
            p.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column", default=None,
                           metavar="NAME", help=f"the column holding {what}")
        p.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES, default="skip",
                       help="skip (count and report) or error on a bad row (default skip)")
        p.add_argument("--max-image-pixels", type=int, default=None,
                       help=f"larger images (width x height, from the header) are bad images "
                            f"(default {MAX_IMAGE_PIXELS} = 4096x4096)")

    f = dsub.add_parser("filter", help="keep absolute winners (NCP data enhancement)")
    common(f)
    f.add_argument("output")
    f.add_argument("--min-wins", type=int, default=2, help="wins an absolute winner needs (paper: 2; authors' code: 1)")
    f.add_argument("--pairs", choices=PAIR_CHOICES, default="latest", help="which pair(s) per winner (default latest)")
    f.add_argument("--variant", choices=VARIANTS, default=None, help="a Table-2 mini version instead")
    overwrite(f, "replace an existing output folder even if `data filter` did not write it")
    f.set_defaults(func=_filter)

    s = dsub.add_parser("stats", help="statistics of a dataset")
    common(s)
    s.add_argument("--min-wins", type=int, default=2)
    s.add_argument("--check-images", action="store_true", help="also decode every image (slow)")
    s.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    s.set_defaults(func=_stats)

    c = dsub.add_parser("cache", help="encode VAE latents and text embeddings of every pair (resumable)")
    common(c)
    c.add_argument("output")
    c.add_argument("--model", required=True, help="diffusers pipeline folder (SD1.5- or SDXL-class)")
    c.add_argument("--resolution", type=int, default=512)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--pairs-per-shard", type=int, default=256)
    c.add_argument("--fp16", action="store_true", help="store tensors in float16 (half the disk)")
    c.add_argument("--ties", choices=TIE_POLICIES, default="drop", help="tie policy (default drop)")
    c.add_argument("--verify", action="store_true",
                   help="check every finished shard's digest (reads them all), not only sizes; damaged ones are rebuilt")
    overwrite(c, "remove an existing output folder first and build from scratch (without it, an earlier cache "
                 "is resumed and any other non-empty folder refused)")
    c.set_defaults(func=_cache)
