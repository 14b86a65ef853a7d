"""Vision Transformer encoder that encodes only visible patches, and MAE's light decoder.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv`` ...), so exported
weights load into timm without renaming. Each module takes its hot-path op (attention,
patch-gather-embed) from the resolved kernel backends when it is built; LayerNorm is torch's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from symmim.core.masking import Mask
from symmim.kernels.dispatch import Backends


@dataclass(frozen=True)
class ViTSize:
    dim: int
    depth: int
    heads: int


VIT_SIZES = {
    "micro": ViTSize(128, 4, 4),  # CPU smoke runs
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[1, 1 + h*w, dim]``, a zero row for CLS."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = pos.flatten()[:, None] * omega[None, :]  # [N, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [N, D/2]

    table = torch.cat([embed(cols), embed(rows)], dim=1)  # [N, D]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


def LayerNorm(dim: int) -> nn.LayerNorm:  # noqa: N802 - a module constructor, as timm's norm_layer
    """torch's fused LayerNorm with ViT's epsilon (statistics in fp32 for half inputs)."""
    return nn.LayerNorm(dim, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention; ``op`` is the backend's ``(q, k, v) -> out`` on ``[B, H, N, d_h]``."""

    def __init__(self, dim: int, heads: int, op: Callable[..., Tensor]):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d_h]
        out = self.op(*qkv.unbind(0))  # [B, H, N, d_h]; unbind: one stack in backward
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``rate``."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.rate)  # [B, 1, 1]
        return x * keep / (1 - self.rate)


class Block(nn.Module):
    """Pre-norm transformer block, optionally with drop path on both residual branches."""

    def __init__(self, dim: int, heads: int, backends: Backends, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, backends.attention_op)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)  # weight [D, C, p, p], used as a GEMM


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (and patch projection), unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """ViT that embeds and encodes only the visible patches of each image (plus CLS).

    ``drop_path`` is the stochastic-depth rate of the last block, rising linearly from 0 at
    the first (MAE / timm fine-tuning); 0 for pre-training.
    """

    def __init__(self, size: str, img_size: int, patch: int, backends: Backends, drop_path: float = 0.0):
        super().__init__()
        s = VIT_SIZES[size]
        self.dim, self.patch = s.dim, patch
        self.grid = (img_size // patch, img_size // patch)
        self.patch_embed = PatchEmbed(patch, s.dim)
        self.embed_op = backends.patch_embed_op  # visible patches -> tokens, fused where the backend is Triton
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(s.dim, self.grid), persistent=True)  # [1, 1+N, D]
        rates = [drop_path * i / max(s.depth - 1, 1) for i in range(s.depth)]  # linear over depth
        self.blocks = nn.ModuleList(Block(s.dim, s.heads, backends, drop_path=r) for r in rates)
        self.norm = LayerNorm(s.dim)
        _init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: Tensor, mask: Mask | None = None) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, 1 + N_vis, D]`` (CLS first); no mask = every patch."""
        b = images.shape[0]
        if mask is None:
            n = self.grid[0] * self.grid[1]
            ids = torch.arange(n, device=images.device).expand(b, n)
            mask = Mask(ids, torch.zeros(b, n, dtype=torch.bool, device=images.device), self.grid)
        w = self.patch_embed.proj
        pos = self.pos_embed.to(w.weight.dtype)  # [1, 1+N, D]
        x = self.embed_op(images.to(pos.dtype), w.weight, w.bias, pos[0, 1:], mask.ids_keep, mask.cell, mask.phase)  # [B, N_vis, D]
        cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1).to(x.dtype)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + N_vis, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class MAEDecoder(nn.Module):
    """Light decoder: mask tokens re-inserted at the masked positions, predicts pixels."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], patch: int, backends: Backends):
        super().__init__()
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid), persistent=True)  # [1, 1+N, Dd]
        self.blocks = nn.ModuleList(Block(dim, heads, backends) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * 3)
        _init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, mask: Mask) -> Tensor:
        """Encoder output ``[B, 1 + N_vis, D]`` -> pixel predictions ``[B, N, C*p*p]``."""
        x = self.decoder_embed(latent)  # [B, 1 + N_vis, Dd]
        b, _, d = x.shape
        n = mask.mask.shape[1]
        idx = mask.ids_keep[..., None].expand(-1, -1, d)  # [B, N_vis, Dd]
        tokens = torch.scatter(self.mask_token.to(x.dtype).expand(b, n, d), 1, idx, x[:, 1:])  # [B, N, Dd]
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed.to(x.dtype)  # [B, 1 + N, Dd]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # [B, N, C*p*p]
