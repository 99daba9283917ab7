"""Training checkpoints, written atomically through accelerate's ``save_state`` / ``load_state``.

``checkpoints/step-000120/`` holds what accelerate writes (``optimizer.bin``, ``scheduler.bin``,
``random_states_<rank>.pkl``, ``scaler.pt`` under fp16; under DeepSpeed or FSDP their sharded forms, which
is why the optimiser goes through accelerate), and, from the save hook :func:`register_hooks` installs
in place of accelerate's full model weights, ``trainable.safetensors`` (the LoRA's or the full U-Net's
trained tensors, not the frozen base) and for a LoRA run ``pytorch_lora_weights.safetensors``: the same
LoRA in diffusers' format, so the checkpoint folder is a LoRA that ``pipe.load_lora_weights`` and
``ncppo generate --lora`` load. ``state.json`` (step, training seconds, counters, the run's settings) is
written last. The folder is written in a scratch folder and renamed (:func:`ncppo.io.atomic_directory`),
so a kill during a save leaves the previous checkpoint whole; a folder counts as a checkpoint only when
:data:`FILES` are there. This module is the one reader of the format (:func:`read_state`,
:func:`load_trainable`). The newest ``keep_last`` are kept:
an older one is renamed to ``.trash-step-...`` before it is deleted, so a kill during the deletion
leaves no half-deleted ``step-`` folder; :func:`clean_leftovers` removes such remains at the next start.
Randomness needs no saved state: every micro-step's noise, prompt dropout and data order derive from
(seed, step), so resuming replays them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from pathlib import Path

import torch

from ncppo.errors import NcppoError, StateError
from ncppo.io import DiskFullError, atomic_directory, is_disk_full, recover_atomic
from ncppo.training.sharding import copy_into, full_tensor

PREFIX = "step-"
TRAINABLE, STATE = "trainable.safetensors", "state.json"
FILES = (TRAINABLE, STATE)  # what makes a checkpoint complete (state.json is written last)
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's checkpoint is also a diffusers-format LoRA
TRASH = ".trash-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_ATOMIC_LEFTOVER = re.compile(rf"^\.(?:tmp|new|old)-({PREFIX}\d+)-")
_NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write is taken for a full disk


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


def _disk_full(err: BaseException) -> bool:
    # torch's zip writer reports a short write to a path only as "unexpected pos ..." / "file write failed"
    return is_disk_full(err) or (isinstance(err, RuntimeError)
                                 and ("unexpected pos" in str(err) or "file write failed" in str(err)))


def _write(final: Path, write) -> None:
    """Run ``write()``; a full disk becomes one line naming ``final`` (the checkpoint or its file)."""
    try:
        write()
    except NcppoError:
        raise
    except Exception as err:  # torch's zip writer and safetensors hide ENOSPC in a RuntimeError
        try:
            free = shutil.disk_usage(final.parent.parent).free
        except OSError:
            free = None
        if _disk_full(err) or (free is not None and free < _NEARLY_FULL):
            raise DiskFullError(final, f" ({(free or 0) / 2**20:.0f} MiB free there); the previous checkpoint is "
                                       "intact: free some space (or lower keep_last_checkpoints) and run the same "
                                       "command again to resume") from err
        raise


def register_hooks(accelerator, model, restore) -> None:
    """accelerate's save/load hooks: a checkpoint holds the trained tensors (and the LoRA in diffusers'
    format) instead of the whole U-Net; ``restore(folder)`` puts a checkpoint's tensors into the model."""
    from safetensors.torch import save_file

    def save_hook(models, weights, output_dir):
        weights.clear()  # not the frozen base: only what is trained
        main = accelerator.is_main_process
        tensors = {}
        for name, param in model.trainable_state().items():
            whole = full_tensor(param.detach())  # under FSDP a gather every process joins
            if main:
                tensors[name] = whole.to("cpu").contiguous()
        if main:
            folder = Path(output_dir)
            save_file(tensors, str(folder / TRAINABLE))
            if model.lora is not None:
                model.write_lora(folder)

    def load_hook(models, input_dir):
        models.clear()  # the tensors come from trainable.safetensors
        restore(Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _shared(accelerator, value):
    """The main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def save_checkpoint(accelerator, output_dir, step: int, state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/step-N/`` atomically on every process (see the module docstring; the hooks of
    :func:`register_hooks` must be installed) and prune the old ones."""
    target = Path(output_dir) / "checkpoints" / f"{PREFIX}{step:06d}"
    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(atomic_directory(target)) if main else None
        scratch = Path(_shared(accelerator, str(scratch) if main else None))
        _write(target, lambda: accelerator.save_state(str(scratch), safe_serialization=True))
        accelerator.wait_for_everyone()
        if main:
            text = json.dumps({**state, "step": step}, indent=2)
            _write(target / STATE, lambda: (scratch / STATE).write_text(text))  # last: the checkpoint is complete
    if main:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return target


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (a damaged one is named)."""
    from ncppo.io import read_json_object

    try:
        return read_json_object(path / STATE, f"delete the checkpoint folder {path} to resume from the one before it")
    except OSError as err:
        raise StateError(f"{path / STATE} cannot be read ({err}); delete the checkpoint folder {path} "
                         "to resume from the one before it") from err


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors (by parameter name)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / TRAINABLE))


def restore_trainable(path: Path, model, context: str = "", command: str = "train") -> None:
    """Copy a checkpoint's tensors into ``model``'s trained parameters; names and shapes must match
    (``context`` is added to the message, e.g. the settings that changed)."""
    trainable = load_trainable(path)
    own = model.trainable_state()
    if set(trainable) != set(own):
        raise StateError(f"{command}: {path} does not match this model's trainable parameters"
                         f"{context or ' (other model or LoRA settings?)'}")
    mismatched = [n for n, t in trainable.items() if tuple(t.shape) != tuple(own[n].shape)]
    if mismatched:
        name = mismatched[0]
        raise StateError(f"{command}: {path} holds {name} with shape {tuple(trainable[name].shape)}, "
                         f"this model's is {tuple(own[name].shape)}{context}")
    for name, tensor in trainable.items():
        copy_into(own[name], tensor)  # under FSDP: this process's shard of it
