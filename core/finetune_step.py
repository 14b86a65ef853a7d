"""The supervised step of fine-tuning and the linear probe (MAE recipes), the trainer ``core.loop`` runs.

:func:`build_classifier_training` puts the (pre-trained) encoder and a head (``core.classify``)
on a DeepSpeed engine: AdamW with layer-wise lr decay for fine-tuning, LARS on a frozen encoder
for the linear probe. :meth:`ClassifierTraining.train_step` mixes the batch (mixup / cutmix with
smoothed targets; neither for the probe), runs the soft cross-entropy forward and backward, and
steps the optimizer.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from symmim.core.classify import ViTClassifier, mix, soft_cross_entropy
from symmim.core.config import Config
from symmim.core.distributed import DistInfo, finite_on_every_rank
from symmim.core.engine import (DTYPES, build_engine, global_grad_norm, inner_optimizer, restore_configured_clip,
                                update_withheld)
from symmim.core.loop import Position
from symmim.core.optim import LARS, layer_decay_groups, param_groups
from symmim.core.pretrained import load_encoder_weights
from symmim.core.vit import ViTEncoder
from symmim.kernels.dispatch import resolve_backends

log = logging.getLogger("symmim")


@dataclass
class ClassifierTraining:
    engine: object  # deepspeed.DeepSpeedEngine around a ViTClassifier
    optimizer: torch.optim.Optimizer  # groups may carry an ``lr_scale`` (layer-wise decay)
    num_classes: int
    mixup: float
    cutmix: float
    smoothing: float
    seed: int
    rank: int
    round_nonfinite: bool = dataclasses.field(default=False, init=False)  # a non-finite loss in this round
    loss_names: ClassVar[tuple[str, ...]] = ("loss",)

    @property
    def model(self) -> nn.Module:
        """The classifier (for evaluation)."""
        return self.engine.module

    def train_step(self, batch: tuple[Tensor, Tensor], lr: float, momentum: float, pos: Position) -> dict:
        """Images ``[B, 3, S, S]`` and labels ``[B]``: one micro-batch (``momentum`` is unused: no EMA). A
        non-finite loss on any rank skips its round's update as a whole; the round counts as a step."""
        images, labels = batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        rng = np.random.default_rng([self.seed, self.rank, pos.epoch, pos.micro])  # stateless: resumes exactly
        images, targets = mix(images, labels, self.num_classes, self.mixup, self.cutmix, self.smoothing, rng)  # [B, C]
        loss = soft_cross_entropy(self.engine(images), targets)
        self.round_nonfinite |= not finite_on_every_rank(loss)  # a host sync: this step is not on the fast path
        self.engine.backward(loss)
        stepped = self.engine.is_gradient_accumulation_boundary()
        with update_withheld(inner_optimizer(self.optimizer), stepped and self.round_nonfinite):
            self.engine.step()
        out = {"loss": loss, "stepped": stepped, "skipped": None, "grad_norm": None}
        if stepped:
            out["skipped"] = torch.tensor(float(self.round_nonfinite), device=loss.device)
            out["grad_norm"] = global_grad_norm(self.engine, loss.device)
            self.round_nonfinite = False
        return out

    def state_dict(self) -> dict:
        return {}  # the engine's state and the loop's position are all of it

    def rank_state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, rank_state: dict | None) -> None:
        restore_configured_clip(self.engine, self.optimizer)


def build_classifier_training(cfg: Config, dist: DistInfo, num_classes: int, weights: str | None,
                              linear_probe: bool) -> ClassifierTraining:
    """The classifier (encoder from ``weights``, or random) and its optimizer on a DeepSpeed engine."""
    m, ft = cfg.model, cfg.finetune
    backends = resolve_backends(cfg.kernels, dist.device)
    encoder = ViTEncoder(m.size, m.img_size, m.patch_size, backends, drop_path=0.0 if linear_probe else ft.drop_path)
    if weights:
        log.info("weights: %s", load_encoder_weights(encoder, weights, m))
    else:
        log.warning("no --weights: the encoder starts from random initialisation")
    model = ViTClassifier(encoder, num_classes, cfg.eval.pool, linear_probe).to(dist.device)
    model.to(DTYPES[cfg.train.precision])  # buffers too, as in pre-training
    if linear_probe:
        optimizer = LARS(param_groups(model, ft.weight_decay))
    else:
        groups = layer_decay_groups(model, ft.weight_decay, ft.layer_decay, len(encoder.blocks))
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=ft.betas, fused=dist.device.type == "cuda")
    engine, optimizer = build_engine(model, optimizer, cfg)
    mixing = (0.0, 0.0, 0.0) if linear_probe else (ft.mixup, ft.cutmix, ft.label_smoothing)
    return ClassifierTraining(engine, optimizer, num_classes, *mixing, cfg.train.seed, dist.rank)
