"""One SymMIM / MAE micro-batch on this process's share of a fixed global batch, for
``tests/test_distributed.py``: run with one process (plain python) or two (torchrun), fp32 on CPU.

Every process builds the real training objects (``build_training``: model, EMA branch, DeepSpeed
engine) as ``symmim-pretrain`` does, takes its slice of one fixed batch and of one fixed mask per
branch, runs the forward and backward, and records the losses (averaged over ranks), the full
gradients (gathered from the ZeRO partitions), what each rank's own mask generator draws, and,
after one optimizer step and EMA update, a checksum of each rank's EMA branch. Rank 0 writes it
all to ``--out``.

    python tests/dist_step.py --out one.pt
    torchrun --nproc_per_node 2 tests/dist_step.py --out two.pt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from symmim.core.config import load_config
from symmim.core.distributed import all_gather, init_distributed, mean_across_ranks
from symmim.core.masking import Mask, MaskGenerator
from symmim.core.pretrain_step import build_training

GLOBAL_BATCH = 8
VARIANTS = {
    "symmim": [],
    "random75": ["mask.strategy=random", "mask.ratio=0.75", "loss.con_weight=0"],
}
STAGES = (0, 1, 2, 3)


class SharedMasks:
    """This rank's slice of one fixed mask per branch, drawn for the whole global batch."""

    def __init__(self, mask_cfg, grid: tuple[int, int], rank: int, per_rank: int):
        gen = MaskGenerator(mask_cfg, grid, torch.device("cpu"), seed=99)
        self.online_mask, self.momentum_mask = gen.online(GLOBAL_BATCH), gen.momentum(GLOBAL_BATCH)
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)

    def _slice(self, m: Mask) -> Mask:
        phase = None if m.phase is None else m.phase[self.rows]
        return Mask(m.ids_keep[self.rows], m.mask[self.rows], m.grid, m.cell, phase)

    def online(self, batch: int) -> Mask:
        return self._slice(self.online_mask)

    def momentum(self, batch: int) -> Mask:
        return self._slice(self.momentum_mask)


ENGINES: list = []  # kept alive to the end: a DeepSpeed engine torn down mid-run once aborted a rank


def run_variant(variant: str, stage: int, dist) -> dict:
    per_rank = GLOBAL_BATCH // dist.world
    cfg = load_config("tiny_cpu", ["train.precision=fp32", "train.device=cpu", f"ds.zero_stage={stage}",
                                   f"train.batch_size={per_rank}", "optim.clip_grad=0", *VARIANTS[variant]])
    torch.manual_seed(cfg.train.seed + dist.rank)  # as the launcher seeds each rank
    tr = build_training(cfg, dist)
    ENGINES.append(tr)
    own_draw = tr.masks.online(per_rank).mask  # [B, N] what this rank's generator gives
    tr.masks = SharedMasks(cfg.mask, tr.model.encoder.grid, dist.rank, per_rank)
    g = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, cfg.model.img_size, cfg.model.img_size, generator=g)  # [2B, 3, S, S]
    out = tr.forward_backward(images[tr.masks.rows])
    names = {id(p): n for n, p in tr.engine.module.named_parameters() if p.requires_grad}
    opt = tr.base_optimizer
    if getattr(opt, "reduce", None) == "mean":  # ZeRO-0 fast step: the optimizer averages the gradients itself
        grads = {}
        opt.register_step_post_hook(lambda o, args, kwargs: grads.update(
            {names[id(p)]: p.grad.detach().clone() for p in o.model_params}))
    else:  # DeepSpeed reduced them in the backward (ZeRO partitions them: gathered here)
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in tr.engine.module.named_parameters()
                 if id(p) in names}
    losses = mean_across_ranks(torch.stack([out["loss_mim"], out["loss_con"]]).detach())
    tr.optimizer_step(lr=1e-3, ema_momentum=0.9)
    ema = tr.momentum.state_dict().values() if tr.momentum else []
    ema_sum = torch.stack([t.double().sum() for t in ema]) if ema else torch.zeros(1, dtype=torch.float64)
    return {"loss_mim": float(losses[0]), "loss_con": float(losses[1]), "grads": grads,
            "own_masks": all_gather(own_draw), "ema_checksums": all_gather(ema_sum[None])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist = init_distributed("cpu")
    results = {(v, s): run_variant(v, s, dist) for v in VARIANTS for s in STAGES}
    if dist.is_main:
        torch.save({"world": dist.world, "results": results}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Eight engines in one process: leave without running their native destructors ('terminate
    # called without an active exception' aborted a rank at exit, once in about ten runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
