"""Optimizers and MAE's parameter groups: weight-decay groups, layer-wise lr decay, LARS."""
from __future__ import annotations

import torch
from torch import nn

from symmim.core.config import OptimConfig


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay applies to weight matrices only: not to norms, biases, CLS and mask tokens."""
    return p.ndim > 1 and not name.endswith(("cls_token", "mask_token"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices and the rest (see :func:`decays`); frozen parameters left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Torch AdamW (fused on CUDA) from the ``optim`` config section; its lr is set every step from ``core.schedules``."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=0.0, betas=o.betas, fused=fused)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, depth: int) -> list[dict]:
    """MAE's layer-wise lr decay for a classifier whose encoder is ``model.encoder``.

    Layer 0 is the embedding (``cls_token``, ``patch_embed``), block ``i`` is layer ``i + 1``, the
    rest (final norm, head) layer ``depth + 1``; a group's ``lr_scale`` is
    ``layer_decay ** (depth + 1 - layer)``: the trainer sets ``lr * lr_scale`` each step.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.")):
            layer = 0
        else:
            layer = depth + 1
        decay = decays(name, p)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: SGD with momentum whose update of each weight matrix is
    scaled by ``trust * ||w|| / ||update||``; vectors (biases, norms) take the plain update."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), g["trust"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(update)
                p.add_(mu, alpha=-g["lr"])
