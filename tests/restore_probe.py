"""``symmim-pretrain`` that saves its optimizer's state right after a resume, for ``tests/test_elastic.py``.

    SYMMIM_RESTORE_PROBE=OUT.pt python tests/restore_probe.py --config ... --resume [pretrain arguments]

Rank 0 writes ``base_optimizer.state_dict()`` as restored (before any step) to OUT.pt (an
environment variable: launchers put their own arguments first).
"""
from __future__ import annotations

import os
import sys

import torch

from symmim.core.loop import TrainLoop
from symmim.launch.pretrain import main

restore = TrainLoop._restore


def recorded_restore(self, tag_dir):
    restore(self, tag_dir)
    if self.dist.is_main:
        torch.save(self.trainer.base_optimizer.state_dict(), os.environ["SYMMIM_RESTORE_PROBE"])


TrainLoop._restore = recorded_restore

if __name__ == "__main__":
    sys.exit(main())
