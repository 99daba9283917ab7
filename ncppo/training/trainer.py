"""The trainer: one loop for all six objectives, from a laptop CPU to many GPUs (accelerate).

It builds the model, the objective and the data from a :class:`TrainConfig`, then repeats: gradient
accumulation over micro-batches (each a call of :func:`ncppo.step.training_step`, which it never looks
inside), clipping, an optimizer and LR-scheduler step, logging, checkpoints and validation, until
``max_steps`` or the ``max_train_minutes`` budget. Everything random in a micro-step (noise, prompt
dropout, crops) derives from (seed, micro-step index, rank), so a resumed run replays an uninterrupted
one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ncppo.errors import NcppoError
from ncppo.io import atomic_write_text
from ncppo.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from ncppo.training.config import ConfigError, TrainConfig
from ncppo.training.logging import MetricLogger


class TrainingDiverged(NcppoError, RuntimeError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    stopped_by: str  # max_steps | time_budget


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config

    # -- setup -------------------------------------------------------------------------------------
    def _setup(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        from ncppo.models.preference_model import LoraSettings, PreferenceModel
        from ncppo.objectives import make_objective

        cfg = self.config
        # Several trainers in one process (the toy world trains six methods): accelerate keeps one global
        # state and refuses a second precision. Without a process group there is nothing to keep: reset it.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            AcceleratorState._reset_state(reset_partial_state=True)
        self.acc = acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        set_seed(cfg.seed)  # the LoRA's initial A matrices (peft draws them from the global generator)
        self.accumulation = cfg.resolved_accumulation(acc.num_processes)
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(
                {**cfg.to_dict(), "resolved": {"gradient_accumulation_steps": self.accumulation,
                                               "num_processes": acc.num_processes}}, sort_keys=False))
        self.objective = make_objective(**cfg.objective.options())
        lora = LoraSettings(cfg.model.lora_rank, cfg.model.lora_alpha, tuple(cfg.model.lora_targets))
        self.model = model = PreferenceModel.from_pretrained(cfg.model.pretrained, finetune=cfg.model.finetune, lora=lora)
        if acc.device.type != "cpu":  # frozen weights in half precision on GPU (on CPU half kernels are slow)
            model.set_frozen_dtype({"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision))
        model.to(acc.device)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.unet.train()
        self._data_setup()
        params = model.trainable_parameters()
        effective = cfg.batch_size * self.accumulation * acc.num_processes
        lr = cfg.optim.learning_rate * (effective if cfg.optim.scale_lr else 1)
        self.optimizer = self._optimizer(params, lr)
        from diffusers.optimization import get_scheduler

        self.scheduler = get_scheduler(cfg.optim.lr_scheduler, self.optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                       num_training_steps=cfg.max_steps)
        model.policy, self.optimizer = acc.prepare(model.unet, self.optimizer)
        self.params = params
        self.logger = MetricLogger(self.out, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process)
        self.effective_batch = effective

    def _optimizer(self, params, lr):
        o = self.config.optim
        kwargs = dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)
        if o.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ConfigError("optim.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from err
            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _data_setup(self):
        cfg, model = self.config, self.model
        if cfg.data.cache:
            from ncppo.data.cache import LatentCache

            self.cache = LatentCache(cfg.data.cache)
            if self.cache.index["model_kind"] != model.kind:
                raise ConfigError(f"data.cache was built for a {self.cache.index['model_kind']} model, "
                                  f"model.pretrained is {model.kind}")
            self.pairs = None
        else:
            from ncppo.data.pairs import PreferencePairs

            self.pairs = PreferencePairs(cfg.data.source, tie_policy=cfg.data.tie_policy)
            self.cache = None
        self._epoch_plan: tuple[int, list] | None = None
        self._per_epoch = len(self._local_plan(0))  # batches per epoch and process (every epoch alike)
        if cfg.data.prompt_dropout > 0:
            self.empty_embeds = model.encode_prompts([""])

    def _local_plan(self, epoch: int) -> list:
        """This process's batches of one epoch (batch k goes to rank k % num_processes)."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            cfg, acc = self.config, self.acc
            source = self.cache or self.pairs
            plan = source.plan(cfg.batch_size, shuffle=True, seed=_seed(cfg.seed, epoch), drop_last=True)
            usable = len(plan) - len(plan) % acc.num_processes
            if usable == 0:
                raise ConfigError(f"the data has {len(plan)} full batches of {cfg.batch_size} pairs: too few for "
                                  f"{acc.num_processes} process(es)")
            self._epoch_plan = (epoch, plan[acc.process_index:usable:acc.num_processes])
        return self._epoch_plan[1]

    def _batch(self, micro_index: int):
        cfg = self.config
        epoch, k = divmod(micro_index, self._per_epoch)
        item = self._local_plan(epoch)[k]
        if self.cache is not None:
            batch = self.cache.make_batch(*item)
        else:
            rng = np.random.default_rng(_seed(cfg.seed, micro_index, self.acc.process_index, 1))
            batch = self.pairs.collate(item, cfg.data.resolution, rng=rng, random_crop=cfg.data.random_crop,
                                       random_flip=cfg.data.random_flip)
            if batch is None:
                return None
        return self._drop_prompts(batch, micro_index)

    def _drop_prompts(self, batch, micro_index: int):
        p = self.config.data.prompt_dropout
        if p <= 0:
            return batch
        rng = np.random.default_rng(_seed(self.config.seed, micro_index, self.acc.process_index, 2))
        drop = rng.random(batch.batch_size) < p
        if not drop.any():
            return batch
        if batch.prompts is not None and batch.prompt_embeds is None:
            return batch.replace(prompts=["" if d else q for d, q in zip(drop, batch.prompts)])
        embeds, pooled = self.empty_embeds
        mask = torch.from_numpy(drop)
        new = batch.prompt_embeds.clone()
        new[mask] = embeds.to(new)
        changes = {"prompt_embeds": new}
        if batch.pooled_prompt_embeds is not None:
            pooled_new = batch.pooled_prompt_embeds.clone()
            pooled_new[mask] = pooled.to(pooled_new)
            changes["pooled_prompt_embeds"] = pooled_new
        return batch.replace(**changes)

    # -- checkpoints -------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.unet.named_parameters() if p.requires_grad}

    def _save(self, step: int, train_seconds: float, bad_in_a_row: int) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_checkpoint(self.out, step, self._trainable_state(), self.optimizer, self.scheduler,
                            {"train_seconds": train_seconds, "nonfinite_in_a_row": bad_in_a_row,
                             "effective_batch": self.effective_batch}, self.config.keep_last_checkpoints)
        self.acc.wait_for_everyone()

    def _restore(self) -> tuple[int, float, int]:
        found = checkpoint_dirs(self.out) if self.config.resume else []
        if not found:
            return 0, 0.0, 0
        trainable, state = load_checkpoint(found[-1], self.optimizer, self.scheduler)
        own = self._trainable_state()
        if set(trainable) != set(own):
            raise ConfigError(f"{found[-1]} does not match this model's trainable parameters (other LoRA settings?)")
        with torch.no_grad():
            for name, tensor in trainable.items():
                own[name].copy_(tensor)
        self.logger.truncate_after(state["step"])
        return state["step"], state["train_seconds"], state.get("nonfinite_in_a_row", 0)

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def _validate(self, step: int) -> None:
        cfg = self.config
        if not cfg.validation_prompts or not self.acc.is_main_process:
            return
        from ncppo.plots import save_image_grid

        self.model.unet.eval()
        images = self.model.pipeline(cfg.validation_prompts, num_inference_steps=cfg.validation_steps,
                                     height=cfg.data.resolution, width=cfg.data.resolution, output_type="np",
                                     generator=[torch.Generator().manual_seed(i) for i in range(len(cfg.validation_prompts))],
                                     ).images
        self.model.unet.train()
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        grid = (images * 255).round().astype(np.uint8)
        save_image_grid([grid], [f"step {step}"], folder / f"step-{step:06d}.png")
        save_image_grid([grid], [f"step {step}"], folder / "last.png")

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from ncppo.step import training_step

        self._setup()
        cfg, acc, model = self.config, self.acc, self.model
        step, train_seconds, bad_in_a_row = self._restore()
        last_ckpt_step, last_ckpt_seconds = step, train_seconds
        budget = cfg.max_train_minutes * 60 if cfg.max_train_minutes is not None else math.inf
        stopped_by = "max_steps"
        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.objective.name}", disable=not acc.is_main_process)
        while step < cfg.max_steps:
            if train_seconds >= budget:
                stopped_by = "time_budget"
                break
            start = time.perf_counter()
            sums: dict[str, float] = {}
            ids, count = [], 0
            for micro in range(self.accumulation):
                micro_index = step * self.accumulation + micro
                batch = self._batch(micro_index)
                if batch is None:
                    continue
                generator = torch.Generator().manual_seed(_seed(cfg.seed, micro_index, acc.process_index, 0))
                sync = contextlib.nullcontext() if micro == self.accumulation - 1 else acc.no_sync(model.policy)
                with sync, acc.autocast():
                    out = training_step(model, self.objective, batch, generator=generator)
                    acc.backward(out.loss / self.accumulation)
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                ids.extend(batch.ids)
                count += 1
            grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            metrics = {k: v / max(count, 1) for k, v in sums.items()}
            finite = count > 0 and math.isfinite(metrics.get("loss", math.nan)) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                bad_in_a_row = 0
            elif count == 0:  # every pair of the step had bad images (counted in the data's skip report)
                acc.print(f"step {step + 1}: no valid pairs in its batches; step skipped")
            else:
                bad_in_a_row += 1
                acc.print(f"step {step + 1}: non-finite loss or gradient (loss={metrics.get('loss')}, grad_norm="
                          f"{grad_norm}); step skipped; batch ids {ids}")
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            train_seconds += seconds
            bar.update(1)
            if step % cfg.log_every == 0 or not finite:
                self.logger.log(step, {**metrics, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                                       "seconds_per_step": seconds, "pairs_per_second": self.effective_batch / seconds,
                                       "train_seconds": train_seconds, "skipped": int(not finite)})
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", acc=f"{metrics.get('implicit_acc', 0):.2f}")
            if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                self._save(step, train_seconds, bad_in_a_row)
                raise TrainingDiverged(f"{bad_in_a_row} non-finite steps in a row (last at step {step}); stopping")
            due_steps = cfg.checkpoint_every_steps and step - last_ckpt_step >= cfg.checkpoint_every_steps
            due_time = cfg.checkpoint_every_minutes and train_seconds - last_ckpt_seconds >= cfg.checkpoint_every_minutes * 60
            if due_steps or due_time:
                self._save(step, train_seconds, bad_in_a_row)
                last_ckpt_step, last_ckpt_seconds = step, train_seconds
            if cfg.validation_every and step % cfg.validation_every == 0:
                self._validate(step)
        bar.close()
        if step != last_ckpt_step:
            self._save(step, train_seconds, bad_in_a_row)
        self._finish(step, train_seconds, stopped_by)
        return TrainResult(self.out, step, train_seconds, stopped_by)

    def _finish(self, step: int, train_seconds: float, stopped_by: str) -> None:
        acc, model = self.acc, self.model
        checksum = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1).to(acc.device)
        checksums = acc.gather(checksum).tolist()
        acc.wait_for_everyone()
        if acc.is_main_process:
            if model.lora is not None:
                model.save_lora(self.out / "lora")
            else:
                model.save_unet(self.out / "unet")
            self._validate(step)
            summary = {"steps": step, "train_seconds": train_seconds, "stopped_by": stopped_by,
                       "effective_batch": self.effective_batch, "gradient_accumulation_steps": self.accumulation,
                       "num_processes": acc.num_processes, "param_checksums_per_rank": checksums}
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        acc.wait_for_everyone()
