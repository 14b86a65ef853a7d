"""``symmim-pretrain`` with the optimizer step and the EMA update recorded, for ``tests/test_train.py``.

    python tests/step_probe.py OUT.json --config ... [pretrain arguments]

Writes ``{"steps": [[lr, ema_momentum, stepped], ...] per micro-batch, "ema": [momentum, ...] per
EMA update}`` to OUT.json and exits with the launcher's code.
"""
from __future__ import annotations

import json
import sys

from symmim.core.pretrain_step import Training
from symmim.core.symmim import MomentumBranch
from symmim.launch.pretrain import main

record: dict[str, list] = {"steps": [], "ema": []}
optimizer_step, ema_update = Training.optimizer_step, MomentumBranch.update


def recorded_optimizer_step(self, lr, ema_momentum, timer=None):
    stepped, skipped = optimizer_step(self, lr, ema_momentum, timer)
    record["steps"].append([lr, ema_momentum, stepped])
    return stepped, skipped


def recorded_update(self, online, momentum, masters=None):
    record["ema"].append(float(momentum))  # the fast step passes a device scalar (1 where a step was skipped)
    return ema_update(self, online, momentum, masters)


Training.optimizer_step = recorded_optimizer_step
MomentumBranch.update = recorded_update

if __name__ == "__main__":
    code = main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump(record, f)
    sys.exit(code)
