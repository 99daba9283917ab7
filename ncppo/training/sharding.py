"""Sharded full fine-tunes through accelerate: FSDP2 (on GPUs, and on the CPU with gloo) and DeepSpeed.

Under FSDP2 the trained U-Net's parameters are DTensors, each process holding a shard: reading a whole tensor
(a checkpoint's ``trainable.safetensors``, the finished ``unet/``, the run's checksum) is a collective that
every process must join, and writing one back scatters it. The frozen reference U-Net of a full fine-tune is
NOT sharded: each process keeps it whole (half precision on a GPU), because the reference and the NCP
encoder run it outside the policy's forward (the encoder stops after its down path), where FSDP's gathering
hooks would not fire in the order FSDP expects; it costs 2 bytes a parameter against the 16 (fp32 weights,
gradients, AdamW) that FSDP shards.
"""

from __future__ import annotations

import os

import torch

from ncppo.errors import UsageError


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor_type())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this process holds of ``tensor`` (its shard under FSDP)."""
    return tensor.to_local().numel() if is_sharded(tensor) else tensor.numel()


def checksum(params) -> torch.Tensor:
    """The sum of every trained entry (float64, 0-d). Under FSDP each process adds up its shards and one
    all-reduce (every process joins) adds those, so each reports the whole model's sum, as under DDP."""
    local = torch.stack([(p.to_local() if is_sharded(p) else p).detach().double().sum() for p in params]).sum()
    if any(is_sharded(p) for p in params):
        torch.distributed.all_reduce(local)
    return local


def copy_into(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Write the whole tensor ``whole`` into ``param`` (its own shard of it, when ``param`` is sharded; every
    process has read ``whole`` itself, so nothing is sent)."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(whole.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(whole)


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Make an FSDP launch on the CPU really shard. ``accelerate launch`` with an FSDP config sets
    ``ACCELERATE_USE_FSDP``, but accelerate (1.x) switches to FSDP only for GPU-like devices: CPU processes
    (``MULTI_CPU``, gloo) would silently run DDP, each holding the whole model and its optimiser state.
    torch's FSDP2 runs on the CPU with gloo, so the state is switched to FSDP with the plugin the launch's
    ``FSDP_*`` variables describe. Returns whether it switched."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (accelerator.distributed_type != DistributedType.MULTI_CPU
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"):
        return False
    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UsageError("FSDP on the CPU: set fsdp_version: 2 in the accelerate config (torch's fully_shard; "
                         "FSDP1 is not supported on the CPU)")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    from accelerate.state import PartialState

    # AcceleratorState copies PartialState's shared fields again each time one is made (accelerate's own
    # utilities make them): both must say FSDP, or a later save_state would take the DDP path
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def check_sharding(accelerator, model, validation_prompts) -> None:
    """What a sharded run refuses: LoRA (its weights, gradients and AdamW state are small, there is nothing
    worth sharding: use DDP) and, under FSDP, validation images (sampling runs on the main process only, and
    a sharded U-Net's forward needs every process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and model.lora is not None:
        raise UsageError(f"{kind.value} with model.finetune: lora: a LoRA's weights, gradients and optimiser state "
                         "are small, so there is nothing to shard; launch with DDP (accelerate launch --multi_gpu) "
                         "or set model.finetune: full")
    if kind == DistributedType.FSDP and validation_prompts:
        raise UsageError("validation_prompts: validation images are not supported under FSDP yet (a sharded U-Net "
                         "samples only with every process); leave validation_prompts empty and sample from the "
                         "finished unet/ folder after the run")


def configure_deepspeed(accelerator, batch_size: int, accumulation: int) -> None:
    """DeepSpeed (untested here: no deepspeed package): accelerate's ``prepare()`` without a dataloader needs
    ``train_micro_batch_size_per_gpu``; it is the config's ``batch_size`` unless the user's DeepSpeed config sets
    it. The trainer accumulates micro-batches itself, but the DeepSpeed engine steps inside ``backward``, so
    accumulation over micro-batches is refused (raise ``batch_size`` instead) rather than stepping too often."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if accumulation != 1:
        raise UsageError(f"DeepSpeed: gradient accumulation ({accumulation} micro-batches a step) is not supported by "
                         "the trainer under DeepSpeed (its engine steps in backward); set batch_size to "
                         "effective_batch / num_processes, or use FSDP (configs/accelerate/fsdp.yaml)")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
        ds["train_micro_batch_size_per_gpu"] = batch_size
    if ds.get("gradient_accumulation_steps") in (None, "auto"):
        ds["gradient_accumulation_steps"] = 1


def unet_state_dict(accelerator, policy) -> dict[str, torch.Tensor] | None:
    """The trained U-Net's whole state (on the CPU) on the main process, None on the others; a collective
    under FSDP (every process calls it). None on every process when the U-Net is not sharded."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    state = accelerator.get_state_dict(policy)
    return state if accelerator.is_main_process else None
