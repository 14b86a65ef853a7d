"""Backend switch: which implementation runs each hot-path op, chosen once when a model is built.

``resolve_backends(kernels_cfg, device)`` turns the config's ``auto`` choices into concrete
names and checks that what was asked for can run here; a module takes its op from the
resolved :class:`Backends` when it is built (``backends.attention_op``, ...), so a forward pass
calls the chosen function directly. ``auto`` is what measured fastest in training on an H200
(``benchmarks/kernels.py``, ``benchmarks/throughput.py``): our Triton patch-gather-embed and
norm-pix loss on CUDA (torch elsewhere), torch SDPA for attention (its flash kernel beat ours
at every ViT shape) and torch's LayerNorm (ours was slower forward+backward). The Triton
attention and LayerNorm stay selectable and tested.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from symmim.kernels.attention import attention_reference, attention_triton
from symmim.kernels.layernorm import layer_norm_triton
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference, norm_pix_loss_triton
from symmim.kernels.patch_embed import patch_embed_reference, patch_embed_triton


class BackendError(RuntimeError):
    """A kernel backend was asked for that cannot run here."""


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient attention, ``[B, H, N, d]`` in and out (xformers works on ``[B, N, H, d]``)."""
    import xformers.ops as xops

    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def torch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """torch's fused LayerNorm over the last dimension (statistics in fp32 for half inputs)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# Each op's implementations; every entry of one table has the same signature.
ATTENTION: dict[str, Callable[..., Tensor]] = {  # (q, k, v) [B, H, N, d] -> [B, H, N, d], non-causal
    "torch": attention_reference, "sdpa": F.scaled_dot_product_attention, "xformers": xformers_attention,
    "triton": attention_triton,
}
PATCH_EMBED: dict[str, Callable[..., Tensor]] = {  # (images, weight, bias, pos_embed, ids_keep, cell, phase)
    "torch": patch_embed_reference, "triton": patch_embed_triton,
}
NORM_PIX_LOSS: dict[str, Callable[..., Tensor]] = {  # (pred, images, mask, patch, norm_pix) -> scalar
    "torch": norm_pix_loss_reference, "triton": norm_pix_loss_triton,
}
LAYER_NORM: dict[str, Callable[..., Tensor]] = {  # (x, weight, bias, eps)
    "torch": torch_layer_norm, "triton": layer_norm_triton,
}


@dataclass(frozen=True)
class Backends:
    """Concrete backend names; the default is eager PyTorch for every op (the kernels' references,
    torch's own LayerNorm)."""

    ops: str = "torch"  # patch-embed, loss: "triton" | "torch"
    attention: str = "torch"  # "triton" | "sdpa" | "xformers" | "torch"
    layernorm: str = "torch"  # "triton" | "torch"

    def describe(self) -> str:
        return f"kernels: ops={self.ops} attention={self.attention} layernorm={self.layernorm}"

    @property
    def attention_op(self) -> Callable[..., Tensor]:
        return ATTENTION[self.attention]

    @property
    def patch_embed_op(self) -> Callable[..., Tensor]:
        return PATCH_EMBED[self.ops]

    @property
    def norm_pix_loss_op(self) -> Callable[..., Tensor]:
        return NORM_PIX_LOSS[self.ops]

    @property
    def layer_norm_op(self) -> Callable[..., Tensor]:
        return LAYER_NORM[self.layernorm]


def resolve_backends(cfg, device: torch.device) -> Backends:
    """Concrete backends for the ``kernels`` config section (``backend``, ``attention``, ``layernorm``) on ``device``."""
    on_cuda = torch.device(device).type == "cuda"
    ops = cfg.backend if cfg.backend != "auto" else ("triton" if on_cuda else "torch")
    attention = cfg.attention if cfg.attention != "auto" else "sdpa"
    layernorm = cfg.layernorm if cfg.layernorm != "auto" else "torch"
    if "triton" in (ops, attention, layernorm) and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "kernels: triton kernels need a CUDA device; on CPU they run only under the (slow) "
            "interpreter, TRITON_INTERPRET=1. Use kernels.backend=torch here"
        )
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise BackendError(
            "kernels.attention=xformers but xformers is not importable; "
            "install the extra (pip install 'symmim[xformers]') or pick triton|sdpa|torch"
        )
    return Backends(ops, attention, layernorm)
