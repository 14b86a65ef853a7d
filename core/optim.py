"""AdamW with MAE's parameter groups."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weight matrices only: no decay on norms, biases, CLS and mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """Torch AdamW (fused on CUDA); its lr is set every step from ``core.schedules``."""
    o = cfg.optim
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=0.0, betas=o.betas, fused=fused)
