"""Per-step schedules, stateless: the value at a step depends on the step alone, so a
resumed run follows the same curves; :class:`Schedule` plans a run's steps and curves."""
from __future__ import annotations

import math
from dataclasses import dataclass

from symmim.core.config import ConfigError


def _cosine(progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    return (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return final + (peak - final) * _cosine((step - warmup_steps) / max(total_steps - warmup_steps, 1))


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum: cosine from ``start`` at step 0 to ``end`` at the last step."""
    return end - (end - start) * _cosine(step / max(total_steps, 1))


@dataclass(frozen=True)
class Schedule:
    """A run's length and curves in optimizer steps, planned from the loader's epoch length.

    An epoch is ``micro_per_epoch`` micro-batches per rank (whole accumulation rounds only);
    the lr warms up linearly, then follows a cosine to ``min_lr``; the EMA momentum follows a
    cosine from ``momentum_start`` to ``momentum_end`` (constant 1 where there is no EMA).
    """

    micro_per_epoch: int
    accum: int
    epochs: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    momentum_start: float = 1.0
    momentum_end: float = 1.0

    @classmethod
    def plan(cls, batches_per_epoch: int, accum: int, epochs: int, max_steps: int, global_batch: int,
             lr: float | None, base_lr: float, warmup_epochs: float, min_lr: float,
             momentum: tuple[float, float] = (1.0, 1.0)) -> Schedule:
        """``epochs`` of ``batches_per_epoch`` micro-batches (``max_steps`` caps the run when > 0); the
        peak lr is ``lr``, or ``base_lr * global_batch / 256`` when ``lr`` is None."""
        micro = batches_per_epoch // accum * accum
        if micro == 0:
            raise ConfigError(f"train.grad_accum: {accum} is more than the {batches_per_epoch} micro-batches an "
                              "epoch gives each rank; lower it or train.batch_size")
        steps_per_epoch = micro // accum
        total = steps_per_epoch * epochs
        if max_steps:
            total = min(total, max_steps)
        return cls(micro, accum, epochs, total, int(warmup_epochs * steps_per_epoch),
                   base_lr * global_batch / 256 if lr is None else lr, min_lr, *momentum)

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.accum

    def lr(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based)."""
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def momentum(self, step: int) -> float:
        """The EMA momentum applied after optimizer step ``step`` completes (``step`` steps done)."""
        return momentum_at(step, self.total_steps, self.momentum_start, self.momentum_end)

    def describe(self) -> str:
        return (f"peak lr {self.peak_lr:.3g}, {self.total_steps} steps ({self.steps_per_epoch} per epoch), "
                f"warm-up {self.warmup_steps}")
