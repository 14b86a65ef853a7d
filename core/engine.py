"""The DeepSpeed engine every trainer is built on: its config, generated from ours, and the dtypes."""
from __future__ import annotations

import torch
from torch import nn

from symmim.core.config import Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed engine config generated from ``train``, ``optim.clip_grad`` and ``ds``, with
    ``ds.extra`` merged on top."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": cfg.ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }

    def merge(base: dict, extra: dict) -> dict:
        for k, v in extra.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    return merge(ds, cfg.ds.extra)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    """``(engine, optimizer)``: DeepSpeed's wrapping of ``model`` and ``optimizer`` under ``cfg``."""
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine, optimizer
