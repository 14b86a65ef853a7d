"""Pre-train a ViT with SymMIM (or the MAE baseline) under DeepSpeed.

    symmim-pretrain --config configs/tiny_cpu.yaml --output-dir runs/tiny
    deepspeed --num_gpus 8 --module symmim.launch.pretrain --config configs/vit_b16_symmim.yaml --output-dir runs/b16
    torchrun --nproc_per_node 8 -m symmim.launch.pretrain --config ... --set train.epochs=100

Writes into the run folder: ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard events
under ``tb/``, DeepSpeed checkpoints under ``checkpoints/`` and each epoch's reconstruction
picture under ``recon/``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from symmim.core.checkpoint import step_of
from symmim.core.config import Config
from symmim.core.distributed import DistInfo
from symmim.core.flops import train_flops_per_image
from symmim.core.knn import knn_accuracy
from symmim.core.loop import Evaluation, TrainLoop
from symmim.core.masking import MaskGenerator
from symmim.core.pretrain_step import Training, architecture, build_training
from symmim.core.recon import ReconPictures
from symmim.core.schedules import Schedule
from symmim.data.loader import build_train_loader, data_root
from symmim.data.torch_loader import load_eval_images
from symmim.launch.common import RunFolder, explain_resume, launch, run_parser

log = logging.getLogger("symmim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return run_parser("SymMIM pre-training", "configs/tiny_cpu.yaml").parse_args(argv)


def recon_pictures(cfg: Config, tr: Training, run_dir: Path, dist: DistInfo) -> ReconPictures | None:
    """Rank 0's epoch-end reconstruction pictures of ``log.recon_images`` val images (None: off)."""
    if not dist.is_main or not cfg.log.recon_images:
        return None
    images = load_eval_images(data_root(cfg.data) / "val", cfg.log.recon_images, cfg.model.img_size)  # [n, 3, S, S]
    masks = MaskGenerator(cfg.mask, tr.model.encoder.grid, dist.device, seed=12345)
    return ReconPictures(images.to(dist.device), masks, tr.predict, cfg.model.patch_size, cfg.loss.norm_pix,
                         run_dir / "recon")


def plan(cfg: Config, batches_per_epoch: int, world: int) -> Schedule:
    """The run's steps, lr and EMA-momentum curves."""
    t, o = cfg.train, cfg.optim
    return Schedule.plan(batches_per_epoch, t.grad_accum, t.epochs, t.max_steps, t.batch_size * t.grad_accum * world,
                         o.lr, o.base_lr, o.warmup_epochs, o.min_lr, momentum=(cfg.loss.momentum, cfg.loss.momentum_end))


def train(cfg: Config, folder: RunFolder, dist: DistInfo) -> None:
    t = cfg.train
    if cfg.data.key_view != "same" and cfg.loss.con_weight == 0:
        log.warning("data.key_view=%s: no momentum branch takes it (loss.con_weight=0); the loader makes one view",
                    cfg.data.key_view)
        cfg.data.key_view = "same"
    # The data set and the checkpoint to resume are checked before anything is written or built.
    loader = build_train_loader(cfg.data, cfg.model.img_size, t.batch_size, t.seed, dist.rank, dist.world, dist.device)
    folder.check_shared(dist)
    resume_from = folder.resumable(architecture(cfg), cfg, dist.world)
    folder.accept(cfg, dist)
    torch.manual_seed(t.seed + dist.rank)
    tr = build_training(cfg, dist)
    log.info("device %s, %d process(es); %s; precision %s; %s", dist.device, dist.world, tr.backends.describe(),
             t.precision, tr.describe())
    schedule = plan(cfg, loader.steps_per_epoch, dist.world)
    flops = train_flops_per_image(cfg)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in tr.model.parameters() if p.requires_grad)  # ZeRO-3: full size
    log.info("model: %.1fM trainable parameters, %.1f GFLOP per image per step; %s",
             params / 1e6, flops / 1e9, schedule.describe())
    if resume_from is not None:
        explain_resume(folder.previous, cfg, lambda c: plan(c, loader.steps_per_epoch, dist.world), step_of(resume_from))
    knn = None
    if cfg.eval.knn_every_epochs:
        knn = Evaluation(lambda: knn_accuracy(tr.encoder, cfg.eval, cfg.data, cfg.model.img_size, dist),
                         cfg.eval.knn_every_epochs)
    loop = TrainLoop(tr, loader, schedule, folder.path, dist, t, cfg.log, architecture(cfg), evaluation=knn,
                     epoch_end=recon_pictures(cfg, tr, folder.path, dist), flops_per_image=flops)
    loop.run(resume_from)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return launch(args, train)


if __name__ == "__main__":
    sys.exit(main())
