"""Checkpoints that are LoRAs, the kohya (A1111/ComfyUI) export with its metadata, the model card, ``--lora``."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ncppo.cli import main
from ncppo.models.loading import ModelLoadError, load_pipeline
from ncppo.models.lora_export import find_lora, read_metadata
from ncppo.training import Trainer, load_config
from ncppo.training.checkpoint import checkpoint_dirs

from .data_helpers import write_dataset

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(6) for c in ("red", "blue")]
PROMPTS = ["a red shape", "a blue shape"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def run(request, tmp_path_factory, tiny_pipeline_dirs, dataset):
    """A 3-step DPO run (alpha 8 = 2 x rank: the scale must survive every format), a checkpoint every step."""
    kind = request.param
    out = tmp_path_factory.mktemp(f"run-{kind}") / "my run"
    cfg = load_config(None, [f"output_dir={out}", f"model.pretrained={tiny_pipeline_dirs[kind]}", "model.lora_rank=4",
                             "model.lora_alpha=8", f"data.source={dataset}", "data.resolution=32", "batch_size=2",
                             "objective.name=dpo", "objective.beta=5e6", "optim.learning_rate=1e-2",
                             "optim.scale_lr=false", "max_steps=3", "checkpoint_every_steps=1"])
    result = Trainer(cfg).train()
    return {"kind": kind, "base": tiny_pipeline_dirs[kind], "out": out, "summary": result.summary}


def _sample(pipe) -> np.ndarray:
    return pipe(PROMPTS, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images


def _loaded(base, lora) -> np.ndarray:
    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(lora))
    return _sample(pipe)


def test_every_checkpoint_is_a_lora_with_the_runs_weights_at_that_step(run):
    from ncppo.evaluation.runs import apply_checkpoint, load_run_model, run_checkpoints

    ckpts = checkpoint_dirs(run["out"])
    assert [p.name for p in ckpts] == ["step-000001", "step-000002", "step-000003"]
    assert all((p / "pytorch_lora_weights.safetensors").is_file() for p in ckpts)
    assert [c.step for c in run_checkpoints(run["out"])] == [1, 2, 3]
    model = load_run_model(run["out"])  # the run's own model at step 2: the resume tensors applied
    apply_checkpoint(model, ckpts[1])
    at_step_2 = _sample(model.pipeline)
    loaded = _loaded(run["base"], ckpts[1])  # a fresh pipeline, diffusers' own loader, the checkpoint folder
    base = _sample(load_pipeline(run["base"]))
    final = _loaded(run["base"], run["out"] / "lora")
    assert np.abs(loaded - at_step_2).max() < 1e-5
    assert np.abs(at_step_2 - base).max() > 1e-3 and np.abs(at_step_2 - final).max() > 1e-4  # not the base, not step 3
    last = load_file(str(ckpts[-1] / "pytorch_lora_weights.safetensors"))
    exported = load_file(str(run["out"] / "lora" / "pytorch_lora_weights.safetensors"))
    assert last.keys() == exported.keys() and all(torch.equal(last[k], exported[k]) for k in last)


def test_the_kohya_export_loads_through_diffusers_kohya_loader_and_matches(run, monkeypatch):
    import diffusers.loaders.lora_pipeline as lora_pipeline

    kohya = run["out"] / "lora" / "my_run_kohya.safetensors"
    assert run["summary"]["weights_kohya"] == str(kohya.absolute())
    tensors = load_file(str(kohya))
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))  # the LoRA's alpha, not its rank
    converted = []
    real = lora_pipeline._convert_non_diffusers_lora_to_diffusers
    monkeypatch.setattr(lora_pipeline, "_convert_non_diffusers_lora_to_diffusers",
                        lambda *a, **k: converted.append(1) or real(*a, **k))
    from_kohya = _loaded(run["base"], kohya)
    assert converted, "diffusers did not read the file as a kohya LoRA"
    monkeypatch.setattr(lora_pipeline, "_convert_non_diffusers_lora_to_diffusers", real)
    from_diffusers = _loaded(run["base"], run["out"] / "lora")
    assert np.abs(from_kohya - from_diffusers).max() < 1e-5
    assert np.abs(from_kohya - _sample(load_pipeline(run["base"]))).max() > 1e-3

    meta = read_metadata(kohya)
    assert meta["ncppo.objective"] == "dpo" and json.loads(meta["ncppo.objective_settings"])["beta"] == 5e6
    assert float(meta["ncppo.beta"]) == 5e6 and meta["ncppo.steps"] == "3" and meta["ss_steps"] == "3"
    assert meta["ncppo.base_model"] == str(run["base"]) and meta["ncppo.data_source"].endswith("pairs")
    import ncppo

    assert meta["ncppo.version"] == ncppo.__version__ and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.architecture"] == {"sd15": "stable-diffusion-v1/lora",
                                              "sdxl": "stable-diffusion-xl-v1-base/lora"}[run["kind"]]


def test_the_model_card(run):
    card = (run["out"] / "README.md").read_text()
    summary = run["summary"]
    assert card.startswith("---\nlibrary_name: diffusers\ntags:\n") and "\n- lora\n" in card
    assert f"| base model | `{run['base']}` |" in card and "| method | dpo: Diffusion-DPO" in card
    assert "beta=5000000.0" in card and f"| data | 12 pairs from `{summary['data']['source']}`" in card
    assert "LoRA rank 4, alpha 8" in card and "| steps | 3 optimiser steps (stopped by max_steps)" in card
    assert f"| loss | {summary['final_metrics']['loss']:.6g} |" in card
    assert f'pipe.load_lora_weights("{run["out"] / "lora"}")' in card
    assert "models/Lora/" in card and "<lora:my_run_kohya:1>" in card and "models/loras/" in card


def test_generate_takes_a_checkpoint_a_run_folder_or_says_where_the_loras_are(run, tmp_path, capsys):
    if run["kind"] != "sd15":
        pytest.skip("once is enough")
    (tmp_path / "p.txt").write_text("a red shape\n")

    def generate(lora, name):
        code = main(["generate", "--model", str(run["base"]), "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"),
                     "--out", str(tmp_path / name), "--steps", "2"])
        return code, sorted((tmp_path / name).glob("**/*.png"))

    ckpts = checkpoint_dirs(run["out"])
    code, first = generate(ckpts[0], "first")
    assert code == 0 and len(first) == 1
    _, last = generate(ckpts[-1], "last")
    _, whole_run = generate(run["out"], "run")  # the run folder: its lora/
    _, lora = generate(run["out"] / "lora", "lora")
    assert last[0].read_bytes() == lora[0].read_bytes() == whole_run[0].read_bytes()
    assert first[0].read_bytes() != last[0].read_bytes()
    capsys.readouterr()
    (run["out"] / "lora").rename(tmp_path / "moved")  # a run still training: no lora/ yet
    try:
        code, _ = generate(run["out"], "none")
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "not a diffusers-format LoRA" in err
        assert all(str(p) in err for p in ckpts)  # the folders that hold one
    finally:
        (tmp_path / "moved").rename(run["out"] / "lora")


def test_find_lora(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: not a diffusers-format LoRA \(no pytorch_lora_weights.safetensors in it\)$"):
        find_lora(tmp_path / "empty")
    (tmp_path / "full" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="a fully fine-tuned U-Net, not a LoRA"):
        find_lora(tmp_path / "full")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="a checkpoint without a LoRA file"):
        find_lora(tmp_path / "old")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .safetensors file"):
        find_lora(tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_lora(tmp_path / "missing")
    (tmp_path / "k.safetensors").write_bytes(b"")
    assert find_lora(tmp_path / "k.safetensors") == tmp_path / "k.safetensors"
    (tmp_path / "a" / "lora").mkdir(parents=True)
    (tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert find_lora(tmp_path / "a") == tmp_path / "a" / "lora"
    assert find_lora(tmp_path / "a" / "lora") == tmp_path / "a" / "lora"


def test_a_full_fine_tune_has_no_lora_and_says_so(tmp_path, tiny_pipeline_dirs, dataset):
    cfg = load_config(None, [f"output_dir={tmp_path / 'full'}", f"model.pretrained={tiny_pipeline_dirs['sd15']}",
                             "model.finetune=full", f"data.source={dataset}", "data.resolution=32", "batch_size=2",
                             "objective.name=sft", "optim.learning_rate=1e-4", "optim.scale_lr=false", "max_steps=1"])
    summary = Trainer(cfg).train().summary
    (ckpt,) = checkpoint_dirs(tmp_path / "full")
    assert not (ckpt / "pytorch_lora_weights.safetensors").exists() and summary["weights_kohya"] is None
    card = (tmp_path / "full" / "README.md").read_text()
    assert "| weights | full U-Net fine-tune |" in card and "UNet2DConditionModel.from_pretrained" in card
    assert "kohya" not in card
    with pytest.raises(ModelLoadError, match="a checkpoint without a LoRA file"):
        find_lora(ckpt)
    with pytest.raises(ModelLoadError, match="a fully fine-tuned U-Net"):
        find_lora(tmp_path / "full")


def test_loras_on_any_modules_load_as_the_model_in_both_formats(tmp_path, tiny_pipeline_dirs, kind):
    """Attention projections mixed with other targets: diffusers' loader reads a file's format from its first key,
    so a file with two namings loses part of the LoRA (here the to_q adapters) without a word."""
    from ncppo.models.lora_export import export_kohya
    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from tests.conftest import perturb_lora

    targets = ("to_q", "proj_in", "ff.net.0.proj", "conv1")
    model = PreferenceModel.from_pretrained(tiny_pipeline_dirs[kind], lora=LoraSettings(4, 8.0, targets))
    perturb_lora(model.unet, scale=0.3)
    model.save_lora(tmp_path / "lora")
    export_kohya(tmp_path / "lora", tmp_path / "k.safetensors")
    own = _sample(model.pipeline)
    for lora in (tmp_path / "lora", tmp_path / "k.safetensors"):
        assert np.abs(_loaded(tiny_pipeline_dirs[kind], lora) - own).max() < 1e-5, lora
    assert np.abs(_sample(load_pipeline(tiny_pipeline_dirs[kind])) - own).max() > 1e-2
