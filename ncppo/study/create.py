"""``ncppo study create``: pair two generation outputs by (prompt, seed) into a study folder.

The study folder holds ``study.sqlite`` (items, annotators, votes), ``images/`` (copies of the paired
images, renamed: the server serves nothing else) and ``study.json`` (where the images came from).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from ncppo.evaluation.image_sets import pair_by_prompt_and_seed, read_manifest
from ncppo.io import atomic_write_text
from ncppo.study.store import StudyStore

DB = "study.sqlite"


def create_study(a_dir: str | Path, b_dir: str | Path, out: str | Path, votes_per_item: int = 3,
                 sample: int | None = None, seed: int = 0, timeout_s: float = 600.0) -> StudyStore:
    out = Path(out)
    if (out / DB).exists():
        raise FileExistsError(f"{out} already holds a study; choose another --out")
    if votes_per_item < 1:
        raise ValueError(f"votes per item must be >= 1, got {votes_per_item}")
    a_records, b_records = read_manifest(a_dir), read_manifest(b_dir)
    pairs = pair_by_prompt_and_seed(a_records, b_records)
    if not pairs:
        raise ValueError(f"{a_dir} and {b_dir} share no (prompt, seed); generate both from one prompt file and seed")
    if sample is not None and sample < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, sample), key=lambda p: (p[0].prompt_index, p[0].image_index))
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for n, (ra, rb) in enumerate(pairs):
        names = []
        for side, folder, record in (("a", a_dir, ra), ("b", b_dir, rb)):
            name = f"item{n:05d}-{side}.png"
            shutil.copyfile(Path(folder) / record.path, out / "images" / name)
            names.append(name)
        items.append({"prompt": ra.prompt, "seed": ra.seed, "image_a": names[0], "image_b": names[1],
                      "metadata": {**(ra.metadata or {}), "a_id": ra.id, "b_id": rb.id}})
    atomic_write_text(out / "study.json", json.dumps({"a": str(a_dir), "b": str(b_dir), "items": len(items),
                                                      "unpaired": len(a_records) + len(b_records) - 2 * len(pairs),
                                                      "votes_per_item": votes_per_item, "seed": seed}, indent=2))
    return StudyStore.create(out / DB, items, votes_per_item=votes_per_item, timeout_s=timeout_s, study_seed=seed)


def open_study(folder: str | Path) -> StudyStore:
    path = Path(folder) / DB
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a study (no {DB}); create one with `ncppo study create`")
    return StudyStore(path)
