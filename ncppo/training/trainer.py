"""The trainer: one loop for all six objectives, from a laptop CPU to many GPUs (accelerate).

``Trainer(config)`` builds everything in ``__init__`` (TRL's shape): the output folder (locked, guarded,
the checkpoint to resume; :mod:`~ncppo.training.output`), the accelerator, the model, the objective and the
data (:mod:`~ncppo.training.setup`; any of the three may be passed in instead), the optimiser and its
schedule, and restores a checkpoint. ``train()`` then repeats: gradient accumulation over micro-batches
(each a call of :func:`ncppo.step.training_step`, which it never looks inside), clipping, an optimiser and
LR-scheduler step, logging, checkpoints (:mod:`~ncppo.training.checkpoint`) and validation, until
``max_steps`` or the ``max_train_minutes`` budget. Everything random in a micro-step (noise, prompt
dropout, crops) derives from (seed, micro-step index, rank), so a resumed run replays an uninterrupted one
exactly. The run prints a start banner and an end summary (:mod:`~ncppo.training.report`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ncppo.configuration import flatten
from ncppo.errors import NcppoError, StateError
from ncppo.io import atomic_write_text, mark_output_dir
from ncppo.training import report, sharding
from ncppo.training.card import model_card
from ncppo.training.checkpoint import DiskFullError, register_hooks, restore_trainable, save_checkpoint
from ncppo.training.config import config_record
from ncppo.training.diagnostics import Diagnostics, TooManySkippedSteps, eps_dominated_frac
from ncppo.training.logging import ACCELERATE_TRACKERS, MetricLogger, check_tracker_packages
from ncppo.training.output import COMMAND, RunFolder
from ncppo.training.setup import (
    Derived,
    build_accelerator,
    build_data,
    build_model,
    build_objective,
    build_optimizer,
    build_scheduler,
    calibrate,
    prepare_model,
)
from ncppo.training.sources import MicroBatches, PromptDropout, TrainingData

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "TooManySkippedSteps"]


class TrainingDiverged(NcppoError, RuntimeError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns: the run's folder, optimiser steps, training seconds, why it stopped
    (``max_steps`` or ``time_budget``) and, on the main process, what ``summary.json`` holds."""

    output_dir: Path
    steps: int
    train_seconds: float
    stopped_by: str
    summary: dict = field(default_factory=dict)


@contextlib.contextmanager
def _disk_full_is_one_line(out: str):
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, NcppoError):
            raise DiskFullError(err.filename or f"a file in {out}") from err
        raise


class Trainer:
    """Trains one run of a :class:`~ncppo.training.config.TrainConfig`.

    Parameters:
        config: the run's settings (:func:`~ncppo.training.config.load_config`).
        model: a :class:`~ncppo.models.preference_model.PreferenceModel` to train instead of the one
            ``config.model`` describes (then ``model.*`` is used only to record the run).
        objective: an objective (:func:`ncppo.objectives.make_objective`) instead of ``config.objective``'s.
        data: a :class:`~ncppo.training.sources.TrainingData` instead of ``config.data``'s pairs or cache.
        trackers: extra accelerate trackers (``accelerate.tracking.GeneralTracker`` instances) besides
            those named in ``report_to``.

    Everything is built here; ``train()`` only runs the loop. The output folder is locked from here
    until ``train()`` ends (or this constructor fails).
    """

    def __init__(self, config, *, model=None, objective=None, data: TrainingData | None = None,
                 trackers: list | None = None):
        from accelerate.utils import set_seed

        self.config = cfg = config
        self.wall_start = time.perf_counter()
        self.out = Path(cfg.output_dir)
        self.run_name = cfg.run_name or self.out.resolve().name
        self._trackers_started = False
        self.kohya_file: Path | None = None
        self.accelerator = None
        self.folder = RunFolder(cfg, self._say)
        self.diagnostics = Diagnostics(cfg, self._say)
        self.resume_differences: list[str] = []
        try:
            with _disk_full_is_one_line(cfg.output_dir):
                names = [name for name in cfg.report_to if name in ACCELERATE_TRACKERS]
                check_tracker_packages(names)  # before anything is loaded or written
                self.accelerator = acc = build_accelerator(cfg, names + list(trackers or []))
                sharding.enable_fsdp_on_cpu(acc)  # an FSDP launch without GPUs would otherwise run DDP
                set_seed(cfg.seed)  # the LoRA's initial A matrices (peft draws them from the global generator)
                self.derived = Derived.of(cfg, acc.num_processes)
                self.folder.open(acc.is_main_process, acc.wait_for_everyone)
                if self.folder.resume_from is not None:
                    self._check_resume_settings()
                self.objective = objective if objective is not None else build_objective(cfg.objective)
                self.model = model if model is not None else build_model(cfg.model)
                sharding.check_sharding(acc, self.model, cfg.validation_prompts)
                prepare_model(self.model, cfg, acc.device, objective=self.objective)  # the one that trains
                self.data = data if data is not None else build_data(cfg.data)
                if hasattr(self.data, "check_model"):
                    self.data.check_model(self.model)
                self.batches = MicroBatches(self.data, cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index,
                                            PromptDropout(cfg.data.prompt_dropout, self.model))
                self.calibration = self._calibrate()  # beta: auto; may replace the objective
                self.params = self.model.trainable_parameters()
                optimizer = build_optimizer(cfg.optim, self.params, self.derived.learning_rate)
                self.scheduler = build_scheduler(cfg, optimizer)
                sharding.configure_deepspeed(acc, cfg.batch_size, self.derived.gradient_accumulation_steps)
                policy, self.optimizer = acc.prepare(self.model.unet, optimizer)
                self.model.use_policy(policy)
                self.params = self.model.trainable_parameters()  # FSDP replaced them by their shards (DTensors)
                # the schedule is saved with the checkpoints but not prepared (a prepared scheduler steps once
                # per process, which would change the schedule with the process count)
                acc.register_for_checkpointing(self.scheduler)
                register_hooks(acc, self.model, self._restore_trainable)
                self.logger = MetricLogger(self.out, cfg.report_to, cfg.to_dict(), enabled=acc.is_main_process)
                if acc.is_main_process:
                    mark_output_dir(self.out, COMMAND)
                    atomic_write_text(self.out / "config.yaml", yaml.safe_dump(
                        {**config_record(cfg), "resolved": self.resolved(), "provenance": self._provenance()},
                        sort_keys=False))
                self.tracker_run_id = (self.folder.resume_state or {}).get("tracker_run_id") or uuid.uuid4().hex[:12]
                self._start_trackers()
                self.step, self.train_seconds, self.bad_in_a_row = self._restore()
        except BaseException:
            self._close()
            raise

    # -- helpers -------------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            tqdm.write(message)

    def settings(self) -> dict:
        """The flat settings a resume must match (the config and the derived batch and learning rate)."""
        return {**flatten(self.config.to_dict()), "resolved.effective_batch": self.derived.effective_batch,
                "resolved.learning_rate": self.derived.learning_rate}

    def resolved(self) -> dict:
        """Every value the run derived from its config (``config.yaml``'s ``resolved``, ``summary.json``)."""
        lora = self.model.lora
        with self.accelerator.autocast():  # auto is decided by the precision the steps compute in
            reference_pass = self.model.resolved_reference_pass()
        return {**vars(self.derived), "reference_pass": reference_pass,
                "batches_per_epoch": self.batches.per_epoch * self.derived.num_processes,
                "lora_alpha": (lora.alpha or lora.rank) if lora is not None else None,
                "frozen_weights": (self.config.mixed_precision if self.accelerator.device.type != "cpu"
                                   and self.config.mixed_precision != "no" else "fp32"),
                "seed": self.config.seed, "run_name": self.run_name, **self.calibration}

    def _provenance(self) -> dict:
        from ncppo.training.provenance import provenance

        return provenance(self.accelerator.device, self.accelerator.num_processes)

    def _check_resume_settings(self) -> None:
        diffs = self.folder.resume_differences(self.settings())
        if diffs:  # resume: force (anything else was refused)
            self.diagnostics.warn("resume_force", int(self.folder.resume_state["step"]),
                                  f"resume: force: continuing {self.folder.resume_from} with changed settings: "
                                  f"{'; '.join(diffs)}")
            self.resume_differences = diffs

    def _start_trackers(self) -> None:
        """accelerate's trackers (``report_to`` tensorboard/wandb and ``trackers``), with the run's settings;
        a resumed run continues its W&B run (the id is kept in the checkpoints)."""
        if not self.accelerator.log_with:
            return
        flat = {**flatten(self.config.to_dict()), **{f"resolved.{k}": v for k, v in flatten(self.resolved()).items()}}
        values = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}
        wandb = {"name": self.run_name, "dir": str(self.out), "id": self.tracker_run_id, "resume": "allow"}
        self.accelerator.init_trackers(self.config.tracker_project, config=values, init_kwargs={"wandb": wandb})
        self._trackers_started = True

    def _close(self) -> None:
        """End the trackers and release the output folder (also after an error)."""
        if self._trackers_started:
            self._trackers_started = False
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.folder.release()

    def _calibrate(self) -> dict:
        """``objective.beta: auto`` (:func:`~ncppo.training.setup.calibrate`): the measured beta and its record."""
        if not self.objective.needs_calibration:
            return {}
        self.objective, record = calibrate(self.model, self.objective, self.batches, self.config, self.accelerator)
        self._say(f"beta: auto -> {record['beta']:.6g} (noise MSE / {self.config.objective.name} loss = "
                  f"{record['noise_over_space']:.4g} over {record['batches']} batches x "
                  f"{self.accelerator.num_processes} process(es), target: noise-space DPO's scale at beta "
                  f"{record['target_beta']:g})")
        return {"beta": record["beta"], "beta_calibration": record}

    # -- checkpoints -------------------------------------------------------------------------------
    def _changed(self) -> str:
        return f" (changed settings: {'; '.join(self.resume_differences)})" if self.resume_differences else ""

    def _restore_trainable(self, folder: Path) -> None:  # accelerate's load hook calls it
        restore_trainable(folder, self.model, self._changed())

    def _save(self) -> Path:
        state = {"train_seconds": self.train_seconds, "nonfinite_in_a_row": self.bad_in_a_row,
                 "effective_batch": self.derived.effective_batch, **self.diagnostics.state(),
                 "settings": self.settings(), "resolved": self.resolved(), "tracker_run_id": self.tracker_run_id}
        return save_checkpoint(self.accelerator, self.out, self.step, state, self.config.keep_last_checkpoints)

    def _restore(self) -> tuple[int, float, int]:
        """(step, training seconds, non-finite steps in a row) of the resumed checkpoint, or of a new run."""
        path, state = self.folder.resume_from, self.folder.resume_state
        if path is None:
            self.logger.truncate_after(0)  # a fresh start in a folder whose run never checkpointed
            return 0, 0.0, 0
        if (path / "optimizer.pt").is_file() and not (path / "optimizer.bin").is_file():
            raise StateError(f"train: {path} was written by an older ncppo (optimizer.pt, before checkpoints were "
                             "accelerate states) and cannot be resumed; its LoRA still loads (--lora); set "
                             "overwrite_output_dir: true to start over, or choose a new output_dir")
        try:
            self.accelerator.load_state(str(path))
        except (NcppoError, OSError):
            raise
        except Exception as err:  # a damaged file (safetensors, torch.load) or tensors of another model
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise StateError(f"train: {path} cannot be restored into this run ({first}){self._changed()}; if the "
                             "checkpoint is damaged, delete that folder to resume from the one before it") from err
        self.logger.truncate_after(state["step"])
        self.diagnostics.restore(state)
        return state["step"], state["train_seconds"], state.get("nonfinite_in_a_row", 0)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run the loop to ``max_steps`` or the time budget; write the weights, ``summary.json`` and the card."""
        try:
            with _disk_full_is_one_line(self.config.output_dir):
                return self._train()
        finally:
            self._close()

    def _train(self) -> TrainResult:
        cfg = self.config
        self._say(report.banner(self))
        for note in self.folder.notes + self.logger.notes:
            self._say(f"note: {note}")
        budget = cfg.max_train_minutes * 60 if cfg.max_train_minutes is not None else math.inf
        timed = math.isfinite(budget)
        last_ckpt = (self.step, self.train_seconds)
        stopped_by = "max_steps"
        bar = report.progress_bar(self, timed, budget)
        with contextlib.closing(bar):  # closed on errors too: the error starts on a line of its own
            first = (self.step, self.train_seconds)
            while self.step < cfg.max_steps:
                if self.train_seconds >= budget:
                    stopped_by = "time_budget"
                    break
                metrics, grad_norm, finite, seconds = self._optimizer_step()
                if timed:  # the bar ends at the budget, or sooner where max_steps will come first at this pace
                    pace = (self.train_seconds - first[1]) / (self.step - first[0])
                    bar.total = min(budget, self.train_seconds + (cfg.max_steps - self.step) * pace)
                    bar.update(max(0.0, min(self.train_seconds, bar.total) - bar.n))
                else:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or not finite:
                    self._log(bar, timed, metrics, grad_norm, finite, seconds)
                if self.bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                    where = self._save()
                    raise TrainingDiverged(
                        f"train: training diverged at step {self.step}: {self.bad_in_a_row} non-finite losses or "
                        f"gradients in a row (last loss={metrics.get('loss')}, grad_norm={grad_norm}); try a lower "
                        "optim.learning_rate, a smaller objective.beta, optim.max_grad_norm, or mixed_precision "
                        f"bf16/no instead of fp16; the weights before these steps are in {where}")
                self.diagnostics.check_skipped(self.step, self.data.skip_report())
                due_steps = cfg.checkpoint_every_steps and self.step - last_ckpt[0] >= cfg.checkpoint_every_steps
                due_time = (cfg.checkpoint_every_minutes
                            and self.train_seconds - last_ckpt[1] >= cfg.checkpoint_every_minutes * 60)
                if due_steps or due_time:
                    self._save()
                    last_ckpt = (self.step, self.train_seconds)
                if cfg.validation_every and self.step % cfg.validation_every == 0:
                    self._validate()
        # a short run whose data is all bad must not end as a success
        self.diagnostics.check_skipped(self.step, self.data.skip_report(), final=True)
        if self.step != last_ckpt[0]:
            self._save()
        summary = self._finish(stopped_by)
        return TrainResult(self.out, self.step, self.train_seconds, stopped_by, summary)

    def _optimizer_step(self) -> tuple[dict, float, bool, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; a step whose loss or
        gradient is not finite, or that had no valid pair, is skipped (counted)."""
        from ncppo.step import training_step

        cfg, acc, model = self.config, self.accelerator, self.model
        accumulation = self.derived.gradient_accumulation_steps
        start = time.perf_counter()
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}
        ids, count = [], 0
        for micro in range(accumulation):
            micro_index = self.step * accumulation + micro
            batch = self.batches(micro_index)
            if batch is None:
                continue
            sync = contextlib.nullcontext() if micro == accumulation - 1 else acc.no_sync(model.policy)
            with sync, acc.autocast():
                out = training_step(model, self.objective, batch, generator=self.batches.generator(micro_index))
                acc.backward(out.loss / accumulation)
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
            self.bad_in_a_row = 0
        elif count == 0:  # every pair of the step had bad images (counted in the data's skip report)
            self.diagnostics.counts["no_valid_pair"] += 1
            self._say(f"step {self.step + 1}: no valid pairs in its batches; step skipped")
        else:
            self.bad_in_a_row += 1
            self.diagnostics.counts["nonfinite"] += 1
            self._say(f"step {self.step + 1}: non-finite loss or gradient (loss={metrics.get('loss')}, grad_norm="
                      f"{grad_norm}); step skipped; batch ids {ids}")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        return metrics, grad_norm, finite, seconds

    def _log(self, bar, timed: bool, metrics: dict, grad_norm: float, finite: bool, seconds: float) -> None:
        cfg, step = self.config, self.step
        row = {**metrics, "grad_norm": grad_norm,
               "grad_norm_clipped": int(finite and grad_norm > cfg.optim.max_grad_norm),
               "lr": self.scheduler.get_last_lr()[0], "seconds_per_step": seconds,
               "pairs_per_second": self.derived.effective_batch / seconds, "train_seconds": self.train_seconds,
               "skipped": int(not finite)}
        if finite and (frac := eps_dominated_frac(self.optimizer)) is not None:
            row["eps_dominated_frac"] = frac
        self.logger.log(step, row)
        self.accelerator.log(row, step=step)
        self.diagnostics.observe(step, row)
        bar.set_postfix(report.bar_postfix(metrics, step, cfg.max_steps, timed))

    def _validate(self, final: bool = False) -> None:
        if self.accelerator.is_main_process:
            from ncppo.training.validation import validate

            validate(self.model, self.config, self.out, self.accelerator.trackers, self.step, final=final)

    def _finish(self, stopped_by: str) -> dict:
        acc, model = self.accelerator, self.model
        checksums = acc.gather(sharding.checksum(self.params).reshape(1).to(acc.device)).tolist()
        gathered = sharding.unet_state_dict(acc, model.policy) if model.lora is None else None  # a collective under FSDP
        acc.wait_for_everyone()
        summary = {}
        if acc.is_main_process:
            if model.lora is not None:
                model.save_lora(self.out / "lora")
                self.kohya_file = report.export_kohya(self)
            else:
                model.save_unet(self.out / "unet", gathered)
            self._validate(final=True)
            summary = report.summary(self, stopped_by, checksums)
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            atomic_write_text(self.out / "README.md", model_card(summary, config_record(self.config), self.run_name))
            self._say(report.end_text(summary, self.data.skip_report(), self.out))
        self.logger.close()
        self._close()
        acc.wait_for_everyone()
        return summary
