"""The trainer itself under accelerate's FSDP2 on two CPU processes (gloo): a full NCP-DPO fine-tune of a tiny
SD1.5-class U-Net, checkpointed, resumed and saved, against the same run under DDP (unsharded)."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from .data_helpers import write_dataset

FSDP_YAML = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
# the environment `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives its processes
_ENV_NAMES = {"fsdp_version": "FSDP_VERSION", "fsdp_auto_wrap_policy": "FSDP_AUTO_WRAP_POLICY",
              "fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP",
              "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD", "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
              "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
              "fsdp_state_dict_type": "FSDP_STATE_DICT_TYPE",
              "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING"}


def _fsdp_env() -> dict[str, str]:
    config = yaml.safe_load(FSDP_YAML.read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config.items():
        env[_ENV_NAMES[key]] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _memory(trainer) -> dict:
    """Bytes this process holds of the trained U-Net (weights, gradients' room, AdamW state) and the reference."""
    from ncppo.training.sharding import is_sharded, local_numel

    params = trainer.model.trainable_parameters()
    opt = trainer.optimizer.optimizer
    state = sum(local_numel(v) * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.ndim > 0)
    return {"policy_bytes": sum(local_numel(p) * p.element_size() for p in params),
            "policy_full_bytes": sum(p.numel() * p.element_size() for p in params),
            "adam_state_bytes": state, "sharded": all(is_sharded(p) for p in params),
            "reference_bytes": sum(p.numel() * p.element_size() for p in trainer.model.reference_unet.parameters()),
            "reference_sharded": any(is_sharded(p) for p in trainer.model.reference_unet.parameters())}


def _worker(rank: int, port: int, root: str, overrides: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from ncppo.training import Trainer, load_config

    def run(name, *more):
        cfg = load_config(None, [f"output_dir={Path(root) / name}", *overrides, *more])
        trainer = Trainer(cfg)
        trainer.train()  # the optimiser state is still there after it
        record = {"distributed_type": str(trainer.accelerator.distributed_type), **_memory(trainer)}
        (Path(root) / f"{name}-rank{rank}.json").write_text(json.dumps(record))

    run("ddp", "max_steps=2")  # unsharded: what the sharded run must equal
    os.environ.update(_fsdp_env())
    run("fsdp", "max_steps=1")
    run("fsdp", "max_steps=2")  # resumes step-000001 (its sharded model and optimiser state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dirs):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("distributed")
    spec = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(4) for c in ("red", "blue")]
    data = write_dataset(root / "pairs", spec, rows_per_shard=5)
    overrides = [f"model.pretrained={tiny_pipeline_dirs['sd15']}", "model.finetune=full", f"data.source={data}",
                 "data.resolution=32", "objective.name=ncp-dpo", "objective.beta=5e3", "batch_size=1",
                 "effective_batch=4", "optim.learning_rate=1e-3", "optim.scale_lr=false",
                 "optim.max_grad_norm=1.0", "checkpoint_every_steps=1"]
    mp.spawn(_worker, args=(_free_port(), str(root), overrides), nprocs=2, join=True)
    return root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _close(a: dict, b: dict, exact: bool = False) -> None:
    """Equal, or (``exact`` False) equal but for float rounding as AdamW amplifies it: FSDP averages the gradients
    by reduce-scatter, DDP by all-reduce, in another order; where the two processes' gradients nearly cancel,
    that rounding is a large share of the average, and AdamW's update g / (sqrt(v) + eps) does not shrink with
    it. Measured here (lr 1e-3, so an update is about 1e-3): 0.1% of the 793k entries beyond 1e-6, the largest
    3e-5 to 7e-5. A lost update, a shard put back in the wrong place or a resume without the optimiser state
    moves most entries by about the learning rate."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    if exact:
        assert float(diff.max()) == 0.0
        return
    assert float(diff.max()) < 1e-4 and float((diff > 1e-6).double().mean()) < 1e-2, float(diff.max())


def test_fsdp_shards_the_trained_unet_and_keeps_the_reference_whole(runs):
    for rank in range(2):
        ddp, fsdp = (json.loads((runs / f"{name}-rank{rank}.json").read_text()) for name in ("ddp", "fsdp"))
        assert "FSDP" in fsdp["distributed_type"] and "MULTI_CPU" in ddp["distributed_type"]
        assert fsdp["sharded"] and not ddp["sharded"]
        assert ddp["policy_bytes"] == ddp["policy_full_bytes"]
        assert fsdp["policy_bytes"] < 0.6 * fsdp["policy_full_bytes"]  # each process holds about half
        assert fsdp["adam_state_bytes"] < 0.6 * ddp["adam_state_bytes"]  # after the resume: restored as shards
        assert not fsdp["reference_sharded"] and fsdp["reference_bytes"] == ddp["reference_bytes"]


def test_fsdp_checkpoints_and_weights_equal_the_unsharded_run(runs, tiny_pipeline_dirs):
    from diffusers import UNet2DConditionModel

    ddp, fsdp = runs / "ddp", runs / "fsdp"
    for step in ("step-000001", "step-000002"):  # step 2 of the FSDP run came after a resume from step 1
        _close(_tensors(ddp / "checkpoints" / step / "trainable.safetensors"),
               _tensors(fsdp / "checkpoints" / step / "trainable.safetensors"))
    assert (fsdp / "checkpoints" / "step-000002" / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded form
    _close(_tensors(ddp / "unet" / "diffusion_pytorch_model.safetensors"),
           _tensors(fsdp / "unet" / "diffusion_pytorch_model.safetensors"))
    final = _tensors(fsdp / "checkpoints" / "step-000002" / "trainable.safetensors")
    loaded = UNet2DConditionModel.from_pretrained(fsdp / "unet")  # diffusers' class, not FSDP's wrapper
    _close(final, {n: p.detach() for n, p in loaded.named_parameters()}, exact=True)  # one model, two files
    start = UNet2DConditionModel.from_pretrained(tiny_pipeline_dirs["sd15"] / "unet")
    assert any(not torch.equal(p, final[n]) for n, p in start.named_parameters())  # it trained
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["gradient_accumulation_steps"] == 2  # FSDP2's no_sync: gradients reduced once a step
    losses = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (ddp, fsdp)]
    assert [r["step"] for r in losses[1]] == [1, 2]
    for (a, b), tol in zip(zip(*losses), (1e-5, 1e-2)):  # step 2 starts from weights equal up to rounding
        assert abs(a["loss"] - b["loss"]) <= tol * a["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= tol * a["grad_norm"]
        assert a["grad_norm_clipped"] == b["grad_norm_clipped"] == 1  # clip_grad_norm_ acted, on shards too


def test_a_full_fine_tunes_fp32_encoder_is_float32_when_its_reference_is_half():
    """On a GPU the reference of a full fine-tune is half precision while the trained U-Net stays float32: the
    encoder's precision follows the frozen U-Net it runs on, not the trained one."""
    from ncppo.models.preference_model import PreferenceModel
    from ncppo.models.tiny import build_tiny_pipeline

    model = PreferenceModel(build_tiny_pipeline("sd15", seed=0), finetune="full")
    model.set_frozen_dtype(torch.bfloat16)
    assert model.unet.dtype == torch.float32 and model.reference_unet.dtype == torch.bfloat16
    with model.perceptual_encoder("fp32") as encoder:
        assert encoder.dtype == torch.float32 and encoder is not model.unet and encoder is not model.reference_unet
        assert not any(p.requires_grad for p in encoder.parameters())
    with model.perceptual_encoder("model") as encoder:
        assert encoder is model.reference_unet


def _accelerator(kind: str, **state):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(**state))


def test_sharded_runs_refuse_what_they_cannot_do():
    from types import SimpleNamespace

    from ncppo.errors import UsageError
    from ncppo.training.sharding import check_sharding

    lora, full = SimpleNamespace(lora=object()), SimpleNamespace(lora=None)
    with pytest.raises(UsageError, match="FSDP with model.finetune: lora.*--multi_gpu"):
        check_sharding(_accelerator("FSDP"), lora, [])
    with pytest.raises(UsageError, match="DEEPSPEED with model.finetune: lora"):
        check_sharding(_accelerator("DEEPSPEED"), lora, [])
    with pytest.raises(UsageError, match="validation_prompts: .* not supported under FSDP"):
        check_sharding(_accelerator("FSDP"), full, ["a red circle"])
    check_sharding(_accelerator("FSDP"), full, [])
    check_sharding(_accelerator("MULTI_CPU"), lora, ["a red circle"])


def test_deepspeed_gets_its_micro_batch_before_prepare():
    """Untested against DeepSpeed itself (not installed here): what the trainer writes into its config."""
    from types import SimpleNamespace

    from ncppo.errors import UsageError
    from ncppo.training.sharding import configure_deepspeed

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    configure_deepspeed(_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=config)), 4, 1)
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    own = {"train_micro_batch_size_per_gpu": 2}  # the user's DeepSpeed config wins
    configure_deepspeed(_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=own)), 4, 1)
    assert own["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(UsageError, match="gradient accumulation .*set batch_size"):
        configure_deepspeed(_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config={})), 1, 4)
    configure_deepspeed(_accelerator("FSDP"), 1, 4)  # not DeepSpeed: nothing to set
