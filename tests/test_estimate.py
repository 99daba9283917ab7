"""``ncppo estimate``: counted on fake tensors, checked against real CPU steps of tiny and small U-Nets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ncppo.batch import PreferenceBatch
from ncppo.errors import UsageError
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.models.tiny import build_tiny_pipeline
from ncppo.objectives import make_objective
from ncppo.planning.architectures import build_abstract_pipeline, read_configs
from ncppo.planning.estimate import AbstractRun, estimate_run
from ncppo.planning.measure import measured_step
from ncppo.step import training_step
from ncppo.training.config import load_config

SMALL = (64, 128, 256)  # benchmarks/step_cost.py's "small" U-Net: large enough for compute to dominate the CPU time


def _config(model_dir, **values):
    values = {"model": {"pretrained": str(model_dir), "lora_rank": 8}, "data": {"source": "unused", "resolution": 32},
              "batch_size": 2, "max_steps": 100, **values}
    return load_config(**values)


def _real(kind="sd15", block_out_channels=(32, 64), image_size=32, batch=2, seed=0, reference_pass="auto"):
    """A real tiny model and a batch of encoded inputs (latents, prompt embeddings) of its shape."""
    pipe = build_tiny_pipeline(kind, block_out_channels=block_out_channels, image_size=image_size, seed=seed)
    model = PreferenceModel(pipe, lora=LoraSettings(rank=8), reference_pass=reference_pass)
    model.unet.train()
    size = image_size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(batch, 16, generator=g) if kind == "sdxl" else None
    return model, PreferenceBatch(latents_w=torch.randn(batch, 4, size, size, generator=g),
                                  latents_l=torch.randn(batch, 4, size, size, generator=g),
                                  prompt_embeds=torch.randn(batch, 77, 32, generator=g), pooled_prompt_embeds=pooled,
                                  ids=list(range(batch)))


def _abstract(kind="sd15", block_out_channels=(32, 64), image_size=32, batch=2, reference_pass="auto"):
    pipe = build_tiny_pipeline(kind, block_out_channels=block_out_channels, image_size=image_size)
    return AbstractRun(None, lora=LoraSettings(rank=8), batch_size=batch, resolution=image_size, pipeline=pipe,
                       reference_pass=reference_pass)


def test_presets_are_the_published_architectures():
    counts = {}
    for name in ("sd15", "sdxl"):
        pipe = build_abstract_pipeline(read_configs(name))
        counts[name] = {c: sum(p.numel() for p in getattr(pipe, c).parameters())
                        for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
        assert all(p.is_meta for p in pipe.unet.parameters())
    # the parameter counts of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
    assert counts["sd15"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert counts["sdxl"] == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                              "text_encoder_2": 694_659_840}


@pytest.mark.parametrize("kind,name,reference_pass", [("sd15", "dpo", "separate"), ("sd15", "dpo", "difference"),
                                                      ("sd15", "ncp-dpo", "difference"), ("sdxl", "ncp-dpo", "auto"),
                                                      ("sd15", "sft", "auto")])
def test_fake_step_counts_the_flops_of_the_real_step(kind, name, reference_pass):
    objective = make_objective(name)
    model, batch = _real(kind, reference_pass=reference_pass)
    counter = FlopCounterMode(display=False)
    with counter:
        training_step(model, objective, batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    run = _abstract(kind, reference_pass=reference_pass)
    counted = run.count(objective, gradient_checkpointing=False)
    assert run.reference_pass == ("difference" if reference_pass == "difference" else "separate")  # auto in fp32
    assert counted.total == counter.get_total_flops() > 0
    assert counted.flops["policy"] > 0 and counted.flops["backward"] > counted.flops["policy"] / 2
    # a separate reference pass is counted apart; the difference pass computes it inside the policy's forward
    assert (counted.flops["reference"] > 0) == (name in ("dpo", "ncp-dpo") and run.reference_pass == "separate")
    # NCP's encoder passes are a real share of the step; noise-space losses cost almost nothing
    assert (counted.flops["encoder"] > 0.1 * counted.flops["policy"]) == name.startswith("ncp-")


@pytest.mark.parametrize("name", ["dpo", "ncp-dpo"])
def test_activation_peak_within_25_percent_of_the_measured_cpu_peak(name):
    """Measured: torch's CPU memory profiler (allocation records of one real step, running sum, peak)."""
    objective = make_objective(name)
    model, batch = _real(block_out_channels=SMALL, image_size=64)
    measured_step(model, objective, batch)  # warm-up (peft, allocator)
    measured = measured_step(model, objective, batch)["peak_bytes"]
    estimated = _abstract(block_out_channels=SMALL, image_size=64).count(objective, False).peak_bytes
    assert measured > 50 * 2**20  # activations, not noise
    assert abs(estimated / measured - 1) < 0.25, (estimated, measured)


def test_gradient_checkpointing_lowers_the_activation_peak_and_adds_recompute():
    run, objective = _abstract(block_out_channels=SMALL, image_size=64), make_objective("dpo")
    off, on = run.count(objective, False), run.count(objective, True)
    assert on.peak_bytes < 0.8 * off.peak_bytes
    assert on.flops["backward"] > off.flops["backward"] and on.flops["policy"] == off.flops["policy"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ncppo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("estimate") / "sd15", "sd15")


def test_estimate_of_a_folder_config(tiny_dir):
    config = _config(tiny_dir, objective={"name": "ncp-dpo"}, optim={"optimizer": "adamw"}, effective_batch=8)
    r = estimate_run(config, gpu_name="a100", num_gpus=2, utilization=0.5)
    f, m = r["flops_per_micro_step"], r["memory_bytes"]
    assert f["total"] == f["policy"] + f["reference"] + f["encoder"] + f["backward"]
    assert f["data_encoding"] > 0 and r["data"] == "raw images and prompts"
    assert r["counterpart"]["objective"] == "dpo" and r["ncp_ratio"] == f["total"] / r["counterpart"]["flops_per_micro_step"] > 1
    assert r["gradient_accumulation_steps"] == 2 and r["effective_batch"] == 8
    # 2 GPUs x 2 micro-steps each, at half of an A100's 156 TF32 TFLOP/s
    assert r["seconds_per_optimizer_step"] == pytest.approx((f["total"] + f["data_encoding"]) * 4 / (2 * 156e12 * 0.5))
    assert r["gpu_hours"] == pytest.approx(r["seconds_per_optimizer_step"] * 100 * 2 / 3600)
    lora = sum(p.numel() for n, p in _real()[0].unet.named_parameters() if "lora" in n)
    assert m["weights"]["trainable"] == m["gradients"] == 4 * lora and m["optimizer_state"] == 8 * lora
    assert m["activations_gradient_checkpointing_on"] < m["activations_gradient_checkpointing_off"]
    assert r["fits"] and r["largest_batch"] > 1000
    cached = estimate_run(_config(tiny_dir, data={"cache": "unused", "resolution": 32}, objective={"name": "sft"}))
    assert cached["flops_per_micro_step"]["data_encoding"] == 0 and cached["flops_per_micro_step"]["reference"] == 0
    assert cached["counterpart"]["objective"] == "ncp-sft"


def test_estimate_command_prints_a_table_and_json(tiny_dir, tmp_path, capsys):
    from ncppo.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  pretrained: {tiny_dir}\n  lora_rank: 8\ndata:\n  source: x\n  resolution: 32\n"
                    "objective:\n  name: dpo\nbatch_size: 2\n")
    assert main(["estimate", str(path), "optim.optimizer=adamw8bit", "--json", "--gpu", "h200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["optimizer"] == "adamw8bit" and r["gpu"]["name"].startswith("NVIDIA H200") and r["gpu"]["utilization"] == 0.35
    assert main(["estimate", str(path)]) == 0
    table = capsys.readouterr().out
    assert "NCP-X / X" in table and "utilisation 0.35" in table and "494.7 TFLOP/s peak (TF32" in table


def test_bad_inputs_say_what_to_change(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(UsageError, match=r"vae component has no config.json .*vae/config.json"):
        estimate_run(_config(broken))
    with pytest.raises(UsageError, match=r"unknown GPU 'h1000'; known GPUs: h100, h100-pcie, h200, a100"):
        estimate_run(_config(tiny_dir), gpu_name="h1000")
    huge = _config(tiny_dir, batch_size=200_000)
    largest = estimate_run(huge, gpu_name="a100-40gb", check_fit=False)["largest_batch"]
    assert 1000 < largest < 200_000
    with pytest.raises(UsageError) as err:
        estimate_run(huge, gpu_name="a100-40gb")
    message = str(err.value)
    assert f"the largest batch_size that fits is {largest}" in message and "36 GiB usable" in message
    assert "gradient_checkpointing: true fits batch_size" in message and "adamw8bit" in message
