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
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from core.checkpoint import save_checkpoint  # noqa: E402
from core.config import Config  # noqa: E402
from core.distributed import DistInfo, mean_across_ranks  # noqa: E402
from core.masking import MaskGenerator  # noqa: E402
from core.metrics import MetricsLog  # noqa: E402
from core.recon import save_recon_grid  # noqa: E402
from core.schedules import lr_at, momentum_at  # noqa: E402
from core.flops import peak_flops, train_flops_per_image  # noqa: E402
from core.train_step import architecture, build_training  # noqa: E402
from data.folder import DataError  # noqa: E402
from data.loader import build_train_loader, data_root  # noqa: E402
from data.torch_loader import load_eval_images  # noqa: E402
from launch.common import Position, TrainingError, launch, resume, run_parser  # noqa: E402

log = logging.getLogger("symmim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return run_parser("SymMIM pre-training", "configs/tiny_cpu.yaml").parse_args(argv)


class StopRequest:
    """SIGTERM / SIGINT set a flag; training finishes its step, checkpoints and exits 0."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def train(cfg: Config, run_dir: Path, resume_run: bool, dist_info: DistInfo) -> None:
    from tqdm import tqdm

    rank, world, device = dist_info.rank, dist_info.world, dist_info.device
    stop = StopRequest()
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
    flops = train_flops_per_image(cfg)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3: full size
    log.info("model: %.1fM trainable parameters, %.1f GFLOP per image per step; peak lr %.3g, %d steps (%d per epoch), warm-up %d",
             params / 1e6, flops / 1e9, peak_lr, total_steps, steps_per_epoch, warmup)

    ckpt_dir = run_dir / "checkpoints"
    arch = architecture(cfg)
    pos = Position()
    restored = resume(engine, run_dir, arch, rank) if resume_run else None
    if restored:
        pos, client, own = restored
        if momentum is not None:
            momentum.load_state_dict(client["momentum"])
        masks.load_state_dict(own["masks"])
        loader.load_state_dict(own["loader"])

    def checkpoint(directory: Path = ckpt_dir) -> Path:
        client = {"position": vars(pos).copy(), "momentum": momentum.state_dict() if momentum else None}
        own = {"masks": masks.state_dict(), "loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
        path = save_checkpoint(engine, directory, pos.step, client, own, arch, cfg.train.keep_checkpoints)
        log.info("checkpoint saved: %s", path)
        return path

    def evaluate_knn() -> float:
        """Log kNN accuracy of the current encoder; returns the seconds it took."""
        from core.knn import knn_accuracy

        t0 = time.perf_counter()
        accuracy = knn_accuracy(engine.module.encoder, cfg, dist_info)
        metrics.log({"step": pos.step, "epoch": pos.epoch + pos.micro / micro_per_epoch, "wall_s": pos.wall_s, **accuracy})
        log.info("step %d kNN: %s", pos.step, ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        return time.perf_counter() - t0

    recon_images = None
    if rank == 0 and cfg.log.recon_images:
        recon_images = load_eval_images(data_root(cfg) / "val", cfg.log.recon_images, cfg.model.img_size).to(device)
        recon_masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=12345)
        (run_dir / "recon").mkdir(exist_ok=True)

    metrics = MetricsLog(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    bar = tqdm(total=total_steps, initial=pos.step, disable=rank != 0 or not cfg.log.progress, unit="step", dynamic_ncols=True)
    sums = torch.zeros(3, device=device)  # loss, loss_mim, loss_con over the logging window
    window_start, wait, window_micro, skipped, nonfinite_run = time.perf_counter(), 0.0, 0, 0, 0
    session_start, wall_at_start, last_ckpt_time = time.perf_counter(), pos.wall_s, time.perf_counter()
    done = pos.step >= total_steps
    while not done and pos.epoch < cfg.train.epochs:
        engine.train()
        batches = loader.epoch(pos.epoch, pos.micro, micro_per_epoch)
        while pos.micro < micro_per_epoch:
            t0 = time.perf_counter()
            images = next(batches)  # [B, 3, S, S] on device
            wait += time.perf_counter() - t0
            lr = lr_at(pos.step, total_steps, warmup, peak_lr, cfg.optim.min_lr)
            m = momentum_at(pos.step + 1, total_steps, cfg.loss.momentum, cfg.loss.momentum_end)
            out = tr.step(images, lr, m)
            pos.micro += 1
            if out["skipped"]:
                skipped += 1
                nonfinite_run += 1
                log.warning("non-finite loss at step %d (epoch %d, micro-batch %d): step skipped", pos.step, pos.epoch, pos.micro)
                if nonfinite_run >= cfg.train.max_nonfinite:
                    path = checkpoint(run_dir / "debug")
                    raise TrainingError(f"loss non-finite for {nonfinite_run} micro-batches in a row, last at step "
                                        f"{pos.step}; debug checkpoint: {path}")
                continue
            nonfinite_run = 0
            sums += torch.stack([out["loss"], out["loss_mim"], out["loss_con"]]).detach().float()
            window_micro += 1
            if not out["stepped"]:
                continue
            pos.step += 1
            pos.wall_s = wall_at_start + time.perf_counter() - session_start
            bar.update(1)
            last = pos.step >= total_steps
            if pos.step % cfg.log.every_steps == 0 or last:
                loss, mim, con = (mean_across_ranks(sums) / max(window_micro, 1)).tolist()
                elapsed = time.perf_counter() - window_start
                img_per_s = window_micro * batch * world / elapsed
                record = {
                    "step": pos.step, "epoch": pos.epoch + pos.micro / micro_per_epoch, "loss": loss,
                    "loss_mim": mim, "loss_con": con, "lr": lr, "img_per_s": img_per_s,
                    "data_wait_frac": wait / elapsed, "nonfinite_skipped": skipped, "wall_s": pos.wall_s,
                }
                if peak:
                    record["mfu"] = flops * img_per_s / world / peak
                metrics.log(record)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}")
                sums.zero_()
                window_start, wait, window_micro, skipped = time.perf_counter(), 0.0, 0, 0
            # Every rank must agree on stopping or checkpointing: rank 0's clocks decide, any signal counts.
            flags = torch.tensor([
                stop.signal is not None,
                cfg.train.time_limit_min > 0 and pos.wall_s - wall_at_start >= cfg.train.time_limit_min * 60,
                cfg.train.ckpt_every_min > 0 and time.perf_counter() - last_ckpt_time >= cfg.train.ckpt_every_min * 60,
            ], dtype=torch.float32, device=device)
            if world > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signalled, out_of_time, ckpt_due = flags.bool().tolist()
            if signalled or out_of_time:
                if out_of_time and cfg.eval.knn_every_epochs:
                    evaluate_knn()  # a budgeted run ends with an accuracy point
                path = checkpoint()
                reason = f"received {stop.signal or 'a stop signal on another rank'}" if signalled else \
                    f"time limit of {cfg.train.time_limit_min} min reached"
                log.info("%s: stopped at step %d, checkpoint %s; continue with --resume", reason, pos.step, path)
                bar.close()
                metrics.close()
                return
            if (cfg.train.ckpt_every_steps and pos.step % cfg.train.ckpt_every_steps == 0 and not last) or ckpt_due:
                checkpoint()
                last_ckpt_time = time.perf_counter()
            if last:
                done = True
                break
        if pos.micro >= micro_per_epoch:
            pos.epoch, pos.micro = pos.epoch + 1, 0
            if cfg.eval.knn_every_epochs and pos.epoch % cfg.eval.knn_every_epochs == 0:
                session_start += evaluate_knn()  # wall_s counts training, not evaluation
        if recon_images is not None:
            with torch.no_grad():
                mask = recon_masks.online(recon_images.shape[0])
                pred = engine.module.decoder(engine.module.encoder(recon_images, mask), mask)
            save_recon_grid(recon_images, pred, mask, cfg.model.patch_size, cfg.loss.norm_pix,
                            run_dir / "recon" / f"epoch{pos.epoch:04d}_step{pos.step:08d}.png")
        checkpoint()
        last_ckpt_time = time.perf_counter()
    bar.close()
    metrics.close()
    log.info("done: %d steps; run folder %s", pos.step, run_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return launch(args, lambda cfg, run_dir, dist_info: train(cfg, run_dir, args.resume, dist_info))


if __name__ == "__main__":
    sys.exit(main())
