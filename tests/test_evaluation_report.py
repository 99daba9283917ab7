"""``ncppo report``: every generation setting stated, every pair of sets compared (NCP-DPO vs DPO too),
Markdown rendered as HTML, figures with a colour and marker per model, intervals and prompt counts."""

import json
import re
import zlib

import numpy as np
import pytest
from PIL import Image

from ncppo.cli import main
from ncppo.evaluation import paired_win_rate
from ncppo.evaluation.image_sets import read_manifest
from ncppo.evaluation.scoring import read_scores
from ncppo.toy.world import COLOURS, Scene, all_scenes, render

SCENES = all_scenes()[::14][:12]


def scene_set(folder, model, lora="", wrong=0.5, steps=20, images=2, seed=0, size=32):
    """An `ncppo generate`-shaped folder of toy-world renders: with probability ``wrong`` an image has the
    wrong object colour (a worse model), so the oracle reward ranks the sets."""
    rng = np.random.default_rng(zlib.crc32(f"{model}|{lora}|{wrong}".encode()))
    (folder / "images").mkdir(parents=True)
    rows, colours = [], list(COLOURS)
    for p, scene in enumerate(SCENES):
        for k in range(images):
            shown = scene
            if rng.random() < wrong:
                shown = Scene(next(c for c in rng.permutation(colours) if c not in (scene.object_colour, scene.background)),
                              scene.shape, scene.background)
            rid = f"p{p:05d}-i{k:02d}"
            Image.fromarray(render(shown, size, np.random.default_rng(1009 * p + k), noise=0.02)).save(
                folder / "images" / f"{rid}.png")
            rows.append({"id": rid, "prompt": scene.caption, "prompt_index": p, "image_index": k,
                         "seed": seed * 1_000_003 + p * 1_009 + k, "path": f"images/{rid}.png", "model": model,
                         "lora": lora, "metadata": {"Category": ["Animals", "Artifacts", "Abstract"][p % 3]}})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "generation.json").write_text(json.dumps({
        "spec": {"images_per_prompt": images, "seed": seed, "num_inference_steps": steps, "guidance_scale": 3.0,
                 "height": None, "width": None, "prompt_ids": None},
        "prompt_source": "toy-prompts.txt", "prompts": len(SCENES), "model": model, "lora": lora,
        "scheduler": "euler", "dtype": "fp32"}))
    return folder


@pytest.fixture
def three_sets(tmp_path, capsys):
    base = scene_set(tmp_path / "base", "toy/base_model", wrong=0.6)
    dpo = scene_set(tmp_path / "dpo", "toy/base_model", "runs/dpo/lora", wrong=0.4)
    ncp = scene_set(tmp_path / "ncp-dpo", "toy/base_model", "runs/ncp-dpo/lora", wrong=0.15)
    assert main(["score", "--reward", "oracle", str(base), str(dpo), str(ncp)]) == 0
    capsys.readouterr()
    return base, dpo, ncp


def _rate(a, b, reward="oracle"):
    ra, rb = read_manifest(a), read_manifest(b)
    sa, sb = read_scores(a)[reward], read_scores(b)[reward]
    return paired_win_rate([sa[r.id] for r in ra], [sb[r.id] for r in rb], groups=[r.prompt for r in ra])


def test_the_report_states_settings_and_compares_every_pair(three_sets, tmp_path, capsys):
    base, dpo, ncp = three_sets
    out = tmp_path / "rep"
    assert main(["report", str(base), str(dpo), str(ncp), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    # every generation setting, per set
    assert "| set | model | LoRA | sampler | dtype | steps | guidance | resolution | seeds | prompts | images |" in md
    assert ("| ncp-dpo | `toy/base_model` | `runs/ncp-dpo/lora` | euler | fp32 | 20 | 3.0 | 32x32 (model default) | "
            "base seed 0, 2 per prompt | `toy-prompts.txt` (12) | 24 |") in md
    assert "| base | `toy/base_model` | none |" in md and "same settings but the model and LoRA" in md
    # NCP-DPO vs DPO (the paper's Table 1), beside both against the base, with the chart
    for b, a, name_b, name_a in ((dpo, base, "dpo", "base"), (ncp, base, "ncp-dpo", "base"), (ncp, dpo, "ncp-dpo", "dpo")):
        w = _rate(a, b)
        assert f"| **{name_b}** vs {name_a} | oracle | 24 | 12 | {w} | {w.counts} |" in md
    assert _rate(dpo, ncp).rate > 0.5  # the toy sets are ordered as built
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert [(c["b"], c["a"]) for c in comparisons] == [("dpo", "base"), ("ncp-dpo", "base"), ("ncp-dpo", "dpo")]
    assert "![Win rate of B over A" in md and (out / "win_rates.png").stat().st_size > 5000
    assert "Win rates by prompt category (oracle)" in md and "| Animals | 4 |" in md
    # means with intervals, the grid with its prompts and scores under it
    assert re.search(r"\| ncp-dpo \| oracle \| 24 \| 12 \| [\d.]+ \[[\d.]+, [\d.]+\] \|", md)
    assert "| column | prompt | seed | base: oracle | dpo: oracle | ncp-dpo: oracle |" in md
    assert f"| 1 | {SCENES[0].caption} | 0 |" in md
    for name in ("means.png", "grid.png"):
        assert (out / name).stat().st_size > 5000
    # the HTML renders the Markdown: code, bold, tables and embedded figures; no literal backticks or **
    page = (out / "report.html").read_text()
    text = re.sub(r"<[^>]+>", "", re.sub(r"src='[^']*'", "", page))
    assert "<code>toy/base_model</code>" in page and "<strong>ncp-dpo</strong> vs dpo" in page
    assert "`" not in text and "**" not in text and "![" not in text
    assert page.count("data:image/png;base64,") == 3 and "<figcaption>" in page
    assert "report.html" in capsys.readouterr().out


def test_chosen_pairs_and_labels(three_sets, tmp_path, capsys):
    base, dpo, ncp = three_sets
    out = tmp_path / "rep"
    args = ["report", str(base), str(dpo), str(ncp), "--label", "SD", "--label", "DPO", "--label", "NCP-DPO",
            "--out", str(out)]
    assert main([*args, "--pair", "NCP-DPO:DPO"]) == 0
    assert [(c["b"], c["a"]) for c in json.loads((out / "comparisons.json").read_text())] == [("NCP-DPO", "DPO")]
    assert main([*args, "--pair", "NCP:DPO"]) == 2
    assert "--pair names 'NCP', which is no set of the report" in capsys.readouterr().err
    assert main([*args, "--pair", "NCP-DPO"]) == 2
    assert "expected B:A" in capsys.readouterr().err


def test_mismatched_sets_are_refused_or_named(three_sets, tmp_path, capsys):
    base, dpo, _ = three_sets
    other = scene_set(tmp_path / "steps50", "toy/base_model", "x", steps=50)
    assert main(["score", "--reward", "oracle", str(other)]) == 0
    assert main(["report", str(base), str(other), "--out", str(tmp_path / "r")]) == 2
    assert "spec.num_inference_steps: 20 vs 50" in capsys.readouterr().err
    assert main(["report", str(base), str(other), "--out", str(tmp_path / "r"), "--allow-mismatch"]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**Settings differ** between sets (beyond model and LoRA): `spec.num_inference_steps` (base, steps50)" in md
    assert "steps50 vs base: compared despite other generation settings" in md


def test_curves_in_the_report_have_bands_and_prompt_counts(three_sets, tmp_path):
    base, dpo, ncp = three_sets
    curves = tmp_path / "curves"
    curves.mkdir()

    def points(gain):
        return [{"step": s, "train_seconds": 10.0 * s, "mean": 0.5 + gain * s, "low": 0.45 + gain * s,
                 "high": 0.55 + gain * s, "prompts": 12} for s in range(5)]

    (curves / "curves.json").write_text(json.dumps({
        "reward": "oracle", "prompts": 12, "prompt_source": "toy-prompts.txt",
        "spec": {"num_inference_steps": 20, "guidance_scale": 3.0, "seed": 0, "images_per_prompt": 2},
        "curves": {"dpo": points(0.01), "ncp-dpo": points(0.03)}}))
    out = tmp_path / "rep"
    assert main(["report", str(base), str(dpo), str(ncp), "--out", str(out), "--curves", str(curves)]) == 0
    md = (out / "report.md").read_text()
    assert "## Reward (oracle) against training time" in md and "Prompts: `toy-prompts.txt` (12); steps 20" in md
    assert "| ncp-dpo | 4 | 40 | 0.5 | 0.62 [0.57, 0.67] |" in md
    assert (out / "curves.png").stat().st_size > 5000


def test_each_model_has_its_own_colour_and_marker():
    from ncppo.plots import model_style

    styles = [model_style(i) for i in range(10)]
    assert len({s["color"] for s in styles}) == 10 and len({s["marker"] for s in styles}) == 10
    # beyond one round of colours no model repeats another's pair (the reproduction draws 14 runs)
    pairs = [(s["color"], s["marker"]) for s in map(model_style, range(100))]
    assert len(set(pairs)) == 100


def test_a_report_never_writes_into_a_foreign_folder_or_an_input(three_sets, tmp_path, capsys):
    base, dpo, _ = three_sets
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "report.md").write_text("my own notes")
    args = ["report", str(base), str(dpo)]
    assert main([*args, "--out", str(theirs)]) == 2
    assert "a folder that no ncppo command wrote" in capsys.readouterr().err
    assert (theirs / "report.md").read_text() == "my own notes"  # untouched
    assert main([*args, "--out", str(base / "rep")]) == 2  # inside an input image set
    assert "is inside the input" in capsys.readouterr().err
    out = tmp_path / "rep"
    assert main([*args, "--out", str(out)]) == 0
    (out / "stale.png").write_bytes(b"x")
    assert main([*args, "--out", str(out)]) == 0  # its own earlier report: replaced whole
    assert not (out / "stale.png").exists() and (out / "report.md").is_file()
    assert main([*args, "--out", str(theirs), "--overwrite"]) == 0
    assert "my own notes" not in (theirs / "report.md").read_text()
