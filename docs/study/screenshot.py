"""Makes docs/study/screenshot.png: the annotation page on a toy-world study (base vs NCP-DPO).

Run after `make demo` (it uses outputs/demo/base_model and the ncp-dpo run's LoRA):
    .venv/bin/python docs/study/screenshot.py
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ncppo.study.create import create_study
from ncppo.study.server import running_server

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "outputs" / "demo"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("a red circle on a blue background\na yellow triangle on a black background\n")
        common = ["--prompts", str(prompts), "--steps", "10", "--guidance", "3", "--seed", "3"]
        ncppo = [sys.executable, "-m", "ncppo.cli", "generate", "--model", str(DEMO / "base_model")]
        subprocess.run([*ncppo, "--out", str(tmp / "a"), *common], check=True)
        lora = DEMO / "runs" / "filtered" / "ncp-dpo" / "lora"
        subprocess.run([*ncppo, "--lora", str(lora), "--out", str(tmp / "b"), *common], check=True)
        store = create_study(tmp / "a", tmp / "b", tmp / "study", votes_per_item=3)
        token = store.invite(1)[0]
        from playwright.sync_api import sync_playwright

        with running_server(tmp / "study") as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(f"{url}/?token={token}")
            page.wait_for_selector("#left[src]")
            page.wait_for_timeout(300)
            page.screenshot(path=str(Path(__file__).parent / "screenshot.png"))
            browser.close()
    print(Path(__file__).parent / "screenshot.png")


if __name__ == "__main__":
    main()
