"""Embedded default data set: ten procedural image classes stored as real JPEG files.

CPU smoke runs, CI and the data pipeline tests need an ImageFolder tree of real JPEGs on
machines without ImageNet or a network. This module draws one from a seed, once per cache
folder. Each class is a structural concept (rings, stripes, checkers, ...); position, scale,
count, rotation and colours are drawn from wide ranges shared by all classes, over gradient
backgrounds with clutter and noise, so the classes differ by structure and not by colour and
kNN accuracy on learned features is a meaningful signal. The same seed and counts give
byte-identical files, whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger("symmim.data")

VERSION = "embedded-v1"
SPLITS = ("train", "val")
MIN_SIZE, MAX_SIZE = 96, 320
MARKER = ".complete"


# ---- class concepts: each returns a boolean foreground mask of shape (h, w) ----

def _frame(rng, w, h):
    """Pixel coordinates (u, v) around a random centre, rotated by a random angle."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x -= rng.uniform(0.2, 0.8) * w
    y -= rng.uniform(0.2, 0.8) * h
    a = rng.uniform(0, np.pi)
    return x * np.cos(a) + y * np.sin(a), y * np.cos(a) - x * np.sin(a)


def _period(rng, w, h):
    """A pattern period between 6 px and a fifth of the shorter side."""
    return max(6.0, rng.uniform(0.06, 0.2) * min(w, h))


def _rings(rng, w, h):
    u, v = _frame(rng, w, h)
    phase = np.hypot(u, v) * (2 * np.pi / _period(rng, w, h)) + rng.uniform(0, 2 * np.pi)
    return np.sin(phase) > rng.uniform(-0.4, 0.4)


def _stripes(rng, w, h):
    u, _ = _frame(rng, w, h)
    return np.sin(u * (2 * np.pi / _period(rng, w, h))) > rng.uniform(-0.5, 0.5)


def _checkers(rng, w, h):
    u, v = _frame(rng, w, h)
    cell = _period(rng, w, h) / 2 + 3
    return np.sin(np.pi * u / cell) * np.sin(np.pi * v / (cell * rng.uniform(0.7, 1.4))) > 0


def _waves(rng, w, h):
    u, v = _frame(rng, w, h)
    gap = 1.5 * _period(rng, w, h)
    wavelength = gap * rng.uniform(1.5, 4)
    amplitude = gap * rng.uniform(0.3, 0.7)
    offset = (v + amplitude * np.sin(u * (2 * np.pi / wavelength))) % gap
    return offset < gap * rng.uniform(0.15, 0.4)


def _spokes(rng, w, h):
    u, v = _frame(rng, w, h)
    return np.sin(rng.integers(5, 19) * np.arctan2(v, u)) > rng.uniform(-0.3, 0.5)


def _blobs(rng, w, h):
    grid = rng.random(rng.integers(3, 9, size=2)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC))
    return field > np.quantile(field, rng.uniform(0.35, 0.65))


def _shapes(w, h, draw_all):
    """Mask of the shapes that draw_all(draw, size) draws on a blank canvas."""
    canvas = Image.new("L", (w, h))
    draw_all(ImageDraw.Draw(canvas), min(w, h))
    return np.asarray(canvas) > 127


def _star_points(rng, w, h, radii):
    """Vertices around a random centre at the given radii, evenly spaced from a random angle."""
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _fill_or_outline(rng, draw, points):
    if rng.random() < 0.3:
        draw.polygon(points, outline=255, width=int(rng.integers(2, 5)))
    else:
        draw.polygon(points, fill=255)


def _dots(rng, w, h):
    def draw_all(draw, size):
        for _ in range(rng.integers(12, 61)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), max(2.5, rng.uniform(0.015, 0.05) * size)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return _shapes(w, h, draw_all)


def _triangles(rng, w, h):
    def draw_all(draw, size):
        for _ in range(rng.integers(2, 8)):
            radii = rng.uniform(0.12, 0.3) * size * rng.uniform(0.8, 1.2, 3)
            _fill_or_outline(rng, draw, _star_points(rng, w, h, radii))
    return _shapes(w, h, draw_all)


def _stars(rng, w, h):
    def draw_all(draw, size):
        for _ in range(rng.integers(1, 5)):
            outer, inner = rng.uniform(0.15, 0.35) * size, rng.uniform(0.35, 0.55)
            radii = np.tile([outer, outer * inner], rng.integers(5, 9))
            _fill_or_outline(rng, draw, _star_points(rng, w, h, radii))
    return _shapes(w, h, draw_all)


def _crosses(rng, w, h):
    def draw_all(draw, size):
        for _ in range(rng.integers(2, 9)):
            arm, half = rng.uniform(0.1, 0.25) * size, rng.uniform(0.1, 0.2)
            cx, cy, a = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, np.pi / 2)
            for bar in (a, a + np.pi / 2):
                along = arm * np.array([np.cos(bar), np.sin(bar)])
                across = arm * half * np.array([-np.sin(bar), np.cos(bar)])
                corners = [along + across, along - across, -along - across, -along + across]
                draw.polygon([(cx + px, cy + py) for px, py in corners], fill=255)
    return _shapes(w, h, draw_all)


CLASSES = {
    "rings": _rings, "stripes": _stripes, "checkers": _checkers, "waves": _waves, "spokes": _spokes,
    "blobs": _blobs, "dots": _dots, "triangles": _triangles, "stars": _stars, "crosses": _crosses,
}
_TEXTURES = {"rings", "stripes", "checkers", "waves", "spokes", "blobs"}


# ---- rendering ----

def _gradient(rng, w, h, c0, c1):
    """A (h, w, 3) linear gradient from colour c0 to c1 along a random direction."""
    u, _ = _frame(rng, w, h)
    t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    return c0 + t[..., None] * (c1 - c0)


def _contrasting_colour(rng, others, min_distance=90.0):
    """A random RGB colour at least min_distance away from each of the others."""
    while True:
        c = rng.uniform(0, 255, 3)
        if all(np.linalg.norm(c - o) >= min_distance for o in others):
            return c


def _add_clutter(rng, img):
    """img with up to six faint random lines and ellipse outlines blended in."""
    h, w, _ = img.shape
    for _ in range(rng.integers(0, 7)):
        canvas = Image.new("L", (w, h))
        x, y = rng.uniform(0, w, 2), rng.uniform(0, h, 2)
        box, width = (min(x), min(y), max(x), max(y)), int(rng.integers(1, 4))
        if rng.random() < 0.5:
            ImageDraw.Draw(canvas).line(box, fill=255, width=width)
        else:
            ImageDraw.Draw(canvas).ellipse(box, outline=255, width=width)
        alpha = rng.uniform(0.15, 0.45) / 255 * np.asarray(canvas, np.float32)[..., None]
        img = img * (1 - alpha) + rng.uniform(0, 255, 3) * alpha
    return img


def _render(name, rng):
    """One image of class name, of random size, as a PIL RGB image."""
    w, h = (int(s) for s in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
    bg = rng.uniform(0, 255, (2, 3))
    img = _add_clutter(rng, _gradient(rng, w, h, *bg))
    mask = CLASSES[name](rng, w, h)
    if name in _TEXTURES and rng.random() < 0.5:  # texture confined to an elliptic region
        y, x = np.mgrid[0:h, 0:w]
        (cx, cy), (rx, ry) = rng.uniform(0.3, 0.7, 2) * (w, h), rng.uniform(0.3, 0.6, 2) * (w, h)
        mask &= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    fg = _gradient(rng, w, h, _contrasting_colour(rng, bg), _contrasting_colour(rng, bg))
    img = Image.fromarray(np.where(mask[..., None], fg, img).astype(np.uint8))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1))), np.float32)
    img += rng.normal(0, rng.uniform(0, 10), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_chunk(args):
    """Render and save the images of one chunk of (split, class, index) jobs; returns their count."""
    root, seed, jobs = args
    names = list(CLASSES)
    for split_id, c, i in jobs:
        rng = np.random.default_rng([seed, split_id, c, i])
        path = root / SPLITS[split_id] / names[c] / f"{names[c]}_{i:04d}.jpg"
        _render(names[c], rng).save(path, "JPEG", quality=90)
    return len(jobs)


def _generate(root: Path, seed: int, per_class: dict[str, int]) -> int:
    """Write the whole tree under root; returns the number of images."""
    for split in SPLITS:
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
    jobs = [(s, c, i) for s, split in enumerate(SPLITS)
            for c in range(len(CLASSES)) for i in range(per_class[split])]
    processes = min(os.cpu_count() or 1, 4)
    chunks = [(root, seed, jobs[k::4 * processes]) for k in range(4 * processes)]
    with Pool(processes) as pool:
        return sum(pool.imap_unordered(_write_chunk, chunks))


def ensure_embedded(cache_dir: str | Path, seed: int = 0,
                    train_per_class: int = 200, val_per_class: int = 50) -> Path:
    """Root of the embedded ImageFolder tree (ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg).

    Generated on first use into cache_dir; later calls, and processes that waited on the lock
    while another one generated it, return the complete tree at once.
    """
    cache_dir = Path(cache_dir).expanduser()
    name = f"{VERSION}-seed{seed}-{train_per_class}x{val_per_class}"
    root = cache_dir / name
    if (root / MARKER).exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes or the process dies
        if (root / MARKER).exists():
            return root
        for stale in cache_dir.glob(f".{name}.tmp-*"):  # left by a generation that crashed
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)  # a tree without the marker is incomplete
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            start = time.perf_counter()
            per_class = {"train": train_per_class, "val": val_per_class}
            count = _generate(tmp, seed, per_class)
            manifest = {"seed": seed, "per_class": per_class, "classes": list(CLASSES)}
            (tmp / MARKER).write_text(json.dumps(manifest))
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("generated embedded data set: %d images, %d classes in %.1f s -> %s",
             count, len(CLASSES), time.perf_counter() - start, root)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="~/.cache/symmim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_embedded(args.cache_dir, args.seed, args.train_per_class, args.val_per_class))


if __name__ == "__main__":
    main()
