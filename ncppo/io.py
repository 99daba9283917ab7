"""Small I/O helpers shared by every writer: atomic files and directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ncppo.errors import OutputDirError


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``target``; on success it replaces ``target`` in one rename.

    A crash inside the block leaves ``target`` as it was (the scratch folder has a ``.tmp-`` name that
    no reader takes for a finished output).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(scratch, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


OUTPUT_MARKER = ".ncppo-output.json"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def guard_output_dir(out: str | Path, command: str, inputs: tuple[str | Path, ...] | list = (),
                     overwrite: bool = False) -> Path:
    """Refuse an output folder whose writing would destroy or mix up other data; return it resolved.

    Refused: ``out`` equal to, inside or around one of ``inputs``; ``out`` an existing file; ``out`` an
    existing non-empty folder that is not an earlier output of the same ``command`` (recognised by the
    marker file ``mark_output_dir`` writes), unless ``overwrite``. An empty folder is accepted.
    """
    out = Path(out).expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if _within(out, source) or _within(source, out):
            where = "is" if out == source else ("is inside" if _within(out, source) else "contains")
            raise OutputDirError(f"{command}: the output folder {out} {where} the input {source}; "
                                 "choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{command}: the output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        owner = output_owner(out)
        if owner != command:
            what = f"an output of `ncppo {owner}`" if owner else "a folder that no ncppo command wrote"
            raise OutputDirError(f"{command}: the output folder {out} exists and is {what}; "
                                 "choose a new folder, or pass --overwrite to replace it")
    return out


def output_owner(folder: str | Path) -> str | None:
    """The command recorded in ``folder``'s marker, or None (no marker or an unreadable one)."""
    try:
        return json.loads((Path(folder) / OUTPUT_MARKER).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_output_dir(folder: str | Path, command: str) -> None:
    """Record that ``folder`` is an output of ``command`` (write it inside the scratch folder)."""
    atomic_write_text(Path(folder) / OUTPUT_MARKER, json.dumps({"command": command}))
