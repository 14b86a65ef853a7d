"""Scan an image data set for broken and unusual files; write the exclusion list.

    symmim-verify-data /data/imagenet            # writes /data/imagenet/symmim_exclude.txt
    symmim-verify-data ROOT --out bad.txt --workers 16

Broken files (zero bytes, not an image, truncated or corrupt) are listed, relative to ROOT,
in the exclusion file, which the training and evaluation loaders skip (``data.exclude``,
default ``ROOT/symmim_exclude.txt``). Grayscale, CMYK and PNG-named-.jpg files are reported
but kept: the pipeline converts them to RGB. Exits 0 once the list is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path


from symmim.data.folder import EXCLUDE_FILE, IMAGE_SUFFIXES
from symmim.data.verify import verify_files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="data set root (an ImageFolder tree, or a folder holding train/ and val/)")
    p.add_argument("--out", help=f"exclusion list to write (default ROOT/{EXCLUDE_FILE})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    print(f"checking {len(paths)} files under {root} with {args.workers} processes")
    findings = verify_files(paths, args.workers, progress=True)
    broken = [f for f in findings if f.broken]
    for f in findings:
        print(f"{'EXCLUDE' if f.broken else 'note   '}  {f.kind:12s} {Path(f.path).relative_to(root)}: {f.detail}")
    out = Path(args.out) if args.out else root / EXCLUDE_FILE
    out.write_text("# written by symmim-verify-data: files the loaders skip, relative to the data root\n"
                   + "".join(f"{Path(f.path).relative_to(root)}\n" for f in broken))
    counts = ", ".join(f"{n} {k}" for k, n in Counter(f.kind for f in findings).items()) or "nothing unusual"
    print(f"{len(paths)} files: {counts}; {len(broken)} excluded -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
