"""Fake `ncppo generate` outputs for study tests: solid-colour PNGs and a manifest, no model needed."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def fake_generation(folder: Path, prompts: list[str], colour: tuple[int, int, int], images_per_prompt: int = 1,
                    size: int = 32) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p, prompt in enumerate(prompts):
        for k in range(images_per_prompt):
            rid = f"p{p:05d}-i{k:02d}"
            Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(folder / "images" / f"{rid}.png")
            rows.append({"id": rid, "prompt": prompt, "prompt_index": p, "image_index": k, "seed": 1000 * p + k,
                         "path": f"images/{rid}.png", "model": str(folder), "lora": "", "metadata": {"Category": "c"}})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def fake_gold(folder: Path, n: int, size: int = 32) -> Path:
    """``n`` gold items: a clear picture (better) against a grey one (worse); returns the JSONL's path."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n):
        Image.fromarray(np.full((size, size, 3), (0, 160, 0), np.uint8)).save(folder / "img" / f"good{k}.png")
        Image.fromarray(np.full((size, size, 3), (128, 128, 128), np.uint8)).save(folder / "img" / f"bad{k}.png")
        lines.append(json.dumps({"prompt": f"a green square {k}", "better": f"img/good{k}.png",
                                 "worse": f"img/bad{k}.png"}))
    (folder / "gold.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "gold.jsonl"
