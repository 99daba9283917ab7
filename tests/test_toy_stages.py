"""The toy world end to end at ``--quick`` sizes, and its stage bookkeeping."""

import json
import re

import numpy as np
import pytest

from ncppo.cli import main
from ncppo.data.filter import dataset_stats
from ncppo.data.pairs import PreferencePairs
from ncppo.evaluation import paired_win_rate
from ncppo.toy.config import QUICK_CONFIG, ToyConfig, toy_config_from_dict
from ncppo.toy.layout import ToyLayout, slug
from ncppo.toy.oracle import OracleReward
from ncppo.toy.stages import STAGES, ToyWorld


def test_quick_demo_writes_every_stage_and_the_report(quick_world):
    out = quick_world
    assert list(json.loads((out / "stages.json").read_text())) == list(STAGES)
    for figure in ("curves.png", "win_rates.png", "samples.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    assert (out / "base_model" / "model_index.json").is_file()  # the link configs/toy/*.yaml train from
    for method in QUICK_CONFIG.train.methods:
        assert (out / "runs" / "filtered" / method / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_reports_numbers_are_computed_from_the_runs(quick_world):
    out = quick_world
    report = (out / "report.md").read_text()
    results = json.loads((out / "eval" / "results.json").read_text())
    oracle = OracleReward()
    for name, record in results["models"].items():
        saved = np.load(out / "eval" / "images" / f"{slug(name)}.npz")
        prompts = [results_prompt for results_prompt in _prompts(results, saved["prompt_ids"])]
        rescored = oracle(saved["images"], prompts)  # the images on disk give the rewards in the report
        np.testing.assert_allclose(rescored, record["rewards"])
        assert f"| {name} | {rescored.mean():.4f} |" in report
    for row in results["comparisons"]:
        a, b = results["models"][row["a"]], results["models"][row["b"]]
        win = paired_win_rate(a["rewards"], b["rewards"], groups=a["prompt_ids"], n_boot=QUICK_CONFIG.eval.bootstrap)
        assert (win.rate, win.low, win.high) == (row["rate"], row["low"], row["high"])
        assert f"| {row['b']} vs {row['a']} | {row['kind']} | {100 * win.rate:.1f}% " in report
    for method in QUICK_CONFIG.train.methods:
        steps = json.loads((out / "runs" / "filtered" / method / "summary.json").read_text())["steps"]
        assert re.search(rf"\| filtered/{method} \| {steps} \|", report)
    pairs = dataset_stats(PreferencePairs(out / "pairs", tie_policy="keep").meta)
    assert f"- {pairs['rows']} rows over {pairs['prompts']} prompts: {pairs['pairs']} decided pairs and " \
           f"{pairs['ties']} ties" in report
    kept = len(PreferencePairs(out / "filtered").meta)
    filtered = json.loads((out / "filtered" / "stats.json").read_text())
    assert f"- {filtered['before']['absolute_winners']} absolute winners (no loss, no draw, at least " \
           f"{QUICK_CONFIG.filter.min_wins} win(s)); kept {kept} pairs over" in report  # one rule, stated once


def _prompts(results, prompt_ids):
    from ncppo.toy.world import all_scenes

    captions = [s.caption for s in all_scenes()]
    return [captions[i] for i in prompt_ids]


def test_curves_start_at_the_base_model_and_follow_training_compute(quick_world):
    results = json.loads((quick_world / "eval" / "results.json").read_text())
    budget = json.loads((quick_world / "budget.json").read_text())
    for name, points in results["curves"].items():
        assert points[0]["train_seconds"] == 0.0 and points[0]["step"] == 0 and points[0]["compute"] == 0
        seconds = [p["train_seconds"] for p in points]
        assert seconds == sorted(seconds) and len(points) >= 2
        assert points[-1]["step"] == json.loads((quick_world / "runs" / name / "summary.json").read_text())["steps"]
        method = name.rsplit("/", 1)[1]
        ratio = budget["flops_per_step"][method] / budget["flops_per_step"]["dpo"]
        assert points[-1]["compute"] == pytest.approx(points[-1]["step"] * ratio)


def test_every_run_gets_the_same_compute_whatever_the_machine(quick_world):
    budget = json.loads((quick_world / "budget.json").read_text())
    flops, steps = budget["flops_per_step"], budget["steps"]
    assert steps["dpo"] == QUICK_CONFIG.train.budget_dpo_steps and set(QUICK_CONFIG.train.methods) <= set(steps)
    assert flops["ncp-dpo"] > flops["dpo"] > flops["sft"] > 0  # NCP runs the encoder; SFT has no loser/reference
    for method in QUICK_CONFIG.train.methods:
        assert steps[method] == max(1, round(budget["budget_dpo_steps"] * flops["dpo"] / flops[method]))
        summary = json.loads((quick_world / "runs" / "filtered" / method / "summary.json").read_text())
        assert summary["steps"] == steps[method]  # a step budget: the machine's speed cannot change it


def test_evaluation_uses_held_out_captions_and_reports_the_base_on_both_splits(quick_world):
    from ncppo.toy.splits import split_captions

    results = json.loads((quick_world / "eval" / "results.json").read_text())
    held_out = set(split_captions(results["spec"]["split"]))
    trained_on = set(PreferencePairs(quick_world / "pairs", tie_policy="keep").meta.caption.to_pylist())
    evaluated = set(_prompts(results, results["models"]["base"]["prompt_ids"]))
    assert evaluated <= held_out and not evaluated & trained_on and trained_on <= set(split_captions("train"))
    assert set(results["base_by_split"]) == {"validation", "test"}
    report = (quick_world / "report.md").read_text()
    for split, record in results["base_by_split"].items():
        assert f"| {split} | {record['images']} | {record['mean']:.4f} |" in report


def test_a_stage_reruns_only_when_its_inputs_change(quick_world, tmp_path):
    world = ToyWorld(quick_world, QUICK_CONFIG)
    assert all(world._fresh(stage) for stage in STAGES)
    changed = ToyWorld(quick_world, toy_config_from_dict({"eval": {"guidance_scale": 2.0}}, QUICK_CONFIG))
    assert [s for s in STAGES if changed._fresh(s)] == ["pretrain", "pairs", "filter", "train"]
    retrain = ToyWorld(quick_world, toy_config_from_dict({"train": {"learning_rate": 1e-4}}, QUICK_CONFIG))
    assert [s for s in STAGES if retrain._fresh(s)] == ["pretrain", "pairs", "filter"]
    layout = ToyLayout(quick_world, ("x>y",))
    assert world.layout == ToyLayout(quick_world) and world.run_dir("filtered/dpo") == layout.run_dir("filtered/dpo")
    assert layout.dataset("x>y") == quick_world / "filtered-x_gt_y" and layout.eval_images("a/b").name == "a-b.npz"
    with pytest.raises(ValueError, match="unknown toy dataset 'x>z'"):
        layout.dataset("x>z")
    with pytest.raises(FileNotFoundError, match="ncppo toy pairs"):
        ToyWorld(tmp_path / "empty", QUICK_CONFIG).run(stages=("filter",))


def test_toy_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"toy config.train: unknown key\(s\) \['lr'\]"):
        toy_config_from_dict({"train": {"lr": 1}})
    assert toy_config_from_dict({"pairs": {"guidance_scales": [2, 1]}}).pairs.guidance_scales == (2, 1)
    assert toy_config_from_dict({}) == ToyConfig()
    assert main(["toy", "train", "--out", str(tmp_path), "train.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    # every value is type-checked when the config is loaded, not when a stage uses it
    assert main(["toy", "train", "--out", str(tmp_path), "train.budget_dpo_steps=abc"]) == 2
    assert "toy config.train.budget_dpo_steps: expected int, got 'abc'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval.split: 'train' is not one of"):
        toy_config_from_dict({"eval": {"split": "train"}})  # the preference data's captions are not held out
    with pytest.raises(ValueError, match="train.methods: 'dpoo' is not one of .*did you mean 'dpo'"):
        toy_config_from_dict({"train": {"methods": ["dpoo"]}})
    with pytest.raises(ValueError, match="pairs.guidance_scales: expected a list"):
        toy_config_from_dict({"pairs": {"guidance_scales": 3}})
    with pytest.raises(ValueError, match=r"eval.curve_prompt_stride: must be > 0, got 0"):
        toy_config_from_dict({"eval": {"curve_prompt_stride": 0}})
    with pytest.raises(ValueError, match="pairs.image_format: 'webp' is not one of"):
        toy_config_from_dict({"pairs": {"image_format": "webp"}})
    assert toy_config_from_dict({"pairs": {"image_format": "jpeg"}}).pairs.image_format == "jpeg"


def test_the_shipped_world_config_is_the_default():
    from pathlib import Path

    from ncppo.toy.config import load_toy_config

    path = Path(__file__).parents[1] / "configs" / "world" / "toy.yaml"
    assert load_toy_config(str(path), [], quick=False) == ToyConfig()
    assert load_toy_config(str(path), ["train.budget_dpo_steps=2"], quick=False).train.budget_dpo_steps == 2


def test_a_damaged_stage_record_is_named(tmp_path):
    from ncppo.errors import StateError

    (tmp_path / "stages.json").write_text("[1")
    with pytest.raises(StateError, match="stages.json is damaged"):
        ToyWorld(tmp_path, QUICK_CONFIG).run(stages=("pretrain",))


def test_a_foreign_folder_is_never_used_as_a_toy_world(tmp_path):
    from ncppo.errors import OutputDirError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="no ncppo command wrote"):
        ToyWorld(tmp_path, QUICK_CONFIG).run(stages=("pretrain",))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_interrupted_train_and_evaluate_stages_resume_run_by_run(quick_world, tmp_path, monkeypatch):
    import shutil

    import ncppo.toy.evaluate as toy_evaluate
    import ncppo.toy.training as toy_training

    out = tmp_path / "world"
    shutil.copytree(quick_world, out, symlinks=True)
    world = ToyWorld(out, QUICK_CONFIG, progress=False)
    ledger = json.loads(world.layout.stages_file.read_text())
    for stage in ("train", "evaluate", "report"):  # as after a kill during the train stage
        ledger.pop(stage)
    world.layout.stages_file.write_text(json.dumps(ledger))
    world.layout.run_record("filtered/cpo").unlink()  # this run had not finished
    trained = []
    real_train = toy_training.train_method
    monkeypatch.setattr(toy_training, "train_method", lambda cfg, method, *a: trained.append(method) or real_train(cfg, method, *a))
    world.run(stages=("train",))
    assert trained == ["cpo"]  # the finished runs were reused

    scored, real_curve = [], toy_evaluate.checkpoint_curve

    def interrupted(run_dir, *args):
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(run_dir.name)
        return real_curve(run_dir, *args)

    monkeypatch.setattr(toy_evaluate, "checkpoint_curve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world.run(stages=("evaluate",))
    assert len(list(world.layout.eval_partial.glob("*.json"))) == 4  # the base model and three runs
    counted = []
    monkeypatch.setattr(toy_evaluate, "checkpoint_curve", lambda run_dir, *a: counted.append(run_dir.name) or real_curve(run_dir, *a))
    world.run(stages=("evaluate",))
    assert counted == list(QUICK_CONFIG.train.methods[3:])  # only the runs not yet evaluated
    assert not world.layout.eval_partial.exists()
    resumed = json.loads(world.layout.results.read_text())
    whole = json.loads((quick_world / "eval" / "results.json").read_text())
    assert resumed["models"].keys() == whole["models"].keys()
    for name, record in whole["models"].items():
        if name != "filtered/cpo":  # retrained above; the rest are the same runs evaluated in two sittings
            assert resumed["models"][name]["rewards"] == pytest.approx(record["rewards"])
