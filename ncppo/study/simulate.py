"""``ncppo study simulate``: fill a study's votes from a reward, through the same store calls the web app
uses (assignment, randomised sides, submission), so the toy world runs the whole study offline.

Each simulated annotator sees the pair as assigned (left/right) and, per question, picks by a
Bradley-Terry choice on the reward gap (``temperature``), answering tie when the gap is below
``tie_margin``. The three questions share the reward (a programmatic judge has one opinion), each
with its own draw.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ncppo.study.store import QUESTIONS


def simulate_study(store, study_dir: str | Path, reward, annotators: int | None = None, temperature: float = 0.02,
                   tie_margin: float = 0.002, seed: int = 0) -> dict:
    from PIL import Image

    study_dir = Path(study_dir)
    items = {i["id"]: i for i in store.items()}
    scores = {}
    for item in items.values():
        images = [np.asarray(Image.open(study_dir / "images" / item[k]).convert("RGB")) for k in ("image_a", "image_b")]
        a, b = reward(images, [item["prompt"]] * 2)
        scores[item["id"]] = (float(a), float(b))
    tokens = store.invite(annotators or store.votes_per_item, prefix="simulated")
    rng, sides = random.Random(seed), random.Random(seed + 1)
    votes = 0
    for token in tokens:
        while (assignment := store.next_assignment(token, rng=sides)) is not None:
            a, b = scores[assignment.item_id]
            left, right = (a, b) if assignment.left_is_a else (b, a)
            answers = {}
            for q in QUESTIONS:
                gap = left - right
                if abs(gap) < tie_margin:
                    answers[q] = "tie"
                else:
                    answers[q] = "left" if rng.random() < 1 / (1 + np.exp(-gap / temperature)) else "right"
            store.submit(token, assignment.id, f"sim-{token[:8]}-{assignment.id}", answers)
            votes += 1
    return {"annotators": len(tokens), "votes": votes}
