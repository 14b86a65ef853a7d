"""SymMIM and its MAE baseline: one model, the contrastive branch on or off.

- :class:`SymMIM` is the trained (online) part: visible-only encoder, MAE decoder and,
  with ``loss.con_weight > 0``, MoCo v3's projector and predictor.
- :class:`MomentumBranch` is the EMA copy of the encoder and projector. It lives outside
  the optimizer (and outside DeepSpeed), in fp32, so the EMA update loses no precision.

The MAE baseline is the same code with ``mask.strategy=random`` and ``loss.con_weight=0``:
no momentum branch is built and nothing contrastive is computed.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from symmim.core.config import LossConfig, ModelConfig
from symmim.core.masking import Mask
from symmim.core.vit import MAEDecoder, ViTEncoder
from symmim.kernels.dispatch import Backends


class _SumAcrossRanks(torch.autograd.Function):
    """``x`` summed over every rank; the gradient, too, is summed over ranks (each rank's loss
    depends on every rank's ``x`` through the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch, every rank's samples (MoCo v3
    runs its heads under SyncBatchNorm, which has no CPU path); one process: plain BatchNorm1d.

    Two differentiable all-reduces (the sums, then the squared deviations from the global mean:
    two passes, no cancellation) make the gradients flow across ranks as they would through the
    statistics of one process holding the whole batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()  # [B, C]
        count = torch.tensor([float(x.shape[0])], device=x.device)
        sums = _SumAcrossRanks.apply(torch.cat([xf.sum(0), count]))  # [C + 1] over every rank
        n = sums[c].detach()
        mean = sums[:c] / n  # [C]
        var = _SumAcrossRanks.apply((xf - mean).pow(2).sum(0)) / n  # [C] biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)  # unbiased, as torch
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


def mlp_head(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool, bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: Linear-BN-ReLU blocks, a last Linear, optionally a BN without affine (global-batch BN).
    ``bn=False``: Linear-ReLU blocks with biases and a last Linear, no BatchNorm anywhere."""
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=not bn))
        if not last:
            mods += [GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True)] if bn else [nn.ReLU(inplace=True)]
        elif last_bn and bn:
            mods.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


def head_input(latent: Tensor, token: str) -> Tensor:
    """What the contrastive heads see: ``latent [B, 1 + N_vis, D]`` -> ``[B, D]``, the CLS token
    (``cls``) or the mean of the visible patch tokens (``mean``)."""
    return latent[:, 0] if token == "cls" else latent[:, 1:].mean(1)


def info_nce(q: Tensor, k_all: Tensor, offset: int, temperature: float) -> Tensor:
    """MoCo v3 contrastive loss ``2*tau * CE(q k_all^T / tau, own index)``.

    q ``[B, E]`` (this rank), k_all ``[W*B, E]`` (every rank's keys, no gradient); sample
    ``i`` of this rank is positive with key ``offset + i``. Both are L2-normalised here.
    """
    q = F.normalize(q.float(), dim=1)
    k_all = F.normalize(k_all.float(), dim=1)
    logits = q @ k_all.t() / temperature  # [B, W*B]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


class SymMIM(nn.Module):
    """Online encoder + decoder (+ projector/predictor); ``forward`` returns the losses."""

    def __init__(self, model: ModelConfig, loss: LossConfig, backends: Backends = Backends()):
        super().__init__()
        self.loss_cfg = loss
        self.patch = model.patch_size
        self.encoder = ViTEncoder(model.size, model.img_size, model.patch_size, backends)
        self.decoder = MAEDecoder(
            self.encoder.dim, model.decoder_dim, model.decoder_depth, model.decoder_heads, self.encoder.grid, model.patch_size,
            backends,
        )
        self.loss_op = backends.norm_pix_loss_op
        self.contrastive = loss.con_weight > 0
        if self.contrastive:
            self.con_token = model.con_token
            self.projector = mlp_head(3, self.encoder.dim, model.proj_hidden, model.proj_dim, True, model.head_bn)
            self.predictor = mlp_head(2, model.proj_dim, model.proj_hidden, model.proj_dim, False, model.head_bn)

    def forward(self, images: Tensor, mask: Mask, keys: Tensor | None = None, key_offset: int = 0) -> dict[str, Tensor]:
        """images ``[B, 3, H, W]`` (fp32, normalised); keys ``[W*B, E]`` from the momentum branch."""
        latent = self.encoder(images, mask)  # [B, 1 + N_vis, D]
        pred = self.decoder(latent, mask)  # [B, N, 3*p*p]
        loss_mim = self.loss_op(pred, images, mask.mask, self.patch, self.loss_cfg.norm_pix)  # masked patches only
        out = {"loss_mim": loss_mim, "pred": pred}
        if self.contrastive:
            if keys is None:
                raise ValueError("the contrastive branch is on: forward needs the momentum keys")
            q = self.predictor(self.projector(head_input(latent, self.con_token)))  # [B, E]
            out["loss_con"] = info_nce(q, keys, key_offset, self.loss_cfg.temperature)
            out["loss"] = loss_mim + self.loss_cfg.con_weight * out["loss_con"]
        else:
            out["loss_con"] = torch.zeros((), device=loss_mim.device)
            out["loss"] = loss_mim
        return out


class MomentumBranch(nn.Module):
    """EMA copy of the online encoder and projector: ``xi <- m * xi + (1 - m) * theta``. Its buffers
    (BatchNorm running statistics) are the online model's as of the last optimizer step taken: its
    own forward normalises by batch statistics and leaves them alone."""

    def __init__(self, online: SymMIM):
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder).float()
        self.projector = copy.deepcopy(online.projector).float()
        for m in self.projector.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = False  # the buffers stay (state, eval); training forwards do not move them
        self.con_token = online.con_token
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Mask, dtype: torch.dtype) -> Tensor:
        """Keys ``[B, E]`` of the visible patches; the encoder runs in ``dtype`` via autocast."""
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            latent = self.encoder(images.float(), mask)  # [B, 1 + N_vis, D]
        return self.projector(head_input(latent, self.con_token).float())  # [B, E]; small MLP with BatchNorm: fp32

    @torch.no_grad()
    def update(self, online: SymMIM, momentum: float | Tensor, masters: dict[int, Tensor] | None = None) -> None:
        """EMA step of the parameters from the online weights (any dtype), or from their fp32
        ``masters`` (``id(parameter) -> master``) where the optimizer keeps them; ``momentum`` may be
        a 0-dim tensor (1 = no change, for a step skipped on the device)."""
        for name in ("encoder", "projector"):
            src, dst = getattr(online, name), getattr(self, name)
            online_fp32 = [(masters[id(p)] if masters else p.detach()).float() for p in src.parameters()]
            ema = list(dst.parameters())
            if isinstance(momentum, Tensor):  # a device scalar: lerp would read its weight on the host
                torch._foreach_mul_(ema, momentum)
                torch._foreach_add_(ema, torch._foreach_mul(online_fp32, 1.0 - momentum))
            else:
                torch._foreach_lerp_(ema, online_fp32, 1.0 - momentum)  # fused over all tensors

    @torch.no_grad()
    def take_buffers(self, online: SymMIM, skipped: Tensor) -> None:
        """At the end of an accumulation round: the online model's buffers become this branch's; where
        the round's update was skipped (``skipped``, a 0-dim tensor, is 1) this branch's, those of the
        last step taken, go back into the online model instead, so that a skipped round leaves no
        statistics behind. Decided on the device."""
        ema = [b for name in ("encoder", "projector") for b in getattr(self, name).buffers()]
        live = [b for name in ("encoder", "projector") for b in getattr(online, name).buffers()]
        skip = skipped.bool()
        kept = [torch.where(skip, e, b) for e, b in zip(ema, live)]  # a select: NaN * 0 would be NaN
        torch._foreach_copy_(ema, kept)
        torch._foreach_copy_(live, kept)
