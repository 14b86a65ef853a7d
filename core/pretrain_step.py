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
from symmim.core.engine import DTYPES, build_engine, fast_step
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
    """The pre-training objects of one rank and the step that drives them.

    ``fast`` (``train.fast_step``): a :class:`~symmim.core.optim.FusedAdamW` clips and skips
    non-finite steps on the device; under ZeRO-0 the weights are in ``dtype`` with its fp32
    masters, under ZeRO 1-3 they stay fp32 and the forward runs under autocast (``autocast``);
    the ZeRO-0 step dispatches no host sync. Otherwise DeepSpeed's bf16/fp16 engine runs the
    weights in ``dtype`` and a host sync decides each non-finite skip before backward.
    """

    dist: DistInfo
    backends: Backends
    model: SymMIM
    momentum: MomentumBranch | None
    masks: MaskGenerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # DeepSpeed's (a ZeRO wrapper) or ours
    dtype: torch.dtype
    zero_stage: int
    fast: bool
    autocast: bool  # the forward under autocast to ``dtype`` (fast step on fp32 weights, ZeRO 1-3)
    loss_names: ClassVar[tuple[str, ...]] = ("loss", "loss_mim", "loss_con")

    def step(self, images: Tensor, lr: float, ema_momentum: float, timer: PhaseTimer | None = None) -> dict:
        """One micro-batch ``[B, 3, S, S]``: :meth:`forward_backward`, then :meth:`optimizer_step`.

        Returns the loss tensors, ``stepped`` (an accumulation round ended: the optimizer stepped or
        skipped) and ``skipped``: a 0-dim tensor, 1 when the update was skipped for a non-finite
        loss (on any rank), or None mid-accumulation on the fast step (decided at the round's end).
        """
        out = self.forward_backward(images, timer)
        if out.pop("backward"):
            out["stepped"], skipped = self.optimizer_step(lr, ema_momentum, timer)
            if self.fast:
                out["skipped"] = skipped
        return out

    def forward_backward(self, images: Tensor, timer: PhaseTimer | None = None) -> dict:
        """Masks, momentum keys (gathered from every rank), forward and backward of ``images`` ``[B, 3, S, S]``;
        ``backward`` in the result says whether the backward ran.

        Fast step: the backward always runs; a non-finite loss makes the gradient norm non-finite
        and the optimizer skips itself on the device. Otherwise a non-finite loss on any rank skips
        the backward on every rank, decided by a host sync before it. After the backward that ends
        an accumulation round the gradients are reduced across ranks.
        """
        mark = timer.mark if timer else (lambda phase: None)
        batch = images.shape[0]
        keys = None
        if self.momentum is not None:
            keys = all_gather(self.momentum(images, self.masks.momentum(batch), self.dtype))  # [W*B, E]
            mark("momentum_forward")
        with torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.engine(images, self.masks.online(batch), keys, self.dist.rank * batch)
        out["stepped"], out["skipped"], out["backward"] = False, None, True
        if not self.fast:
            out["backward"] = finite_on_every_rank(out["loss"])  # the host sync of the DeepSpeed-engine path
            out["skipped"] = torch.tensor(0.0 if out["backward"] else 1.0, device=self.dist.device)
        mark("forward")
        if out["backward"]:
            self.engine.backward(out["loss"])
            mark("backward")
        return out

    def optimizer_step(self, lr: float, ema_momentum: float, timer: PhaseTimer | None = None
                       ) -> tuple[bool, Tensor | None]:
        """The engine's step at ``lr`` (it updates only at the end of an accumulation round) and then
        the EMA update with ``ema_momentum``. Returns whether the round ended and, on the fast step
        at a round's end, the 0-dim skip flag (1: the update was skipped for a non-finite gradient)."""
        mark = timer.mark if timer else (lambda phase: None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stepped = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        mark("optimizer")
        skipped = self._skipped() if self.fast and stepped else None
        if stepped and self.momentum is not None:
            if skipped is not None:  # no change where the update was skipped
                ema_momentum = 1.0 - (1.0 - ema_momentum) * (1.0 - skipped)
            self._ema_update(ema_momentum)
            mark("ema")
        return stepped, skipped

    def _skipped(self) -> Tensor:
        """Fast step: whether the update just skipped. DeepSpeed's ZeRO 1-3 optimizers check the
        gradients for overflow themselves (on the host) and then never call ours."""
        if getattr(self.optimizer, "overflow", False):
            return torch.ones((), device=self.dist.device)
        return self.base_optimizer.found_inf

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """Our optimizer (the one that steps) inside DeepSpeed's ZeRO wrapper, or itself under ZeRO-0."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def describe(self) -> str:
        """The step's path, for the log."""
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        if not self.fast:
            why = "fp16 needs its loss scaling" if self.dtype == torch.float16 else "train.fast_step=false"
            return f"step: DeepSpeed's {precision} engine ({why}; a host sync per step)"
        if self.zero_stage:
            cast = f" under {precision} autocast" if self.autocast else ""
            return (f"step: fast, fp32 weights{cast}, fused AdamW on ZeRO-{self.zero_stage} partitions "
                    "(DeepSpeed checks them for overflow on the host)")
        weights = f"{precision} weights, fp32 masters" if self.dtype != torch.float32 else "fp32 weights"
        return f"step: fast, {weights} in a fused AdamW, no host sync"

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

    def load_state_dict(self, state: dict, rank_state: dict | None) -> None:
        """``rank_state`` None (another number of processes wrote it): the mask streams start anew,
        seeded from the step of the checkpoint and this rank."""
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])
        if rank_state is None:
            self.masks.reseed(1_000_003 * state["position"]["step"] + self.dist.rank)
        else:
            self.masks.load_state_dict(rank_state["masks"])

    def _ema_update(self, momentum: float | Tensor) -> None:
        """EMA step from the fp32 masters where the optimizer keeps them; under ZeRO-3 the online
        weights are gathered from their partitions first."""
        module = self.engine.module
        if self.zero_stage != 3:
            masters = getattr(self.base_optimizer, "has_masters", False) and self.base_optimizer.master_of()
            self.momentum.update(module, momentum, masters or None)
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
    if cfg.train.compile:  # in place: parameter names, checkpoints and exports stay as they are
        for module in (model.encoder, model.decoder, *(momentum.children() if momentum else ()),
                       *((model.projector, model.predictor) if model.contrastive else ())):
            module.compile(dynamic=False)  # both masks give every sample the same visible count
    fast, zero = fast_step(cfg), cfg.ds.zero_stage
    autocast = fast and zero > 0 and dtype != torch.float32  # ZeRO keeps fp32 weights: the forward casts
    if not autocast:
        model.to(dtype)  # buffers too (BatchNorm statistics, position tables): DeepSpeed casts parameters only
    masks = MaskGenerator(cfg.mask, model.encoder.grid, device, seed=cfg.train.seed * 1000 + dist.rank)
    optimizer = build_optimizer(model, cfg.optim, device, fast, reduce="partitioned" if zero else "mean")
    engine, optimizer = build_engine(model, optimizer, cfg, fast)
    if fast and zero == 0:
        engine.enable_backward_allreduce = False  # FusedAdamW reduces in one flat all-reduce, not tensor by tensor
    return Training(dist, backends, model, momentum, masks, engine, optimizer, dtype, zero, fast, autocast)
