"""Backend switch: which implementation runs each hot-path op.

``resolve_backends(cfg.kernels, device)`` turns the config's ``auto`` choices into concrete
ones and checks that what was asked for can run. ``auto`` is what measured fastest in
training on an H200 (``benchmarks/kernels.py``, ``benchmarks/throughput.py``): our Triton
patch-gather-embed and norm-pix loss on CUDA (torch elsewhere), torch SDPA for attention
(its flash kernel beat ours at every ViT shape) and torch's LayerNorm (ours was slower
forward+backward). The Triton attention and LayerNorm stay selectable and tested.
The model calls the ops below with the resolved :class:`Backends`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.masking import Mask
from kernels.attention import attention_reference, attention_triton
from kernels.layernorm import layer_norm_reference, layer_norm_triton
from kernels.norm_pix_loss import norm_pix_loss_reference, norm_pix_loss_triton
from kernels.patch_embed import patch_embed_reference, patch_embed_triton


class BackendError(RuntimeError):
    """A kernel backend was asked for that cannot run here."""


@dataclass(frozen=True)
class Backends:
    ops: str  # patch-embed, loss: "triton" | "torch"
    attention: str  # "triton" | "sdpa" | "xformers" | "torch"
    layernorm: str  # "triton" | "torch"

    def describe(self) -> str:
        return f"kernels: ops={self.ops} attention={self.attention} layernorm={self.layernorm}"


def resolve_backends(cfg, device: torch.device) -> Backends:
    """Concrete backends for ``kernels.backend`` / ``kernels.attention`` on ``device``."""
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


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Non-causal attention, ``[B, H, N, d]`` in and out."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "torch":
        return attention_reference(q, k, v)
    if backend == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # xformers works on [B, N, H, d]
    return attention_triton(q, k, v)


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, mask: Mask, backend: str) -> Tensor:
    """Visible patches of ``images`` ``[B, C, H, W]`` -> tokens ``[B, N_vis, D]``."""
    if backend == "torch":
        return patch_embed_reference(images, weight, bias, pos_embed, mask.ids_keep)
    return patch_embed_triton(images, weight, bias, pos_embed, mask.ids_keep, mask.cell, mask.phase)


def norm_pix_loss(pred: Tensor, images: Tensor, mask: Tensor, patch: int, norm_pix: bool, backend: str) -> Tensor:
    """Mean squared error over masked patches, ``pred`` ``[B, N, C*p*p]``."""
    if backend == "torch":
        return norm_pix_loss_reference(pred, images, mask, patch, norm_pix)
    return norm_pix_loss_triton(pred, images, mask, patch, norm_pix)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> Tensor:
    if backend == "torch":
        return layer_norm_reference(x, weight, bias, eps)
    return layer_norm_triton(x, weight, bias, eps)
