"""Finding image files that would break or silently change training.

``check_image`` classifies one file; ``verify_files`` checks many in parallel. Broken
files (empty, not an image, truncated or corrupt) go into an exclusion list that the
loaders honour; files the pipeline converts (grayscale, CMYK, PNG named .jpg) are reported.
``find_truncated`` is the quick check the DALI loader runs before training: it reads only
the ends of each file and fully decodes just the suspects.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
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


TAIL = 1024  # bytes read from the end of a file for its end marker
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PNG_START, PNG_END = b"\x89PNG", b"IEND"


def suspect(path: str) -> bool:
    """True when ``path`` is empty, starts like neither a JPEG nor a PNG, or is a JPEG / PNG
    whose end marker is missing from its last KiB (truncated). Reads at most 1 KiB + 4 bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - TAIL))
        tail = f.read()
    if head.startswith(JPEG_START):
        return JPEG_END not in tail
    if head.startswith(PNG_START):
        return PNG_END not in tail
    return True


def find_truncated(paths: list[str], threads: int = 16) -> list[Finding]:
    """The broken files among ``paths``: quick end-marker check in ``threads`` threads, then a
    full decode of the suspects only (a JPEG with bytes after its end marker is a suspect, not broken)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        suspects = [p for p, bad in zip(paths, pool.map(suspect, paths)) if bad]
    return [f for p in suspects if (f := check_image(p)) is not None and f.broken]
