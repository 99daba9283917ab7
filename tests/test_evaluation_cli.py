"""generate -> score -> compare (-> curve) from the command line, on tiny models and a real prompt file."""

import json

import numpy as np
import pytest

from ncppo.cli import main
from ncppo.evaluation import paired_win_rate
from ncppo.evaluation.image_sets import load_image, read_manifest
from ncppo.evaluation.scoring import read_scores
from tests.conftest import perturb_lora


@pytest.fixture(scope="module")
def models(quick_world, tmp_path_factory):
    """The toy world's base model and a LoRA for it (random adapters, so that images surely differ)."""
    from ncppo.models.preference_model import LoraSettings, PreferenceModel

    root = tmp_path_factory.mktemp("models")
    base = quick_world / "base_model"
    model = PreferenceModel.from_pretrained(base, lora=LoraSettings(rank=4))
    perturb_lora(model.unet, scale=0.3)
    model.save_lora(root / "lora")
    return base, root / "lora"


@pytest.fixture
def prompt_file():
    return "partiprompts"  # the packaged set, by name (1632 prompts with categories)


def _gen(model, out, prompts, *extra):
    return main(["generate", "--model", str(model), "--out", str(out), "--prompts", str(prompts), "--limit", "6",
                 "--images-per-prompt", "2", "--steps", "2", "--guidance", "2", "--batch-size", "5", *extra])


def test_generate_score_compare(models, prompt_file, tmp_path, capsys):
    base, lora = models
    a, b = tmp_path / "a", tmp_path / "b"
    assert _gen(base, a, prompt_file) == 0
    assert _gen(base, b, prompt_file, "--lora", str(lora)) == 0
    rows_a, rows_b = read_manifest(a), read_manifest(b)
    assert len(rows_a) == 12 and [(r.prompt, r.seed) for r in rows_a] == [(r.prompt, r.seed) for r in rows_b]
    assert rows_a[0].metadata["Category"] and rows_b[0].lora == str(lora)
    assert len({r.seed for r in rows_a}) == 12
    # same seed -> same image: a second generation elsewhere is identical; the LoRA changes the images
    assert _gen(base, tmp_path / "a2", prompt_file) == 0
    for ra, ra2 in zip(rows_a, read_manifest(tmp_path / "a2")):
        np.testing.assert_array_equal(load_image(a, ra), load_image(tmp_path / "a2", ra2))
    assert any(not np.array_equal(load_image(a, ra), load_image(b, rb)) for ra, rb in zip(rows_a, rows_b))

    # resume: a missing and a truncated image are made again, the rest is reused
    (a / rows_a[3].path).unlink()
    (a / rows_a[7].path).write_bytes((a / rows_a[7].path).read_bytes()[:40])
    capsys.readouterr()
    assert _gen(base, a, prompt_file) == 0
    assert "2 generated, 10 already there, 12 in all" in capsys.readouterr().out
    assert _gen(base, a, prompt_file, "--steps", "3") == 2  # other settings: refused, nothing mixed
    assert "other settings" in capsys.readouterr().err

    assert main(["score", "--reward", "oracle", str(a), str(b)]) == 0
    scores_a, scores_b = read_scores(a)["oracle"], read_scores(b)["oracle"]
    assert set(scores_a) == {r.id for r in rows_a}
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp.json").read_text())["rewards"]["oracle"]
    expected = paired_win_rate([scores_a[r.id] for r in rows_a], [scores_b[r.id] for r in rows_b],
                               groups=[r.prompt for r in rows_a])
    assert result["win_rate"]["rate"] == expected.rate and result["pairs"] == 12
    assert (result["win_rate"]["low"], result["win_rate"]["high"]) == (expected.low, expected.high)
    assert "By category (oracle)" in printed and set(result["by_category"]) == {r.metadata["Category"] for r in rows_a}
    assert f"{100 * expected.rate:.1f}%" in printed
    assert all(0 <= v <= 1 for v in scores_a.values())

    assert main(["report", str(a), str(b), "--label", "base", "--label", "lora", "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"| **lora** vs base | oracle | 12 | 6 | {100 * expected.rate:.1f}% [{100 * expected.low:.1f}, " in report
    assert "| base | `" + str(base) + "` | none | default | fp32 | 2 | 2.0 | 32x32 (model default) |" in report
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "data:image/png;base64," in page and "<td><strong>lora</strong> vs base</td>" in page
    assert (tmp_path / "rep" / "grid.png").stat().st_size > 1000


def test_errors_are_one_line_and_name_the_problem(models, prompt_file, tmp_path, capsys):
    base, _ = models
    assert main(["score", "--reward", "pickscore", str(tmp_path)]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err
    assert _gen(base, tmp_path / "o", prompt_file, "--lora", str(tmp_path / "missing")) == 2
    assert "--lora" in capsys.readouterr().err


def test_curve_scores_every_checkpoint_of_runs(quick_world, tmp_path, capsys):
    from ncppo.evaluation.runs import run_checkpoints
    from ncppo.toy.world import all_scenes

    prompts = tmp_path / "toy.txt"
    prompts.write_text("\n".join(s.caption for s in all_scenes()[::40]) + "\n")
    runs = [quick_world / "runs" / "filtered" / m for m in ("dpo", "ncp-dpo")]
    assert main(["curve", *map(str, runs), "--prompts", str(prompts), "--reward", "oracle", "--out",
                 str(tmp_path / "curves"), "--steps", "2", "--guidance", "2"]) == 0
    curves = json.loads((tmp_path / "curves" / "curves.json").read_text())["curves"]
    for run in runs:
        points = curves[run.name]
        assert [p["step"] for p in points] == [0] + [c.step for c in run_checkpoints(run)]
        last = tmp_path / "curves" / run.name / run_checkpoints(run)[-1].path.name
        assert points[-1]["mean"] == pytest.approx(np.mean(list(read_scores(last)["oracle"].values())))
    assert curves["dpo"][0] == curves["ncp-dpo"][0]  # one base model, scored once
    assert (tmp_path / "curves" / "curves.png").stat().st_size > 1000
    # a rerun into its own folder resumes; a foreign folder or one inside a run is refused
    args = ["curve", str(runs[0]), "--prompts", str(prompts), "--reward", "oracle", "--steps", "2", "--guidance", "2"]
    assert main([*args, "--out", str(tmp_path / "curves")]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "curves.json").write_text("{}")
    assert main([*args, "--out", str(tmp_path / "mine")]) == 2
    assert "a folder that no ncppo command wrote" in capsys.readouterr().err
    assert (tmp_path / "mine" / "curves.json").read_text() == "{}"
    assert main([*args, "--out", str(runs[0] / "curves")]) == 2
    assert "is inside the input" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_generate_with_sd_class_pipelines_and_another_scheduler(tiny_pipeline_dirs, kind, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red circle", {"prompt": "a blue square", "style": "photo"}]))
    args = ["generate", "--model", str(tiny_pipeline_dirs[kind]), "--prompts", str(prompts), "--steps", "2",
            "--height", "32", "--width", "32", "--scheduler", "euler"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 0
    assert main([*args, "--out", str(tmp_path / "y"), "--batch-size", "1"]) == 0
    rows = read_manifest(tmp_path / "x")
    assert [r.metadata for r in rows] == [{}, {"style": "photo"}]
    settings = json.loads((tmp_path / "x" / "generation.json").read_text())
    assert settings["scheduler"] == "euler" and settings["spec"]["num_inference_steps"] == 2
    for r, r2 in zip(rows, read_manifest(tmp_path / "y")):
        diff = np.abs(load_image(tmp_path / "x", r).astype(int) - load_image(tmp_path / "y", r2).astype(int))
        assert diff.max() <= 1  # same seed, other batching: the same image up to float summation order
