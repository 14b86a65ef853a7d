"""One SymMIM / MAE micro-batch on this process's share of a fixed global batch, for
``tests/test_distributed.py``: run with one process (plain python) or two (torchrun), fp32 on CPU.

Every process builds the real training objects (``build_training``: model, EMA branch, DeepSpeed
engine) as ``symmim-pretrain`` does, takes its slice of one fixed batch and of one fixed mask per
branch, runs the forward and backward, and records the losses (averaged over ranks), the full
gradients (gathered from the ZeRO partitions), what each rank's own mask generator draws, and,
after one optimizer step and EMA update, a checksum of each rank's EMA branch. Then, for MAE
under each ZeRO stage, ``CLIP_STEPS`` steps clipped to ``CLIP``: the gradient norm each step
reports and the fp32 weights after; one process also runs them in plain PyTorch (AdamW and
``clip_grad_norm_`` on the whole batch) as the reference. Rank 0 writes it all to ``--out``.

    python tests/dist_step.py --out one.pt
    torchrun --nproc_per_node 2 tests/dist_step.py --out two.pt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from symmim.core.config import load_config
from symmim.core.distributed import all_gather, init_distributed, mean_across_ranks
from symmim.core.masking import Mask, MaskGenerator
from symmim.core.optim import param_groups
from symmim.core.pretrain_step import build_training
from symmim.core.symmim import SymMIM
from symmim.kernels.dispatch import resolve_backends

GLOBAL_BATCH = 8
VARIANTS = {
    "symmim": [],
    "random75": ["mask.strategy=random", "mask.ratio=0.75", "loss.con_weight=0"],
}
STAGES = (0, 1, 2, 3)
CLIP, CLIP_LR, CLIP_STEPS = 0.02, 1e-3, 4  # every step clips: the tiny model's gradient norm is above 1


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


def config(variant: str, stage: int, batch: int, clip: float):
    return load_config("tiny_cpu", ["train.precision=fp32", "train.device=cpu", f"ds.zero_stage={stage}",
                                    f"train.batch_size={batch}", f"optim.clip_grad={clip}", *VARIANTS[variant]])


def global_batch(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(GLOBAL_BATCH, 3, cfg.model.img_size, cfg.model.img_size, generator=g)  # [W*B, 3, S, S]


def run_variant(variant: str, stage: int, dist) -> dict:
    per_rank = GLOBAL_BATCH // dist.world
    cfg = config(variant, stage, per_rank, clip=0.0)
    torch.manual_seed(cfg.train.seed + dist.rank)  # as the launcher seeds each rank
    tr = build_training(cfg, dist)
    ENGINES.append(tr)
    own_draw = tr.masks.online(per_rank).mask  # [B, N] what this rank's generator gives
    tr.masks = SharedMasks(cfg.mask, tr.model.encoder.grid, dist.rank, per_rank)
    out = tr.forward_backward(global_batch(cfg)[tr.masks.rows])
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


def clipped_steps(stage: int, dist) -> dict:
    """MAE's real step under ZeRO ``stage``, ``CLIP_STEPS`` steps on this rank's share of the global
    batch: each step's reported gradient norm and the whole fp32 weights after."""
    per_rank = GLOBAL_BATCH // dist.world
    cfg = config("random75", stage, per_rank, clip=CLIP)
    torch.manual_seed(cfg.train.seed + dist.rank)
    tr = build_training(cfg, dist)
    ENGINES.append(tr)
    tr.masks = SharedMasks(cfg.mask, tr.model.encoder.grid, dist.rank, per_rank)
    images = global_batch(cfg)[tr.masks.rows]
    norms = [float(tr.step(images, CLIP_LR, 0.9)["grad_norm"]) for _ in range(CLIP_STEPS)]
    weights = {}
    for name, p in tr.engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3: assembled from the partitions; ZeRO-0: None
        weights[name] = (p if full is None else full).detach().clone()
    return {"norms": norms, "weights": weights}


def clipped_reference() -> dict:
    """The same steps in plain PyTorch, one process, the whole batch: AdamW after ``clip_grad_norm_``."""
    cfg = config("random75", 0, GLOBAL_BATCH, clip=CLIP)
    with torch.random.fork_rng(devices=[]):  # the initialisation build_training makes
        torch.manual_seed(cfg.train.seed)
        model = SymMIM(cfg.model, cfg.loss, resolve_backends(cfg.kernels, torch.device("cpu")))
    mask = SharedMasks(cfg.mask, model.encoder.grid, 0, GLOBAL_BATCH).online(GLOBAL_BATCH)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=CLIP_LR, betas=cfg.optim.betas)
    images, norms = global_batch(cfg), []
    for _ in range(CLIP_STEPS):
        opt.zero_grad()
        model(images, mask)["loss"].backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return {"norms": norms, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist = init_distributed("cpu")
    results = {(v, s): run_variant(v, s, dist) for v in VARIANTS for s in STAGES}
    clipped = {s: clipped_steps(s, dist) for s in STAGES}
    if dist.world == 1:
        clipped["reference"] = clipped_reference()
    if dist.is_main:
        torch.save({"world": dist.world, "results": results, "clipped": clipped}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Twelve engines in one process: leave without running their native destructors ('terminate
    # called without an active exception' aborted a rank at exit, once in about ten runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
