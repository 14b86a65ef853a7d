"""Data-loading throughput: the DALI pipeline against the PyTorch (PIL + DataLoader) loader.

Both are the training loaders themselves (``data.dali_loader.DaliLoader``,
``data.torch_loader.TorchLoader``) built from one config: the same batch, output size,
random-resized-crop scale, flip and normalisation, full-resolution decode (no DCT
down-scaling; DALI's fused decode-and-crop skips what lies outside the crop, as in training),
and ``--workers`` decode threads (DALI) or worker processes (PyTorch). Throughput is images
per second over ``--batches`` batches after ``--warmup``, all inside one epoch, the median
of ``--repeats`` alternating runs. Two data sets: generated photo-like JPEGs of ImageNet
size (about 500x375, quality 90) and the embedded one (small procedural JPEGs).

``--key-view same independent shifted`` measures each key view (``data.key_view``: the momentum
branch's own view, ``data/views.py``) as its own row, all runs alternating, and the cost per image
of each against ``same`` (``torch_cost_x``, ``dali_cost_x``: same's img/s over the row's).

``--stages`` also profiles where the time goes on the photos: DALI's CPU pipeline cut after each
stage (read, decode and crop, resize, flip and normalise) and two variants of the whole (uint8
out, resize without antialiasing), in img/s with ``--workers`` threads; and the PIL loader's
per-image steps in ms on one thread.

    python benchmarks/dataloader.py --workers 2 --photos 1024 --batches 30 --repeats 5 --stages \
        --json benchmarks/results/cpu_dataloader.json
    python benchmarks/dataloader.py --workers 2 --key-view same independent shifted \
        --json benchmarks/results/cpu_dataloader_key_views.json
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
import time
import typing
from multiprocessing import Pool
from pathlib import Path


import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from symmim.benchmarks.common import base_parser, environment, print_table, write_results
from symmim.core.config import DataConfig, load_config
from symmim.core.distributed import pick_device
from symmim.data.embedded import ensure_embedded
from symmim.data.folder import scan_imagefolder
from symmim.data.torch_loader import TorchLoader, open_rgb, random_resized_crop_box, to_tensor

PHOTOS_VERSION = "photos-v1"
KEY_VIEWS = typing.get_args(typing.get_type_hints(DataConfig)["key_view"])
TARGET = 2.0  # target: DALI-CPU >= 2x PIL + DataLoader at equal threads, ImageNet-size photos


# ---- photo-like JPEGs -----------------------------------------------------------------

def _textures(rng: np.random.Generator, w: int, h: int, count: int) -> np.ndarray:
    """``count`` unit-variance noise fields ``[count, h, w]`` with a 1/f^a spectrum (natural-image
    statistics) plus a white floor (sensor grain), random phases, via one inverse FFT."""
    f = np.hypot(np.fft.rfftfreq(w)[None, :], np.fft.fftfreq(h)[:, None])  # [h, w//2+1]
    f[0, 0] = 1.0
    amp = (f ** -rng.uniform(0.9, 1.3, (count, 1, 1)) + 1.5).astype(np.float32)  # [count, h, w//2+1]
    amp[:, 0, 0] = 0.0  # zero mean
    phase = rng.random(amp.shape, dtype=np.float32) * np.float32(2 * np.pi)
    fields = np.fft.irfft2(amp * (np.cos(phase) + 1j * np.sin(phase)), s=(h, w))  # [count, h, w]
    return fields / fields.std(axis=(1, 2), keepdims=True)


def _layer(rng: np.random.Generator, texture: np.ndarray) -> np.ndarray:
    """An RGB layer ``[3, h, w]``: a smooth two-colour gradient plus ``texture`` ``[3, h, w]`` mixed
    mostly into luminance."""
    _, h, w = texture.shape
    angle = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :] * np.cos(angle) + \
        np.linspace(0, 1, h, dtype=np.float32)[:, None] * np.sin(angle)  # [h, w]
    c0, c1 = rng.uniform(30, 225, (2, 3, 1, 1)).astype(np.float32)
    mixed = 0.4 * texture + rng.uniform(0.3, 0.7) * texture.sum(axis=0)  # shared (luminance) + own part
    return c0 + (c1 - c0) * t + mixed * rng.uniform(15, 40)


def photo(seed: int, index: int) -> Image.Image:
    """One deterministic photo-like image: a textured background with textured, soft-edged shapes."""
    rng = np.random.default_rng([seed, index])
    w, h = (375, 500) if rng.random() < 0.2 else (500, 375)  # some portrait, like ImageNet
    tex = _textures(rng, w, h, 6)  # [6, h, w]
    back, fore = _layer(rng, tex[:3]), _layer(rng, tex[3:])  # [3, h, w] each
    shapes = Image.new("L", (w, h))
    draw = ImageDraw.Draw(shapes)
    for _ in range(rng.integers(2, 6)):
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, 1, 2) * (w, h)
            draw.ellipse((x0, y0, *((x0, y0) + rng.uniform(30, 250, 2))), fill=255)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (rng.integers(3, 7), 2)) * (w, h)], fill=255)
    alpha = np.asarray(shapes.filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255  # [h, w]
    img = back + (fore - back) * alpha  # [3, h, w]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _save_photo(job: tuple[Path, int, int]) -> None:
    folder, seed, index = job
    photo(seed, index).save(folder / f"photo_{index:05d}.jpg", "JPEG", quality=90)


def ensure_photos(cache_dir: str | Path, count: int, seed: int = 0) -> Path:
    """Root of an ImageFolder tree (ROOT/train/photo/*.jpg) of ``count`` photo-like JPEGs,
    written once into ``cache_dir`` (atomically: a complete tree or none)."""
    root = Path(cache_dir).expanduser() / f"{PHOTOS_VERSION}-seed{seed}-{count}"
    if root.is_dir():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    (tmp / "train" / "photo").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(_save_photo, [(tmp / "train" / "photo", seed, i) for i in range(count)], chunksize=16)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp)
    print(f"generated {count} photo-like JPEGs in {time.perf_counter() - start:.1f}s -> {root}")
    return root


# ---- measurement ----------------------------------------------------------------------

def images_per_s(loader, warmup: int, batches: int, device: torch.device) -> float:
    """Images per second over ``batches`` batches of epoch 0, after ``warmup`` batches."""
    stream = loader.epoch(0)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)  # [B, 3, S, S] float, normalised (Views of two with a key view)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    stream.close()  # stops the DataLoader workers mid-epoch
    return batches * loader.batch / elapsed


def _file_stats(files: list[str]) -> dict:
    """Mean JPEG size in KB and mean image size in megapixels (headers only)."""
    pixels = []
    for path in files:
        with Image.open(path) as img:
            pixels.append(img.width * img.height)
    return {"mean_kb": statistics.mean(os.path.getsize(f) for f in files) / 1e3, "mean_mpix": statistics.mean(pixels) / 1e6}


def measure(root: Path, cfgs: dict, size: int, device: torch.device, args, use_dali: bool) -> list[dict]:
    """Table rows for ``root``/train, one per key view of ``cfgs`` (key view -> config): both loaders,
    median img/s of ``args.repeats`` runs, every loader and key view in turn in each repeat."""
    items = scan_imagefolder(root / "train")
    cfg = next(iter(cfgs.values()))
    batch, seed = cfg.train.batch_size, cfg.train.seed
    builders = {}
    for view, c in cfgs.items():
        builders[view, "torch"] = lambda c=c: TorchLoader(items, c.data, size, batch, seed, 0, 1, device)
        if use_dali:
            from symmim.data.dali_loader import DaliLoader  # DALI is optional (absent on the GPU test machine)

            builders[view, "dali"] = lambda c=c: DaliLoader(items, len(items), c.data, size, batch, seed, 0, 1, device)
    steps = len(items) // batch
    batches = min(args.batches, steps - args.warmup)
    if batches < 1:
        raise SystemExit(f"{len(items)} images give {steps} batches of {batch}: "
                         f"too few for --warmup {args.warmup}; use more images or a smaller --batch")
    runs = {key: [] for key in builders}
    names = {}
    for _ in range(args.repeats):  # alternate, so every loader sees the same background load
        for (view, name), build in builders.items():
            loader = build()
            names[name] = loader.name
            runs[view, name].append(images_per_s(loader, args.warmup, batches, device))
            del loader  # frees the DALI pipeline and its threads before the next run
    common = {"dataset": root.name, "files": len(items), **_file_stats(items.files), "batches": batches}
    rows = []
    for view in cfgs:
        row = {**common, "key_view": view}
        for name in ("torch", "dali") if use_dali else ("torch",):
            row[f"{name}_img_s"] = statistics.median(runs[view, name])
            row[f"{name}_runs"] = [round(v, 1) for v in runs[view, name]]
        row["dali_over_torch"] = row["dali_img_s"] / row["torch_img_s"] if use_dali else None
        rows.append(row | {"loaders": names})
    same = next((r for r in rows if r["key_view"] == "same"), None)
    for row in rows:
        for name in ("torch", "dali"):
            if same and row.get(f"{name}_img_s"):
                row[f"{name}_cost_x"] = same[f"{name}_img_s"] / row[f"{name}_img_s"]
    return rows


def dali_stages(items, cfg, size: int, batches: int) -> dict[str, float]:
    """img/s of the DALI CPU training pipeline cut after each stage, and of two variants of the whole."""
    from symmim.data.dali_loader import DaliLoader

    loader = DaliLoader(items, len(items), cfg.data, size, cfg.train.batch_size, cfg.train.seed, 0, 1,
                        torch.device("cpu"))
    variants = {"read": dict(until="read"), "+ decode and crop": dict(until="decode"), "+ resize": dict(until="resize"),
                "+ flip, normalise: float out (training on CPU)": {},
                "uint8 out (training on a GPU)": dict(normalize=False),
                "float out, resize without antialiasing": dict(antialias=False)}
    rates = {}
    for name, changes in variants.items():
        pipe = loader.pipeline(**changes)
        for _ in range(2):
            pipe.run()
        start = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        rates[name] = batches * cfg.train.batch_size / (time.perf_counter() - start)
        del pipe
    return rates


def pil_stages(files: list[str], size: int, scale: tuple[float, float], count: int) -> dict[str, float]:
    """ms per image on one thread of the PIL loader's steps: decode, random-resized-crop, to a tensor."""
    rng = np.random.default_rng(0)
    files = files[:count]
    start = time.perf_counter()
    decoded = [open_rgb(f) for f in files]
    t_decode = time.perf_counter() - start
    start = time.perf_counter()
    crops = [img.resize((size, size), Image.BILINEAR, box=random_resized_crop_box(img.width, img.height, scale, rng))
             for img in decoded]
    t_crop = time.perf_counter() - start
    start = time.perf_counter()
    for img in crops:
        to_tensor(img)
    t_tensor = time.perf_counter() - start
    return {"decode": t_decode / count * 1e3, "random-resized-crop": t_crop / count * 1e3,
            "to uint8 tensor": t_tensor / count * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=14, help="timed batches per run (capped to fit one epoch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per loader, alternating; the median counts")
    p.add_argument("--size", type=int, default=224, help="output crop size")
    p.add_argument("--photos", type=int, default=512, help="photo-like JPEGs to generate (once, cached)")
    p.add_argument("--cache-dir", default=None, help="where data sets are generated (default: data.cache_dir)")
    p.add_argument("--stages", action="store_true", help="also profile each loader stage by stage on the photos")
    p.add_argument("--key-view", nargs="+", choices=KEY_VIEWS, default=["same"],
                   help="data.key_view values to measure, each its own row (the momentum branch's view)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: few photos, batches and repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.batches, args.warmup, args.repeats, args.photos = 4, 2, 1, 1, 16
        args.size = min(args.size, 64)
    device = pick_device(args.device)
    sets = [f"train.batch_size={args.batch}", f"data.workers={args.workers}"] + (
        [f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])
    cfgs = {view: load_config(None, [*sets, f"data.key_view={view}"]) for view in dict.fromkeys(args.key_view)}
    cfg = load_config(None, sets)
    use_dali = importlib.util.find_spec("nvidia.dali") is not None
    notes = [] if use_dali else ["DALI is not installed here: only the PyTorch loader was measured"]
    if args.quick:
        notes.append("quick: counts too small for performance claims; the target is marked only as a check")
    decode = "mixed (nvJPEG)" if device.type == "cuda" else "cpu"
    env = environment(device) | {"load_avg_1min": round(os.getloadavg()[0], 2)}

    datasets = [ensure_photos(cfg.data.cache_dir, args.photos), ensure_embedded(cfg.data.cache_dir, cfg.data.embedded_seed)]
    rows = [row for root in datasets for row in measure(root, cfgs, args.size, device, args, use_dali)]
    photos = rows[0]  # the first key view's row on the photos
    met = None if photos["dali_over_torch"] is None or device.type == "cuda" else photos["dali_over_torch"] >= TARGET
    if met is not None:
        photos["target"] = f"{'met' if met else 'MISSED'} (>= {TARGET:g}x)"
    targets = [{"target": f"DALI-CPU >= {TARGET:g}x PIL+DataLoader, equal threads, ImageNet-size photos "
                          f"(key view {photos['key_view']})", "measured": photos["dali_over_torch"], "met": met}]
    columns = ["dataset", "files", "mean_kb", "mean_mpix", "batches", "key_view", "torch_img_s", "dali_img_s",
               "dali_over_torch", "target"]
    if len(cfgs) > 1:
        columns[-1:-1] = ["torch_cost_x", "dali_cost_x"]
    print_table(f"data loading: DALI (decode {decode}) vs PyTorch, {args.workers} threads each, "
                f"batch {args.batch}, {args.size}px crops", env, rows, columns)
    for name, label in rows[0]["loaders"].items():
        print(f"{name}: {label}")
    stages = {}
    if args.stages:
        items = scan_imagefolder(datasets[0] / "train")
        stages["pil_ms_per_image_1_thread"] = pil_stages(items.files, args.size, cfg.data.crop_scale,
                                                         min(len(items), 256))
        if use_dali:
            stages["dali_cpu_img_s"] = dali_stages(items, cfg, args.size, args.batches)
        for part, values in stages.items():
            print(f"\nstages, photos: {part}")
            for name, value in values.items():
                print(f"  {name:48s} {value:8.2f}")
    for note in notes:
        print(f"note: {note}")
    record = {"benchmark": "dataloader", "env": env, "config": vars(args) | {"decode": decode, "crop_scale": cfg.data.crop_scale},
              "rows": rows, "targets": targets, "notes": notes, "stages": stages}
    views = len(cfgs) > 1
    bars = [(f"{r['dataset'].split('-')[0]} {name}" + (f" {r['key_view']}" if views else ""), r[f"{name}_img_s"])
            for r in rows for name in ("torch", "dali") if r.get(f"{name}_img_s")]
    write_results(args.json, record, bars, ylabel="images / s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
