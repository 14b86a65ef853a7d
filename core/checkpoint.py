"""Training checkpoints: DeepSpeed's engine state plus our own per-rank state.

Layout under ``run_dir/checkpoints``: one folder per tag (``step00001234``) holding the
DeepSpeed files and ``rank{r}_state.pt`` (data position, mask RNG, torch RNG of rank r);
``latest`` names the newest complete tag (DeepSpeed writes it last).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("symmim.checkpoint")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep: int) -> Path:
    """Save on every rank (collective); keep the ``keep`` newest tags."""
    rank = dist.get_rank()
    tag = step_tag(step)
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tag_dir / f"rank{rank}_state.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return tag_dir


def load_checkpoint(engine, ckpt_dir: Path) -> tuple[dict, dict] | None:
    """Restore the engine from the latest tag; ``(client_state, rank_state)`` or None."""
    if not (ckpt_dir / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint named by {ckpt_dir / 'latest'}")
    tag = (ckpt_dir / "latest").read_text().strip()
    rank_file = ckpt_dir / tag / f"rank{dist.get_rank()}_state.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file} is missing: the checkpoint was written by a different number of ranks")
    rank_state = torch.load(rank_file, weights_only=False)
    log.info("resumed from %s", ckpt_dir / tag)
    return client_state, rank_state
