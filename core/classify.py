"""Supervised use of the encoder: MAE's fine-tuning and linear-probe classifier, mixup / cutmix
with smoothed soft targets, and the top-k evaluation of a classifier on a split."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmim.core.distributed import DistInfo
from symmim.core.knn import percent_across_ranks, pool_features, topk_hits
from symmim.core.vit import ViTEncoder
from symmim.data.eval_loader import eval_batches
from symmim.data.folder import ImageList


class ViTClassifier(nn.Module):
    """Encoder, pooled feature (``cls`` or ``mean``) and a linear head.

    ``linear_probe``: the encoder is frozen and runs without gradient, and the head is
    BatchNorm without affine before the linear layer (MAE); otherwise everything trains.
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, pool: str, linear_probe: bool):
        super().__init__()
        self.encoder, self.pool, self.linear_probe = encoder, pool, linear_probe
        linear = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01 if linear_probe else 2e-5)  # MAE's head inits
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.dim, affine=False, eps=1e-6), linear) if linear_probe else linear
        if linear_probe:
            encoder.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> logits ``[B, C]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.linear_probe):
            feats = pool_features(self.encoder(images), self.pool)  # [B, D]
        return self.head(feats)


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Label-smoothed one-hot targets ``[B, C]``: ``1 - s + s/C`` on the label, ``s/C`` elsewhere."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def mix(images: Tensor, labels: Tensor, num_classes: int, mixup: float, cutmix: float, smoothing: float,
        rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """timm's batch-mode Mixup: each image is mixed with the batch reversed; ``(images, targets [B, C])``.

    ``mixup`` / ``cutmix`` are Beta(alpha, alpha) parameters (0 = off); with both on, each batch
    takes one of them, 50/50. Cutmix pastes one box whose area fraction is ``1 - lam`` (clipped
    at the border, ``lam`` corrected to the pasted area). With both off this is label smoothing.
    """
    targets = soft_targets(labels, num_classes, smoothing)
    use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    if alpha == 0:
        return images, targets
    lam = float(rng.beta(alpha, alpha))
    other = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + other * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c targets * log_softmax(logits)`` (fp32)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, items: ImageList, img_size: int, batch: int, workers: int,
             dist_info: DistInfo) -> dict[str, float]:
    """Top-1 / top-5 (percent) of ``model``'s logits on ``img_size`` centre crops of ``items``, in batches
    of ``batch`` decoded by ``workers`` processes; every rank must call it."""
    was_training = model.training
    model.eval()
    ks = (1, min(5, len(items.classes)))
    counts = torch.zeros(3, dtype=torch.long, device=dist_info.device)  # top-1 hits, top-5 hits, images
    for images, labels in eval_batches(items, img_size, batch, dist_info.rank, dist_info.world, workers,
                                       dist_info.device):
        counts += torch.cat([topk_hits(model(images).float(), labels, ks), (labels >= 0).sum()[None]])
    model.train(was_training)
    top1, top5 = percent_across_ranks(counts)
    return {"top1": top1, "top5": top5}
