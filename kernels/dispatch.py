"""Backend switch: which implementation runs each hot-path op, chosen once when a model is built.

``resolve_backends(kernels_cfg, device)`` turns the config's ``auto`` choices into concrete
names and checks that what was asked for can run here; a module takes its op from the
resolved :class:`Backends` when it is built (``backends.attention_op``, ...), so a forward pass
calls the chosen function directly. ``auto`` on a GPU listed in ``kernels/measured.json`` is
``measured``: each call runs what measured fastest at the nearest shape there (attention
longer than the Triton kernel's limit always runs SDPA). On other GPUs ``auto`` is our Triton
patch-embed and loss with torch SDPA; on CPU it is eager torch with SDPA.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from symmim.kernels.attention import MAX_TOKENS, attention_reference, attention_triton
from symmim.kernels.measured import ByShape, measured_table
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference, norm_pix_loss_triton
from symmim.kernels.patch_embed import patch_embed_reference, patch_embed_triton


class BackendError(RuntimeError):
    """A kernel backend was asked for that cannot run here."""


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient attention, ``[B, H, N, d]`` in and out (xformers works on ``[B, N, H, d]``)."""
    import xformers.ops as xops

    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


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


@dataclass(frozen=True)
class Backends:
    """Backend names; the default is eager PyTorch for every op (the kernels' references).
    ``measured`` picks per call shape from ``table`` (this GPU's ``kernels/measured.json`` entry)."""

    ops: str = "torch"  # patch-embed, loss: "triton" | "torch" | "measured"
    attention: str = "torch"  # "triton" | "sdpa" | "xformers" | "torch" | "measured"
    table: dict | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        text = f"kernels: ops={self.ops} attention={self.attention}"
        return text + (f" (measured: {self.table['source']})" if self.table else "")

    @property
    def attention_op(self) -> Callable[..., Tensor]:
        if self.attention != "measured":
            return ATTENTION[self.attention]
        return ByShape("attention", self.table["attention"], ATTENTION, lambda q, k, v: (q.shape[-1], q.shape[-2]),
                       override=lambda d, n: "sdpa" if n > MAX_TOKENS else None)

    @property
    def patch_embed_op(self) -> Callable[..., Tensor]:
        if self.ops != "measured":
            return PATCH_EMBED[self.ops]
        return ByShape("patch-embed", self.table["patch-embed"], PATCH_EMBED,
                       lambda images, weight, bias, pos, ids_keep, *rest: (weight.shape[0], ids_keep.shape[1]))

    @property
    def norm_pix_loss_op(self) -> Callable[..., Tensor]:
        if self.ops != "measured":
            return NORM_PIX_LOSS[self.ops]
        return ByShape("norm-pix loss", self.table["norm-pix loss"], NORM_PIX_LOSS,
                       lambda pred, *rest: (pred.shape[-1], pred.shape[1]))


def resolve_backends(cfg, device: torch.device) -> Backends:
    """Concrete backends for the ``kernels`` config section (``backend``, ``attention``) on ``device``."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    table = measured_table(torch.cuda.get_device_name(device)) if on_cuda and torch.cuda.is_available() else None
    ops = cfg.backend if cfg.backend != "auto" else ("measured" if table else "triton" if on_cuda else "torch")
    attention = cfg.attention if cfg.attention != "auto" else ("measured" if table else "sdpa")
    if "triton" in (ops, attention) and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "kernels: triton kernels need a CUDA device; on CPU they run only under the (slow) "
            "interpreter, TRITON_INTERPRET=1. Use kernels.backend=torch here"
        )
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise BackendError(
            "kernels.attention=xformers but xformers is not importable; "
            "install the extra (pip install 'symmim[xformers]') or pick triton|sdpa|torch"
        )
    return Backends(ops, attention, table if "measured" in (ops, attention) else None)
