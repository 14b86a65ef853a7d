"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step``: a crashed session may have logged steps it never saved."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(lines))


class MetricsLog:
    """Appends to ``run_dir/metrics.jsonl`` (and TensorBoard under ``run_dir/tb``); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
