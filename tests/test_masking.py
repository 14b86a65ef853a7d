"""Mask generators (core/masking.py): exact counts, checkerboard formula, batch rectangles,
ids_keep consistency, seeding and checkpointable random state."""
import pytest
import torch

from symmim.core.config import MaskConfig
from symmim.core.masking import (
    Mask,
    MaskGenerator,
    block_mask,
    checkerboard,
    checkerboard_masked_counts,
    random_mask,
    symmetric_mask,
)

CPU = torch.device("cpu")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_consistent(m: Mask, batch: int, grid: tuple[int, int]) -> None:
    """Shape, dtype, device and the ids_keep <-> mask relation that every generator must keep."""
    n = grid[0] * grid[1]
    assert m.grid == grid
    assert m.mask.shape == (batch, n) and m.mask.dtype == torch.bool
    assert m.ids_keep.dim() == 2 and m.ids_keep.shape[0] == batch and m.ids_keep.dtype == torch.int64
    assert m.mask.device.type == "cpu" and m.ids_keep.device.type == "cpu"
    n_vis = m.ids_keep.shape[1]
    assert m.num_visible == n_vis and m.num_masked == n - n_vis
    assert 0 < n_vis < n
    # strictly ascending rows: raster order and no duplicate index
    assert bool((m.ids_keep[:, 1:] > m.ids_keep[:, :-1]).all())
    assert int(m.ids_keep.min()) >= 0 and int(m.ids_keep.max()) < n
    # the kept indices are exactly the unmasked positions
    assert not bool(m.mask.gather(1, m.ids_keep).any())
    assert (~m.mask).sum(1).tolist() == [n_vis] * batch
    for b in range(batch):
        assert m.ids_keep[b].tolist() == torch.nonzero(~m.mask[b]).flatten().tolist()


def masked_neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    h, w = grid
    m = mask.view(-1, h, w).float()
    p = torch.nn.functional.pad(m, (1, 1, 1, 1))
    count = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    return float((count * m).sum() / m.sum())


# ---------------------------------------------------------------- symmetric (checkerboard)

EVEN_GRIDS = [((14, 14), 1), ((8, 8), 1), ((8, 8), 2), ((16, 16), 2), ((4, 6), 1), ((4, 8), 2)]


@pytest.mark.parametrize("grid,cell", EVEN_GRIDS)
@pytest.mark.parametrize("phase", [0, 1, "random"])
def test_symmetric_exact_half(grid, cell, phase):
    n = grid[0] * grid[1]
    m = symmetric_mask(6, grid, cell, phase, CPU, gen(1))
    assert_consistent(m, 6, grid)
    assert m.mask.sum(1).tolist() == [n // 2] * 6
    assert m.num_visible == n // 2 and m.num_masked == n // 2
    assert m.cell == cell
    assert m.phase.shape == (6,) and m.phase.device.type == "cpu"
    assert checkerboard_masked_counts(grid, cell) == (n // 2, n // 2)


def test_symmetric_random_phase_is_per_sample_on_even_grids():
    m = symmetric_mask(64, (8, 8), 1, "random", CPU, gen(0))
    assert set(m.phase.tolist()) == {0, 1}  # 64 fair draws: both phases occur
    assert torch.equal(m.mask, checkerboard((8, 8), 1, m.phase))


@pytest.mark.parametrize("phase", [0, 1])
def test_symmetric_fixed_phase(phase):
    m = symmetric_mask(5, (8, 8), 2, phase, CPU)
    assert m.phase.tolist() == [phase] * 5
    assert torch.equal(m.mask, checkerboard((8, 8), 2, m.phase))


def test_odd_cell_grid_counts():
    # 14x14 patches with cell 2: 7x7 = 49 cells; phase 0 masks 24 cells (96 patches),
    # phase 1 masks 25 cells (100 patches)
    assert checkerboard_masked_counts((14, 14), 2) == (96, 100)
    for phase, masked in ((0, 96), (1, 100)):
        m = symmetric_mask(3, (14, 14), 2, phase, CPU)
        assert_consistent(m, 3, (14, 14))
        assert m.mask.sum(1).tolist() == [masked] * 3
        assert m.num_visible == 196 - masked


def test_odd_cell_grid_random_phase_shared_by_the_batch():
    g = gen(123)
    seen = set()
    for _ in range(24):
        m = symmetric_mask(8, (14, 14), 2, "random", CPU, g)
        assert_consistent(m, 8, (14, 14))
        phases = m.phase.tolist()
        assert len(set(phases)) == 1  # one phase for the whole batch
        counts = set(m.mask.sum(1).tolist())
        assert len(counts) == 1  # one count for the whole batch
        assert counts == {96 if phases[0] == 0 else 100}
        seen.add(phases[0])
    assert seen == {0, 1}  # the phase is still random from batch to batch


@pytest.mark.parametrize("grid,cell", EVEN_GRIDS + [((14, 14), 2), ((14, 14), 3), ((7, 5), 2)])
def test_phases_are_complementary(grid, cell):
    m0 = symmetric_mask(2, grid, cell, 0, CPU)
    m1 = symmetric_mask(2, grid, cell, 1, CPU)
    assert torch.equal(m0.mask, ~m1.mask)
    m0c, m1c = checkerboard_masked_counts(grid, cell)
    assert m0c + m1c == grid[0] * grid[1]
    assert int(m0.mask[0].sum()) == m0c and int(m1.mask[0].sum()) == m1c


@pytest.mark.parametrize("grid,cell", [((6, 10), 1), ((6, 10), 2), ((6, 10), 3), ((14, 14), 2), ((9, 7), 4)])
def test_checkerboard_matches_definition(grid, cell):
    h, w = grid
    phases = torch.tensor([0, 1, 1, 0])
    got = checkerboard(grid, cell, phases)
    assert got.shape == (4, h * w) and got.dtype == torch.bool
    for b, phi in enumerate(phases.tolist()):
        expected = [(i // cell + j // cell + phi) % 2 == 1 for i in range(h) for j in range(w)]
        assert got[b].tolist() == expected
    for phi in (0, 1):
        m = symmetric_mask(2, grid, cell, phi, CPU)
        expected = [(i // cell + j // cell + phi) % 2 == 1 for i in range(h) for j in range(w)]
        assert m.mask[0].tolist() == expected and m.mask[1].tolist() == expected


def test_fine_checkerboard_masked_patches_have_only_visible_neighbours():
    m = symmetric_mask(2, (8, 8), 1, "random", CPU, gen(0))
    assert masked_neighbours(m.mask, (8, 8)) == 0.0


@pytest.mark.parametrize("cell", [0, -1, 15])
def test_symmetric_bad_cell_raises(cell):
    with pytest.raises(ValueError):
        symmetric_mask(2, (14, 14), cell, 0, CPU)


@pytest.mark.parametrize("phase", [2, -1, "fixed"])
def test_symmetric_bad_phase_raises(phase):
    with pytest.raises(ValueError):
        symmetric_mask(2, (8, 8), 1, phase, CPU)


# ---------------------------------------------------------------- random


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (5, 7)])
def test_random_ratio_exact(ratio, grid):
    n = grid[0] * grid[1]
    m = random_mask(7, grid, ratio, CPU, gen(2))
    assert_consistent(m, 7, grid)
    assert m.mask.sum(1).tolist() == [round(n * ratio)] * 7
    assert m.num_masked == round(n * ratio)
    assert m.cell is None and m.phase is None


def test_random_mask_differs_per_sample_and_is_uniform():
    m = random_mask(2000, (8, 8), 0.75, CPU, gen(3))
    assert len({tuple(row) for row in m.ids_keep.tolist()}) > 1900  # per-sample masks
    freq = m.mask.float().mean(0)  # how often each patch is hidden
    assert float((freq - 0.75).abs().max()) < 0.06


# ---------------------------------------------------------------- block


@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.5, 0.75])
@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (6, 9)])
def test_block_ratio_exact(ratio, grid):
    n = grid[0] * grid[1]
    m = block_mask(9, grid, ratio, CPU, gen(4))
    assert_consistent(m, 9, grid)
    assert m.mask.sum(1).tolist() == [round(n * ratio)] * 9
    assert m.cell is None and m.phase is None


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_block_mask_is_blocky(ratio):
    g = gen(5)
    blocky = masked_neighbours(block_mask(64, (14, 14), ratio, CPU, g).mask, (14, 14))
    scattered = masked_neighbours(random_mask(64, (14, 14), ratio, CPU, g).mask, (14, 14))
    assert blocky > scattered + 1.0, (blocky, scattered)


# ---------------------------------------------------------------- ratio validation


@pytest.mark.parametrize("fn", [random_mask, block_mask])
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, 0.001, 0.999])
def test_bad_ratio_raises(fn, ratio):
    # 0.001 and 0.999 of 196 patches round to 0 and 196 masked: no masked / no visible patch
    with pytest.raises(ValueError):
        fn(2, (14, 14), ratio, CPU, gen(0))


# ---------------------------------------------------------------- MaskGenerator

STRATEGIES = [
    MaskConfig(strategy="symmetric", cell=1, coarse_cell=2, phase="random"),
    MaskConfig(strategy="random", ratio=0.75),
    MaskConfig(strategy="block", ratio=0.4),
]


def draw(g: MaskGenerator, times: int = 3, batch: int = 16) -> list[torch.Tensor]:
    out = []
    for _ in range(times):
        out += [g.online(batch).mask, g.momentum(batch).mask]
    return out


@pytest.mark.parametrize("cfg", STRATEGIES, ids=lambda c: c.strategy)
def test_generator_same_seed_same_masks(cfg):
    a = draw(MaskGenerator(cfg, (8, 8), CPU, seed=7))
    b = draw(MaskGenerator(cfg, (8, 8), CPU, seed=7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", STRATEGIES, ids=lambda c: c.strategy)
def test_generator_different_seeds_differ(cfg):
    a = draw(MaskGenerator(cfg, (8, 8), CPU, seed=7))
    b = draw(MaskGenerator(cfg, (8, 8), CPU, seed=8))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", STRATEGIES, ids=lambda c: c.strategy)
def test_generator_masks_change_from_call_to_call(cfg):
    g = MaskGenerator(cfg, (8, 8), CPU, seed=0)
    assert not torch.equal(g.online(16).mask, g.online(16).mask)


def test_generator_online_and_momentum_cells():
    cfg = MaskConfig(strategy="symmetric", cell=1, coarse_cell=2, phase="random")
    g = MaskGenerator(cfg, (8, 8), CPU, seed=0)
    on, mo = g.online(4), g.momentum(4)
    assert on.cell == 1 and mo.cell == 2
    assert torch.equal(on.mask, checkerboard((8, 8), 1, on.phase))
    assert torch.equal(mo.mask, checkerboard((8, 8), 2, mo.phase))
    assert_consistent(on, 4, (8, 8))
    assert_consistent(mo, 4, (8, 8))
    assert on.mask.device.type == mo.mask.device.type == "cpu"


def test_generator_fixed_phase():
    g = MaskGenerator(MaskConfig(strategy="symmetric", cell=2, coarse_cell=2, phase=1), (8, 8), CPU, seed=0)
    m = g.online(3)
    assert m.phase.tolist() == [1, 1, 1]


@pytest.mark.parametrize("cfg", STRATEGIES, ids=lambda c: c.strategy)
def test_generator_state_dict_round_trip(cfg):
    g = MaskGenerator(cfg, (8, 8), CPU, seed=11)
    draw(g, times=2)  # advance the streams
    state = g.state_dict()
    expected = draw(g)
    # the same generator rewound
    g.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, draw(g)))
    # a fresh generator with another seed restored from the state
    other = MaskGenerator(cfg, (8, 8), CPU, seed=999)
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, draw(other)))


def test_generator_state_is_a_snapshot():
    cfg = STRATEGIES[1]
    g = MaskGenerator(cfg, (8, 8), CPU, seed=1)
    state = g.state_dict()
    first = g.online(8).mask
    g.online(8)  # drawing more must not alter the saved state
    g.load_state_dict(state)
    assert torch.equal(g.online(8).mask, first)
