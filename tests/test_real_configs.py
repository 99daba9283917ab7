"""The real SD1.5 and SDXL U-Net configs through ncppo's encoder and training step.

Building them with weights takes a minute on this machine's CPU (SDXL: 2.6B parameters), so the tests run
them on fake tensors: every shape, dtype and code path of the real architectures (SDXL's 1/2/10
transformer layers, list-valued head dims, linear projections, 2048-wide cross-attention, 2816-wide
added embeddings), no values. ``benchmarks/real_configs.py`` runs them with random weights and checks
the encoder's values against the hooked full forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ncppo.models.preference_model import LoraSettings
from ncppo.objectives import make_objective
from ncppo.perception import FEATURE_CHOICES, NoiseConditionedEncoder, feature_names
from ncppo.planning.abstract import abstract_execution
from ncppo.planning.architectures import read_configs
from ncppo.planning.estimate import AbstractRun
from ncppo.planning.measure import hooked_levels


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def real(request):
    return AbstractRun(read_configs(request.param), lora=LoraSettings(64), mixed_precision="bf16", batch_size=1,
                       resolution=64)


def test_encoder_levels_have_the_shapes_of_the_full_forward(real):
    model = real.model
    with abstract_execution(real.mode, real.half), torch.no_grad():
        pairs = model.encode_batch(real.batch())
        x, t = pairs.latents_w, torch.full((1,), 500)
        with model.frozen_unet() as unet:
            full = hooked_levels(unet, x.to(unet.dtype), t, pairs.condition_w)
            for features in FEATURE_CHOICES:
                feats = NoiseConditionedEncoder(features)(unet, x, t, **pairs.condition_w.unet_kwargs())
                names = feature_names(features, len(unet.down_blocks))
                assert [(f.shape, f.dtype) for f in feats] == [(full[n].shape, full[n].dtype) for n in names]
    channels = model.unet.config.block_out_channels
    assert full[f"down_{len(channels) - 1}"].shape[1] == channels[-1]


def test_training_step_on_the_real_config(real):
    # NCP-DPO only: it runs every pass DPO runs plus the encoder's (DPO's step at the real configs is timed by
    # benchmarks/real_configs.py; the tiny-model FLOP test checks DPO has no encoder share)
    counted = real.count(make_objective("ncp-dpo"), gradient_checkpointing=False)
    # in bf16 the reference rides in the policy's pass (reference_pass auto: the difference pass)
    assert real.reference_pass == ("difference" if real.half == torch.bfloat16 else "separate")
    assert counted.flops["policy"] > 0 and counted.flops["backward"] > 0
    assert (counted.flops["reference"] > 0) == (real.reference_pass == "separate")
    assert counted.flops["encoder"] > 0.1 * counted.flops["policy"]
    lora = real.model.trainable_parameters()
    assert lora and all(p.dtype == torch.float32 for p in lora)  # trained in float32 under bf16 autocast


def test_sdxl_real_config_exercises_what_tiny_models_do_not():
    config = read_configs("sdxl")["unet"]
    assert config["transformer_layers_per_block"] == [1, 2, 10] and config["attention_head_dim"] == [5, 10, 20]
    run = AbstractRun(read_configs("sdxl"), lora=LoraSettings(64), batch_size=1, resolution=64)
    blocks = run.model.unet.down_blocks
    assert [len(b.attentions[0].transformer_blocks) for b in blocks[1:]] == [2, 10]
    assert run.model.unet.add_embedding.linear_1.in_features == 2816
    assert isinstance(blocks[2].attentions[0].proj_in, torch.nn.Linear)  # use_linear_projection (SD1.5: a 1x1 conv)
    assert blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 2048


def test_gpu_benchmark_runs_at_toy_size_on_the_cpu(tmp_path):
    """``benchmarks/gpu_step.py`` is run for real only where a GPU is; its code path runs here at toy size."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    out = tmp_path / "gpu_step.json"
    assert gpu_step.main(["--device", "cpu", "--toy", "--steps", "1", "--presets", "sdxl", "--precisions", "bf16",
                          "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["precision"] == "bf16" and row["latent_size"] == 16 and row["lora_params"] > 0
    for name in ("dpo", "ncp-dpo"):
        method = row["methods"][name]
        assert method["seconds_per_step"] > 0 and method["step_peak_bytes"] > 0 and method["loss"] > 0
    assert row["estimate"]["ncp_dpo_over_dpo_flops"] > 1 and row["ncp_dpo_over_dpo"] > 0


def test_shipped_fsdp_config_wraps_blocks_the_real_unets_have():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from ncppo.planning.architectures import build_abstract_pipeline

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    config = load_config_from_file(str(path))
    assert str(config.distributed_type) in ("FSDP", "DistributedType.FSDP") and config.fsdp_config["fsdp_version"] == 2
    wrapped = set(yaml.safe_load(path.read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
    for preset in ("sd15", "sdxl"):
        classes = {type(m).__name__ for m in build_abstract_pipeline(read_configs(preset)).unet.modules()}
        assert wrapped <= classes, (preset, wrapped - classes)
