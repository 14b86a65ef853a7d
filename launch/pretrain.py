"""Pre-train a ViT with SymMIM (or the MAE baseline) under DeepSpeed.

    python launch/pretrain.py --config configs/tiny_cpu.yaml --output-dir runs/tiny
    deepspeed --num_gpus 8 launch/pretrain.py --config configs/vit_b16_symmim.yaml --output-dir runs/b16
    torchrun --nproc_per_node 8 launch/pretrain.py --config ... --set train.epochs=100

Writes into the run folder: ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard
events under ``tb/``, DeepSpeed checkpoints under ``checkpoints/`` and each epoch's
reconstruction picture under ``recon/``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from core.config import Config, ConfigError, load_config, save_config  # noqa: E402
from core.distributed import DistInfo, init_distributed, mean_across_ranks  # noqa: E402
from core.masking import MaskGenerator  # noqa: E402
from core.metrics import MetricsLog  # noqa: E402
from core.recon import save_recon_grid  # noqa: E402
from core.schedules import lr_at, momentum_at  # noqa: E402
from core.train_step import build_training  # noqa: E402
from data.folder import DataError  # noqa: E402
from data.loader import build_train_loader, data_root  # noqa: E402
from data.torch_loader import load_eval_images  # noqa: E402
from kernels.dispatch import BackendError  # noqa: E402

log = logging.getLogger("symmim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SymMIM pre-training")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/tiny_cpu.yaml")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


@dataclass
class Position:
    """Where training stands; saved with every checkpoint."""

    epoch: int = 0
    micro: int = 0  # micro-batches consumed in this epoch (this rank)
    step: int = 0  # optimizer steps


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True,
    )


def train(cfg: Config, run_dir: Path, resume: bool, dist_info: DistInfo) -> None:
    from tqdm import tqdm

    rank, world, device = dist_info.rank, dist_info.world, dist_info.device
    torch.manual_seed(cfg.train.seed + rank)
    tr = build_training(cfg, dist_info)
    model, momentum, masks, engine = tr.model, tr.momentum, tr.masks, tr.engine
    log.info("device %s, %d process(es); %s; precision %s", device, world, tr.backends.describe(), cfg.train.precision)
    loader = build_train_loader(cfg, rank, world, device)

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    micro_per_epoch = loader.steps_per_epoch // accum * accum
    if micro_per_epoch == 0:
        raise DataError(f"an epoch has {loader.steps_per_epoch} micro-batches per rank, fewer than train.grad_accum={accum}")
    steps_per_epoch = micro_per_epoch // accum
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    peak_lr = cfg.optim.lr or cfg.optim.base_lr * batch * accum * world / 256
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    log.info("model: %.1fM trainable parameters; peak lr %.3g, %d steps (%d per epoch), warm-up %d",
             sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, peak_lr, total_steps, steps_per_epoch, warmup)

    ckpt_dir = run_dir / "checkpoints"
    pos = Position()
    if resume:
        restored = load_checkpoint(engine, ckpt_dir)
        if restored is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        else:
            client, own = restored
            pos = Position(**client["position"])
            if momentum is not None:
                momentum.load_state_dict(client["momentum"])
            masks.load_state_dict(own["masks"])
            loader.load_state_dict(own["loader"])
            torch.set_rng_state(own["torch_rng"])

    def checkpoint() -> None:
        client = {"position": vars(pos).copy(), "momentum": momentum.state_dict() if momentum else None}
        own = {"masks": masks.state_dict(), "loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
        path = save_checkpoint(engine, ckpt_dir, pos.step, client, own, cfg.train.keep_checkpoints)
        log.info("checkpoint saved: %s", path)

    recon_images = None
    if rank == 0 and cfg.log.recon_images:
        recon_images = load_eval_images(data_root(cfg) / "val", cfg.log.recon_images, cfg.model.img_size).to(device)
        recon_masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=12345)
        (run_dir / "recon").mkdir(exist_ok=True)

    metrics = MetricsLog(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    bar = tqdm(total=total_steps, initial=pos.step, disable=rank != 0 or not cfg.log.progress, unit="step", dynamic_ncols=True)
    sums = torch.zeros(3, device=device)  # loss, loss_mim, loss_con over the logging window
    window_start, wait, window_micro = time.perf_counter(), 0.0, 0
    done = pos.step >= total_steps
    while not done and pos.epoch < cfg.train.epochs:
        engine.train()
        batches = loader.epoch(pos.epoch, pos.micro)
        while pos.micro < micro_per_epoch:
            t0 = time.perf_counter()
            images = next(batches)  # [B, 3, S, S] on device
            wait += time.perf_counter() - t0
            lr = lr_at(pos.step, total_steps, warmup, peak_lr, cfg.optim.min_lr)
            m = momentum_at(pos.step + 1, total_steps, cfg.loss.momentum, cfg.loss.momentum_end)
            out = tr.step(images, lr, m)
            sums += torch.stack([out["loss"], out["loss_mim"], out["loss_con"]]).detach().float()
            pos.micro += 1
            window_micro += 1
            if pos.micro % accum:
                continue
            pos.step += 1
            bar.update(1)
            last = pos.step >= total_steps
            if pos.step % cfg.log.every_steps == 0 or last:
                loss, mim, con = (mean_across_ranks(sums) / window_micro).tolist()
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": pos.step, "epoch": pos.epoch + pos.micro / micro_per_epoch, "loss": loss,
                    "loss_mim": mim, "loss_con": con, "lr": lr,
                    "img_per_s": window_micro * batch * world / elapsed, "data_wait_frac": wait / elapsed,
                }
                metrics.log(record)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['img_per_s']:.0f}")
                sums.zero_()
                window_start, wait, window_micro = time.perf_counter(), 0.0, 0
            if cfg.train.ckpt_every_steps and pos.step % cfg.train.ckpt_every_steps == 0 and not last:
                checkpoint()
            if last:
                done = True
                break
        if pos.micro >= micro_per_epoch:
            pos.epoch, pos.micro = pos.epoch + 1, 0
        if recon_images is not None:
            with torch.no_grad():
                mask = recon_masks.online(recon_images.shape[0])
                pred = engine.module.decoder(engine.module.encoder(recon_images, mask), mask)
            save_recon_grid(recon_images, pred, mask, cfg.model.patch_size, cfg.loss.norm_pix,
                            run_dir / "recon" / f"epoch{pos.epoch:04d}_step{pos.step:08d}.png")
        checkpoint()
    bar.close()
    metrics.close()
    log.info("done: %d steps; run folder %s", pos.step, run_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    try:
        dist_info = init_distributed(cfg.train.device)
        setup_logging(dist_info.rank)
        run_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        train(cfg, run_dir, args.resume, dist_info)
    except (DataError, BackendError, ConfigError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
