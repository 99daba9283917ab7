"""The run's folder: held with a lock, refused or replaced when it holds something else, and the checkpoint
a run resumes from, whose settings must match the new run's.

``OUTPUT_DIR/.lock`` (``flock``) is held for the whole run; a second run there is refused with the first
one's pid. A non-empty folder that is not an ``ncppo train`` run is refused; a run's folder is continued
(``resume: true``, the newest complete checkpoint, same settings unless ``resume: force``), refused
(``resume: false``) or replaced (``overwrite_output_dir: true``: moved aside in one rename, then deleted).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from ncppo.configuration import flatten
from ncppo.errors import OutputDirError, StateError
from ncppo.io import guard_output_dir, output_owner, setting_differences
from ncppo.training.checkpoint import checkpoint_dirs, clean_leftovers, read_state

COMMAND = "train"
LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoints", "summary.json", "lora", "unet")
PATH_KEYS = ("output_dir", "model.pretrained", "data.source", "data.cache")


def normal_path(key: str, value):
    """Local paths compare as absolute paths (``outputs/data`` and ``/home/me/outputs/data`` are one folder)."""
    if key in PATH_KEYS and isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


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


class RunFolder:
    """Opens ``output_dir`` for a run (see the module docstring); ``say`` prints on the main process."""

    def __init__(self, config, say):
        self.config, self.say = config, say
        self.out = Path(config.output_dir)
        self.lock: RunLock | None = None
        self.notes: list[str] = []
        self.resume_from: Path | None = None
        self.resume_state: dict | None = None

    def open(self, is_main: bool, wait_for_everyone) -> None:
        """Guard, lock, replace or refuse what is there, clean leftovers; then find the checkpoint to resume."""
        cfg = self.config
        if is_main:
            inputs = [p for p in (cfg.data.source, cfg.data.cache, cfg.model.pretrained) if p and Path(p).expanduser().exists()]
            guard_output_dir(self.out, COMMAND, inputs=inputs, overwrite=True)  # inputs and "is a file"; the rest below
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.parent.glob(f".replaced-{self.out.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)  # an overwrite killed while it deleted the old run
            self.lock = RunLock(self.out)
            self._check_contents()
            self.notes += clean_leftovers(self.out)
        wait_for_everyone()
        found = checkpoint_dirs(self.out) if cfg.resume else []
        self.resume_from = found[-1] if found else None
        self.resume_state = read_state(self.resume_from) if found else None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _holds_run(self) -> bool:
        owner = output_owner(self.out)
        return owner == COMMAND or (owner is None and any((self.out / n).exists() for n in RUN_FILES))

    def _check_contents(self) -> None:
        cfg = self.config
        contents = [p for p in self.out.iterdir() if p.name != LOCK]
        if not contents:
            return
        owner = output_owner(self.out)
        if cfg.overwrite_output_dir:
            self._replace("overwrite_output_dir: true: replaced the earlier contents of")
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
            self._replace("no complete checkpoint to resume: replaced the files of an earlier run in")

    def _replace(self, why: str) -> None:
        """Move the folder aside in one rename (holding the lock of the new one), then delete it."""
        aside = self.out.parent / f".replaced-{self.out.name}-{uuid.uuid4().hex[:8]}"
        old_lock = self.lock
        try:
            os.replace(self.out, aside)
        except OSError:  # a mount point or a busy folder: delete its contents in place
            for p in self.out.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.say(f"{why} {self.out}")
            return
        self.out.mkdir()
        self.lock = RunLock(self.out)
        old_lock.release()
        shutil.rmtree(aside, ignore_errors=True)
        self.say(f"{why} {self.out}")

    def resume_differences(self, settings: dict) -> list[str] | None:
        """The settings that differ from the resumed checkpoint's run (None: it records none to compare);
        refused unless ``resume: force``."""
        from ncppo.training.config import CHANGEABLE_ON_RESUME, TrainConfig, load_run_config

        old = self.resume_state.get("settings")
        if old is None:  # a checkpoint of an older version: the run's config.yaml (not yet rewritten)
            try:
                old = flatten(load_run_config(self.out).to_dict())
            except Exception:  # noqa: BLE001 - an unreadable record only means nothing to compare
                self.notes.append(f"{self.resume_from} records no settings: they are not compared")
                return None
        # resolved.* values an older checkpoint did not record are not compared
        ignore = CHANGEABLE_ON_RESUME | {k for k in settings if k.startswith("resolved.") and k not in old}
        diffs = setting_differences(old, settings, ignore, flatten(TrainConfig().to_dict()), normal_path)
        if diffs and self.config.resume != "force":
            raise StateError(f"train: {self.resume_from} is from a run with other settings ({'; '.join(diffs)}); "
                             "set resume: force to continue it with the new settings, overwrite_output_dir: true "
                             "to start over, or choose a new output_dir")
        return diffs
