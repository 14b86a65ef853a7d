"""Fine-tune a pre-trained encoder end to end (MAE recipe); ``symmim-linprobe`` trains a linear probe.

    symmim-finetune --config configs/finetune_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_ft
    symmim-linprobe --config configs/linprobe_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_lin
    deepspeed --num_gpus 8 --module symmim.launch.finetune --config configs/vit_b16_finetune.yaml --weights exports/b16.safetensors

Fine-tuning (MAE conventions, docs/method.md): AdamW with layer-wise lr decay, drop path, label
smoothing, mixup / cutmix, warm-up then cosine, on the DeepSpeed engine (ZeRO, bf16).
Linear probe: frozen encoder, BatchNorm without affine + linear head, LARS, no mixing, ZeRO-0
(LARS needs whole weight matrices; the head is small). Training batches are random-resized
crops + flips with labels from the PIL loader (``data/torch_loader.py``), validation batches
centre crops (``data/eval_loader.py``). ``--weights`` is a pre-training run folder or an
exported .safetensors (``symmim-export``); without it the encoder starts from scratch.

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

import torch

from symmim.core.checkpoint import step_of
from symmim.core.classify import evaluate
from symmim.core.config import Config
from symmim.core.distributed import DistInfo
from symmim.core.finetune_step import build_classifier_training
from symmim.core.loop import Evaluation, TrainLoop
from symmim.core.schedules import Schedule
from symmim.data.eval_loader import train_val_splits
from symmim.data.folder import DataError
from symmim.data.torch_loader import TorchLoader
from symmim.launch.common import RunFolder, explain_resume, launch, run_parser

log = logging.getLogger("symmim")


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = run_parser(description, "configs/finetune_tiny_cpu.yaml")
    p.add_argument("--weights", help="pre-training run folder or exported .safetensors (default: random init)")
    return p.parse_args(argv)


def recipe(cfg: Config, linear_probe: bool) -> str:
    ft = cfg.finetune
    if linear_probe:
        return "frozen encoder, LARS"
    return (f"layer decay {ft.layer_decay}, drop path {ft.drop_path}, mixup {ft.mixup}, cutmix {ft.cutmix}, "
            f"label smoothing {ft.label_smoothing}")


def plan(cfg: Config, batches_per_epoch: int, world: int) -> Schedule:
    """The run's steps and lr curve (``finetune`` section)."""
    t, ft = cfg.train, cfg.finetune
    return Schedule.plan(batches_per_epoch, t.grad_accum, ft.epochs, ft.max_steps, t.batch_size * t.grad_accum * world,
                         ft.lr, ft.base_lr, ft.warmup_epochs, ft.min_lr)


def train(cfg: Config, folder: RunFolder, weights: str | None, dist: DistInfo, linear_probe: bool) -> dict:
    """Train, evaluating on val/ at each epoch end; returns the final ``{"top1", "top5"}``."""
    t, task = cfg.train, "linprobe" if linear_probe else "finetune"
    if cfg.data.format != "imagefolder":
        raise DataError(f"{task} reads labels from an ImageFolder tree: set data.format=imagefolder")
    # The data set and the checkpoint to resume are checked before anything is written or built.
    train_items, val_items = train_val_splits(cfg.data)
    num_classes = len(train_items.classes)
    loader = TorchLoader(train_items, cfg.data, cfg.model.img_size, t.batch_size, t.seed, dist.rank, dist.world,
                         dist.device, labels=True)
    arch = {**dataclasses.asdict(cfg.model), "task": task, "num_classes": num_classes, "pool": cfg.eval.pool}
    folder.check_shared(dist)
    resume_from = folder.resumable(arch, cfg, dist.world)
    folder.accept(cfg, dist)
    torch.manual_seed(t.seed + dist.rank)
    tr = build_classifier_training(cfg, dist, num_classes, weights, linear_probe)
    schedule = plan(cfg, loader.steps_per_epoch, dist.world)
    log.info("%s: %d classes, %.2fM trainable parameters, pool=%s; %s; %s", task, num_classes,
             sum(p.numel() for p in tr.model.parameters() if p.requires_grad) / 1e6, cfg.eval.pool,
             schedule.describe(), recipe(cfg, linear_probe))
    if resume_from is not None:
        explain_resume(folder.previous, cfg, lambda c: plan(c, loader.steps_per_epoch, dist.world), step_of(resume_from))

    def validate() -> dict[str, float]:
        result = evaluate(tr.model, val_items, cfg.model.img_size, cfg.eval.batch_size, cfg.data.workers, dist)
        return {"val_top1": result["top1"], "val_top5": result["top5"]}

    loop = TrainLoop(tr, loader, schedule, folder.path, dist, t, cfg.log, arch, evaluation=Evaluation(validate, 1))
    final = loop.run(resume_from) or validate()
    return {"top1": final["val_top1"], "top5": final["val_top5"]}


def main(argv: list[str] | None = None, linear_probe: bool = False) -> int:
    task = "linear probe" if linear_probe else "fine-tuning"
    args = parse_args(argv, f"{task} of a pre-trained encoder")

    def adjust(cfg: Config) -> None:
        if linear_probe and cfg.ds.zero_stage:
            log.info("linear probe: ZeRO stage 0 instead of %d (LARS needs whole weight matrices)", cfg.ds.zero_stage)
            cfg.ds.zero_stage = 0

    def run(cfg: Config, folder: RunFolder, dist: DistInfo) -> None:
        result = train(cfg, folder, args.weights, dist, linear_probe)
        if dist.is_main:
            record = {"task": "linprobe" if linear_probe else "finetune", **result, "weights": args.weights}
            out = folder.path / "results.json"
            out.write_text(json.dumps(record, indent=2) + "\n")
            log.info("%s: val top-1 %.2f%%, top-5 %.2f%% -> %s", task, result["top1"], result["top5"], out)
            print(json.dumps(record))

    return launch(args, run, adjust)


if __name__ == "__main__":
    sys.exit(main())
