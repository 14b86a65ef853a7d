"""What the pre-training step does with its numbers, on one CPU process, for ``tests/test_step_numerics.py``.

Every case builds the real training objects (``build_training``: model, EMA branch, DeepSpeed
engine) on the ``tiny_cpu`` SymMIM model with one fixed mask per branch, and writes what it saw:

- ``accum``: the fp32 gradient the fast step's optimizer holds after a round of 8 identical
  micro-batches of bf16 weights (``train.grad_accum=8``), and after one (``grad_accum=1``);
- ``rounds/<path>``: three accumulation rounds of 2 micro-batches on each path (the fast step
  under ZeRO 0 and 2, DeepSpeed's bf16 engine under ZeRO 0 and 2, its fp32 engine), the second round's first micro-batch
  NaN: per micro-batch ``stepped``, ``skipped`` and ``grad_norm``; after each round the fp32
  weights (the optimizer's masters, or the module's own), the EMA branch's parameters and
  buffers and the online buffers those mirror. The EMA momentum is 0 after the first round
  (the EMA branch then is a copy of the fp32 weights), 0.5 after the others;
- ``clip``: DeepSpeed's ZeRO-2 clipping threshold as built, and after a checkpoint's state
  (which carries its own) is loaded.

    python tests/step_numerics.py --out numerics.pt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param
from dist_step import GLOBAL_BATCH, SharedMasks

from symmim.core.config import load_config
from symmim.core.distributed import init_distributed
from symmim.core.pretrain_step import Training, build_training

PATHS = {
    "fast-zero0": ["train.precision=bf16"],
    "fast-zero2": ["train.precision=bf16", "ds.zero_stage=2"],
    "engine-bf16": ["train.precision=bf16", "train.fast_step=false"],
    "engine-bf16-zero2": ["train.precision=bf16", "train.fast_step=false", "ds.zero_stage=2"],
    "engine-fp32": ["train.precision=fp32", "train.fast_step=false"],
}
ENGINES: list = []  # kept alive to the end (see dist_step.py)


def training(dist, sets: list[str], fixed_masks: bool = True) -> Training:
    cfg = load_config("tiny_cpu", ["train.device=cpu", f"train.batch_size={GLOBAL_BATCH}", *sets])
    torch.manual_seed(cfg.train.seed)
    tr = build_training(cfg, dist)
    if fixed_masks:
        tr.masks = SharedMasks(cfg.mask, tr.model.encoder.grid, 0, GLOBAL_BATCH)
    ENGINES.append(tr)
    return tr


def images(seed: int = 7) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # [B, 3, S, S]


def fp32_weights(tr: Training) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer steps, whole, by parameter name."""
    named = [(n, p) for n, p in tr.engine.module.named_parameters() if p.requires_grad]
    if tr.fast and tr.zero_stage == 0:
        masters = tr.base_optimizer.master_of()
    elif tr.fast or tr.dtype == torch.float32:  # fp32 module weights (ZeRO 1-2 gathers them after each step)
        masters = {id(p): p for _, p in named}
    elif tr.zero_stage:  # DeepSpeed's bf16 engine under ZeRO 1-3: assembled from its partitions
        masters = {id(p): safe_get_full_fp32_param(p) for _, p in named}
    else:  # DeepSpeed's bf16 engine under ZeRO-0: its unfused optimizer's masters, group by group
        opt = tr.optimizer
        masters = {id(p): m for ps, ms in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(ps, ms)}
    return {n: masters[id(p)].detach().clone() for n, p in named}


def accumulated_gradient(dist, accum: int) -> list[torch.Tensor]:
    """The masters' gradient at the fast step's first optimizer step: ``accum`` micro-batches of the same images."""
    tr = training(dist, ["train.precision=bf16", f"train.grad_accum={accum}", "optim.clip_grad=0"])
    seen: list[torch.Tensor] = []
    tr.base_optimizer.register_step_post_hook(
        lambda opt, args, kwargs: seen.extend(m.grad.detach().clone() for m in opt.params))
    x = images()
    for _ in range(accum):
        tr.step(x, lr=1e-3, ema_momentum=0.9)
    assert seen, "the optimizer stepped"
    return seen


def rounds(dist, sets: list[str]) -> dict:
    tr = training(dist, ["train.grad_accum=2", *sets])
    bad = images(8)
    bad[0, 0, 0, 0] = float("nan")
    batches = [images(1), images(2), bad, images(3), images(4), images(5)]
    momenta = [0.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    record: dict = {"steps": [], "after": []}
    for x, m in zip(batches, momenta):
        out = tr.step(x, lr=1e-2, ema_momentum=m)
        record["steps"].append({k: None if out.get(k) is None else float(out[k]) for k in ("skipped", "grad_norm")}
                               | {"stepped": out["stepped"]})
        if out["stepped"]:
            module = tr.engine.module
            record["after"].append({
                "weights": fp32_weights(tr),
                "ema": {n: p.detach().clone() for n, p in tr.momentum.named_parameters()},
                "ema_buffers": [b.clone() for b in tr.momentum.buffers()],
                "online_buffers": [b.float().clone() for name in ("encoder", "projector")
                                   for b in getattr(module, name).buffers()]})
    return record


def clip_after_load(dist) -> dict:
    tr = training(dist, ["train.precision=bf16", "ds.zero_stage=2", "optim.clip_grad=0.5"], fixed_masks=False)
    built = tr.optimizer.clip_grad
    tr.optimizer.clip_grad = 0.0  # what DeepSpeed restores from a checkpoint saved without clipping
    tr.load_state_dict(tr.state_dict(), tr.rank_state_dict())
    return {"built": built, "loaded": tr.optimizer.clip_grad}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist = init_distributed("cpu")
    results = {"accum": {n: accumulated_gradient(dist, n) for n in (1, 8)},
               "rounds": {path: rounds(dist, sets) for path, sets in PATHS.items()},
               "clip": clip_after_load(dist)}
    torch.save(results, args.out)
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # many engines in one process: leave without their native destructors (see dist_step.py)


if __name__ == "__main__":
    main()
