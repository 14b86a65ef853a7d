"""Optimizers and MAE's parameter groups: weight-decay groups, layer-wise lr decay, LARS."""
from __future__ import annotations

import torch
import torch.distributed as dist
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


class FusedAdamW(torch.optim.AdamW):
    """AdamW for the fast step: a few multi-tensor kernels per step whatever the number of tensors,
    and a non-finite step skipped on the device (no host sync: a non-finite gradient anywhere makes
    the global gradient norm non-finite, and the fused kernel then leaves every weight and moment
    as it was).

    Built on the module's parameter groups. When those are bf16 (or fp16) it keeps fp32 masters
    as its own parameters and sums the gradients in fp32: :meth:`accumulate`, called after each
    backward, adds the module's fresh low-precision gradients into one flat fp32 buffer that the
    masters' ``.grad`` view; a step steps the masters and writes them back cast, one multi-tensor
    copy. ``reduce`` says where the gradients stand across ranks: ``"none"`` (one process),
    ``"mean"`` (averaged here, in one flat fp32 all-reduce: DeepSpeed's per-tensor reduction is
    switched off under ZeRO-0), or ``"partitioned"`` (ZeRO 1-3: DeepSpeed reduced and partitioned
    them, clipped them by their global norm over every group and rank, and skipped a non-finite
    step before calling this once per group; nothing is normed or clipped here).

    ``clip`` (not with ``"partitioned"``): clipping by the global norm of all gradients. After
    :meth:`step` (not ``"partitioned"``), ``found_inf`` is 1.0 when the step was skipped and
    ``grad_norm`` the global norm before clipping (0-dim tensors on the device; DeepSpeed's
    engine reads the norm as ``_global_grad_norm``).
    """

    def __init__(self, groups: list[dict], betas: tuple[float, float], clip: float, reduce: str = "none"):
        if clip > 0 and reduce == "partitioned":
            raise ValueError("FusedAdamW: under ZeRO 1-3 DeepSpeed clips (by the global norm); "
                             "a clip here would see one parameter group at a time")
        self.model_params = [p for g in groups for p in g["params"]]
        self.has_masters = any(p.dtype != torch.float32 for p in self.model_params)
        if self.has_masters:
            groups = [{**g, "params": [p.detach().float().clone() for p in g["params"]]} for g in groups]
        super().__init__(groups, lr=0.0, betas=betas, fused=True)
        self.clip, self.reduce = clip, reduce
        self._masters_by_param: dict[int, torch.Tensor] | None = None
        self._flat_grad: torch.Tensor | None = None  # [all elements] fp32: the masters' gradients
        self._round_start = True  # the next accumulate() begins a new sum
        self.found_inf: torch.Tensor | None = None
        self._global_grad_norm: torch.Tensor | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        """The tensors this optimizer updates (the fp32 masters, or the module's own parameters)."""
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step, before clipping."""
        return self._global_grad_norm

    def master_of(self) -> dict[int, torch.Tensor]:
        """``id(module parameter) -> its fp32 master`` (the parameter itself without masters); built once."""
        if self._masters_by_param is None:
            self._masters_by_param = {id(p): m for p, m in zip(self.model_params, self.params)}
        return self._masters_by_param

    @torch.no_grad()
    def accumulate(self) -> None:
        """Adds the module's gradients of the last backward to this round's fp32 sum in the masters'
        ``.grad`` and releases them, so that autograd hands over fresh ones next time. Without
        masters, autograd sums into the module's fp32 ``.grad`` itself: nothing to do."""
        if not self.has_masters:
            return
        masters = self.params
        if masters[0].grad is None:  # first use, or after zero_grad(): one flat buffer, the masters' grads view it
            numel = sum(m.numel() for m in masters)
            self._flat_grad = torch.empty(numel, dtype=torch.float32, device=masters[0].device)  # [all elements]
            for m, g in zip(masters, self._flat_grad.split([m.numel() for m in masters])):
                m.grad = g.view_as(m)
            self._round_start = True
        grads = [p.grad for p in self.model_params]
        if self._round_start:
            torch._foreach_copy_([m.grad for m in masters], grads)
        else:
            self._flat_grad.add_(torch.cat([g.reshape(-1) for g in grads]))  # [all elements] low precision, summed in fp32
        self._round_start = False
        for p in self.model_params:
            p.grad = None

    @torch.no_grad()
    def _gradients(self) -> list[torch.Tensor]:
        """The gradients to step with, summed across ranks where needed, in fp32 beside the weights stepped."""
        if self.reduce == "partitioned":  # DeepSpeed put its flat fp32 partitions in our groups
            return [p.grad for p in self.params if p.grad is not None]
        if self.has_masters:
            if any(p.grad is not None for p in self.model_params):  # a backward not yet accumulated
                self.accumulate()
            self._round_start = True
            grads, flat = [m.grad for m in self.params], self._flat_grad
        else:
            grads, flat = [p.grad for p in self.model_params], None
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.reduce == "mean" and world > 1:
            if flat is None:
                flat = torch.cat([g.reshape(-1) for g in grads])  # [all elements] fp32
                grads = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
                for p, g in zip(self.model_params, grads):  # the fused step reads the module's own .grad
                    p.grad = g
            dist.all_reduce(flat.div_(world))
        return grads

    @torch.no_grad()
    def step(self, closure=None):
        grads = self._gradients()
        if self.reduce != "partitioned":
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # [] per tensor, then all (as torch)
            self._global_grad_norm = norm
            self.found_inf = (~torch.isfinite(norm)).float()  # read by the fused kernel
            if self.clip > 0:
                torch._foreach_mul_(grads, (self.clip / (norm + 1e-6)).clamp(max=1.0))
        loss = super().step(closure)
        if self.has_masters:
            torch._foreach_copy_(self.model_params, self.params)  # cast back into the module
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.has_masters:
            state["masters"] = [m.detach() for m in self.params]
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        masters = state.pop("masters", None)
        super().load_state_dict(state)
        if masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, [m.to(self.params[0].device) for m in masters])
                torch._foreach_copy_(self.model_params, self.params)


def build_optimizer(model: nn.Module, o: OptimConfig, device: torch.device, fast: bool,
                    reduce: str = "none") -> torch.optim.Optimizer:
    """AdamW from the ``optim`` config section; its lr is set every step from ``core.schedules``.

    ``fast``: :class:`FusedAdamW` (the fast step skips non-finite steps and keeps fp32 masters
    inside the optimizer, and clips there except under ZeRO 1-3, ``reduce="partitioned"``, where
    DeepSpeed clips); else torch's AdamW (fused on CUDA) under DeepSpeed's own clipping and engine.
    """
    groups = param_groups(model, o.weight_decay)
    if fast:
        return FusedAdamW(groups, betas=o.betas, clip=0.0 if reduce == "partitioned" else o.clip_grad, reduce=reduce)
    return torch.optim.AdamW(groups, lr=0.0, betas=o.betas, fused=torch.device(device).type == "cuda")


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
