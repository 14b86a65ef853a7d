"""The momentum branch's own view (``data.key_view``): the config key, the PyTorch loader's draws
and colour operations read off directly with seeded generators, both loaders' colour functions
on noise (the blur), and both loaders' outputs.

The crop, flip and colour statistics measured from the loaders' outputs (both loaders, DALI's
stage cut included) are in ``test_augment.py``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from symmim.core.config import ConfigError, load_config
from symmim.data import views as moco
from symmim.data.folder import scan_imagefolder
from symmim.data.torch_loader import (Augmentation, KeyColour, TorchLoader, apply_colour, crop_view, draw_colour,
                                      random_resized_crop_box)
from symmim.data.views import Views

W, H, SIZE, SHIFT, DRAWS = 240, 180, 32, 4, 4000
LOADERS = ["torch"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])
MODES = ["same", "independent", "shifted"]


def within(fraction: float, p: float, n: int, sds: float = 4.5) -> bool:
    """``fraction`` of ``n`` draws is what a coin of probability ``p`` gives (within ``sds`` standard deviations)."""
    return abs(fraction - p) < sds * (p * (1 - p) / n) ** 0.5


def test_key_view_config():
    data = load_config(None).data
    assert data.key_view == "same" and data.key_shift == 16
    assert load_config(None, ["data.key_view=shifted", "data.key_shift=0"]).data.key_shift == 0
    with pytest.raises(ConfigError, match="data.key_view: expected one of same|independent|shifted, got 'moco'"):
        load_config(None, ["data.key_view=moco"])
    for bad in (-1, 224):
        with pytest.raises(ConfigError, match=r"data.key_shift: output pixels in \[0, model.img_size 224\)"):
            load_config(None, ["data.key_view=shifted", f"data.key_shift={bad}"])
    assert load_config(None, ["model.img_size=16", "model.patch_size=8"]).data.key_shift == 16  # unused unless shifted


def draws(key_view: str, count: int = DRAWS, **kw) -> list:
    """``count`` (online box, online flip, key draw) of a ``W`` x ``H`` image, each from its own seeded generator."""
    aug = Augmentation(SIZE, (0.25, 0.5), True, key_view, **kw)
    out = []
    for i in range(count):
        rng = np.random.default_rng([5, i])
        box, flip = aug.online(W, H, rng)
        out.append((box, flip, aug.key(W, H, box, flip, rng)))
    return out


def test_independent_key_has_its_own_box_and_flip():
    drawn = draws("independent", 2000)
    online = np.array([box for box, _, _ in drawn], dtype=float)  # [n, 4] left, top, right, bottom
    key = np.array([k.box for _, _, k in drawn], dtype=float)
    for boxes in (online, key):
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (W * H)
        assert area.min() > 0.25 - 0.01 and area.max() < 0.5 + 0.01  # crop_scale, +-rounding to whole pixels
        assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= W and boxes[:, 3].max() <= H
    assert (np.abs(key - online).max(1) > 0).mean() > 0.99  # another box, not the online one
    assert np.corrcoef(online[:, 0], key[:, 0])[0, 1] < 0.1  # drawn independently
    flips = np.array([[flip, k.flip] for _, flip, k in drawn])  # [n, 2]
    assert within(flips[:, 1].mean(), 0.5, len(drawn)) and within((flips[:, 0] == flips[:, 1]).mean(), 0.5, len(drawn))
    assert all(k.colour is not None for _, _, k in drawn)


def test_key_colour_draws_follow_moco_v3():
    colours = [draw_colour(np.random.default_rng([9, i])) for i in range(DRAWS)]
    for fraction, p in [(np.mean([bool(c.jitter) for c in colours]), moco.JITTER_P),
                        (np.mean([c.gray for c in colours]), moco.GRAY_P),
                        (np.mean([c.blur > 0 for c in colours]), moco.BLUR_P),
                        (np.mean([c.solarize for c in colours]), moco.SOLARIZE_P)]:
        assert within(fraction, p, DRAWS), (fraction, p)
    factors = {name: [] for name in ("brightness", "contrast", "saturation", "hue")}
    for c in colours:
        for name, value in c.jitter:
            factors[name].append(value)
    for name, strength in [("brightness", moco.BRIGHTNESS), ("contrast", moco.CONTRAST),
                           ("saturation", moco.SATURATION)]:
        assert 1 - strength <= min(factors[name]) < 1 - 0.9 * strength and 1 + 0.9 * strength < max(factors[name]) <= 1 + strength
    assert -moco.HUE <= min(factors["hue"]) < -0.9 * moco.HUE and 0.9 * moco.HUE < max(factors["hue"]) <= moco.HUE
    assert len({tuple(name for name, _ in c.jitter) for c in colours if c.jitter}) == 24  # every order, as torchvision
    sigmas = np.array([c.blur for c in colours if c.blur])
    assert moco.BLUR_SIGMA[0] <= sigmas.min() < 0.3 and 1.8 < sigmas.max() <= moco.BLUR_SIGMA[1]


def test_key_colour_operations_do_what_they_say():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    plain = KeyColour((), False, 0.0, False)

    def out(**changes) -> np.ndarray:
        return np.asarray(apply_colour(img, dataclasses.replace(plain, **changes))).astype(int)  # [24, 24, 3]

    assert (out() == pixels).all()
    gray = out(gray=True)
    assert (gray == gray[..., :1]).all()  # R = G = B
    assert np.abs(gray[..., 0] - pixels @ [0.299, 0.587, 0.114]).max() <= 1  # ITU-R 601 luma
    assert (out(solarize=True) == np.where(pixels >= 128, 255 - pixels, pixels)).all()
    assert np.abs(out(jitter=(("brightness", 0.5),)) - pixels * 0.5).max() <= 1
    assert out(blur=2.0).std() < 0.5 * pixels.std()  # noise is smoothed
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    turned = apply_colour(red, KeyColour((("hue", 0.5),), False, 0.0, False)).getpixel((0, 0))
    assert turned[0] < 5 and min(turned[1:]) > 250  # half a turn of the wheel: cyan


def test_shifted_key_is_the_online_box_moved_by_whole_output_pixels():
    drawn = draws("shifted", 2000, key_shift=SHIFT)
    online = np.array([box for box, _, _ in drawn], dtype=float)  # [n, 4]
    key = np.array([k.box for _, _, k in drawn])
    extent = online[:, 2:] - online[:, :2]  # [n, 2] width, height
    np.testing.assert_allclose(key[:, 2:] - key[:, :2], extent)
    assert key[:, :2].min() >= 0 and key[:, 2].max() <= W and key[:, 3].max() <= H
    moves = (key[:, :2] - online[:, :2]) * SIZE / extent  # [n, 2] in output pixels
    assert np.abs(moves).max() <= SHIFT + 1e-9
    at_edge = (key[:, :2] == 0) | (key[:, 2:] == [W, H])  # clamped inside the image
    assert np.allclose(moves[~at_edge], moves[~at_edge].round()) and at_edge.mean() < 0.2
    assert set(moves[~at_edge].round().astype(int)) == set(range(-SHIFT, SHIFT + 1))
    assert all(k.flip == flip and k.colour is None for _, flip, k in drawn)
    assert all(k.box == box for box, _, k in draws("shifted", 50, key_shift=0))


def test_shifted_view_is_the_online_view_moved():
    """Rendered: the key's pixels are the online view's, displaced by the drawn whole pixels."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    for i in range(20):
        rng = np.random.default_rng([3, i])
        box = np.add(random_resized_crop_box(W // 2, H // 2, (0.3, 0.6), rng), [W // 4, H // 4] * 2)  # central: no clamping
        dx, dy = rng.integers(-SHIFT, SHIFT + 1, 2)
        w, h = box[2] - box[0], box[3] - box[1]
        moved = tuple(box + np.array([dx * w, dy * h] * 2) / SIZE)
        online = np.asarray(crop_view(img, tuple(box), SIZE, False)).astype(int)  # [S, S, 3]
        key = np.asarray(crop_view(img, moved, SIZE, False)).astype(int)
        overlap = key[max(0, -dy):SIZE - max(0, dy), max(0, -dx):SIZE - max(0, dx)]
        assert np.abs(overlap - online[max(0, dy):SIZE + min(0, dy), max(0, dx):SIZE + min(0, dx)]).max() <= 1


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyviews")
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"c{i % 2}" / f"{i:02d}.jpg", quality=90)
    return root


def _loader(name: str, root, mode: str, **kw):
    data = load_config(None, ["data.workers=1", "data.precheck=false", f"data.key_view={mode}"]).data
    items = scan_imagefolder(root / "train")
    if name == "dali":
        from symmim.data.dali_loader import DaliLoader

        return DaliLoader(items, len(items), data, SIZE, 4, 0, 0, 1, torch.device("cpu"))
    return TorchLoader(items, data, SIZE, 4, 0, 0, 1, torch.device("cpu"), **kw)


@pytest.mark.parametrize("name", LOADERS)
def test_loaders_yield_a_tensor_for_same_and_views_otherwise(photo_root, name):
    batches = {mode: list(_loader(name, photo_root, mode).epoch(0)) for mode in MODES}
    for mode, got in batches.items():
        assert len(got) == 4
        for batch in got:
            views = (batch,) if mode == "same" else batch
            assert isinstance(batch, torch.Tensor) if mode == "same" else isinstance(batch, Views)
            assert all(v.shape == (4, 3, SIZE, SIZE) and v.dtype == torch.float32 for v in views)
            if mode == "independent":
                assert (batch.online - batch.key).abs().mean() > 0.1
    if name == "torch":  # the online view is the `same` batch, bit for bit
        for mode in ("independent", "shifted"):
            assert all(torch.equal(a, b.online) for a, b in zip(batches["same"], batches[mode]))


def test_fine_tuning_batches_ignore_the_key_view(photo_root):
    images, labels = next(iter(_loader("torch", photo_root, "independent", labels=True).epoch(0)))
    assert isinstance(images, torch.Tensor) and images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,)


@pytest.mark.skipif(len(LOADERS) < 2, reason="DALI is not installed")
@pytest.mark.parametrize("mode", MODES)
def test_dali_mixed_decoder_graph_is_defined(photo_root, mode):
    """The GPU path's graph (``mixed`` decode, uint8 out) is defined and serialised without a GPU: DALI
    refuses, as the graph is defined, a CPU operator fed by a GPU one, or a per-sample argument
    (boxes, flips, colour draws) that lives on the GPU."""
    from symmim.data.dali_loader import MIXED_PREALLOCATION, _train_pipeline

    pipe = _train_pipeline(source=scan_imagefolder(photo_root / "train"), shard_id=0, num_shards=1, size=SIZE,
                           scale=(0.2, 1.0), hflip=True, decode_device="mixed", normalize=False, key_view=mode,
                           decoder_args={"hw_decoder_load": 0.65, **MIXED_PREALLOCATION}, key_shift=SHIFT,
                           enable_conditionals=mode == "independent", seed=1, batch_size=4, num_threads=1,
                           device_id=None)
    assert b"mixed" in pipe.serialize()


def test_blurred_keys_at_moco_v3s_rate_in_both_loaders():
    """The colour functions themselves on 400 noise images: a blurred key loses its pixel-to-pixel
    differences against its spread (jitter and grayscale scale both alike). Expected: BLUR_P times
    the share of sigmas in [0.1, 2] that visibly smooth noise, most of them."""
    noise = np.random.default_rng(0).integers(0, 256, (400, SIZE, SIZE, 3), dtype=np.uint8)  # [n, S, S, 3]
    keys = {"torch": np.stack([np.asarray(apply_colour(Image.fromarray(x), draw_colour(np.random.default_rng([2, i]))))
                               for i, x in enumerate(noise)])}
    if "dali" in LOADERS:
        from nvidia.dali import fn, pipeline_def

        from symmim.data.dali_loader import _moco_colour

        @pipeline_def(batch_size=len(noise), num_threads=1, device_id=None, seed=3, enable_conditionals=True)
        def colour():
            return _moco_colour(fn.external_source(source=lambda: noise, batch=True, layout="HWC"))

        pipe = colour()
        pipe.build()
        keys["dali"] = pipe.run()[0].as_array()
    for name, key in keys.items():
        key = key.astype(float)
        sharpness = np.abs(np.diff(key, axis=2)).mean((1, 2, 3)) / (key.std((1, 2, 3)) + 1e-9)  # [n]; noise: ~1.13
        assert 0.03 < (sharpness < 0.8).mean() < moco.BLUR_P + 0.04, name


def test_the_momentum_branch_encodes_the_key_view_and_the_online_branch_the_online_view():
    from symmim.core.distributed import init_distributed
    from symmim.core.pretrain_step import build_training

    cfg = load_config("tiny_cpu", ["train.device=cpu", "train.batch_size=4", "data.key_view=independent"])
    tr = build_training(cfg, init_distributed("cpu"))
    seen = {}
    momentum_forward, engine_forward = tr.momentum.forward, tr.engine.forward
    tr.momentum.forward = lambda images, *a: seen.setdefault("key", images) is not None and momentum_forward(images, *a)
    tr.engine.forward = lambda images, *a: seen.setdefault("online", images) is not None and engine_forward(images, *a)
    g = torch.Generator().manual_seed(0)
    online, key = (torch.randn(4, 3, 64, 64, generator=g) for _ in range(2))
    out = tr.step(Views(online, key), 1e-3, 0.99)
    assert seen["key"] is key and seen["online"] is online and torch.isfinite(out["loss"])


def test_a_pretraining_run_with_an_independent_key_view(embedded_cache, tmp_path):
    from pretrain_runs import PRETRAIN, metrics, quiet, run

    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, "data.key_view=independent", "train.max_steps=3",
                                                 "train.batch_size=16", "log.every_steps=1", "log.recon_images=0"),
                "--output-dir", str(run_dir)])
    assert "decode=cpu" in proc.stderr and [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert all(r["loss_con"] > 0 for r in metrics(run_dir))
