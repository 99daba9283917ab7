"""The Trainer as a loop (model, objective and data passed in; everything built in ``__init__``), prompt
dropout as a batch operation, the run's record (absolute paths, provenance, derived values), config paths
read from the config file's folder, a run reloaded from another folder, and accelerate checkpoints."""

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ncppo.batch import PreferenceBatch
from ncppo.training import Trainer, load_config
from ncppo.training.checkpoint import checkpoint_dirs
from ncppo.training.config import ConfigError, DataConfig, ObjectiveConfig, OptimConfig, TrainConfig
from ncppo.training.sources import TrainingData, drop_prompts

from .data_helpers import write_dataset

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(4) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=4)


class HandMadeData:
    """Random latents and a fixed prompt's embeddings: a data source that is neither pairs nor a cache."""

    def __init__(self, model, n: int = 6):
        gen = torch.Generator().manual_seed(0)
        cfg = model.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.latents_w, self.latents_l = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        self.embeds = model.encode_prompts(["a red shape"] * n)[0]
        self.seen: list[list[int]] = []

    def __len__(self):
        return len(self.latents_w)

    def plan(self, batch_size, *, shuffle, seed, drop_last):
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        return [order[i:i + batch_size] for i in range(0, len(self) - batch_size + 1, batch_size)]

    def batch(self, item, rng):
        self.seen.append([int(i) for i in item])
        sel = torch.as_tensor(item)
        return PreferenceBatch(latents_w=self.latents_w[sel], latents_l=self.latents_l[sel],
                               prompt_embeds=self.embeds[sel], ids=[int(i) for i in item])

    def skip_report(self):
        return "no pairs skipped"

    def summary(self):
        return {"source": "hand-made", "pairs": len(self), "skips": {"total": 0}}


def test_a_hand_made_model_objective_and_data_are_trained(tmp_path):
    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.models.tiny import build_tiny_pipeline
    from ncppo.objectives import make_objective

    model = PreferenceModel(build_tiny_pipeline("sd15"), lora=LoraSettings(rank=2))
    data = HandMadeData(model)
    assert isinstance(data, TrainingData)
    objective = make_objective(name="dpo", beta=5e6)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=2, max_steps=3, checkpoint_every_steps=2,
                      optim=OptimConfig(learning_rate=1e-3, scale_lr=False), data=DataConfig(prompt_dropout=0.5),
                      objective=ObjectiveConfig(name="dpo", beta=5e6))
    trainer = Trainer(cfg, model=model, objective=objective, data=data)
    assert trainer.model is model and trainer.objective is objective and trainer.data is data
    assert model.policy is not None and trainer.step == 0 and trainer.optimizer is not None
    built = set(vars(trainer))
    before = {n: p.detach().clone() for n, p in model.trainable_state().items()}
    result = trainer.train()
    assert set(vars(trainer)) == built  # train() is the loop: it creates nothing
    assert result.steps == 3 and sorted(i for b in data.seen for i in b) == list(range(6))  # one epoch, each pair once
    after = model.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["source"] == "hand-made" and "a model passed to the Trainer" in summary["sample_command"]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002", "step-000003"]


def test_prompt_dropout_is_an_operation_on_the_batch():
    embeds = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    pooled = torch.ones(3, 5)
    empty = (torch.full((1, 2, 4), -1.0), torch.zeros(1, 5), None)
    batch = PreferenceBatch(latents_w=torch.zeros(3, 1), prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    dropped = drop_prompts(batch, np.array([True, False, True]), empty)
    assert torch.equal(dropped.prompt_embeds[1], embeds[1]) and (dropped.prompt_embeds[[0, 2]] == -1).all()
    assert dropped.pooled_prompt_embeds[[0, 2]].abs().sum() == 0 and torch.equal(dropped.pooled_prompt_embeds[1], pooled[1])
    assert torch.equal(batch.prompt_embeds, embeds)  # the input batch is left as it was
    mask = torch.ones(3, 2, dtype=torch.long)  # PixArt's T5 padding mask: the dropped rows get the empty prompt's
    masked = PreferenceBatch(latents_w=torch.zeros(3, 1), prompt_embeds=embeds, prompt_attention_mask=mask)
    dropped = drop_prompts(masked, np.array([False, True, False]), (empty[0], None, torch.tensor([[1, 0]])))
    assert dropped.prompt_attention_mask.tolist() == [[1, 1], [1, 0], [1, 1]] and dropped.prompt_attention_mask.dtype == torch.long
    with pytest.raises(ValueError, match="the batch has prompt_attention_mask but the empty prompt's encoding has none"):
        drop_prompts(masked, np.array([True, False, False]), empty)
    with pytest.raises(ValueError, match="needs the empty prompt's encoding"):
        drop_prompts(masked, np.array([True, False, False]), None)
    text = PreferenceBatch(latents_w=torch.zeros(2, 1), prompts=["a", "b"])
    assert drop_prompts(text, np.array([False, True]), None).prompts == ["a", ""]
    assert drop_prompts(text, np.array([False, False]), None) is text


def test_config_paths_are_read_from_the_config_files_folder(tmp_path, monkeypatch):
    from ncppo.training.setup import build_data, build_model

    folder = tmp_path / "configs"
    (folder / "pairs.csv").parent.mkdir()
    (folder / "pairs.csv").write_text("x")
    (folder / "c.yaml").write_text("output_dir: ../runs/a\nmodel: {pretrained: ./missing-model}\n"
                                   "data: {source: pairs.csv, cache: no-such-cache}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.yaml")
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.data.source == str(folder / "pairs.csv") and cfg.data.cache == str(folder / "no-such-cache")
    assert cfg.model.pretrained == str(folder / "missing-model")
    with pytest.raises(ConfigError, match=rf"^data.cache: {folder / 'no-such-cache'} does not exist \(relative paths "
                                          "in a config file are read from the file's folder"):
        build_data(cfg.data)
    with pytest.raises(ConfigError, match=rf"^model.pretrained: {folder / 'missing-model'} does not exist"):
        build_model(cfg.model)
    # a hub id stays a hub id; an override is read from the current folder
    cfg = load_config(folder / "c.yaml", ["model.pretrained=org/model", "output_dir=out"])
    assert cfg.model.pretrained == "org/model" and cfg.output_dir == str(elsewhere / "out")


def test_the_run_records_provenance_and_reloads_from_another_folder(tmp_path, tiny_pipeline_dirs, dataset,
                                                                   monkeypatch):
    import ncppo
    from ncppo.evaluation.curves import checkpoint_curve
    from ncppo.evaluation.runs import run_config
    from ncppo.training.provenance import git_commit

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model").symlink_to(tiny_pipeline_dirs["sd15"])
    (folder / "pairs").symlink_to(dataset)
    (folder / "train.yaml").write_text(yaml.safe_dump({
        "output_dir": "run", "model": {"pretrained": "model", "lora_rank": 4},
        "data": {"source": "pairs", "resolution": 32}, "objective": {"name": "dpo", "beta": 5e6},
        "optim": {"learning_rate": 1e-3}, "batch_size": 2, "max_steps": 2, "checkpoint_every_steps": 1, "seed": 3}))
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_config(folder / "train.yaml")
    Trainer(cfg).train()
    run = folder / "run"
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["output_dir"] == str(run) and record["model"]["pretrained"] == str(folder / "model")
    assert record["data"]["source"] == str(folder / "pairs")
    resolved, prov = record["resolved"], record["provenance"]
    assert resolved["learning_rate"] == pytest.approx(2e-3) and resolved["effective_batch"] == 2  # scale_lr x 2
    assert resolved["seed"] == 3 and resolved["gradient_accumulation_steps"] == 1 and resolved["batches_per_epoch"] == 4
    assert prov["ncppo_version"] == ncppo.__version__
    for name in ("torch", "diffusers", "peft", "accelerate"):
        assert prov["libraries"][name] == metadata.version(name)
    machine = prov["machine"]
    assert machine["hostname"] and machine["platform"] and machine["cpu_count"] >= 1 and machine["device"] == "cpu"
    if git_commit() is None:  # ncppo installed outside a checkout
        assert prov["git"] is None
    else:  # the checkout the tests run from (others may commit meanwhile: the commit must exist in it)
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"]) and isinstance(prov["git"]["dirty"], bool)
        where = Path(ncppo.__file__).parent
        assert subprocess.run(["git", "-C", str(where), "cat-file", "-e", prov["git"]["commit"]]).returncode == 0
    assert git_commit(tmp_path) is None  # not a checkout: no commit, no error
    # the record reloads with load_config, from any folder, as the same config
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert run_config(run).to_dict() == cfg.to_dict()
    points = checkpoint_curve(run, lambda pipe, ckpt, last: float(sum(
        p.detach().double().sum() for n, p in pipe.unet.named_parameters() if "lora_B" in n)), base=0.0)
    assert [p["step"] for p in points] == [0, 1, 2] and points[2]["mean"] != 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert points[2]["mean"] == pytest.approx(sum(summary["param_checksums_per_rank"]) - float(sum(
        v.double().sum() for k, v in _trainable(run / "checkpoints" / "step-000002").items() if "lora_A" in k)))


def _trainable(folder):
    from ncppo.training.checkpoint import load_trainable

    return load_trainable(folder)


def test_checkpoints_are_accelerate_states_and_loras(tmp_path, tiny_pipeline_dirs, dataset):
    from ncppo.models.loading import load_pipeline
    from ncppo.models.lora_export import find_lora

    assert TrainConfig().checkpoint_every_steps == 500  # on by default
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.pretrained={tiny_pipeline_dirs['sd15']}",
                             "model.lora_rank=4", f"data.source={dataset}", "data.resolution=32", "batch_size=2",
                             "objective.name=dpo", "objective.beta=5e6", "optim.scale_lr=false", "max_steps=2"])
    Trainer(cfg).train()
    (ckpt,) = checkpoint_dirs(tmp_path / "run")  # at the end (the default interval is longer than the run)
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "trainable.safetensors",
            "pytorch_lora_weights.safetensors", "state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # the frozen base is not copied
    assert find_lora(ckpt) == ckpt
    pipe = load_pipeline(tiny_pipeline_dirs["sd15"])
    pipe.load_lora_weights(ckpt)
    trained = _trainable(ckpt)
    loaded = sum(p.detach().double().sum().item() for n, p in pipe.unet.named_parameters() if "lora" in n)
    assert loaded == pytest.approx(sum(v.double().sum().item() for v in trained.values()), rel=1e-9, abs=1e-9)
