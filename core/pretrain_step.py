"""The SymMIM pre-training step, shared by ``symmim-pretrain`` and ``benchmarks/throughput.py``.

:func:`build_training` makes the model, the EMA branch, the mask generator and the
DeepSpeed engine from a config; :meth:`Training.step` runs one micro-batch: masks, momentum
keys (all-gathered), forward, backward, optimizer step and, on an accumulation boundary,
the EMA update. An optional :class:`PhaseTimer` splits its time into phases. ``Training`` owns
its state (EMA branch, mask streams) and is the trainer that ``core.loop`` runs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from symmim.core.config import Config
from symmim.core.distributed import DistInfo, all_gather, finite_on_every_rank
from symmim.core.engine import DTYPES, build_engine
from symmim.core.loop import Position
from symmim.core.masking import Mask, MaskGenerator
from symmim.core.optim import build_optimizer
from symmim.core.symmim import MomentumBranch, SymMIM
from symmim.kernels.dispatch import Backends, resolve_backends


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
    """The pre-training objects of one rank and the step that drives them."""

    dist: DistInfo
    backends: Backends
    model: SymMIM
    momentum: MomentumBranch | None
    masks: MaskGenerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype
    zero_stage: int
    loss_names: ClassVar[tuple[str, ...]] = ("loss", "loss_mim", "loss_con")

    def step(self, images: Tensor, lr: float, ema_momentum: float, timer: PhaseTimer | None = None) -> dict:
        """One micro-batch ``[B, 3, S, S]``: :meth:`forward_backward`, then :meth:`optimizer_step` unless
        the loss was non-finite on some rank; returns the loss tensors and ``stepped`` / ``skipped``."""
        out = self.forward_backward(images, timer)
        if not out["skipped"]:
            out["stepped"] = self.optimizer_step(lr, ema_momentum, timer)
        return out

    def forward_backward(self, images: Tensor, timer: PhaseTimer | None = None) -> dict:
        """Masks, momentum keys (gathered from every rank), forward and backward of ``images`` ``[B, 3, S, S]``.

        A non-finite loss on any rank skips the backward on every rank (``skipped``); that check
        is the step's one host sync: it must be decided before backward, on every rank alike.
        After the backward that ends an accumulation round the gradients are reduced across ranks.
        """
        mark = timer.mark if timer else (lambda phase: None)
        batch = images.shape[0]
        keys = None
        if self.momentum is not None:
            keys = all_gather(self.momentum(images, self.masks.momentum(batch), self.dtype))  # [W*B, E]
            mark("momentum_forward")
        out = self.engine(images, self.masks.online(batch), keys, self.dist.rank * batch)
        out["skipped"] = not finite_on_every_rank(out["loss"])
        out["stepped"] = False
        mark("forward")
        if not out["skipped"]:
            self.engine.backward(out["loss"])
            mark("backward")
        return out

    def optimizer_step(self, lr: float, ema_momentum: float, timer: PhaseTimer | None = None) -> bool:
        """The engine's step at ``lr`` (it updates only at the end of an accumulation round) and then
        the EMA update with ``ema_momentum``; returns whether the optimizer stepped."""
        mark = timer.mark if timer else (lambda phase: None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stepped = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        mark("optimizer")
        if stepped and self.momentum is not None:
            self._ema_update(ema_momentum)
            mark("ema")
        return stepped

    def train_step(self, images: Tensor, lr: float, momentum: float, pos: Position) -> dict:
        """:meth:`step` as ``core.loop`` calls it (the position does not change the step)."""
        return self.step(images, lr, momentum)

    @property
    def encoder(self) -> torch.nn.Module:
        """The online encoder (for evaluation)."""
        return self.engine.module.encoder

    @torch.no_grad()
    def predict(self, images: Tensor, mask: Mask) -> Tensor:
        """The decoder's pixel predictions ``[B, N, 3*p*p]`` for ``images`` ``[B, 3, S, S]`` under ``mask``."""
        module = self.engine.module
        return module.decoder(module.encoder(images, mask), mask)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum.state_dict() if self.momentum else None}

    def rank_state_dict(self) -> dict:
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])
        self.masks.load_state_dict(rank_state["masks"])

    def _ema_update(self, momentum: float) -> None:
        """EMA step; under ZeRO-3 the online weights are gathered from their partitions first."""
        module = self.engine.module
        if self.zero_stage != 3:
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
    device = dist.device
    dtype = DTYPES[cfg.train.precision]
    backends = resolve_backends(cfg.kernels, device)
    with torch.random.fork_rng(devices=[]):  # one initialisation on every rank: the EMA branch copies it
        torch.manual_seed(cfg.train.seed)
        model = SymMIM(cfg.model, cfg.loss, backends).to(device)
    momentum = MomentumBranch(model).to(device) if model.contrastive else None  # fp32 copy
    model.to(dtype)  # buffers too (BatchNorm statistics, position tables): DeepSpeed casts parameters only
    masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=cfg.train.seed * 1000 + dist.rank)
    optimizer = build_optimizer(model, cfg.optim, device)
    engine, optimizer = build_engine(model, optimizer, cfg)
    return Training(dist, backends, model, momentum, masks, engine, optimizer, dtype, cfg.ds.zero_stage)
