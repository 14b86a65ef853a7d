"""Random-resized-crop and flip statistics of both training loaders, read off colour-coded images.

Every training image is the same 240 x 180 JPEG whose red channel is the pixel's column and
green its row, so each augmented output tells where its crop box lay in the source and whether
it was flipped: a straight-line fit of red along the output's columns gives the box's left edge
and width (a negative slope: mirrored), of green along its rows the top edge and height.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from symmim.core.config import load_config
from symmim.data.folder import MEAN, STD, scan_imagefolder
from symmim.data.torch_loader import TorchLoader

W, H, SIZE, FILES, EPOCHS, BATCH = 240, 180, 32, 100, 4, 20
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


def crop_boxes(loader_name: str, root, sets: list[str]) -> np.ndarray:
    """``[n, 5]``: left, top, width, height (source pixels) and mirrored (0/1) of every output."""
    data = load_config(None, [f"data.root={root}", "data.workers=1", "data.precheck=false", *sets]).data
    items = scan_imagefolder(root / "train")
    if loader_name == "dali":
        from symmim.data.dali_loader import DaliLoader

        loader = DaliLoader(items, len(items), data, SIZE, BATCH, 0, 0, 1, torch.device("cpu"))
    else:
        loader = TorchLoader(items, data, SIZE, BATCH, 0, 0, 1, torch.device("cpu"))
    images = torch.cat([b for e in range(EPOCHS) for b in loader.epoch(e)])  # [n, 3, S, S] normalised
    rgb = images.double() * torch.tensor(STD, dtype=torch.double).view(1, 3, 1, 1) * 255 \
        + torch.tensor(MEAN, dtype=torch.double).view(1, 3, 1, 1) * 255  # source coordinates
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
