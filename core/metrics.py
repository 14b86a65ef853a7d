"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from symmim.core.checkpoint import write_atomic

log = logging.getLogger("symmim")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step``, which a crashed session may have logged without saving them, and
    a line it left half-written."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s: dropping line %d, cut short by a crash: %.80s", path, number, line)
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))  # a kill while rewriting keeps the history


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
