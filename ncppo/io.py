"""Small I/O helpers shared by every writer: atomic files and directories, and the output-folder rule.

``atomic_directory(target)`` builds a folder in a scratch directory beside ``target`` and puts it in
place at the end. Every name it uses beside ``target`` says what the folder holds::

    .tmp-NAME-TOKEN    being written (a killed run leaves it unfinished)
    .new-NAME-TOKEN    finished, about to replace NAME
    .old-NAME-TOKEN    the previous NAME, being removed

(``TOKEN`` is 8 hex digits and the writer's process id.) The swap is one ``renameat2(RENAME_EXCHANGE)`` on
Linux, else two renames. A kill at any point leaves either the old or the new ``target`` in place, or (a
kill between the two renames of the fallback) a ``.new-`` folder that :func:`recover_atomic` renames to
``target``; the next ``atomic_directory(target)`` or ``guard_output_dir(target, ...)`` calls it, and it also
removes the leftovers of dead writers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ncppo.errors import NcppoError, OutputDirError, StateError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class DiskFullError(NcppoError, OSError):
    """No space left on the device while writing an output; the message names it and what is kept."""

    def __init__(self, path: str | Path, hint: str = ""):
        super().__init__(f"no space left on device while writing {path}{hint}")
        self.errno = errno.ENOSPC
        self.filename = str(path)

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..." form
        return str(self.args[0])


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also where a library says so only in its message (safetensors' ``SafetensorError``)."""
    if isinstance(err, NcppoError):
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


@contextlib.contextmanager
def disk_full_is_one_line(target: str | Path, kept: str) -> Iterator[None]:
    """A full disk inside the block becomes a :class:`DiskFullError` naming ``target``, what is ``kept`` and
    what to do (the command line prints it as one line, not a traceback)."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        try:
            free = f" ({shutil.disk_usage(Path(target).parent).free / 2**20:.0f} MiB free there)"
        except OSError:
            free = ""
        raise DiskFullError(target, f"{free}; {kept}: free some space and run the same command again") from err


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system cannot (then rename twice)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    # nonzero: EINVAL/ENOSYS (no support on this file system), so the caller renames twice
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _token() -> str:
    return f"{uuid.uuid4().hex[:8]}-{os.getpid()}"


def _leftover_pattern(name: str, kinds: str = "tmp|new|old") -> re.Pattern:
    return re.compile(rf"^\.({kinds})-{re.escape(name)}-[0-9a-f]{{8}}(?:-(\d+))?$")


def _alive(pid: str | None) -> bool:
    """Whether the writer that named a leftover may still be running (no pid: an old-style name, dead)."""
    if pid is None:
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_atomic(target: str | Path) -> str | None:
    """Finish or undo an interrupted :func:`atomic_directory` of ``target``; returns what it did, or None.

    If ``target`` is missing and a finished ``.new-`` (else an ``.old-``) folder of a dead writer is there,
    it becomes ``target``. Then every ``.tmp-``/``.new-``/``.old-`` leftover of ``target`` whose writer is
    dead is removed (``target`` is whole, so they hold an unfinished or a superseded state).
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return None
    pattern = _leftover_pattern(target.name)
    found: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    with os.scandir(parent) as entries:
        for entry in entries:
            match = pattern.match(entry.name)
            if match and not _alive(match.group(2)):
                found[match.group(1)].append(Path(entry.path))
    done = []
    if not target.exists() and not target.is_symlink():
        for kind in ("new", "old"):
            if found[kind]:
                newest = max(found[kind], key=lambda p: p.stat().st_mtime_ns)
                found[kind].remove(newest)
                try:
                    os.replace(newest, target)
                except FileNotFoundError:  # another process restored it first
                    break
                done.append(f"restored {target} from {newest.name}")
                break
    stale = [p for paths in found.values() for p in paths]
    for path in stale:
        _remove(path)
    if stale:
        done.append(f"removed {len(stale)} leftover(s) of interrupted writes")
    return "; ".join(done) or None


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``target``; on success it replaces ``target`` (see the module docstring).

    A crash inside the block leaves ``target`` as it was; a kill during the swap leaves the old or the
    new ``target``, or a state that the next call (or :func:`recover_atomic`) completes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_atomic(target)
    token = _token()
    scratch = target.parent / f".tmp-{target.name}-{token}"
    scratch.mkdir()
    try:
        with disk_full_is_one_line(target, f"{target} is as it was"):
            yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    ready = target.parent / f".new-{target.name}-{token}"
    os.replace(scratch, ready)  # finished: from here on a recovery puts this folder in place
    if not target.exists() and not target.is_symlink():
        os.replace(ready, target)
        return
    old = target.parent / f".old-{target.name}-{token}"
    if _exchange(ready, target):  # one step: ``target`` is new, ``ready`` holds the old folder
        os.replace(ready, old)
    else:
        os.replace(target, old)
        os.replace(ready, target)
    _remove(old)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a path (safetensors' ``save_file``,
    PIL's ``save``); on success it replaces ``path`` in one rename, on an error it is removed.

    Temporary files that killed writers left for the same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pattern = _leftover_pattern(path.name, "tmp")
    with os.scandir(path.parent) as entries:
        stale = [Path(e.path) for e in entries if (m := pattern.match(e.name)) and not _alive(m.group(2))]
    for leftover in stale:
        _remove(leftover)
    tmp = path.with_name(f".tmp-{path.name}-{_token()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace`` (:func:`atomic_file`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _same(a, b) -> bool:
    """Equal as settings: 1 and 1.0 are one number, two NaNs are one value (YAML reads ``.nan``)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def setting_differences(old: dict, new: dict, ignore: Iterable[str] = (), defaults: dict | None = None,
                        normal: Callable[[str, object], object] | None = None) -> list[str]:
    """``key: old -> new`` for each key of the flat mapping ``new`` whose value differs from ``old``'s: the
    "settings changed?" rule of everything that resumes into an existing output (a training run, a cache).

    Keys in ``ignore`` may change; a key ``old`` lacks (written by an older version) is compared with its
    value in ``defaults``; ``normal(key, value)`` maps values before the comparison (e.g. paths to absolute).
    """
    ignore, defaults = set(ignore), defaults or {}
    normal = normal or (lambda _key, value: value)
    diffs = []
    for key in sorted(new):
        if key in ignore:
            continue
        before = old.get(key, defaults.get(key))
        if not _same(normal(key, before), normal(key, new[key])):
            diffs.append(f"{key}: {before!r} -> {new[key]!r}")
    return diffs


OUTPUT_MARKER = ".ncppo-output.json"


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def guard_output_dir(out: str | Path, command: str, inputs: tuple[str | Path, ...] | list = (),
                     overwrite: bool = False) -> Path:
    """Refuse an output folder whose writing would destroy or mix up other data; return it resolved.

    Refused: ``out`` equal to, inside or around one of ``inputs``; ``out`` an existing file; ``out`` an
    existing non-empty folder that is not an earlier output of the same ``command`` (recognised by the
    marker file ``mark_output_dir`` writes), unless ``overwrite``. An empty folder is accepted. An
    interrupted atomic write of ``out`` is completed first (:func:`recover_atomic`), so the check sees it.
    """
    out = Path(out).expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if _within(out, source) or _within(source, out):
            where = "is" if out == source else ("is inside" if _within(out, source) else "contains")
            raise OutputDirError(f"{command}: the output folder {out} {where} the input {source}; "
                                 "choose an output folder outside it")
    recover_atomic(out)
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


def unmarked_output(folder: str | Path, record: str, keys: Iterable[str], allowed: Callable[[str], bool]) -> bool:
    """Whether ``folder`` is an output written before outputs were marked: it holds no marker, ``record`` is a
    JSON object with ``keys``, and every name in it passes ``allowed`` (the command's own files)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / record).read_text())
        names = {p.name for p in folder.iterdir()}
    except (OSError, ValueError):
        return False
    return (OUTPUT_MARKER not in names and isinstance(data, dict) and set(keys) <= set(data)
            and all(allowed(n) for n in names))


def mark_output_dir(folder: str | Path, command: str) -> None:
    """Record that ``folder`` is an output of ``command`` (write it inside the scratch folder)."""
    atomic_write_text(Path(folder) / OUTPUT_MARKER, json.dumps({"command": command}))


def open_output_dir(out: str | Path, command: str, inputs: tuple[str | Path, ...] | list = (),
                    overwrite: bool = False, adopt: bool = False) -> Path:
    """An output folder written in place and resumed by its own command (``generate``, ``curve``): checked by
    :func:`guard_output_dir` (``adopt``: accept it as this command's, e.g. an output from before markers),
    removed first when ``overwrite``, then created and marked. Returns it resolved."""
    resolved = guard_output_dir(out, command, inputs=inputs, overwrite=overwrite or adopt)
    if overwrite:
        clear_output_dir(resolved)
    resolved.mkdir(parents=True, exist_ok=True)
    mark_output_dir(resolved, command)
    return resolved


def clear_output_dir(folder: str | Path) -> None:
    """Remove ``folder`` (for ``--overwrite`` of a folder that is written in place): renamed aside first, so
    a kill during the removal leaves no half-deleted folder under the output's name."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    aside = folder.parent / f".old-{folder.name}-{_token()}"
    os.replace(folder, aside)
    _remove(aside)


def read_json_object(path: str | Path, remedy: str = "") -> dict:
    """The JSON object in ``path``; a damaged file or another kind of JSON is a :class:`StateError` naming it
    (with ``remedy``, what to do, appended)."""
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise StateError(f"{path} is damaged ({err}){tail}") from err
    if not isinstance(data, dict):
        raise StateError(f"{path} is not the file ncppo wrote there (not a JSON object){tail}")
    return data
