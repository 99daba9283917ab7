"""Makes docs/study/screenshot.png (an item, with the organisers' instructions), docs/study/zoom.png (an image
opened at full size) and docs/study/finished.png (the page once nothing is left).

The images are toy-world renders (`ncppo.toy.world.render`, 1024 px as SDXL's): B draws what the caption asks for,
A a scene with another colour, plus one gold item. No model or `make demo` is needed:
    .venv/bin/python docs/study/screenshot.py
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ncppo.study.create import create_study
from ncppo.study.server import running_server
from ncppo.toy.world import Scene, render

HERE = Path(__file__).parent
SCENES = [Scene("red", "circle", "blue"), Scene("yellow", "triangle", "black")]
INSTRUCTIONS = """You will see two images made from the same prompt. Answer three questions about each pair.

Q2 asks about looks alone: the prompt is hidden. Click an image to see it at full size; Backspace undoes your \
last answer."""


def _generation(folder: Path, scenes: list[Scene], wrong: bool, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for p, scene in enumerate(scenes):
        drawn = Scene("green", scene.shape, scene.background) if wrong else scene
        Image.fromarray(render(drawn, 1024, rng, noise=0.02)).save(folder / "images" / f"p{p:05d}-i00.png")
        rows.append({"id": f"p{p:05d}-i00", "prompt": scene.caption, "prompt_index": p, "image_index": 0,
                     "seed": p, "path": f"images/p{p:05d}-i00.png", "model": folder.name, "lora": ""})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = _generation(tmp / "base", SCENES, wrong=True, seed=1)
        b = _generation(tmp / "ncp-dpo", SCENES, wrong=False, seed=2)
        (tmp / "gold" / "img").mkdir(parents=True)
        gold_scene = Scene("white", "square", "purple")
        Image.fromarray(render(gold_scene, 1024, np.random.default_rng(3))).save(tmp / "gold" / "img" / "good.png")
        Image.fromarray(np.full((1024, 1024, 3), 128, np.uint8)).save(tmp / "gold" / "img" / "bad.png")
        (tmp / "gold" / "gold.jsonl").write_text(json.dumps(
            {"prompt": gold_scene.caption, "better": "img/good.png", "worse": "img/bad.png"}) + "\n")
        (tmp / "howto.txt").write_text(INSTRUCTIONS)
        store = create_study(a, b, tmp / "study", votes_per_item=1, instructions=tmp / "howto.txt",
                             gold=tmp / "gold" / "gold.jsonl")
        token = store.invite(1)[0]
        from playwright.sync_api import sync_playwright

        with running_server(tmp / "study") as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            page.goto(f"{url}/?token={token}")
            while not page.evaluate("document.getElementById('left').naturalWidth > 0"):  # (the CSP forbids
                page.wait_for_timeout(50)  # wait_for_function's evaluated strings)
            page.wait_for_timeout(300)
            page.screenshot(path=str(HERE / "screenshot.png"))
            page.click("#left")
            page.wait_for_timeout(300)
            page.screenshot(path=str(HERE / "zoom.png"))
            page.keyboard.press("Escape")
            for _ in range(3):  # two items and the gold one, three answers each
                for key in ("3", "3", "3"):
                    page.keyboard.press(key)
                    page.wait_for_timeout(120)
                page.wait_for_timeout(300)
            page.wait_for_selector("#finished:not([hidden])")
            page.wait_for_timeout(200)
            page.screenshot(path=str(HERE / "finished.png"))
            browser.close()
    for name in ("screenshot.png", "zoom.png", "finished.png"):
        print(HERE / name)


if __name__ == "__main__":
    main()
