"""The trainer: one loop for all six objectives, from a laptop CPU to many GPUs (accelerate).

It builds the model, the objective and the data from a :class:`TrainConfig`, then repeats: gradient
accumulation over micro-batches (each a call of :func:`ncppo.step.training_step`, which it never looks
inside), clipping, an optimizer and LR-scheduler step, logging, checkpoints and validation, until
``max_steps`` or the ``max_train_minutes`` budget. Everything random in a micro-step (noise, prompt
dropout, crops) derives from (seed, micro-step index, rank), so a resumed run replays an uninterrupted
one exactly.

The output folder is held with a lock (``OUTPUT_DIR/.lock``) for the whole run; a second run there is
refused with the first one's pid. A resume checks that the checkpoint's run had the same settings
(see :class:`TrainConfig`). The run prints a start banner (data and its skip report, batch sizes, the
resolved learning rate, the objective) and an end summary (``summary.json``: final and mean metrics,
diagnostics, warnings, where the weights are and how to sample from them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ncppo.configuration import flatten
from ncppo.errors import NcppoError, OutputDirError, StateError
from ncppo.io import atomic_write_text, guard_output_dir, mark_output_dir, output_owner
from ncppo.training.card import model_card
from ncppo.training.checkpoint import (
    DiskFullError,
    checkpoint_dirs,
    clean_leftovers,
    load_optimizer_state,
    load_trainable,
    read_state,
    save_checkpoint,
)
from ncppo.training.config import CHANGEABLE_ON_RESUME, ConfigError, TrainConfig
from ncppo.training.logging import ACCELERATE_TRACKERS, MetricLogger, check_tracker_packages

COMMAND = "train"
LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoints", "summary.json", "lora", "unet")
FLAT_ARGUMENT = 1e-3  # argument_rms below this: the sigmoid's argument is ~0 and the loss sits at log 2
EPS_DOMINATED = 0.5  # eps_dominated_frac above this: most Adam updates are set by eps, not by the gradient


class TrainingDiverged(NcppoError, RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class TooManySkippedSteps(NcppoError, ValueError):
    """Too large a share of the optimiser steps had no valid pair (bad images); the message has the skip report."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    stopped_by: str  # max_steps | time_budget
    summary: dict = field(default_factory=dict)  # what summary.json holds (main process)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


_PATHS = ("model.pretrained", "data.source", "data.cache")


def _normal(key: str, value):
    """Local paths compare as absolute paths (``outputs/data`` and ``/home/me/outputs/data`` are one folder)."""
    if key in _PATHS and isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def setting_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every flat key that differs and may not change on resume."""
    diffs = []
    defaults = flatten(TrainConfig().to_dict())
    for key in sorted(new):
        if key in CHANGEABLE_ON_RESUME or (key.startswith("resolved.") and key not in old):
            continue
        before = old.get(key, defaults.get(key))  # a key an older version did not write: its default
        if not _same(_normal(key, before), _normal(key, new[key])):
            diffs.append(f"{key}: {before!r} -> {new[key]!r}")
    return diffs


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.lock``, held for the run (the kernel drops it when the process dies)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            other = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "a process"
            os.close(self.fd)
            self.fd = None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirError(f"train: another run ({other}) is writing to {folder}; wait for it to end or stop "
                                 "it, or choose another output_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class Trainer:
    """Trains one run of a :class:`TrainConfig`; ``trackers``: extra accelerate trackers (instances of
    ``accelerate.tracking.GeneralTracker``) besides those named in ``report_to``."""

    def __init__(self, config: TrainConfig, trackers: list | None = None):
        self.config = config
        self.extra_trackers = list(trackers or [])
        self._trackers_started = False
        self._lock: RunLock | None = None
        self.warnings: list[dict] = []
        self.notes: list[str] = []

    # -- output folder -----------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(message)

    def _warn(self, code: str, step: int, message: str) -> None:
        if any(w["code"] == code for w in self.warnings):
            return
        self.warnings.append({"code": code, "step": step, "message": message})
        self._say(f"warning: {message}")

    def _prepare_output_dir(self) -> None:
        """Guard, lock, replace or refuse what is there, clean leftovers; then find the checkpoint to resume."""
        cfg, acc = self.config, self.acc
        if acc.is_main_process:
            inputs = [p for p in (cfg.data.source, cfg.data.cache, cfg.model.pretrained) if p and Path(p).expanduser().exists()]
            guard_output_dir(self.out, COMMAND, inputs=inputs, overwrite=True)  # inputs and "is a file"; the rest below
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.parent.glob(f".replaced-{self.out.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)  # an overwrite killed while it deleted the old run
            self._lock = RunLock(self.out)
            self._check_folder()
            self.notes += clean_leftovers(self.out)
        acc.wait_for_everyone()
        found = checkpoint_dirs(self.out) if cfg.resume else []
        self.resume_from = found[-1] if found else None
        self.resume_state = read_state(self.resume_from) if found else None
        if self.resume_from is not None:
            self._check_resume_settings()

    def _holds_run(self) -> bool:
        owner = output_owner(self.out)
        return owner == COMMAND or (owner is None and any((self.out / n).exists() for n in RUN_FILES))

    def _check_folder(self) -> None:
        cfg = self.config
        contents = [p for p in self.out.iterdir() if p.name != LOCK]
        if not contents:
            return
        owner = output_owner(self.out)
        if cfg.overwrite_output_dir:
            self._replace_folder("overwrite_output_dir: true: replaced the earlier contents of")
            return
        if not self._holds_run():
            what = f"an output of `ncppo {owner}`" if owner else "a folder that no ncppo command wrote"
            raise OutputDirError(f"train: the output folder {self.out} is not empty and is {what}; choose a new "
                                 "output_dir, or set overwrite_output_dir: true to replace it")
        newest = checkpoint_dirs(self.out)
        if not cfg.resume:
            where = f" (newest checkpoint {newest[-1].name})" if newest else ""
            raise OutputDirError(f"train: the output folder {self.out} holds a training run{where}; with resume: false "
                                 "it is not continued: set resume: true to continue it, overwrite_output_dir: true "
                                 "to replace it, or choose a new output_dir")
        if not newest and any(p.name != "checkpoints" for p in contents):
            # a run killed before its first checkpoint: nothing to resume, and its rows must not mix with ours
            self._replace_folder("no complete checkpoint to resume: replaced the files of an earlier run in")

    def _replace_folder(self, why: str) -> None:
        """Move the folder aside in one rename (holding the lock of the new one), then delete it."""
        aside = self.out.parent / f".replaced-{self.out.name}-{uuid.uuid4().hex[:8]}"
        old_lock = self._lock
        try:
            os.replace(self.out, aside)
        except OSError:  # a mount point or a busy folder: delete its contents in place
            for p in self.out.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self._say(f"{why} {self.out}")
            return
        self.out.mkdir()
        self._lock = RunLock(self.out)
        old_lock.release()
        shutil.rmtree(aside, ignore_errors=True)
        self._say(f"{why} {self.out}")

    def _run_settings(self) -> dict:
        return {**flatten(self.config.to_dict()), "resolved.effective_batch": self.effective_batch,
                "resolved.learning_rate": self.learning_rate}

    def _check_resume_settings(self) -> None:
        old = self.resume_state.get("settings")
        if old is None:  # a checkpoint of an older version: the run's config.yaml (not yet rewritten)
            try:
                old = flatten(yaml.safe_load((self.out / "config.yaml").read_text()) or {})
            except (OSError, yaml.YAMLError):
                self.notes.append(f"{self.resume_from} records no settings: they are not compared")
                return
        diffs = setting_differences(old, self._run_settings())
        if not diffs:
            return
        if self.config.resume != "force":
            raise StateError(f"train: {self.resume_from} is from a run with other settings ({'; '.join(diffs)}); "
                             "set resume: force to continue it with the new settings, overwrite_output_dir: true "
                             "to start over, or choose a new output_dir")
        self._warn("resume_force", int(self.resume_state["step"]),
                   f"resume: force: continuing {self.resume_from} with changed settings: {'; '.join(diffs)}")
        self.resume_differences = diffs

    # -- setup -------------------------------------------------------------------------------------
    def _setup(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        from ncppo.models.preference_model import LoraSettings, PreferenceModel
        from ncppo.objectives import make_objective

        cfg = self.config
        # Several trainers in one process (the toy world trains six methods): accelerate keeps one global
        # state and refuses a second precision. Without a process group there is nothing to keep: reset it.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            AcceleratorState._reset_state(reset_partial_state=True)
        trackers = [name for name in cfg.report_to if name in ACCELERATE_TRACKERS]
        check_tracker_packages(trackers)  # before anything is loaded or written
        self.out = Path(cfg.output_dir)
        self.run_name = cfg.run_name or self.out.resolve().name
        self.acc = acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                                     log_with=(trackers + self.extra_trackers) or None,
                                     project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                         logging_dir=str(self.out / "tensorboard")))
        set_seed(cfg.seed)  # the LoRA's initial A matrices (peft draws them from the global generator)
        self.accumulation = cfg.resolved_accumulation(acc.num_processes)
        self.effective_batch = cfg.batch_size * self.accumulation * acc.num_processes
        self.learning_rate = cfg.optim.learning_rate * (self.effective_batch if cfg.optim.scale_lr else 1)
        self.resume_differences: list[str] = []
        self._prepare_output_dir()
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
        self.resolved: dict = {}  # extra resolved values (beta: auto) for config.yaml and summary.json
        self._calibrate()
        params = model.trainable_parameters()
        self.optimizer = self._optimizer(params, self.learning_rate)
        from diffusers.optimization import get_scheduler

        self.scheduler = get_scheduler(cfg.optim.lr_scheduler, self.optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                       num_training_steps=cfg.max_steps)
        model.policy, self.optimizer = acc.prepare(model.unet, self.optimizer)
        self.params = params
        self.logger = MetricLogger(self.out, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process)
        if acc.is_main_process:
            mark_output_dir(self.out, COMMAND)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(
                {**cfg.to_dict(), "resolved": self._resolved()}, sort_keys=False))
        self._start_trackers()

    def _start_trackers(self) -> None:
        """accelerate's trackers (``report_to`` tensorboard/wandb and ``trackers``), with the run's settings;
        a resumed run continues its W&B run (the id is kept in the checkpoints)."""
        state = self.resume_state or {}
        self.tracker_run_id = state.get("tracker_run_id") or uuid.uuid4().hex[:12]
        if not self.acc.log_with:
            return
        flat = {**flatten(self.config.to_dict()), **{f"resolved.{k}": v for k, v in flatten(self._resolved()).items()}}
        values = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}
        wandb = {"name": self.run_name, "dir": str(self.out), "id": self.tracker_run_id, "resume": "allow"}
        self.acc.init_trackers(self.config.tracker_project, config=values, init_kwargs={"wandb": wandb})
        self._trackers_started = True

    def _end_trackers(self) -> None:
        if self._trackers_started:
            self._trackers_started = False
            for tracker in self.acc.trackers:
                tracker.finish()

    def _calibrate(self) -> None:
        """``objective.beta: auto``: measure beta on the first batches (:mod:`ncppo.calibration`), the same on
        every process (their ratios are averaged) and the same on a resume (the measurement is deterministic)."""
        if not self.objective.needs_calibration:
            return
        from ncppo.calibration import calibrate_beta

        cfg, acc = self.config, self.acc
        batches, generators = [], []
        for micro_index in range(cfg.objective.calibration_batches * 4):  # batches without a valid pair are skipped
            batch = self._batch(micro_index)
            if batch is not None:
                batches.append(batch)
                generators.append(torch.Generator().manual_seed(_seed(cfg.seed, micro_index, acc.process_index, 3)))
            if len(batches) == cfg.objective.calibration_batches:
                break
        def average(ratio: float) -> float:
            return float(acc.reduce(torch.tensor([ratio], device=acc.device), reduction="mean"))

        with acc.autocast():
            self.objective, record = calibrate_beta(self.model, self.objective, batches, generators, average=average)
        self.resolved["beta"] = record["beta"]
        self.resolved["beta_calibration"] = record
        self._say(f"beta: auto -> {record['beta']:.6g} (noise MSE / {cfg.objective.name} loss = "
                  f"{record['noise_over_space']:.4g} over {len(batches)} batches x {acc.num_processes} process(es), "
                  f"target: noise-space DPO's scale at beta {record['target_beta']:g})")

    def _resolved(self) -> dict:
        return {"gradient_accumulation_steps": self.accumulation, "num_processes": self.acc.num_processes,
                "batch_size_per_process": self.config.batch_size, "effective_batch": self.effective_batch,
                "learning_rate": self.learning_rate, **self.resolved}

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

    def _skip_report(self) -> str:
        if self.pairs is not None:
            return self.pairs.skips.summary()
        skipped = int(self.cache.index.get("skipped_pairs", 0))
        return f"{skipped} pairs skipped (bad images) when the cache was built" if skipped else "no pairs skipped"

    def _data_summary(self) -> dict:
        source = self.config.data.cache or self.config.data.source
        if self.pairs is not None:
            return {"source": source, "pairs": len(self.pairs), "skips": self.pairs.skips.as_dict()}
        return {"source": source, "pairs": len(self.cache), "skips": {"total": int(self.cache.index.get("skipped_pairs", 0)),
                                                                      "when": "cache build"}}

    def _local_plan(self, epoch: int) -> list:
        """This process's batches of one epoch (batch k goes to rank k % num_processes)."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            cfg, acc = self.config, self.acc
            source = self.cache or self.pairs
            plan = source.plan(cfg.batch_size, shuffle=True, seed=_seed(cfg.seed, epoch), drop_last=True)
            usable = len(plan) - len(plan) % acc.num_processes
            if usable == 0:
                raise ConfigError(f"the data has {len(plan)} full batches of {cfg.batch_size} pairs: too few for "
                                  f"{acc.num_processes} process(es) ({len(source)} pairs; {self._skip_report()})")
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

    # -- banner and summary ------------------------------------------------------------------------
    def _banner(self, step: int, train_seconds: float) -> str:
        cfg, acc = self.config, self.acc
        data = self._data_summary()
        per_epoch = self._per_epoch * acc.num_processes
        budget = f"{cfg.max_train_minutes:g} min of training" if cfg.max_train_minutes is not None else "none"
        lr = (f"{cfg.optim.learning_rate:g} x {self.effective_batch} (scale_lr: x effective batch) = {self.learning_rate:g}"
              if cfg.optim.scale_lr else f"{self.learning_rate:g} (scale_lr: false)")
        precision = cfg.mixed_precision + ("" if acc.device.type != "cpu" else " (CPU: frozen weights stay float32)")
        options = {k: v for k, v in cfg.objective.options().items() if k != "name"}
        beta = getattr(self.objective.preference, "beta", None)
        options["beta"] = beta if beta is not None else options["beta"]
        if cfg.model.finetune == "lora":
            model = f"{cfg.model.pretrained} (LoRA rank {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha or cfg.model.lora_rank:g})"
        else:
            model = f"{cfg.model.pretrained} (full fine-tune)"
        trainable = sum(p.numel() for p in self.params)
        if self.resume_from is not None:
            start = f"resuming from step {step} ({self.resume_from}, {train_seconds:.1f} s of training so far)"
        else:
            start = "a new run"
        rows = [
            ("output folder", f"{self.out} ({start})"),
            ("model", model),
            ("trainable parameters", f"{trainable:,}"),
            ("data", f"{data['pairs']:,} pairs from {data['source']}"),
            ("data skipped", self._skip_report()),
            ("batches per epoch", f"{per_epoch:,} of {cfg.batch_size} pairs"),
            ("processes", str(acc.num_processes)),
            ("per-process batch", f"{cfg.batch_size} pairs"),
            ("gradient accumulation", f"{self.accumulation} micro-steps"),
            ("effective batch", f"{self.effective_batch} pairs per optimiser step"),
            ("optimiser steps", f"{cfg.max_steps:,} (max_steps)"),
            ("time budget", budget),
            ("learning rate", lr),
            ("optimiser", f"{cfg.optim.optimizer} (betas {cfg.optim.adam_beta1:g}, {cfg.optim.adam_beta2:g}, eps "
                          f"{cfg.optim.adam_epsilon:g}, weight decay {cfg.optim.weight_decay:g}, clip "
                          f"{cfg.optim.max_grad_norm:g}), {cfg.optim.lr_scheduler} with {cfg.optim.lr_warmup_steps} "
                          "warm-up steps"),
            ("precision", precision),
            ("objective", f"{cfg.objective.name} ({', '.join(f'{k}={v}' for k, v in options.items())})"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["***** Running training *****", *(f"  {k:<{width}} = {v}" for k, v in rows)])

    def _diagnostics(self, rows: list[dict]) -> dict:
        out = {}
        keys = ["loss", "argument_rms", "saturated_frac", "eps_dominated_frac", "grad_norm", "grad_norm_clipped"]
        keys += sorted({k for r in rows for k in r if k.startswith("pl_over_l_t")})
        for key in keys:
            values = [float(r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(float(r[key]))]
            if values:
                out[key] = {"final": values[-1], "mean": sum(values) / len(values)}
        return out

    def _summary(self, step, train_seconds, stopped_by, checksums) -> dict:
        cfg, model = self.config, self.model
        rows = self.logger.rows
        weights = (self.out / ("lora" if model.lora is not None else "unet")).absolute()
        if model.lora is not None:
            sample = (f"ncppo generate --model {cfg.model.pretrained} --lora {weights} --prompts PROMPTS.txt "
                      f"--out {self.out / 'samples'}")
        else:
            sample = (f"load {weights} with diffusers' UNet2DConditionModel.from_pretrained and put it in the "
                      f"pipeline of {cfg.model.pretrained}")
        finite = [r for r in rows if not r.get("skipped")]
        metric_keys = sorted({k for r in finite for k in r} - {"step"})
        mean = {}
        for key in metric_keys:
            values = [float(r[key]) for r in finite if key in r and math.isfinite(float(r[key]))]
            if values:
                mean[key] = sum(values) / len(values)
        return {
            "steps": step, "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - self._wall_start,
            "stopped_by": stopped_by,
            "resumed_from": None if self.resume_from is None else {"step": int(self.resume_state["step"]),
                                                                   "checkpoint": str(self.resume_from),
                                                                   "changed_settings": self.resume_differences},
            "effective_batch": self.effective_batch, "gradient_accumulation_steps": self.accumulation,
            "num_processes": self.acc.num_processes, "batch_size_per_process": cfg.batch_size,
            "learning_rate": self.learning_rate, "resolved": self._resolved(),
            "objective": {**cfg.objective.options(), "beta_used": getattr(self.objective.preference, "beta", None)},
            "data": self._data_summary(),
            "skipped_steps": {"no_valid_pair": self.counts["no_valid_pair"], "nonfinite": self.counts["nonfinite"]},
            "final_metrics": finite[-1] if finite else None, "mean_metrics": mean,
            "diagnostics": self._diagnostics(rows), "warnings": self.warnings,
            "notes": self.notes + self.logger.notes,
            "weights": str(weights), "sample_command": sample,
            "weights_kohya": str(self.kohya_file.absolute()) if model.lora is not None else None,
            "model_card": str((self.out / "README.md").absolute()), "run_name": self.run_name,
            "export": self._export_info(step) if model.lora is not None else None,
            "param_checksums_per_rank": checksums,
        }

    def _end_text(self, summary: dict) -> str:
        final = summary["final_metrics"] or {}
        shown = [f"{k} {final[k]:.6g}" for k in ("loss", "implicit_acc", "reward_margin", "grad_norm") if k in final]
        diag = [f"{k} {v['final']:.3g} (mean {v['mean']:.3g})" for k, v in summary["diagnostics"].items()
                if k in ("argument_rms", "saturated_frac", "eps_dominated_frac", "grad_norm_clipped")]
        skipped = summary["skipped_steps"]
        rows = [
            ("stopped by", f"{summary['stopped_by']} after {summary['steps']} steps ({skipped['no_valid_pair']} without a "
                           f"valid pair, {skipped['nonfinite']} non-finite)"),
            ("training time", f"{summary['train_seconds']:.1f} s (this session's wall time {summary['wall_seconds']:.1f} s)"),
            ("final metrics", ", ".join(shown) or "none logged"),
            ("diagnostics", ", ".join(diag) or "none"),
            ("data skipped", self._skip_report()),
            ("warnings", "; ".join(w["message"] for w in summary["warnings"]) or "none"),
            ("weights", summary["weights"] + (f" (A1111/ComfyUI: {Path(summary['weights_kohya']).name})"
                                              if summary["weights_kohya"] else "")),
            ("sample from it", summary["sample_command"]),
            ("summary", f"{self.out / 'summary.json'}; model card {self.out / 'README.md'}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["***** Training finished *****", *(f"  {k:<{width}} = {v}" for k, v in rows)])

    # -- checkpoints -------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.unet.named_parameters() if p.requires_grad}

    def _save(self, step: int, train_seconds: float, bad_in_a_row: int) -> Path:
        self.acc.wait_for_everyone()
        target = self.out / "checkpoints" / f"step-{step:06d}"
        if self.acc.is_main_process:
            save_checkpoint(self.out, step, self._trainable_state(), self.optimizer, self.scheduler,
                            {"train_seconds": train_seconds, "nonfinite_in_a_row": bad_in_a_row,
                             "effective_batch": self.effective_batch, "counts": self.counts,
                             "diagnostic_runs": self._runs, "warnings": self.warnings,
                             "settings": self._run_settings(), "resolved": self._resolved(),
                             "tracker_run_id": self.tracker_run_id},
                            self.config.keep_last_checkpoints,
                            write_lora=self.model.write_lora if self.model.lora is not None else None)
        self.acc.wait_for_everyone()
        return target

    def _restore(self) -> tuple[int, float, int]:
        self.counts = {"no_valid_pair": 0, "nonfinite": 0}
        self._runs = {"flat_argument": 0, "eps_dominated": 0}
        if self.resume_from is None:
            self.logger.truncate_after(0)  # a fresh start in a folder whose run never checkpointed
            return 0, 0.0, 0
        path, state = self.resume_from, self.resume_state
        changed = f" (changed settings: {'; '.join(self.resume_differences)})" if self.resume_differences else ""
        try:
            trainable = load_trainable(path)
            own = self._trainable_state()
            if set(trainable) != set(own):
                raise StateError(f"train: {path} does not match this model's trainable parameters{changed or ' (other model or LoRA settings?)'}")
            mismatched = [n for n, t in trainable.items() if tuple(t.shape) != tuple(own[n].shape)]
            if mismatched:
                raise StateError(f"train: {path} holds {mismatched[0]} with shape {tuple(trainable[mismatched[0]].shape)}, "
                                 f"this model's is {tuple(own[mismatched[0]].shape)}{changed}")
            load_optimizer_state(path, self.optimizer, self.scheduler)
        except (NcppoError, OSError):
            raise
        except Exception as err:  # a damaged file (safetensors, torch.load) or tensors of another model
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise StateError(f"train: {path} cannot be restored into this run ({first}){changed}; if the checkpoint is "
                             "damaged, delete that folder to resume from the one before it") from err
        with torch.no_grad():
            for name, tensor in trainable.items():
                own[name].copy_(tensor)
        self.logger.truncate_after(state["step"])
        self.counts.update(state.get("counts", {}))
        self._runs.update(state.get("diagnostic_runs", {}))
        for w in state.get("warnings", []):
            if not any(w["code"] == x["code"] for x in self.warnings):
                self.warnings.append(w)
        return state["step"], state["train_seconds"], state.get("nonfinite_in_a_row", 0)

    # -- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_validation(self) -> np.ndarray:
        cfg = self.config
        images = self.model.pipeline(cfg.validation_prompts, num_inference_steps=cfg.validation_steps,
                                     height=cfg.data.resolution, width=cfg.data.resolution, output_type="np",
                                     generator=[torch.Generator().manual_seed(i) for i in range(len(cfg.validation_prompts))],
                                     ).images
        return (images * 255).round().astype(np.uint8)

    @torch.no_grad()
    def _validate(self, step: int, final: bool = False) -> None:
        """Sample the validation prompts into ``validation/step-N.png``, ``last.png`` and the trackers; at the
        end of a LoRA run also with the adapters off: ``validation/comparison.png`` (base and LoRA rows)."""
        cfg = self.config
        if not cfg.validation_prompts or not self.acc.is_main_process:
            return
        from ncppo.plots import save_image_grid
        from ncppo.training.logging import log_images

        self.model.unet.eval()
        try:
            grid = self._sample_validation()
            base = None
            if final and self.model.lora is not None:
                with self.model.frozen_unet():  # the same U-Net with its adapters off: the base model
                    base = self._sample_validation()
        finally:
            self.model.unet.train()
        folder = self.out / "validation"
        folder.mkdir(exist_ok=True)
        save_image_grid([grid], [f"step {step}"], folder / f"step-{step:06d}.png")
        save_image_grid([grid], [f"step {step}"], folder / "last.png")
        log_images(self.acc.trackers, "validation", grid, cfg.validation_prompts, step)
        if base is not None:
            save_image_grid([base, grid], ["base model", f"LoRA, step {step}"], folder / "comparison.png")
            log_images(self.acc.trackers, "comparison/base", base, cfg.validation_prompts, step)
            log_images(self.acc.trackers, "comparison/lora", grid, cfg.validation_prompts, step)

    # -- diagnostics -------------------------------------------------------------------------------
    @torch.no_grad()
    def _eps_dominated_frac(self) -> float | None:
        """Share of trained entries whose Adam denominator ``sqrt(exp_avg_sq / bias_correction2)`` is below eps.

        There ``eps`` sets the update size, not the gradient (AdamW divides by ``sqrt(v_hat) + eps``). None for
        optimizers without ``exp_avg_sq`` (8-bit AdamW keeps it quantised).
        """
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        below, total = [], 0
        for group in opt.param_groups:
            eps, beta2 = group.get("eps"), group.get("betas", (None, None))[1]
            if eps is None or beta2 is None:
                return None
            for p in group["params"]:
                state = opt.state.get(p) or {}
                v = state.get("exp_avg_sq")
                if v is None or "step" not in state or not torch.is_tensor(v) or v.dtype == torch.uint8:
                    continue
                bias_correction2 = 1 - beta2 ** float(state["step"])
                below.append((v < eps * eps * bias_correction2).sum())  # sqrt(v / bc2) < eps, without the sqrt
                total += v.numel()
        if not total:
            return None
        return float(torch.stack(below).sum()) / total  # one device sync

    def _diagnose(self, step: int, row: dict) -> None:
        n = self.config.diagnostics_window
        arg = row.get("argument_rms")
        if arg is not None and math.isfinite(arg):
            self._runs["flat_argument"] = self._runs["flat_argument"] + 1 if arg < FLAT_ARGUMENT else 0
            if self._runs["flat_argument"] >= n:
                self._warn("flat_loss", step, f"argument_rms has stayed below {FLAT_ARGUMENT:g} for {n} logged steps "
                           f"({arg:.2g} at step {step}): the loss sits at log 2 and the model barely learns; raise "
                           "objective.beta (or beta: auto for ncp-*, or objective.scale: noise)")
        frac = row.get("eps_dominated_frac")
        if frac is not None:
            self._runs["eps_dominated"] = self._runs["eps_dominated"] + 1 if frac > EPS_DOMINATED else 0
            if self._runs["eps_dominated"] >= n:
                self._warn("eps_dominated", step, f"most updates are below AdamW's eps: raise the loss scale or lower "
                           f"adam_epsilon (eps_dominated_frac {frac:.2f} for {n} logged steps, at step {step}; "
                           f"optim.adam_epsilon={self.config.optim.adam_epsilon:g})")

    def _check_skipped(self, step: int, final: bool = False) -> None:
        fraction = self.config.max_skipped_step_fraction
        if fraction is None or step == 0 or (not final and step < self.config.skipped_step_check_after):
            return
        skipped = self.counts["no_valid_pair"]
        if skipped / step > fraction:
            raise TooManySkippedSteps(
                f"train: stopping at step {step}: {skipped} of {step} optimiser steps ({skipped / step:.0%}) had no valid "
                f"pair (max_skipped_step_fraction={fraction:g}); the data's skip report: {self._skip_report()}; fix or "
                "filter the data (ncppo data filter), or raise max_skipped_step_fraction")

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        self._wall_start = time.perf_counter()
        try:
            return self._train()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, NcppoError):
                raise DiskFullError(err.filename or f"a file in {self.config.output_dir}") from err
            raise
        finally:
            self._end_trackers()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _train(self) -> TrainResult:
        self._setup()
        cfg, acc = self.config, self.acc
        step, train_seconds, bad_in_a_row = self._restore()
        self._say(self._banner(step, train_seconds))
        for note in self.notes + self.logger.notes:
            self._say(f"note: {note}")
        last_ckpt_step, last_ckpt_seconds = step, train_seconds
        budget = cfg.max_train_minutes * 60 if cfg.max_train_minutes is not None else math.inf
        timed = math.isfinite(budget)
        if timed:  # the bound is the training-time budget: show it, not an ETA from max_steps
            bar = tqdm(total=budget, initial=min(train_seconds, budget), unit="s",
                       desc=f"train {cfg.objective.name} (budget {cfg.max_train_minutes:g} min)",
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]",
                       disable=not acc.is_main_process)
        else:
            bar = tqdm(total=cfg.max_steps, initial=step, unit="step", desc=f"train {cfg.objective.name}",
                       disable=not acc.is_main_process)
        with contextlib.closing(bar):  # closed on errors too: the error starts on a line of its own
            step, train_seconds, stopped_by, last_ckpt_step = self._loop(
                bar, timed, budget, step, train_seconds, bad_in_a_row, last_ckpt_step, last_ckpt_seconds)
        self._check_skipped(step, final=True)  # a short run whose data is all bad must not end as a success
        if step != last_ckpt_step:
            self._save(step, train_seconds, self._bad_in_a_row)
        summary = self._finish(step, train_seconds, stopped_by)
        return TrainResult(self.out, step, train_seconds, stopped_by, summary)

    def _loop(self, bar, timed, budget, step, train_seconds, bad_in_a_row, last_ckpt_step, last_ckpt_seconds):
        from ncppo.step import training_step

        cfg, acc, model = self.config, self.acc, self.model
        stopped_by = "max_steps"
        first_step, first_seconds = step, train_seconds
        while step < cfg.max_steps:
            if train_seconds >= budget:
                stopped_by = "time_budget"
                break
            start = time.perf_counter()
            sums: dict[str, float] = {}
            seen: dict[str, int] = {}
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
                    seen[key] = seen.get(key, 0) + 1
                ids.extend(batch.ids)
                count += 1
            # the total norm of the gradients before clipping (clip_grad_norm_ returns the pre-clip norm)
            grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            metrics = {k: v / seen[k] for k, v in sums.items()}
            finite = count > 0 and math.isfinite(metrics.get("loss", math.nan)) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                bad_in_a_row = 0
            elif count == 0:  # every pair of the step had bad images (counted in the data's skip report)
                self.counts["no_valid_pair"] += 1
                self._say(f"step {step + 1}: no valid pairs in its batches; step skipped")
            else:
                bad_in_a_row += 1
                self.counts["nonfinite"] += 1
                self._say(f"step {step + 1}: non-finite loss or gradient (loss={metrics.get('loss')}, grad_norm="
                          f"{grad_norm}); step skipped; batch ids {ids}")
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            train_seconds += seconds
            if timed:  # the bar ends at the budget, or sooner where max_steps will come first at this pace
                pace = (train_seconds - first_seconds) / (step - first_step)
                bar.total = min(budget, train_seconds + (cfg.max_steps - step) * pace)
                bar.update(max(0.0, min(train_seconds, bar.total) - bar.n))
            else:
                bar.update(1)
            if step % cfg.log_every == 0 or not finite:
                row = {**metrics, "grad_norm": grad_norm,
                       "grad_norm_clipped": int(finite and grad_norm > cfg.optim.max_grad_norm),
                       "lr": self.scheduler.get_last_lr()[0], "seconds_per_step": seconds,
                       "pairs_per_second": self.effective_batch / seconds, "train_seconds": train_seconds,
                       "skipped": int(not finite)}
                if finite and (frac := self._eps_dominated_frac()) is not None:
                    row["eps_dominated_frac"] = frac
                self.logger.log(step, row)
                self.acc.log(row, step=step)
                self._diagnose(step, row)
                loss = metrics.get("loss", float("nan"))
                postfix = {"step": f"{step}/{cfg.max_steps}"} if timed else {}
                postfix["loss"] = f"{loss:.6g}"  # near log 2 (0.693147) the change is in the 5th digit
                if "argument_rms" in metrics:
                    postfix["arg_rms"] = f"{metrics['argument_rms']:.2g}"
                if "implicit_acc" in metrics:
                    postfix["acc"] = f"{metrics['implicit_acc']:.2f}"
                bar.set_postfix(postfix)
            if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                where = self._save(step, train_seconds, bad_in_a_row)
                raise TrainingDiverged(
                    f"train: training diverged at step {step}: {bad_in_a_row} non-finite losses or gradients in a row "
                    f"(last loss={metrics.get('loss')}, grad_norm={grad_norm}); try a lower optim.learning_rate, a "
                    "smaller objective.beta, optim.max_grad_norm, or mixed_precision bf16/no instead of fp16; the "
                    f"weights before these steps are in {where}")
            self._check_skipped(step)
            due_steps = cfg.checkpoint_every_steps and step - last_ckpt_step >= cfg.checkpoint_every_steps
            due_time = cfg.checkpoint_every_minutes and train_seconds - last_ckpt_seconds >= cfg.checkpoint_every_minutes * 60
            if due_steps or due_time:
                self._save(step, train_seconds, bad_in_a_row)
                last_ckpt_step, last_ckpt_seconds = step, train_seconds
            if cfg.validation_every and step % cfg.validation_every == 0:
                self._validate(step)
        self._bad_in_a_row = bad_in_a_row
        return step, train_seconds, stopped_by, last_ckpt_step

    def _finish(self, step: int, train_seconds: float, stopped_by: str) -> dict:
        acc, model = self.acc, self.model
        checksum = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1).to(acc.device)
        checksums = acc.gather(checksum).tolist()
        acc.wait_for_everyone()
        summary = {}
        if acc.is_main_process:
            if model.lora is not None:
                model.save_lora(self.out / "lora")
                self._export_kohya(step)
            else:
                model.save_unet(self.out / "unet")
            self._validate(step, final=True)
            summary = self._summary(step, train_seconds, stopped_by, checksums)
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            atomic_write_text(self.out / "README.md", model_card(summary, self.config.to_dict(), self.run_name))
            self._say(self._end_text(summary))
        self.logger.close()
        self._end_trackers()
        acc.wait_for_everyone()
        return summary

    def _export_info(self, step: int) -> dict:
        """The training record written into the exported LoRA's safetensors header (``ncppo.<key>``)."""
        import ncppo

        cfg = self.config
        beta = getattr(self.objective.preference, "beta", None)
        return {"version": ncppo.__version__, "base_model": _normal("model.pretrained", cfg.model.pretrained),
                "objective": cfg.objective.name, "objective_settings": cfg.objective.options(), "beta": beta,
                "steps": step, "data_source": _normal("data.cache" if cfg.data.cache else "data.source",
                                                      cfg.data.cache or cfg.data.source),
                "pairs": self._data_summary()["pairs"], "effective_batch": self.effective_batch,
                "learning_rate": self.learning_rate, "lora_rank": cfg.model.lora_rank,
                "lora_alpha": cfg.model.lora_alpha or cfg.model.lora_rank, "lora_targets": cfg.model.lora_targets,
                "resolution": cfg.data.resolution, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision,
                "run_name": self.run_name, "model_kind": self.model.kind}

    def _export_kohya(self, step: int) -> None:
        from ncppo.models.lora_export import export_kohya, kohya_file_name, training_metadata

        cfg = self.config
        meta = training_metadata(kind=self.model.kind, base_model=cfg.model.pretrained, rank=cfg.model.lora_rank,
                                 alpha=cfg.model.lora_alpha or cfg.model.lora_rank, title=self.run_name,
                                 info=self._export_info(step))
        for old in (self.out / "lora").glob("*_kohya.safetensors"):
            old.unlink()  # a resumed run under another run_name
        self.kohya_file = export_kohya(self.out / "lora", self.out / "lora" / kohya_file_name(self.run_name), meta)

