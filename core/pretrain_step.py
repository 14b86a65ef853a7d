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
from symmim.core.engine import (DTYPES, build_engine, fast_step, global_grad_norm, inner_optimizer,
                                restore_configured_clip, update_withheld)
from symmim.core.loop import Position
from symmim.core.masking import Mask, MaskGenerator
from symmim.core.optim import build_optimizer
from symmim.core.symmim import MomentumBranch, SymMIM
from symmim.data.views import Views
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

    ``fast`` (``train.fast_step``): a :class:`~symmim.core.optim.FusedAdamW` steps; under ZeRO-0
    the weights are in ``dtype`` with its fp32 masters and fp32 gradient sums, and it clips and
    skips non-finite steps on the device (no host sync); under ZeRO 1-3 they stay fp32, the
    forward runs under autocast (``autocast``), and DeepSpeed's ZeRO optimizer clips and checks
    for overflow (one host sync). Otherwise DeepSpeed's bf16/fp16 engine runs the weights in
    ``dtype`` and a host sync per micro-batch tells every rank whether the loss is finite.

    Every path counts alike: each accumulation round (``train.grad_accum`` micro-batches) ends in
    one step of the schedules. A non-finite loss on any rank, or a non-finite gradient, skips the
    round's update as a whole (weights, moments, EMA branch and BatchNorm statistics stay as they
    were), and the round still counts as a step.
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
    round_nonfinite: bool = dataclasses.field(default=False, init=False)  # DeepSpeed's engine: a non-finite loss this round
    loss_names: ClassVar[tuple[str, ...]] = ("loss", "loss_mim", "loss_con")

    def step(self, images: Tensor | Views, lr: float, ema_momentum: float, timer: PhaseTimer | None = None) -> dict:
        """One micro-batch ``[B, 3, S, S]`` (or its :class:`~symmim.data.views.Views`: the online view and
        the momentum branch's own, ``data.key_view``): :meth:`forward_backward`, then :meth:`optimizer_step`.

        Returns the loss tensors, ``stepped`` (this micro-batch ended an accumulation round: the
        update was made or skipped, and the step counts either way) and, at a round's end, 0-dim
        tensors on the device (None mid-round): ``skipped``, 1 when the round's update was skipped
        for a non-finite loss or gradient on any rank, and ``grad_norm``, the global norm of the
        round's gradient (whole model, every rank) before clipping; ``grad_norm`` is None on
        DeepSpeed's fp32 ZeRO-0 engine (``train.fast_step=false`` in fp32), which keeps none.
        """
        out = self.forward_backward(images, timer)
        out["stepped"], out["skipped"] = self.optimizer_step(lr, ema_momentum, timer)
        out["grad_norm"] = global_grad_norm(self.engine, self.dist.device) if out["stepped"] else None
        return out

    def forward_backward(self, images: Tensor | Views, timer: PhaseTimer | None = None) -> dict:
        """Masks, momentum keys (gathered from every rank, from the key view), forward and backward of
        ``images`` ``[B, 3, S, S]`` (or their :class:`~symmim.data.views.Views`).

        Fast step: a non-finite loss gets a NaN gradient (its backward is scaled by NaN), so the
        gradient norm is non-finite and the round's update is skipped where that norm is checked.
        DeepSpeed's engine: a host sync tells every rank whether the loss is finite on all of them
        (the round's update is then withheld at its end). After the backward that ends a round
        DeepSpeed reduces the gradients (ZeRO 1-3); under ZeRO-0 the optimizer does, in its step.
        """
        mark = timer.mark if timer else (lambda phase: None)
        online, key = (images.online, images.key) if isinstance(images, Views) else (images, images)  # [B, 3, S, S]
        batch = online.shape[0]
        keys = None
        if self.momentum is not None:
            keys = all_gather(self.momentum(key, self.masks.momentum(batch), self.dtype))  # [W*B, E]
            mark("momentum_forward")
        with torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.engine(online, self.masks.online(batch), keys, self.dist.rank * batch)
        loss = out["loss"]
        if self.fast:
            value = loss.detach()
            loss = loss * (value - value + 1.0)  # [] times 1, or NaN where non-finite (inf - inf): NaN gradients
        elif not finite_on_every_rank(loss):  # the host sync of the DeepSpeed-engine path
            self.round_nonfinite = True
        mark("forward")
        self.engine.backward(loss)
        if self.fast:
            self.base_optimizer.accumulate()  # bf16 weights: into the fp32 sum
        mark("backward")
        return out

    def optimizer_step(self, lr: float, ema_momentum: float, timer: PhaseTimer | None = None
                       ) -> tuple[bool, Tensor | None]:
        """The engine's step at ``lr`` (it updates only at the end of an accumulation round) and, at a
        round's end, the EMA update with ``ema_momentum``. Returns whether the round ended and, then,
        the 0-dim skip flag (1: the round's update was skipped for a non-finite loss or gradient)."""
        mark = timer.mark if timer else (lambda phase: None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stepped = self.engine.is_gradient_accumulation_boundary()
        with update_withheld(self.base_optimizer, stepped and self.round_nonfinite):
            self.engine.step()
        mark("optimizer")
        if not stepped:
            return False, None
        skipped, no_update = self._skipped()
        if self.momentum is not None:
            self._ema_update(ema_momentum, no_update)
            mark("ema")
        return True, skipped

    def _skipped(self) -> tuple[Tensor, Tensor]:
        """At a round's end, 0-dim tensors on the device: ``(skipped, no_update)``. ``no_update``: the
        weights did not move. ``skipped``: that was for a non-finite loss or gradient; the same flag,
        but for DeepSpeed's fp16 loss-scale overflows, part of its scaling, not counted."""
        if self.fast and not self.zero_stage:
            flag = self.base_optimizer.found_inf  # decided on the device
            return flag, flag
        overflow = getattr(self.optimizer, "overflow", False)  # DeepSpeed's ZeRO/bf16/fp16 optimizers, on the host
        nonfinite, self.round_nonfinite = self.round_nonfinite, False
        skipped = nonfinite or (overflow and self.dtype != torch.float16)
        device = self.dist.device
        return torch.tensor(float(skipped), device=device), torch.tensor(float(nonfinite or overflow), device=device)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """Our optimizer (the one that steps) inside DeepSpeed's ZeRO wrapper, or itself under ZeRO-0."""
        return inner_optimizer(self.optimizer)

    def describe(self) -> str:
        """The step's path, for the log."""
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        if not self.fast:
            why = "fp16 needs its loss scaling" if self.dtype == torch.float16 else "train.fast_step=false"
            return f"step: DeepSpeed's {precision} engine ({why}; a host sync per step)"
        if self.zero_stage:
            cast = f" under {precision} autocast" if self.autocast else ""
            return (f"step: fast, fp32 weights{cast}, fused AdamW on ZeRO-{self.zero_stage} partitions "
                    "(DeepSpeed clips them by the global norm and checks it on the host)")
        weights = f"{precision} weights, fp32 masters" if self.dtype != torch.float32 else "fp32 weights"
        return f"step: fast, {weights} in a fused AdamW, no host sync"

    def train_step(self, images: Tensor | Views, lr: float, momentum: float, pos: Position) -> dict:
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
        restore_configured_clip(self.engine, self.optimizer)
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])
        if rank_state is None:
            self.masks.reseed(1_000_003 * state["position"]["step"] + self.dist.rank)
        else:
            self.masks.load_state_dict(rank_state["masks"])

    def _ema_update(self, momentum: float, no_update: Tensor) -> None:
        """EMA step with ``momentum`` (none where ``no_update`` is 1) from fp32 weights: the module's
        where they are fp32 (ZeRO-3 gathers them from their partitions first), else their masters,
        FusedAdamW's or those of DeepSpeed's bf16/fp16 engine (assembled tensor by tensor, one
        all-reduce each); then the BatchNorm statistics, kept where the update was skipped."""
        module = self.engine.module
        momentum = 1.0 - (1.0 - momentum) * (1.0 - no_update)  # [] 1 where skipped: no change
        params = [*module.encoder.parameters(), *module.projector.parameters()]
        if not self.fast and self.dtype != torch.float32:
            self.momentum.update(module, momentum, self._engine_masters(params))
        elif self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                self.momentum.update(module, momentum)
        else:
            base = self.base_optimizer
            self.momentum.update(module, momentum, base.master_of() if getattr(base, "has_masters", False) else None)
        self.momentum.take_buffers(module, no_update)

    def _engine_masters(self, params: list[torch.nn.Parameter]) -> dict[int, Tensor]:
        """``id(parameter) -> fp32 master`` for ``params`` from DeepSpeed's bf16/fp16 engine: whole under
        ZeRO-0 (its unfused optimizer holds them group by group beside the module's), assembled from
        the partitions under ZeRO 1-3 (one all-reduce per tensor)."""
        if self.zero_stage == 0:
            opt = self.optimizer
            return {id(p): m for ps, ms in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(ps, ms)}
        from deepspeed.utils import safe_get_full_fp32_param

        return {id(p): safe_get_full_fp32_param(p) for p in params}


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
