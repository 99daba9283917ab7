"""Metric sinks: JSONL and CSV files (:class:`MetricLogger`); TensorBoard and W&B through accelerate's
trackers (``report_to``; the packages are the extras ``ncppo[tensorboard]`` and ``ncppo[wandb]``, checked
by :func:`check_tracker_packages` before a run starts), which also get the validation images
(:func:`log_images`).

Rows are appended, one per logged optimizer step. On resume :meth:`MetricLogger.truncate_after` drops
the rows after the checkpoint (they are logged again) by rewriting each file through a temporary file
and a rename, so a kill during the rewrite leaves the old file whole. A torn last line (a kill in the
middle of an append) is dropped; a damaged line anywhere else is an error that names the file and line.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

from ncppo.errors import MissingDependencyError, StateError
from ncppo.io import atomic_write_text

# report_to names served by accelerate's trackers: the packages that provide each (any one of them)
ACCELERATE_TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
        return False


def check_tracker_packages(names: list[str]) -> None:
    """A :class:`MissingDependencyError` (one line, with the extra to install) for the first tracker in
    ``names`` whose package is not installed."""
    for name in names:
        packages = ACCELERATE_TRACKERS.get(name, ())
        if packages and not any(_installed(p) for p in packages):
            raise MissingDependencyError(packages[0], f"report_to: {name}", extra=name)


def log_images(trackers, tag: str, images, captions: list[str], step: int) -> None:
    """Images ``(N, H, W, 3)`` uint8 with their captions (the prompts) to each accelerate tracker: W&B as
    captioned ``wandb.Image``s under ``tag``; TensorBoard and any other tracker with ``log_images`` as
    ``{"TAG/00": ...}`` (one image each) plus the text ``TAG/prompts`` (``00: prompt`` lines)."""
    text = "  \n".join(f"{i:02d}: {c}" for i, c in enumerate(captions))  # markdown line breaks (TensorBoard)
    for tracker in trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
        elif tracker.name == "tensorboard":
            tracker.log_images({f"{tag}/{i:02d}": images[i:i + 1] for i in range(len(images))}, step=step,
                               dataformats="NHWC")
            tracker.log({f"{tag}/prompts": text}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({f"{tag}/{i:02d}": [images[i]] for i in range(len(images))}, step=step)
            tracker.log({f"{tag}/prompts": text}, step=step)


class MetricLogger:
    """Writes one row per logged optimizer step to ``metrics.jsonl`` / ``metrics.csv`` as ``report_to`` asks
    (on the main process only; the trackers get the rows through accelerate).

    ``rows`` holds the run's logged rows (those of the resumed part too, read back from ``metrics.jsonl``)
    for the run summary.
    """

    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self._csv_fields: list[str] | None = None
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.report_to = report_to

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.rows.append(row)
        if "jsonl" in self.report_to:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if "csv" in self.report_to:
            self._log_csv(row)

    def _log_csv(self, row: dict) -> None:
        path = self.dir / "metrics.csv"
        if self._csv_fields is None:
            self._csv_fields = list(row)
            if path.is_file() and path.stat().st_size:  # resuming: keep the existing header
                with open(path, newline="") as f:
                    self._csv_fields = next(csv.reader(f), None) or self._csv_fields
            else:
                atomic_write_text(path, _csv_text([self._csv_fields]))
        new = [k for k in row if k not in self._csv_fields]
        if new:  # a metric that earlier rows did not have (e.g. the first row was a skipped step): new header
            header, rows = _read_csv(path)
            self._csv_fields = (header or []) + [k for k in new if k not in (header or [])]
            atomic_write_text(path, _csv_text([self._csv_fields, *rows]))
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, self._csv_fields, extrasaction="ignore").writerow(row)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we restart from (they will be logged again)."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        if path.is_file():
            rows = [r for r in self._read_jsonl(path) if r["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            self.rows = rows
        path = self.dir / "metrics.csv"
        if path.is_file():
            header, rows = _read_csv(path, self.notes)
            if header is None:  # empty (the header of a fresh file is written with the first row)
                path.unlink()
            else:
                atomic_write_text(path, _csv_text([header, *(r for r in rows if _csv_step(r, path) <= step)]))

    def _read_jsonl(self, path: Path) -> list[dict]:
        text = path.read_text()
        lines = text.splitlines()
        rows = []
        if lines and not text.endswith("\n"):  # torn by a kill in the middle of an append (never checkpointed)
            lines.pop()
            self.notes.append(f"{path}: dropped a torn last line (line {len(lines) + 1}: a kill while it was written)")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("no integer 'step'")
            except ValueError as err:
                raise StateError(f"{path}: line {n} is not a metrics row ({err}); repair or delete that line "
                                 "(or the file) to resume") from err
            rows.append(row)
        return rows

    def close(self) -> None:
        """Nothing to close (each row is appended and closed); kept for callers."""


def _csv_text(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _csv_step(row: list[str], path: Path) -> float:
    try:
        return float(row[0])
    except (ValueError, IndexError) as err:
        raise StateError(f"{path}: a row has no step ({row[:3]}...); repair or delete the file to resume") from err


def _read_csv(path: Path, notes: list[str] | None = None) -> tuple[list[str] | None, list[list[str]]]:
    """Header and rows; a torn last row (a kill mid-append) is dropped, a bad header is an error naming the file."""
    text = path.read_text()
    reader = [r for r in csv.reader(io.StringIO(text))]
    if not reader:
        return None, []
    header, rows = reader[0], [r for r in reader[1:] if r]
    if not header or header[0] != "step":
        raise StateError(f"{path}: the first line is not the header (step, ...); delete the file to resume "
                         "(metrics.jsonl holds the same rows)")
    if rows and not text.endswith("\n"):  # torn by a kill in the middle of an append (never checkpointed)
        rows.pop()
        if notes is not None:
            notes.append(f"{path}: dropped a torn last row (a kill while it was written)")
    return header, rows

