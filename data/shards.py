"""WebDataset tar shards: write them from an ImageFolder tree, count their samples.

Each sample is ``<key>.jpg`` plus ``<key>.cls`` (class index as text), the webdataset
convention. ``symmim-make-shards SRC OUT`` converts ``SRC/{train,val}`` folders.
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

from symmim.data.folder import scan_imagefolder


def write_shards(src: str | Path, out: str | Path, per_shard: int = 1000) -> list[Path]:
    """Pack the ImageFolder ``src`` into ``out/shard-000000.tar``, ... (sorted order)."""
    items = scan_imagefolder(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(items), per_shard):
        path = out / f"shard-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, len(items))):
                key = f"{i:08d}"
                tar.add(items.files[i], arcname=f"{key}.jpg")
                label = str(items.labels[i]).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
        paths.append(path)
    return paths


def count_samples(shards: list[str]) -> int:
    """Number of image samples in the shards (reads tar headers only)."""
    total = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="ImageFolder root holding train/ (and val/)")
    parser.add_argument("out", help="output root: OUT/train/*.tar, OUT/val/*.tar")
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    for split in ("train", "val"):
        if (Path(args.src) / split).is_dir():
            paths = write_shards(Path(args.src) / split, Path(args.out) / split, args.per_shard)
            print(f"{split}: {len(paths)} shards in {Path(args.out) / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
