"""Training checkpoints: trainable weights, optimizer, LR scheduler and counters, written atomically.

``checkpoints/step-000120/`` holds ``trainable.safetensors`` (LoRA or the full U-Net's trainable
tensors, not the frozen base), ``optimizer.pt``, ``scheduler.pt`` and ``state.json`` (step, micro-step,
training seconds, the run's settings), written last; a LoRA run's checkpoint also holds
``pytorch_lora_weights.safetensors``, the same LoRA in diffusers' format, so the checkpoint folder is a
LoRA that ``pipe.load_lora_weights`` and ``ncppo generate --lora`` load (resume reads
``trainable.safetensors``: the same tensors). It is written in a scratch folder and renamed
(:func:`ncppo.io.atomic_directory`), so a kill during a save leaves the previous checkpoint whole; a
folder counts as a checkpoint only when all four files are there. The newest ``keep_last`` are kept:
an older one is renamed to ``.trash-step-...`` before it is deleted, so a kill during the deletion
leaves no half-deleted ``step-`` folder; :func:`clean_leftovers` removes such remains at the next start.
Randomness needs no saved state: every micro-step's noise, prompt dropout and data order derive from
(seed, step), so resuming replays them.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import uuid
from pathlib import Path

import torch

from ncppo.errors import NcppoError, StateError
from ncppo.io import atomic_directory, recover_atomic

PREFIX = "step-"
FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's checkpoint is also a diffusers-format LoRA
TRASH = ".trash-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_ATOMIC_LEFTOVER = re.compile(rf"^\.(?:tmp|new|old)-({PREFIX}\d+)-")
_NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write is taken for a full disk


class DiskFullError(NcppoError, OSError):
    """No space left on the device while writing a file of the run; the message names the file."""

    def __init__(self, path: str | Path, hint: str = ""):
        super().__init__(f"no space left on device while writing {path}{hint}")
        self.errno = errno.ENOSPC
        self.filename = str(path)

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..." form
        return str(self.args[0])


def is_complete(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and path.is_dir() and all((path / f).is_file() for f in FILES)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (scratch, trash and half-deleted folders are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_checkpoint(path: Path) -> None:
    """Rename to a trash name first (one step: no longer a checkpoint), then delete."""
    trash = path.parent / f"{TRASH}{path.name}-{uuid.uuid4().hex[:8]}"
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(output_dir: str | Path) -> list[str]:
    """Finish or remove what killed runs left in ``checkpoints/`` (call it holding the run's lock).

    Interrupted saves are completed or undone (:func:`ncppo.io.recover_atomic`), trash folders of an
    interrupted prune are deleted, and ``step-`` folders that are not complete are removed. Returns what
    was done, for the log.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = []
    for name in sorted({m.group(1) for p in root.iterdir() if (m := _ATOMIC_LEFTOVER.match(p.name))}):
        if (what := recover_atomic(root / name)) is not None:
            done.append(what)
    for path in sorted(root.iterdir()):
        if path.name.startswith(TRASH):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name} (a prune that was interrupted)")
        elif _NAME.match(path.name) and not is_complete(path):
            missing = [f for f in FILES if not (path / f).exists()]
            remove_checkpoint(path)
            done.append(f"removed the incomplete checkpoint {path.name}" + (f" (missing {', '.join(missing)})"
                                                                             if missing else ""))
    return done


def _write(final: Path, write) -> None:
    """Run ``write()``; a full disk becomes one line naming ``final`` (the file's place in the checkpoint)."""
    try:
        write()
    except NcppoError:
        raise
    except Exception as err:  # torch's zip writer and safetensors hide ENOSPC in a RuntimeError
        enospc = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        try:
            free = shutil.disk_usage(final.parent.parent).free
        except OSError:
            free = None
        if enospc or (free is not None and free < _NEARLY_FULL):
            raise DiskFullError(final, f" ({(free or 0) / 2**20:.0f} MiB free there); the previous checkpoint is "
                                       "intact: free some space (or lower keep_last_checkpoints) and run the same "
                                       "command again to resume") from err
        raise


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:  # through a Python file: a full disk raises OSError(ENOSPC), not a zip error
        torch.save(obj, f)


def save_checkpoint(output_dir, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep_last: int, write_lora=None) -> Path:
    """Write ``checkpoints/step-N/`` atomically (see the module docstring) and prune the old ones.

    ``write_lora(folder)``, when given, writes the LoRA in diffusers' format (:data:`LORA_FILE`) into the
    checkpoint, so the checkpoint is also a LoRA (``pipe.load_lora_weights(checkpoint)``).
    """
    from safetensors.torch import save_file

    target = Path(output_dir) / "checkpoints" / f"{PREFIX}{step:06d}"
    with atomic_directory(target) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
        _write(target / FILES[0], lambda: save_file(tensors, str(tmp / FILES[0])))
        _write(target / FILES[1], lambda: _torch_save(optimizer.state_dict(), tmp / FILES[1]))
        _write(target / FILES[2], lambda: _torch_save(scheduler.state_dict(), tmp / FILES[2]))
        if write_lora is not None:
            _write(target / LORA_FILE, lambda: write_lora(tmp))
        text = json.dumps({**state, "step": step}, indent=2)
        _write(target / FILES[3], lambda: (tmp / FILES[3]).write_text(text))  # last: the checkpoint is complete
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        remove_checkpoint(old)
    return target


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (a damaged one is named)."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise StateError(f"{path / 'state.json'} cannot be read ({err}); delete the checkpoint folder {path} "
                         "to resume from the one before it") from err


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / FILES[0]))


def load_optimizer_state(path: Path, optimizer, scheduler) -> None:
    """Restore the optimizer and the scheduler in place."""
    optimizer.load_state_dict(torch.load(path / FILES[1], weights_only=True))
    scheduler.load_state_dict(torch.load(path / FILES[2], weights_only=True))


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer and scheduler in place; return the trainable tensors and the counters."""
    trainable = load_trainable(path)
    load_optimizer_state(path, optimizer, scheduler)
    return trainable, read_state(path)
