"""Finding image files that would break or silently change training.

``check_image`` classifies one file; ``verify_files`` checks many in parallel. Broken
files (empty, not an image, truncated or corrupt) go into an exclusion list that the
loaders honour; files the pipeline converts (grayscale, CMYK, PNG named .jpg) are reported.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

BROKEN = ("empty", "not-an-image", "corrupt")


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str  # one of BROKEN, or "grayscale", "cmyk", "other-mode", "not-jpeg"
    detail: str

    @property
    def broken(self) -> bool:
        return self.kind in BROKEN


def check_image(path: str) -> Finding | None:
    """What is wrong or unusual with ``path``, or None for a plain RGB JPEG (or PNG)."""
    if os.path.getsize(path) == 0:
        return Finding(path, "empty", "zero-byte file")
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            img.load()  # full decode: finds truncated and corrupt data
    except UnidentifiedImageError:
        return Finding(path, "not-an-image", "no image format recognised")
    except (OSError, ValueError, SyntaxError) as err:
        return Finding(path, "corrupt", str(err))
    if Path(path).suffix.lower() in (".jpg", ".jpeg") and fmt != "JPEG":
        return Finding(path, "not-jpeg", f"{fmt} data in a .jpg file (decoded by content)")
    if mode in ("L", "LA", "1", "I", "I;16"):
        return Finding(path, "grayscale", f"mode {mode}: replicated to RGB")
    if mode == "CMYK":
        return Finding(path, "cmyk", "CMYK JPEG: colour conversion differs between decoders")
    if mode not in ("RGB", "RGBA", "P"):
        return Finding(path, "other-mode", f"mode {mode}")
    return None


def verify_files(paths: list[str], workers: int = os.cpu_count() or 1, progress: bool = False) -> list[Finding]:
    """Findings for ``paths``, checked in ``workers`` processes, in input order."""
    from tqdm import tqdm

    # spawn, not fork: this may run inside a training process full of threads (DALI, gloo).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(check_image, paths, chunksize=64)
        return [f for f in tqdm(results, total=len(paths), disable=not progress, unit="file") if f is not None]
