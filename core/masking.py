"""Batched mask generators for masked image modeling.

Three strategies, all computed for the whole batch on the training device (no per-sample
Python loop, no host round trip):

- ``symmetric``: the checkerboard of docs/method.md, cell size ``k`` patches, phase 0 or 1;
- ``random``: MAE's per-sample uniform mask at ratio ``r``;
- ``block``: BEiT-style rectangles at ratio ``r``.

Every generator returns a :class:`Mask` whose visible count is the same for every
sample: kernels and batching need a rectangle ``[B, N_vis]``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from symmim.core.config import MaskConfig


@dataclass(frozen=True)
class Mask:
    """Which patches of a ``h x w`` patch grid the encoder sees, for a batch."""

    ids_keep: Tensor  # [B, N_vis] int64, visible patch indices in ascending (raster) order
    mask: Tensor  # [B, N] bool, True where the patch is hidden from the encoder
    grid: tuple[int, int]  # (h, w) patches
    cell: int | None = None  # checkerboard cell size in patches; None for random / block
    phase: Tensor | None = None  # [B] int64 checkerboard phase; None for random / block

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_masked(self) -> int:
        return self.mask.shape[1] - self.ids_keep.shape[1]


def checkerboard(grid: tuple[int, int], cell: int, phase: Tensor) -> Tensor:
    """Checkerboard masks ``[B, N]`` (True = masked) for per-sample phases ``[B]``.

    ``masked(i, j) = (i // cell + j // cell + phase) % 2 == 1``.
    """
    h, w = grid
    rows = torch.arange(h, device=phase.device) // cell  # [h]
    cols = torch.arange(w, device=phase.device) // cell  # [w]
    parity = (rows[:, None] + cols[None, :]).flatten()  # [N]
    return (parity[None, :] + phase[:, None]) % 2 == 1  # [B, N]


@functools.cache
def checkerboard_masked_counts(grid: tuple[int, int], cell: int) -> tuple[int, int]:
    """How many patches phase 0 and phase 1 mask (they differ when the cell grid is odd)."""
    m0 = int(checkerboard(grid, cell, torch.zeros(1, dtype=torch.long)).sum())
    return m0, grid[0] * grid[1] - m0


def _visible_ids(mask: Tensor, num_visible: int) -> Tensor:
    """Indices of the unmasked patches in raster order, ``[B, N_vis]``, without a host sync."""
    # A stable sort on the 0/1 mask lists the visible (0) positions first, in index order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_visible]


def symmetric_mask(
    batch: int,
    grid: tuple[int, int],
    cell: int,
    phase: str | int,
    device: torch.device,
    host_generator: torch.Generator | None = None,
) -> Mask:
    """Checkerboard mask of cell size ``cell``; ``phase`` is 0, 1 or ``"random"``.

    A random phase is drawn per sample when both phases mask the same number of patches
    (even cell grid), and once for the whole batch otherwise (e.g. 14x14 patches with
    cell 2 give 49 cells: phase 0 masks 96 patches, phase 1 masks 100). Phases are drawn
    on the host (``host_generator``, a CPU generator) so the visible count is known there
    without waiting for the device.
    """
    h, w = grid
    if not 1 <= cell <= min(h, w):
        raise ValueError(f"checkerboard cell {cell} does not fit a {h}x{w} patch grid")
    m0, m1 = checkerboard_masked_counts(grid, cell)
    if phase == "random":
        draws = batch if m0 == m1 else 1
        host = torch.randint(0, 2, (draws,), generator=host_generator).expand(batch).contiguous()
    elif type(phase) is int and phase in (0, 1):
        host = torch.full((batch,), int(phase), dtype=torch.long)
    else:
        raise ValueError(f"checkerboard phase must be 0, 1 or 'random', got {phase!r}")
    masked = m0 if m0 == m1 else (m1 if host[:1].tolist() == [1] else m0)  # one count for the batch (host read)
    phases = host.to(device, non_blocking=True)  # [B]
    mask = checkerboard(grid, cell, phases)  # [B, N]
    return Mask(_visible_ids(mask, h * w - masked), mask, grid, cell, phases)


def _masked_count(num_patches: int, ratio: float) -> int:
    masked = int(round(num_patches * ratio))
    if not 0 < masked < num_patches:
        raise ValueError(f"mask ratio {ratio} leaves no visible or no masked patch of {num_patches}")
    return masked


def random_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Mask:
    """MAE's uniform random mask: exactly ``round(N * ratio)`` masked patches per sample."""
    n = grid[0] * grid[1]
    visible = n - _masked_count(n, ratio)
    noise = torch.rand(batch, n, device=device, generator=generator)  # [B, N]
    ids_keep = torch.argsort(noise, dim=1)[:, :visible].sort(dim=1).values  # [B, N_vis]
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return Mask(ids_keep, mask, grid)


def block_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    aspect: float = 0.3,
) -> Mask:
    """BEiT-style block-wise mask with exactly ``round(N * ratio)`` masked patches.

    Each sample draws a sequence of random rectangles (area in patches, aspect ratio in
    ``[aspect, 1/aspect]``). Patches are masked in the order of the first rectangle that
    covers them; the last rectangle is cut to hit the exact count, and if the rectangles
    cover too little the rest is filled at random.
    """
    h, w = grid
    n = h * w
    masked = _masked_count(n, ratio)
    blocks = max(8, math.ceil(4 * masked / min_block))

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    area = min_block + uniform(batch, blocks) * max(masked - min_block, 0)  # [B, M]
    log_ar = math.log(aspect) + uniform(batch, blocks) * 2 * math.log(1 / aspect)
    bh = (area * log_ar.exp()).sqrt().round().clamp(1, h)  # [B, M]
    bw = (area / log_ar.exp()).sqrt().round().clamp(1, w)
    top = (uniform(batch, blocks) * (h - bh + 1)).floor()  # [B, M]
    left = (uniform(batch, blocks) * (w - bw + 1)).floor()
    rows = torch.arange(h, device=device).repeat_interleave(w).float()  # [N]
    cols = torch.arange(w, device=device).repeat(h).float()  # [N]
    covered = (
        (rows >= top[..., None]) & (rows < (top + bh)[..., None])
        & (cols >= left[..., None]) & (cols < (left + bw)[..., None])
    )  # [B, M, N]
    first = torch.where(covered.any(1), covered.int().argmax(1), blocks).float()  # [B, N]
    order = torch.argsort(first + 0.5 * uniform(batch, n), dim=1)  # [B, N]
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    return Mask(_visible_ids(mask, n - masked), mask, grid)


class MaskGenerator:
    """Seeded masks for the two branches of a step, from the ``mask`` config section.

    ``online`` masks the image the encoder and decoder train on; ``momentum`` masks the
    view the momentum encoder sees (symmetric strategy: the coarse cell size). The
    generator owns its random streams, so its state travels with a checkpoint.
    """

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int], device: torch.device, seed: int):
        self.cfg = cfg
        self.grid = grid
        self.device = torch.device(device)
        self.host_rng = torch.Generator().manual_seed(seed)
        self.device_rng = torch.Generator(self.device).manual_seed(seed)

    def _make(self, batch: int, cell: int) -> Mask:
        c = self.cfg
        if c.strategy == "symmetric":
            return symmetric_mask(batch, self.grid, cell, c.phase, self.device, self.host_rng)
        if c.strategy == "random":
            return random_mask(batch, self.grid, c.ratio, self.device, self.device_rng)
        return block_mask(batch, self.grid, c.ratio, self.device, self.device_rng)

    def online(self, batch: int) -> Mask:
        return self._make(batch, self.cfg.cell)

    def momentum(self, batch: int) -> Mask:
        return self._make(batch, self.cfg.coarse_cell)

    def reseed(self, seed: int) -> None:
        self.host_rng.manual_seed(seed)
        self.device_rng.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"host": self.host_rng.get_state(), "device": self.device_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.host_rng.set_state(state["host"])
        self.device_rng.set_state(state["device"])
