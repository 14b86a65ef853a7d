"""Fine-tune a pre-trained encoder end to end (MAE recipe); ``launch/linprobe.py`` trains a linear probe.

    python launch/finetune.py --config configs/finetune_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_ft
    python launch/linprobe.py --config configs/linprobe_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_lin
    deepspeed --num_gpus 8 launch/finetune.py --config configs/vit_b16_finetune.yaml --weights exports/b16.safetensors

Fine-tuning (MAE conventions, SYMMIM.md): AdamW with layer-wise lr decay, drop path, label
smoothing, mixup / cutmix, warm-up then cosine, on the DeepSpeed engine (ZeRO, bf16).
Linear probe: frozen encoder, BatchNorm without affine + linear head, LARS, no mixing, ZeRO-0
(LARS needs whole weight matrices; the head is small). Training batches are random-resized
crops + flips with labels from the PIL loader (``data/torch_loader.py``), validation batches
centre crops (``data/eval_loader.py``). ``--weights`` is a pre-training run folder or an
exported .safetensors (``launch/export.py``); without it the encoder starts from scratch.

Writes into the output folder: config.yaml, metrics.jsonl (training loss per logging window;
``val_top1``, ``val_top5``, ``wall_s`` at each epoch end), checkpoints/ (``--resume`` continues)
and results.json (final top-1 / top-5, also printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.checkpoint import save_checkpoint  # noqa: E402
from core.classify import ViTClassifier, evaluate, mix, soft_cross_entropy  # noqa: E402
from core.config import Config  # noqa: E402
from core.distributed import DistInfo, mean_across_ranks  # noqa: E402
from core.metrics import MetricsLog  # noqa: E402
from core.optim import LARS, layer_decay_groups, param_groups  # noqa: E402
from core.pretrained import load_encoder_weights  # noqa: E402
from core.schedules import lr_at  # noqa: E402
from core.train_step import DTYPES, deepspeed_config  # noqa: E402
from core.vit import ViTEncoder  # noqa: E402
from data.eval_loader import train_val_splits  # noqa: E402
from data.folder import DataError  # noqa: E402
from data.torch_loader import TorchLoader  # noqa: E402
from kernels.dispatch import resolve_backends  # noqa: E402
from launch.common import Position, launch, resume, run_parser  # noqa: E402

log = logging.getLogger("symmim")


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = run_parser(description, "configs/finetune_tiny_cpu.yaml")
    p.add_argument("--weights", help="pre-training run folder or exported .safetensors (default: random init)")
    return p.parse_args(argv)


def build(cfg: Config, dist_info: DistInfo, num_classes: int, weights: str | None, linear_probe: bool):
    """DeepSpeed engine of the classifier (pre-trained encoder + head) and its optimizer."""
    import deepspeed

    m, ft = cfg.model, cfg.finetune
    backends = resolve_backends(cfg.kernels, dist_info.device)
    encoder = ViTEncoder(m.size, m.img_size, m.patch_size, backends, drop_path=0.0 if linear_probe else ft.drop_path)
    if weights:
        log.info("weights: %s", load_encoder_weights(encoder, weights, m))
    else:
        log.warning("no --weights: the encoder starts from random initialisation")
    model = ViTClassifier(encoder, num_classes, cfg.eval.pool, linear_probe).to(dist_info.device)
    model.to(DTYPES[cfg.train.precision])  # buffers too, as in pre-training
    if linear_probe:
        optimizer = LARS(param_groups(model, ft.weight_decay))
    else:
        groups = layer_decay_groups(model, ft.weight_decay, ft.layer_decay, len(encoder.blocks))
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=ft.betas, fused=dist_info.device.type == "cuda")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine, optimizer


def train(cfg: Config, run_dir: Path, args: argparse.Namespace, dist_info: DistInfo, linear_probe: bool) -> dict:
    """Train, evaluating on val/ at each epoch end; returns the final ``{"top1", "top5"}``."""
    from tqdm import tqdm

    rank, world, device = dist_info.rank, dist_info.world, dist_info.device
    ft, task = cfg.finetune, "linprobe" if linear_probe else "finetune"
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.data.format != "imagefolder":
        raise DataError(f"{task} reads labels from an ImageFolder tree: set data.format=imagefolder")
    train_items, val_items = train_val_splits(cfg)
    num_classes = len(train_items.classes)
    engine, optimizer = build(cfg, dist_info, num_classes, args.weights, linear_probe)
    loader = TorchLoader(train_items, cfg, cfg.model.img_size, rank, world, device, labels=True)

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    micro_per_epoch = loader.steps_per_epoch // accum * accum
    if micro_per_epoch == 0:
        raise DataError(f"an epoch has {loader.steps_per_epoch} micro-batches per rank, fewer than train.grad_accum={accum}")
    steps_per_epoch = micro_per_epoch // accum
    total_steps = steps_per_epoch * ft.epochs
    if ft.max_steps:
        total_steps = min(total_steps, ft.max_steps)
    peak_lr = ft.lr or ft.base_lr * batch * accum * world / 256
    warmup = int(ft.warmup_epochs * steps_per_epoch)
    mixup, cutmix, smoothing = (0.0, 0.0, 0.0) if linear_probe else (ft.mixup, ft.cutmix, ft.label_smoothing)
    recipe = "frozen encoder, LARS" if linear_probe else (
        f"layer decay {ft.layer_decay}, drop path {ft.drop_path}, mixup {mixup}, cutmix {cutmix}, label smoothing {smoothing}")
    log.info("%s: %d classes, %.2fM trainable parameters, pool=%s; peak lr %.3g, %d steps (%d per epoch), warm-up %d; %s",
             task, num_classes, sum(p.numel() for p in engine.module.parameters() if p.requires_grad) / 1e6, cfg.eval.pool,
             peak_lr, total_steps, steps_per_epoch, warmup, recipe)

    ckpt_dir = run_dir / "checkpoints"
    arch = {**dataclasses.asdict(cfg.model), "task": task, "num_classes": num_classes, "pool": cfg.eval.pool}
    restored = resume(engine, run_dir, arch, rank) if args.resume else None
    pos = restored[0] if restored else Position()

    def checkpoint() -> None:
        path = save_checkpoint(engine, ckpt_dir, pos.step, {"position": vars(pos).copy()},
                               {"torch_rng": torch.get_rng_state()}, arch, cfg.train.keep_checkpoints)
        log.info("checkpoint saved: %s", path)

    metrics = MetricsLog(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    bar = tqdm(total=total_steps, initial=pos.step, disable=rank != 0 or not cfg.log.progress, unit="step", dynamic_ncols=True)
    loss_sum, window_micro, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    session_start, wall_at_start = time.perf_counter(), pos.wall_s
    result = None
    while pos.step < total_steps:
        engine.train()
        for images, labels in loader.epoch(pos.epoch, pos.micro, micro_per_epoch):  # [B, 3, S, S], [B]
            lr = lr_at(pos.step, total_steps, warmup, peak_lr, ft.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            rng = np.random.default_rng([cfg.train.seed, rank, pos.epoch, pos.micro])  # stateless: resumes exactly
            images, targets = mix(images, labels, num_classes, mixup, cutmix, smoothing, rng)  # targets [B, C]
            loss = soft_cross_entropy(engine(images), targets)
            engine.backward(loss)
            stepped = engine.is_gradient_accumulation_boundary()
            engine.step()
            pos.micro += 1
            loss_sum += loss.detach().float()
            window_micro += 1
            if not stepped:
                continue
            pos.step += 1
            pos.wall_s = wall_at_start + time.perf_counter() - session_start
            bar.update(1)
            last = pos.step >= total_steps
            if pos.step % cfg.log.every_steps == 0 or last:
                elapsed = time.perf_counter() - window_start
                record = {"step": pos.step, "epoch": pos.epoch + pos.micro / micro_per_epoch,
                          "loss": (mean_across_ranks(loss_sum) / window_micro).item(), "lr": lr,
                          "img_per_s": window_micro * batch * world / elapsed, "wall_s": pos.wall_s}
                metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                loss_sum.zero_()
                window_micro, window_start = 0, time.perf_counter()
            if cfg.train.ckpt_every_steps and pos.step % cfg.train.ckpt_every_steps == 0 and not last:
                checkpoint()
            if last:
                break
        if pos.micro >= micro_per_epoch:
            pos.epoch, pos.micro = pos.epoch + 1, 0
        result = evaluate(engine.module, val_items, cfg, dist_info)
        metrics.log({"step": pos.step, "epoch": pos.epoch + pos.micro / micro_per_epoch, "wall_s": pos.wall_s,
                     "val_top1": result["top1"], "val_top5": result["top5"]})
        log.info("step %d: val top-1 %.2f%%, top-5 %.2f%%", pos.step, result["top1"], result["top5"])
        checkpoint()
    bar.close()
    metrics.close()
    return result if result is not None else evaluate(engine.module, val_items, cfg, dist_info)


def main(argv: list[str] | None = None, linear_probe: bool = False) -> int:
    task = "linear probe" if linear_probe else "fine-tuning"
    args = parse_args(argv, f"{task} of a pre-trained encoder")

    def adjust(cfg: Config) -> None:
        if linear_probe and cfg.ds.zero_stage:
            log.info("linear probe: ZeRO stage 0 instead of %d (LARS needs whole weight matrices)", cfg.ds.zero_stage)
            cfg.ds.zero_stage = 0

    def run(cfg: Config, run_dir: Path, dist_info: DistInfo) -> None:
        result = train(cfg, run_dir, args, dist_info, linear_probe)
        if dist_info.is_main:
            record = {"task": "linprobe" if linear_probe else "finetune", **result, "weights": args.weights}
            (run_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
            log.info("%s: val top-1 %.2f%%, top-5 %.2f%% -> %s", task, result["top1"], result["top5"], run_dir / "results.json")
            print(json.dumps(record))

    return launch(args, run, adjust)


if __name__ == "__main__":
    sys.exit(main())
