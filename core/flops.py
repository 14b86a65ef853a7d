"""Analytic model FLOPs per image (a multiply-add counts 2), for MFU lines and benchmarks.

Counts the matmuls (linear layers, attention scores and values, patch projection); norms,
softmax and elementwise ops are left out, as in the usual MFU convention. A training step
costs 3x the forward of the trained parts plus 1x the momentum branch's forward.
"""
from __future__ import annotations

from symmim.core.masking import checkerboard_masked_counts
from symmim.core.vit import VIT_SIZES

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens."""
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # q k^T and attn v
    return linear + attention


def _mlp_head_flops(layers: int, in_dim: int, hidden: int, out_dim: int) -> float:
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    return sum(2 * a * b for a, b in zip(dims, dims[1:]))


def encoder_flops(cfg, visible: int) -> float:
    s = VIT_SIZES[cfg.model.size]
    patch_vec = 3 * cfg.model.patch_size**2
    return 2 * visible * patch_vec * s.dim + s.depth * block_flops(visible + 1, s.dim)


def visible_counts(cfg) -> tuple[float, float]:
    """Mean visible patches of the online and the momentum branch."""
    grid = cfg.model.img_size // cfg.model.patch_size
    n = grid * grid
    if cfg.mask.strategy != "symmetric":
        visible = n - round(n * cfg.mask.ratio)
        return visible, visible
    fine = sum(n - m for m in checkerboard_masked_counts((grid, grid), cfg.mask.cell)) / 2
    coarse = sum(n - m for m in checkerboard_masked_counts((grid, grid), cfg.mask.coarse_cell)) / 2
    return fine, coarse


def train_flops_per_image(cfg) -> float:
    """FLOPs of one training step per image: 3x online forward + momentum forward."""
    m = cfg.model
    s = VIT_SIZES[m.size]
    n = (m.img_size // m.patch_size) ** 2
    fine, coarse = visible_counts(cfg)
    decoder = (
        2 * (fine + 1) * s.dim * m.decoder_dim
        + m.decoder_depth * block_flops(n + 1, m.decoder_dim)
        + 2 * (n + 1) * m.decoder_dim * 3 * m.patch_size**2
    )
    online = encoder_flops(cfg, fine) + decoder
    momentum = 0.0
    if cfg.loss.con_weight > 0:
        projector = _mlp_head_flops(3, s.dim, m.proj_hidden, m.proj_dim)
        online += projector + _mlp_head_flops(2, m.proj_dim, m.proj_hidden, m.proj_dim)
        momentum = encoder_flops(cfg, coarse) + projector
    return 3 * online + momentum


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU in FLOP/s, else None."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
