"""Random-resized-crop and flip statistics of both training loaders, read off colour-coded images,
and the statistics of the key views (``data.key_view``).

Every training image is the same 240 x 180 JPEG whose red channel is the pixel's column and
green its row, so each augmented output tells where its crop box lay in the source and whether
it was flipped: a straight-line fit of red along the output's columns gives the box's left edge
and width (a negative slope: mirrored), of green along its rows the top edge and height. The
key views' colour changes are read off flat-coloured images.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from symmim.core.config import load_config
from symmim.data import views as moco
from symmim.data.folder import MEAN, STD, scan_imagefolder
from symmim.data.torch_loader import Augmentation, TorchLoader

W, H, SIZE, FILES, EPOCHS, BATCH = 240, 180, 32, 100, 4, 20
SHIFT = 4  # data.key_shift, output pixels
FLATS = {"colour": (180, 110, 90), "white": (255, 255, 255), "grey": (128, 128, 128)}  # the key-colour test's sources
LOADERS = ["torch"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    xs, ys = np.meshgrid(np.arange(W), np.arange(H))  # [H, W]
    pixels = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)  # R = column, G = row
    (root / "train" / "c0").mkdir(parents=True)
    for i in range(FILES):
        Image.fromarray(pixels).save(root / "train" / "c0" / f"{i:03d}.jpg", quality=100, subsampling=0)
    return root


def make_loader(loader_name: str, root, sets: list[str]):
    """A loader on ``root``; the PyTorch one in this process (its output does not depend on its workers)."""
    workers = 1 if loader_name == "dali" else 0
    data = load_config(None, [f"data.root={root}", f"data.workers={workers}", "data.precheck=false", *sets]).data
    items = scan_imagefolder(root / "train")
    if loader_name == "dali":
        from symmim.data.dali_loader import DaliLoader

        return DaliLoader(items, len(items), data, SIZE, BATCH, 0, 0, 1, torch.device("cpu"))
    return TorchLoader(items, data, SIZE, BATCH, 0, 0, 1, torch.device("cpu"))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[n, 3, S, S]`` -> 0-255 doubles: on the coded images, source coordinates."""
    return images.double() * torch.tensor(STD, dtype=torch.double).view(1, 3, 1, 1) * 255 \
        + torch.tensor(MEAN, dtype=torch.double).view(1, 3, 1, 1) * 255


def loader_views(loader_name: str, root, sets: list[str]) -> list[torch.Tensor]:
    """Every output of ``EPOCHS`` epochs as 0-255 doubles ``[n, 3, S, S]``: one tensor, or one per view."""
    loader = make_loader(loader_name, root, sets)
    batches = [b if isinstance(b, tuple) else (b,) for e in range(EPOCHS) for b in loader.epoch(e)]
    return [pixels(torch.cat(views)) for views in zip(*batches)]


def fit_boxes(rgb: torch.Tensor) -> np.ndarray:
    """``[n, 5]``: left, top, width, height (source pixels) and mirrored (0/1) of each coded view
    ``rgb`` ``[n, 3, S, S]`` (0-255)."""
    inner = torch.arange(2, SIZE - 2, dtype=torch.double)  # away from the resize's border effects
    centres = inner + 0.5

    def fit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slope and intercept of ``values`` [n, len(inner)] against the output pixel centres."""
        c = centres - centres.mean()
        slope = ((values - values.mean(1, keepdim=True)) * c).sum(1) / (c * c).sum()
        return slope, values.mean(1) - slope * centres.mean()

    red = rgb[:, 0, 2:SIZE - 2, 2:SIZE - 2].mean(1)  # [n, columns]: mean over rows
    green = rgb[:, 1, 2:SIZE - 2, 2:SIZE - 2].mean(2)  # [n, rows]: mean over columns
    sx, ax = fit(red)
    sy, ay = fit(green)
    width, height = sx.abs() * SIZE, sy * SIZE  # one output pixel spans w / S source pixels
    left = torch.where(sx > 0, ax, ax + sx * SIZE) + 0.5  # a mirrored row starts at the right edge
    top = ay + 0.5
    return torch.stack([left, top, width, height, (sx < 0).double()], 1).numpy()


def crop_boxes(loader_name: str, root, sets: list[str]) -> np.ndarray:
    """``[n, 5]`` boxes (:func:`fit_boxes`) of every output of a loader with one view."""
    (rgb,) = loader_views(loader_name, root, sets)
    return fit_boxes(rgb)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


@pytest.fixture(scope="module")
def boxes(coded_root) -> dict[str, np.ndarray]:
    return {name: crop_boxes(name, coded_root, ["data.crop_scale=[0.25, 0.5]"]) for name in LOADERS}


@pytest.mark.parametrize("name", LOADERS)
def test_crop_boxes_lie_in_the_configured_ranges(boxes, name):
    left, top, width, height, _ = boxes[name].T
    area, aspect = width * height / (W * H), width / height
    assert len(area) == FILES * EPOCHS
    assert area.min() > 0.25 - 0.02 and area.max() < 0.5 + 0.02, (area.min(), area.max())  # crop_scale, +-rounding
    assert aspect.min() > 0.75 - 0.03 and aspect.max() < 4 / 3 + 0.03, (aspect.min(), aspect.max())
    assert left.min() > -1.0 and (left + width).max() < W + 1.0 and top.min() > -1.0 and (top + height).max() < H + 1.0
    # both ranges are used, not one corner of them: area spreads over the scale range, aspect both ways
    assert np.quantile(area, 0.1) < 0.3 and np.quantile(area, 0.9) > 0.45
    assert (aspect < 0.85).mean() > 0.1 and (aspect > 1.2).mean() > 0.1


@pytest.mark.parametrize("name", LOADERS)
def test_half_of_the_crops_are_mirrored(boxes, coded_root, name):
    flips = boxes[name][:, 4]
    assert abs(flips.mean() - 0.5) < 0.1, flips.mean()  # 400 fair coins: 4 standard deviations
    unflipped = crop_boxes(name, coded_root, ["data.crop_scale=[0.25, 0.5]", "data.hflip=false"])[:, 4]
    assert unflipped.sum() == 0


@pytest.mark.skipif(len(LOADERS) < 2, reason="DALI is not installed")
def test_both_loaders_draw_the_same_distribution(boxes):
    """Area fraction, log aspect ratio and box centre, DALI against the PIL loader (two-sample KS,
    400 draws each: a gap above 0.14 has p < 0.001 if both draw alike)."""
    features = {}
    for name in LOADERS:
        left, top, width, height, _ = boxes[name].T
        features[name] = {"area": width * height / (W * H), "log_aspect": np.log(width / height),
                          "centre_x": (left + width / 2) / W, "centre_y": (top + height / 2) / H}
    for key in features["torch"]:
        assert ks_distance(features["torch"][key], features["dali"][key]) < 0.14, key


@pytest.mark.parametrize("name", LOADERS)
def test_shifted_key_is_the_online_crop_moved(coded_root, name):
    online, key = loader_views(name, coded_root, ["data.crop_scale=[0.25, 0.5]", "data.key_view=shifted",
                                                  f"data.key_shift={SHIFT}"])
    a, b = fit_boxes(online), fit_boxes(key)
    assert np.abs(b[:, 2:4] - a[:, 2:4]).max() < 0.7  # the same extent (source pixels; the fit errs by up to ~0.5)
    assert (a[:, 4] == b[:, 4]).all()  # the online view's flip
    moves = (b[:, :2] - a[:, :2]) * SIZE / a[:, 2:4]  # [n, 2]: x, y in output pixels
    assert np.abs(moves).max() < SHIFT + 0.15
    assert (np.abs(moves - moves.round()) < 0.15).mean() > 0.8  # whole pixels, but where kept inside the image
    steps = moves.round()
    assert np.abs(moves).mean() > 1.5 and (steps == SHIFT).any() and (steps == -SHIFT).any()  # the range is used


@pytest.mark.skipif(len(LOADERS) < 2, reason="DALI is not installed")
def test_dali_independent_key_has_a_box_and_flip_of_its_own(coded_root):
    """Read off DALI's pipeline cut after the resize (both views cropped, resized and mirrored, no colour
    change yet); the key's areas are compared with the PyTorch loader's draws."""
    loader = make_loader("dali", coded_root, ["data.crop_scale=[0.25, 0.5]", "data.key_view=independent"])
    pipe = loader.pipeline(until="resize")
    runs = [pipe.run() for _ in range(FILES * EPOCHS // BATCH)]
    a, b = (fit_boxes(torch.from_numpy(np.concatenate([r[i].as_array() for r in runs])).permute(0, 3, 1, 2).double())
            for i in (0, 1))  # [n, 5] each, from [n, 3, S, S] 0-255
    area = b[:, 2] * b[:, 3] / (W * H)
    assert area.min() > 0.25 - 0.02 and area.max() < 0.5 + 0.02
    assert ks_distance(area, a[:, 2] * a[:, 3] / (W * H)) < 0.14  # the online view's distribution
    aug = Augmentation(SIZE, (0.25, 0.5), True, "independent")
    drawn = []
    for i in range(len(area)):
        rng = np.random.default_rng([1, i])
        box, flip = aug.online(W, H, rng)
        left, top, right, bottom = aug.key(W, H, box, flip, rng).box
        drawn.append((right - left) * (bottom - top) / (W * H))
    assert ks_distance(area, np.array(drawn)) < 0.14  # the PyTorch loader's key boxes
    centres = a[:, :2] + a[:, 2:4] / 2 - b[:, :2] - b[:, 2:4] / 2  # [n, 2]
    assert (np.hypot(*centres.T) > 2).mean() > 0.95  # another box
    assert abs(b[:, 4].mean() - 0.5) < 0.1 and abs((a[:, 4] == b[:, 4]).mean() - 0.5) < 0.1  # a flip of its own


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    (root / "train" / "c0").mkdir(parents=True)
    for i in range(FILES * 3 // 2):
        Image.new("RGB", (64, 48), list(FLATS.values())[i % 3]).save(root / "train" / "c0" / f"{i:03d}.jpg", quality=100)
    return root


def test_independent_key_colour_statistics(flat_root):
    """On flat sources, about 190 keys of each in both loaders: grayscale keys (R = G = B) and unchanged ones
    (no jitter, grayscale or solarize) of a colour, and solarized ones of white (then dark), at MoCo
    v3's rates; on grey, where hue, saturation and contrast do nothing, the same brightness and
    solarize (the luma's distribution) in both loaders. The online view keeps the source colour."""
    luma = {}
    for name in LOADERS:
        online, key = loader_views(name, flat_root, ["data.key_view=independent"])  # [n, 3, S, S] 0-255 each
        source = online.mean((2, 3))  # [n, 3]
        kinds = {kind: (source - torch.tensor(rgb, dtype=torch.double)).abs().amax(1) < 2 for kind, rgb in FLATS.items()}
        assert sum(kinds.values()).all() and all(k.sum() > 150 for k in kinds.values())
        mean = key.mean((2, 3))  # [n, 3]
        colour = kinds["colour"]
        unchanged = ((mean - torch.tensor(FLATS["colour"])).abs().amax(1) < 2)[colour].double().mean()
        p_unchanged = (1 - moco.JITTER_P) * (1 - moco.GRAY_P) * (1 - moco.SOLARIZE_P)  # solarize changes its red
        gray = ((key.amax(1) - key.amin(1)).amax((1, 2)) <= 2)[colour].double().mean()
        solarized = (mean[kinds["white"]].mean(1) < 125).double().mean()  # unsolarized white stays above 150
        for fraction, p, n in [(unchanged, p_unchanged, colour.sum()), (gray, moco.GRAY_P, colour.sum()),
                               (solarized, moco.SOLARIZE_P, kinds["white"].sum())]:
            assert abs(fraction - p) < 4.5 * (p * (1 - p) / n) ** 0.5, (name, fraction, p)
        luma[name] = (mean[kinds["grey"]] @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.double)).numpy().round(1)
    if len(LOADERS) == 2:
        assert ks_distance(luma["torch"], luma["dali"]) < 0.2  # about 190 keys each: p < 0.001 for alike draws
