"""Per-step schedules, stateless: the value at a step depends on the step alone, so a
resumed run follows the same curves."""
from __future__ import annotations

import math


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
