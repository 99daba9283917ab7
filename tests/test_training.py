import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ncppo.training import Trainer, TrainingDiverged, load_config
from ncppo.training.checkpoint import checkpoint_dirs

from .data_helpers import write_dataset

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(6) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


def _config(tmp_path, model_dir, dataset, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.pretrained={model_dir}", "model.lora_rank=4",
                              f"data.source={dataset}", "data.resolution=32", "batch_size=2",
                              "optim.learning_rate=1e-3", "optim.scale_lr=false", "max_steps=2", *overrides])


def _lora(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo"])
def test_each_objective_trains_the_lora(tmp_path, tiny_pipeline_dirs, dataset, kind, objective):
    cfg = _config(tmp_path, tiny_pipeline_dirs[kind], dataset, f"objective.name={objective}",
                  "objective.beta=5e6", "gradient_accumulation_steps=2")
    result = Trainer(cfg).train()
    assert result.steps == 2 and result.stopped_by == "max_steps"
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    lora = _lora(tmp_path / "run")
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["objective"]["name"] == objective and saved["resolved"]["gradient_accumulation_steps"] == 2


def test_time_budget_stops_the_run(tmp_path, tiny_pipeline_dirs, dataset):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "max_steps=1000", "max_train_minutes=0.002",
                  "optim.scale_lr=true", "gradient_accumulation_steps=3")
    result = Trainer(cfg).train()
    assert result.stopped_by == "time_budget" and 1 <= result.steps < 1000
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-3 * 2 * 3)  # lr x effective batch (2 pairs x 3 micro-steps), as Diffusion-DPO
    assert result.train_seconds >= 0.12
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "time_budget" and checkpoint_dirs(tmp_path / "run")[-1].name == f"step-{result.steps:06d}"


def test_nan_guard_skips_and_stops(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "objective.name=dpo", "objective.beta=.nan",
                  "max_steps=10", "max_nonfinite_in_a_row=3")
    with pytest.raises(TrainingDiverged, match=r"^train: training diverged at step 3: 3 non-finite losses or gradients "
                       r"in a row .*try a lower optim.learning_rate.*checkpoints/step-000003$"):
        Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1, 1]
    printed = capsys.readouterr().out
    assert "step 1: non-finite loss or gradient" in printed and "batch ids [" in printed
    (ckpt,) = checkpoint_dirs(tmp_path / "run")
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in weights.items() if "lora_B" in k)  # no update was applied


def _run_cli(config_path, *, kill_after_checkpoint=None, run_dir=None):
    cmd = [sys.executable, "-m", "ncppo.cli", "train", str(config_path)]
    if kill_after_checkpoint is None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(p.name == f"step-{kill_after_checkpoint:06d}" for p in checkpoint_dirs(run_dir)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_kill_and_resume_reproduces_the_losses(tmp_path, tiny_pipeline_dirs, dataset):
    def write(name):
        cfg = {"output_dir": str(tmp_path / name), "model": {"pretrained": str(tiny_pipeline_dirs["sd15"]), "lora_rank": 4},
               "data": {"source": str(dataset), "resolution": 32, "random_flip": True, "prompt_dropout": 0.3},
               "objective": {"name": "ncp-dpo", "beta": 5.0e6}, "optim": {"learning_rate": 1.0e-3, "scale_lr": False},
               "batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 12, "checkpoint_every_steps": 3,
               "keep_last_checkpoints": 2}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    _run_cli(write("straight"))
    _run_cli(write("killed"), kill_after_checkpoint=6, run_dir=tmp_path / "killed")
    _run_cli(tmp_path / "killed.yaml")  # resumes from the newest checkpoint
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert len(straight) == len(resumed) == 12
    assert straight == resumed  # exactly: data order, noise, dropout, optimizer and scheduler restored
    assert [p.name for p in checkpoint_dirs(tmp_path / "killed")] == ["step-000009", "step-000012"]
    a, b = _lora(tmp_path / "straight"), _lora(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path, tiny_pipeline_dirs, dataset, monkeypatch):
    import ncppo.training.checkpoint as ckpt

    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "max_steps=4", "checkpoint_every_steps=2")
    real = torch.save

    def dying(obj, f, *args, **kwargs):
        if "step-000004" in str(f) and str(f).endswith("optimizer.bin"):  # the second checkpoint's optimizer state
            raise KeyboardInterrupt("killed while saving")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).train()
    monkeypatch.setattr(ckpt.torch, "save", real)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    result = Trainer(cfg).train()  # resumes from step 2
    assert result.steps == 4 and len(_losses(tmp_path / "run")) == 4


def test_two_processes_end_with_identical_parameters(tmp_path, tiny_pipeline_dirs, dataset):
    # the LoRA's policy and reference run as one difference pass through the DDP-wrapped U-Net (the separate passes
    # under DDP: tests/test_trainer_distributed.py's full fine-tune)
    cfg = {"output_dir": str(tmp_path / "ddp"), "model": {"pretrained": str(tiny_pipeline_dirs["sd15"]), "lora_rank": 4,
                                                          "reference_pass": "difference"},
           "data": {"source": str(dataset), "resolution": 32}, "objective": {"name": "ncp-dpo", "beta": 5.0e6},
           "optim": {"learning_rate": 1.0e-3, "scale_lr": False}, "batch_size": 1, "effective_batch": 4, "max_steps": 3}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ncppo.cli",
                          "train", str(tmp_path / "ddp.yaml")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["gradient_accumulation_steps"] == 2
    assert summary["resolved"]["reference_pass"] == "difference"
    first, second = summary["param_checksums_per_rank"]
    assert first == second and first != 0


def test_exported_lora_loads_into_a_fresh_pipeline(tmp_path, tiny_pipeline_dirs, dataset, kind):
    from ncppo.models.loading import load_pipeline

    cfg = _config(tmp_path, tiny_pipeline_dirs[kind], dataset, "objective.name=dpo", "objective.beta=5e6",
                  "model.lora_alpha=8")
    Trainer(cfg).train()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    pipe = load_pipeline(tiny_pipeline_dirs[kind])
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    loaded = sum(p.detach().double().sum().item() for n, p in pipe.unet.named_parameters() if "lora" in n)
    assert loaded == pytest.approx(summary["param_checksums_per_rank"][0], rel=1e-9, abs=1e-9)
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8


def test_8bit_adamw_bf16_and_validation_images(tmp_path, tiny_pipeline_dirs, dataset):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "optim.optimizer=adamw8bit", "mixed_precision=bf16",
                  "objective.name=ncp-dpo", "objective.beta=5e6", "validation_every=1", "validation_steps=2",
                  "validation_prompts=[a red shape, a blue shape]")
    trainer = Trainer(cfg)
    result = trainer.train()
    import bitsandbytes as bnb

    assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit)
    assert trainer.resolved()["reference_pass"] == "difference"  # auto, for a LoRA under bf16 autocast
    assert result.steps == 2 and all(math.isfinite(v) for v in _losses(tmp_path / "run"))
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in _lora(tmp_path / "run").items())
    for name in ("step-000001.png", "step-000002.png", "last.png"):
        assert (tmp_path / "run" / "validation" / name).stat().st_size > 0


def test_training_from_a_latent_cache(tmp_path, tiny_pipeline_dirs, dataset, kind):
    from ncppo.data.cache import build_cache
    from ncppo.data.pairs import PreferencePairs
    from ncppo.models.preference_model import PreferenceModel
    from ncppo.training.config import ConfigError

    frozen = PreferenceModel.from_pretrained(tiny_pipeline_dirs[kind], finetune="none")
    build_cache(frozen, PreferencePairs(dataset), tmp_path / "cache", resolution=32, progress=False)
    cfg = _config(tmp_path, tiny_pipeline_dirs[kind], dataset, f"data.cache={tmp_path / 'cache'}",
                  "objective.name=ncp-dpo", "objective.beta=5e6", "data.prompt_dropout=0.5")
    result = Trainer(cfg).train()
    assert result.steps == 2 and all(math.isfinite(v) for v in _losses(tmp_path / "run"))
    other = "sdxl" if kind == "sd15" else "sd15"
    wrong = _config(tmp_path, tiny_pipeline_dirs[other], dataset, f"data.cache={tmp_path / 'cache'}",
                    f"output_dir={tmp_path / 'wrong'}")
    with pytest.raises(ConfigError, match=f"built for a {kind} model"):
        Trainer(wrong).train()
