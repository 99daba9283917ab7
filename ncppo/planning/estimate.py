"""``ncppo estimate``: FLOPs, memory and time of the run a training config describes, without weights.

The model is built from its configs on the ``meta`` device and the real training step
(:func:`ncppo.step.training_step`, forward and backward) runs on fake tensors at the configured
resolution, batch, precision and gradient checkpointing (:mod:`ncppo.planning.abstract`). FLOPs and the
activation peak are therefore counted, not modelled; only the per-GPU totals, the largest batch that fits
(activations linear in the batch) and the times (peak throughput x utilisation) are arithmetic.
"""

from __future__ import annotations

import dataclasses

import torch

from ncppo.errors import UsageError
from ncppo.planning.abstract import LiveBytes, PhaseFlops, abstract_execution, fake_mode, to_fake
from ncppo.planning.architectures import build_abstract_pipeline, read_configs
from ncppo.planning.hardware import (
    DEFAULT_UTILIZATION,
    MEMORY_RESERVE,
    PRECISION_NOTE,
    gpu,
    optimizer_state_bytes,
)
from ncppo.precision import HALF_DTYPES

GIB = 2**30


def counterpart(name: str) -> str:
    """NCP-X for X and X for NCP-X: the method the ratio compares with."""
    return name.removeprefix("ncp-") if name.startswith("ncp-") else f"ncp-{name}"


@dataclasses.dataclass
class StepCount:
    flops: dict  # policy, reference, encoder, backward
    peak_bytes: int  # live tensor bytes made by the step (activations, temporaries, gradients) at their peak

    @property
    def total(self) -> int:
        return sum(self.flops.values())


class AbstractRun:
    """A :class:`~ncppo.models.preference_model.PreferenceModel` of fake tensors and a batch of the run's shape."""

    def __init__(self, configs: dict, *, finetune: str = "lora", lora=None, mixed_precision: str = "no",
                 batch_size: int = 1, resolution: int = 512, pipeline=None, reference_pass: str = "auto"):
        from ncppo.models.preference_model import PreferenceModel

        self.pipeline = pipeline if pipeline is not None else build_abstract_pipeline(configs)
        self.model = PreferenceModel(self.pipeline, finetune=finetune, lora=lora, reference_pass=reference_pass)
        self.half = HALF_DTYPES.get(mixed_precision)
        self.model.set_frozen_dtype(self.half)
        self.mode = fake_mode()
        self.weight_bytes = _weight_bytes(self.model)  # read on meta, before the swap to fake tensors
        self.trainable_numels = [p.numel() for p in self.model.trainable_parameters()]
        unets = [u for u in (self.model.unet, self.model.reference_unet) if u is not None]
        self.unets = unets
        to_fake(unets + self.model._frozen_components(), self.mode)
        self.model.unet.train()
        self.batch_size = batch_size
        self.latent = resolution // self.pipeline.vae_scale_factor
        if self.latent < 1 or resolution % self.pipeline.vae_scale_factor:
            raise UsageError(f"data.resolution: {resolution} is not a multiple of the VAE's factor "
                             f"{self.pipeline.vae_scale_factor}")

    def batch(self):
        from ncppo.batch import PreferenceBatch

        unet = self.model.unet.config
        b, size = self.batch_size, self.latent
        text = self.pipeline.text_encoder.config
        pooled = None
        if unet.addition_embed_type == "text_time":
            pooled = torch.randn(b, unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim)
        return PreferenceBatch(latents_w=torch.randn(b, unet.in_channels, size, size),
                               latents_l=torch.randn(b, unet.in_channels, size, size),
                               prompt_embeds=torch.randn(b, text.max_position_embeddings, unet.cross_attention_dim),
                               pooled_prompt_embeds=pooled, ids=list(range(b)))

    def count(self, objective, gradient_checkpointing: bool) -> StepCount:
        """FLOPs and peak live bytes of one forward and backward of ``objective`` (LoRA/U-Net grads cleared)."""
        from ncppo.step import training_step

        unet = self.model.unet
        self.model.enable_gradient_checkpointing() if gradient_checkpointing else unet.disable_gradient_checkpointing()
        phases = PhaseFlops(self.unets)
        with abstract_execution(self.mode, self.half):
            batch = self.batch()
            self.reference_pass = self.model.resolved_reference_pass()  # auto: decided by the precision
            live = LiveBytes([*self._tensors(), *(v for v in vars(batch).values() if isinstance(v, torch.Tensor))])
            with phases.counter, live:
                out = training_step(self.model, objective, batch)
                phases.switch("backward")
                out.loss.backward()
            del out
            for p in self.model.trainable_parameters():
                p.grad = None
        return StepCount(phases.close(), live.peak)

    def _tensors(self):
        for module in self.unets + self.model._frozen_components():
            yield from module.parameters()
            yield from module.buffers()
        yield from (self.model.schedule.betas, self.model.schedule.alphas_cumprod)

    def encoding_flops(self) -> int:
        """FLOPs of encoding a raw batch (VAE posterior of winners and losers, the text encoders on the prompts)."""
        from ncppo.flops import FlopCounterMode  # with CPU flash attention counted

        pipe, b, counter = self.pipeline, self.batch_size, FlopCounterMode(display=False)
        with abstract_execution(self.mode, self.half), torch.no_grad():
            size = self.latent * pipe.vae_scale_factor
            pixels = torch.randn(2 * b, pipe.vae.config.in_channels, size, size, dtype=pipe.vae.dtype)
            with counter:
                pipe.vae.encode(pixels)
                for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                    if encoder is not None:
                        ids = torch.zeros(b, encoder.config.max_position_embeddings, dtype=torch.long)
                        encoder(ids, output_hidden_states=True)
        return int(counter.get_total_flops())


def _weight_bytes(model) -> dict:
    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0

    trainable = sum(p.numel() * p.element_size() for p in model.trainable_parameters())
    frozen_components = sum(size(m) for m in model._frozen_components())
    return {"unet_frozen": size(model.unet) - trainable, "trainable": trainable,
            "reference_copy": size(model.reference_unet), "vae_and_text_encoders": frozen_components}


def _objective(config):
    from ncppo.objectives import make_objective

    options = config.objective.options()
    if options["beta"] == "auto":  # the calibrated value changes no FLOP or byte
        options["beta"] = None
    return make_objective(**options)


def estimate_run(config, *, model: str | None = None, gpu_name: str = "h100", num_gpus: int = 1,
                 utilization: float = DEFAULT_UTILIZATION, check_fit: bool = True) -> dict:
    """The estimate for ``config`` (a :class:`~ncppo.training.config.TrainConfig`) as a JSON-ready dict, for
    ``model`` (a preset name or a pipeline folder; None: the config's ``model.pretrained``); a
    :class:`UsageError` when the configured batch cannot fit the GPU (with the largest batch that does)."""
    from ncppo.models.preference_model import LoraSettings

    device = gpu(gpu_name)
    if not 0 < utilization <= 1:
        raise UsageError(f"--utilization must be in (0, 1], got {utilization}")
    if num_gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {num_gpus}")
    cfg = config
    model = model or cfg.model.pretrained
    configs = read_configs(model)
    lora = LoraSettings(cfg.model.lora_rank, cfg.model.lora_alpha, tuple(cfg.model.lora_targets))
    run = AbstractRun(configs, finetune=cfg.model.finetune, lora=lora if cfg.model.finetune == "lora" else None,
                      mixed_precision=cfg.mixed_precision, batch_size=cfg.batch_size, resolution=cfg.data.resolution,
                      reference_pass=cfg.model.reference_pass)
    objective = _objective(cfg)
    gc = cfg.gradient_checkpointing
    step = run.count(objective, gc)
    other_gc = run.count(objective, not gc)
    base = run.count(_objective(dataclasses.replace(
        cfg, objective=dataclasses.replace(cfg.objective, name=counterpart(cfg.objective.name)))), gc)
    encoding = 0 if cfg.data.cache else run.encoding_flops()

    accumulation = cfg.resolved_accumulation(num_gpus)
    micro_steps = accumulation * num_gpus  # per optimiser step, over all GPUs
    grads = 4 * sum(run.trainable_numels)
    optimizer = optimizer_state_bytes(run.trainable_numels, cfg.optim.optimizer)
    weights = sum(run.weight_bytes.values())
    activations = {gc: max(step.peak_bytes - grads, 0), not gc: max(other_gc.peak_bytes - grads, 0)}
    total = weights + grads + optimizer + activations[gc]
    usable = device.memory_gib * GIB * (1 - MEMORY_RESERVE)
    peak = device.tflops[cfg.mixed_precision] * 1e12
    step_seconds = (step.total + encoding) * micro_steps / (num_gpus * peak * utilization)
    result = {
        "model": model, "pipeline": configs["pipeline"], "finetune": cfg.model.finetune,
        "lora_rank": cfg.model.lora_rank if cfg.model.finetune == "lora" else None,
        "objective": cfg.objective.name, "reference_pass": run.reference_pass,
        "resolution": cfg.data.resolution, "latent_size": run.latent,
        "batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": accumulation, "gpus": num_gpus,
        "effective_batch": cfg.batch_size * micro_steps, "max_steps": cfg.max_steps,
        "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": gc, "optimizer": cfg.optim.optimizer,
        "data": "latent cache (no VAE or text encoder per step)" if cfg.data.cache else "raw images and prompts",
        "flops_per_micro_step": {**step.flops, "total": step.total, "data_encoding": encoding},
        "flops_per_pair": step.total / cfg.batch_size,
        "counterpart": {"objective": counterpart(cfg.objective.name), "flops_per_micro_step": base.total,
                        "ratio": step.total / base.total},
        "ncp_ratio": _ncp_ratio(cfg.objective.name, step.total, base.total),
        "memory_bytes": {"weights": run.weight_bytes, "gradients": grads, "optimizer_state": optimizer,
                         "activations": activations[gc], "activations_gradient_checkpointing_on": activations[True],
                         "activations_gradient_checkpointing_off": activations[False], "total": total},
        "gpu": {"key": gpu_name.lower(), "name": device.name, "memory_gib": device.memory_gib,
                "peak_tflops": device.tflops[cfg.mixed_precision], "precision": PRECISION_NOTE[cfg.mixed_precision],
                "utilization": utilization, "usable_memory_gib": usable / GIB, "memory_reserve": MEMORY_RESERVE},
        "fits": total <= usable,
        "seconds_per_optimizer_step": step_seconds,
        "run_hours": step_seconds * cfg.max_steps / 3600,
        "gpu_hours": step_seconds * cfg.max_steps * num_gpus / 3600,
        "assumptions": ASSUMPTIONS,
    }
    result["largest_batch"] = _largest_batch(weights + grads + optimizer, activations[gc] / cfg.batch_size, usable)
    if check_fit and not result["fits"]:
        raise UsageError(_does_not_fit(result, activations, weights + grads, run.trainable_numels, cfg))
    return result


def _ncp_ratio(name: str, flops: int, other: int) -> float:
    return flops / other if name.startswith("ncp-") else other / flops


def _largest_batch(fixed: float, per_pair: float, usable: float) -> int:
    return max(int((usable - fixed) // per_pair), 0) if per_pair > 0 else 0


def _does_not_fit(result: dict, activations: dict, weights_and_grads: int, numels, cfg) -> str:
    g, mem = result["gpu"], result["memory_bytes"]
    usable = g["usable_memory_gib"] * GIB
    b = cfg.batch_size
    hints = [f"the largest batch_size that fits is {result['largest_batch']}" if result["largest_batch"] else
             "not even batch_size 1 fits"]
    if not cfg.gradient_checkpointing:
        fixed = weights_and_grads + mem["optimizer_state"]
        hints.append(f"gradient_checkpointing: true fits batch_size "
                     f"{_largest_batch(fixed, activations[True] / b, usable)}")
    if cfg.optim.optimizer == "adamw":
        fixed = weights_and_grads + optimizer_state_bytes(numels, "adamw8bit")
        hints.append(f"optim.optimizer: adamw8bit fits batch_size "
                     f"{_largest_batch(fixed, activations[cfg.gradient_checkpointing] / b, usable)}")
    if cfg.model.finetune == "full":
        hints.append("model.finetune: lora, or shard a full fine-tune (configs/accelerate/fsdp.yaml)")
    return (f"batch_size={b} needs {mem['total'] / GIB:.1f} GiB per GPU (weights "
            f"{sum(mem['weights'].values()) / GIB:.1f}, gradients {mem['gradients'] / GIB:.1f}, optimizer "
            f"{mem['optimizer_state'] / GIB:.1f}, activations {mem['activations'] / GIB:.1f}) but a {g['name']} has "
            f"{g['usable_memory_gib']:.0f} GiB usable; " + "; ".join(hints)
            + " (then raise gradient_accumulation_steps or effective_batch to keep the effective batch)")


ASSUMPTIONS = [
    "FLOPs: torch.utils.flop_counter.FlopCounterMode on the real training step (ncppo.step.training_step, forward "
    "and backward) run on fake tensors at the configured shapes; it counts matmuls, convolutions and attention "
    "(elementwise ops, norms and the optimiser step are not counted).",
    "policy/reference: U-Net forwards with and without grad; encoder: the rest of the forward (the NCP encoder "
    "passes f, the loss); backward includes the recomputation of gradient checkpointing.",
    "Memory: weights as the trainer holds them on a GPU (frozen weights in the training half precision, trained ones "
    "in float32), float32 gradients, the optimiser's two moments; activations: the peak of live tensors during the "
    "step, measured on the fake step (CPU autocast dtypes; attention as flash attention, which saves no attention "
    "matrix, except inside the NCP JVP, which runs the math kernel), minus the gradients.",
    "Not counted: the CUDA context, cuDNN workspaces and fragmentation (a 10% reserve of the GPU's memory), DDP's "
    "gradient buckets (a second copy of the gradients: small for a LoRA), the optimiser step's temporaries, the "
    "beta: auto calibration (a few no-grad passes once), data loading and validation sampling.",
    "Time: FLOPs per optimiser step / (GPUs x peak dense tensor-core TFLOP/s x utilisation); the largest batch "
    "assumes activations grow linearly with the batch.",
]
