"""Metric sinks: JSONL and CSV always available; TensorBoard and W&B when installed."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class MetricLogger:
    """Writes one row per logged optimizer step to each requested sink (on the main process only)."""

    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self._csv_fields: list[str] | None = None
        self._tb = self._wandb = None
        if not enabled:
            return
        self.report_to = report_to
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("report_to has 'tensorboard' but the tensorboard package is not installed "
                                   "(pip install tensorboard)") from err
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("report_to has 'wandb' but wandb is not installed (pip install wandb)") from err
            self._wandb = wandb.init(project="ncppo", config=config, dir=str(self.dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        if "jsonl" in self.report_to:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if "csv" in self.report_to:
            path = self.dir / "metrics.csv"
            if self._csv_fields is None:
                self._csv_fields = list(row)
                if path.is_file():  # resuming: keep the existing header
                    with open(path) as f:
                        self._csv_fields = next(csv.reader(f), self._csv_fields)
                else:
                    with open(path, "w", newline="") as f:
                        csv.writer(f).writerow(self._csv_fields)
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, self._csv_fields, extrasaction="ignore").writerow(row)
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we restart from (they will be logged again)."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))
        path = self.dir / "metrics.csv"
        if path.is_file():
            with open(path) as f:
                reader = list(csv.reader(f))
            keep = [reader[0]] + [r for r in reader[1:] if r and int(float(r[0])) <= step] if reader else []
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
