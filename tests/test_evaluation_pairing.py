"""Two generated sets are compared only when they were generated alike: ``compare``, ``report`` and
``study create`` pair through one function (``pair_image_sets``), which refuses sets whose generation
settings differ in anything but the model and LoRA, and always reports unpaired images."""

import json

import pytest

from ncppo.cli import main
from ncppo.errors import UsageError
from ncppo.evaluation.image_sets import SettingsMismatchError, pair_image_sets
from tests.study_helpers import fake_generation

PROMPTS = [f"prompt {i}" for i in range(8)]


def _settings(model="m", lora="", steps=50, images=1, prompts=8, source="p.txt", guidance=3.0, dtype="fp32"):
    return {"spec": {"images_per_prompt": images, "seed": 0, "num_inference_steps": steps, "guidance_scale": guidance,
                     "height": None, "width": None, "prompt_ids": None},
            "prompt_source": source, "prompts": prompts, "model": model, "lora": lora, "scheduler": "default",
            "dtype": dtype}


def _set(folder, colour, prompts=PROMPTS, images=1, score=0.0, **settings):
    fake_generation(folder, prompts, colour, images_per_prompt=images)
    (folder / "generation.json").write_text(json.dumps(_settings(images=images, prompts=len(prompts), **settings)))
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    (folder / "scores").mkdir()
    (folder / "scores" / "oracle.json").write_text(json.dumps(
        {"reward": "oracle", "weights": None, "scores": {r["id"]: score + 0.01 * i for i, r in enumerate(rows)}}))
    return folder


def test_sets_generated_alike_pair_silently_and_model_and_lora_may_differ(tmp_path, capsys):
    a = _set(tmp_path / "a", (200, 0, 0), model="base")
    b = _set(tmp_path / "b", (0, 0, 200), model="base", lora="runs/x/lora", score=1.0, source="/elsewhere/p.txt")
    pairing = pair_image_sets(a, b)
    assert len(pairing.pairs) == 8 and pairing.unpaired == 0 and pairing.differences == {}
    assert capsys.readouterr().err == ""  # nothing to note (the prompt file named by another path: same prompts)
    assert main(["compare", str(a), str(b)]) == 0
    assert "| oracle | 8 | 100.0% [100.0, 100.0]" in capsys.readouterr().out


def test_other_settings_are_refused_with_the_keys_named_unless_allowed(tmp_path, capsys):
    # the case: an 8-image, 50-step set against a 1-image, 2-step set of the first prompt
    a = _set(tmp_path / "base", (200, 0, 0), prompts=PROMPTS[:1], images=8, steps=50)
    b = _set(tmp_path / "lora2", (0, 0, 200), prompts=PROMPTS[:1], images=1, steps=2, lora="l")
    with pytest.raises(SettingsMismatchError, match=r"spec\.images_per_prompt: 8 vs 1; spec\.num_inference_steps: "
                                                    r"50 vs 2\).*--allow-mismatch"):
        pair_image_sets(a, b)
    assert isinstance(SettingsMismatchError("x"), UsageError)
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.num_inference_steps: 50 vs 2" in err and "lora:" not in err

    assert main(["compare", str(a), str(b), "--allow-mismatch", "--json", str(tmp_path / "c.json")]) == 0
    captured = capsys.readouterr()
    assert "7 of 8 images of " in captured.err and "have no partner" in captured.err
    assert "e.g. p00000-i01, p00000-i02, p00000-i03, ..." in captured.err
    assert "despite other generation settings" in captured.err and "only 1 prompt(s)" in captured.err
    assert "7 images of A and 0 of B unpaired" in captured.out
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["unpaired"] == {"a": 7, "b": 0} and result["rewards"]["oracle"]["pairs"] == 1
    assert result["settings_differences"]["spec.num_inference_steps"] == [50, 2]


@pytest.mark.parametrize("key,value", [("guidance", 7.5), ("dtype", "fp16"), ("steps", 20)])
def test_any_other_setting_is_a_mismatch(tmp_path, key, value):
    a = _set(tmp_path / "a", (200, 0, 0))
    b = _set(tmp_path / "b", (0, 0, 200), **{key: value})
    with pytest.raises(SettingsMismatchError, match="--allow-mismatch"):
        pair_image_sets(a, b)


def test_a_limit_on_the_prompts_is_a_mismatch(tmp_path):
    a = _set(tmp_path / "a", (200, 0, 0))
    b = _set(tmp_path / "b", (0, 0, 200), prompts=PROMPTS[:4])  # --limit 4
    with pytest.raises(SettingsMismatchError, match="prompts: 8 vs 4"):
        pair_image_sets(a, b)


def test_unpaired_images_are_reported_even_when_settings_match(tmp_path, capsys):
    a = _set(tmp_path / "a", (200, 0, 0))
    b = _set(tmp_path / "b", (0, 0, 200))
    rows = (b / "manifest.jsonl").read_text().splitlines()
    (b / "manifest.jsonl").write_text("\n".join(rows[:5]) + "\n")  # an unfinished generation
    assert main(["compare", str(a), str(b)]) == 0
    err = capsys.readouterr().err
    assert f"3 of 8 images of {a} have no partner" in err and "(e.g. p00005-i00, p00006-i00, p00007-i00)" in err


def test_a_set_without_settings_is_noted_and_nothing_shared_is_refused(tmp_path, capsys):
    a = _set(tmp_path / "a", (200, 0, 0))
    b = fake_generation(tmp_path / "b", PROMPTS, (0, 0, 200))  # no generation.json
    assert len(pair_image_sets(a, b).pairs) == 8
    assert "has no generation.json: its generation settings could not be checked" in capsys.readouterr().err
    c = fake_generation(tmp_path / "c", ["other"], (0, 0, 200))
    with pytest.raises(UsageError, match="share no"):
        pair_image_sets(b, c, notify=None)


def test_study_create_pairs_through_the_same_check(tmp_path, capsys):
    a = _set(tmp_path / "base", (200, 0, 0), prompts=PROMPTS[:1], images=8, steps=50)
    b = _set(tmp_path / "lora2", (0, 0, 200), prompts=PROMPTS[:1], images=1, steps=2)
    args = ["study", "create", "--a", str(a), "--b", str(b), "--out"]
    assert main([*args, str(tmp_path / "s")]) == 2
    assert "spec.images_per_prompt: 8 vs 1" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main([*args, str(tmp_path / "s"), "--allow-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "1 items" in captured.out and "7 of 8 images of " in captured.err
    assert json.loads((tmp_path / "s" / "study.json").read_text())["unpaired"] == 7
