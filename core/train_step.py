"""The pre-training step shared by ``launch/pretrain.py`` and ``benchmarks/throughput.py``.

:func:`build_training` makes the model, the EMA branch, the mask generator and the
DeepSpeed engine from a config; :meth:`Training.step` runs one micro-batch: masks, momentum
keys (all-gathered), forward, backward, optimizer step and, on an accumulation boundary,
the EMA update. An optional :class:`PhaseTimer` splits its time into phases.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from core.config import Config
from core.distributed import DistInfo, all_gather
from core.masking import MaskGenerator
from core.optim import build_optimizer
from core.symmim import MomentumBranch, SymMIM
from kernels.dispatch import Backends, resolve_backends

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed engine config generated from ours, with ``ds.extra`` merged on top."""
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


class PhaseTimer:
    """Accumulated seconds per named phase; synchronises CUDA at each mark to be exact."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase``."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
        self._last = now


@dataclass
class Training:
    cfg: Config
    dist: DistInfo
    backends: Backends
    model: SymMIM
    momentum: MomentumBranch | None
    masks: MaskGenerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype

    def step(self, images: Tensor, lr: float, ema_momentum: float, timer: PhaseTimer | None = None) -> dict:
        """One micro-batch ``[B, 3, S, S]``; returns the loss tensors and ``stepped`` / ``skipped``.

        A non-finite loss on any rank skips this micro-batch's backward and update on every
        rank (``skipped``); ``stepped`` says whether the optimizer stepped. That check is the
        step's one host sync: it must be decided before backward, on every rank alike.
        """
        mark = timer.mark if timer else (lambda phase: None)
        batch = images.shape[0]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        keys = None
        if self.momentum is not None:
            keys = all_gather(self.momentum(images, self.masks.momentum(batch), self.dtype))  # [W*B, E]
            mark("momentum_forward")
        out = self.engine(images, self.masks.online(batch), keys, self.dist.rank * batch)
        finite = torch.isfinite(out["loss"].detach()).float()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # every rank skips together
        mark("forward")
        out["skipped"] = not bool(finite)
        out["stepped"] = False
        if out["skipped"]:
            return out
        self.engine.backward(out["loss"])
        mark("backward")
        out["stepped"] = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        mark("optimizer")
        if out["stepped"] and self.momentum is not None:
            self._ema_update(ema_momentum)
            mark("ema")
        return out


    def _ema_update(self, momentum: float) -> None:
        """EMA step; under ZeRO-3 the online weights are gathered from their partitions first."""
        module = self.engine.module
        if self.cfg.ds.zero_stage != 3:
            self.momentum.update(module, momentum)
            return
        import deepspeed

        params = [*module.encoder.parameters(), *module.projector.parameters()]
        with deepspeed.zero.GatheredParameters(params):
            self.momentum.update(module, momentum)


def architecture(cfg: Config) -> dict:
    """What a checkpoint must match to be resumed: the model and whether it has the heads."""
    return {**dataclasses.asdict(cfg.model), "contrastive": cfg.loss.con_weight > 0}


def build_training(cfg: Config, dist: DistInfo) -> Training:
    """Model, EMA branch, masks and DeepSpeed engine for ``cfg`` on ``dist.device``."""
    import deepspeed

    device = dist.device
    dtype = DTYPES[cfg.train.precision]
    backends = resolve_backends(cfg.kernels, device)
    model = SymMIM(cfg, backends).to(device)
    momentum = MomentumBranch(model).to(device) if model.contrastive else None  # fp32 copy
    model.to(dtype)  # buffers too (BatchNorm statistics, position tables): DeepSpeed casts parameters only
    masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=cfg.train.seed * 1000 + dist.rank)
    optimizer = build_optimizer(model, cfg, device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return Training(cfg, dist, backends, model, momentum, masks, engine, optimizer, dtype)
