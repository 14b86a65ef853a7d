"""The DeepSpeed engine every trainer is built on: its config, generated from ours, the dtypes, and
what every trainer asks of it at a round's end (the global gradient norm, an update withheld)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from symmim.core.config import Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
log = logging.getLogger("symmim")


def fast_step(cfg: Config) -> bool:
    """Whether the run takes the fast step (``train.fast_step``; fp16 needs DeepSpeed's loss scaling)."""
    return cfg.train.fast_step and cfg.train.precision != "fp16"


def deepspeed_config(cfg: Config, fast: bool = False) -> dict:
    """The DeepSpeed engine config generated from ``train``, ``optim.clip_grad`` and ``ds``, with
    ``ds.extra`` merged on top. ``fast``: an fp32 engine that does not cast (the module holds bf16
    weights itself, or runs under autocast). Clipping is by the global norm of all gradients: under
    ZeRO 1-3 DeepSpeed's ZeRO optimizer clips (it computes that norm over every parameter group and
    rank, and calls the optimizer group by group); on the fast step under ZeRO-0
    :class:`~symmim.core.optim.FusedAdamW` clips, on the device."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if fast and cfg.ds.zero_stage == 0 else cfg.optim.clip_grad,
        "bf16": {"enabled": t.precision == "bf16" and not fast},
        "fp16": {"enabled": t.precision == "fp16" and not fast, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": cfg.ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }

    def merge(base: dict, extra: dict) -> dict:
        for k, v in extra.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    return merge(ds, cfg.ds.extra)


def bf16_sums_warning(cfg: Config, fast: bool) -> str | None:
    """Why the gradient of a round is less exact than the weights' fp32 masters, or None: DeepSpeed's
    own bf16 engine adds the micro-batches' gradients in bf16 (it has no fp32 accumulation at ZeRO-0),
    while the fast step sums them in fp32 (:meth:`~symmim.core.optim.FusedAdamW.accumulate`)."""
    t = cfg.train
    if fast or t.precision != "bf16" or t.grad_accum == 1:
        return None
    return (f"train.grad_accum={t.grad_accum} under DeepSpeed's bf16 engine: it sums the micro-batches' gradients "
            "in bf16 (about 0.3% off relative at 8 micro-batches); a larger train.batch_size with fewer micro-batches "
            "keeps the sum exact, and pre-training's fast step (train.fast_step=true) sums in fp32")


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, fast: bool = False):
    """``(engine, optimizer)``: DeepSpeed's wrapping of ``model`` and ``optimizer`` under ``cfg``."""
    import deepspeed

    if warning := bf16_sums_warning(cfg, fast):
        log.warning(warning)

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, fast))
    return engine, optimizer


def restore_configured_clip(engine, optimizer: torch.optim.Optimizer) -> None:
    """After a checkpoint load: DeepSpeed's ZeRO and bf16/fp16 optimizers restore the clipping
    threshold they were saved with; a resume clips by the one its config asks for."""
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = engine.gradient_clipping()


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps: ours inside DeepSpeed's ZeRO or bf16/fp16 wrapper, or ``optimizer`` itself."""
    return getattr(optimizer, "optimizer", optimizer)


@contextmanager
def update_withheld(optimizer: torch.optim.Optimizer, withhold: bool) -> Iterator[None]:
    """DeepSpeed's engine step, with ``optimizer``'s update (the optimizer inside DeepSpeed's wrapper)
    withheld when ``withhold``: the engine still ends the round (its counters, the gradients cleared)
    but weights and moments stay. DeepSpeed skips a non-finite gradient itself, except on its fp32
    ZeRO-0 path, and a non-finite loss need not give one."""
    if not withhold:
        yield
        return
    optimizer.step = lambda closure=None: None  # shadows the method for this one engine step
    try:
        yield
    finally:
        del optimizer.step


def global_grad_norm(engine, device: torch.device) -> Tensor | None:
    """The global gradient norm of the round just ended, before clipping, as the engine keeps it
    (FusedAdamW's under ZeRO-0 on the fast step, DeepSpeed's optimizer's otherwise; None on
    DeepSpeed's fp32 ZeRO-0 engine, which keeps none), a 0-dim fp32 tensor on ``device``."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=device)
