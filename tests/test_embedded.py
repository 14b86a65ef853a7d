"""Embedded default data set: layout, JPEG content, determinism, caching, crash and concurrency safety."""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from symmim.data import embedded
from symmim.data.embedded import CLASSES, MARKER, ensure_embedded

REPO = Path(__file__).resolve().parents[1]


def files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_embedded(tmp_path_factory.mktemp("cache"), seed=0, train_per_class=8, val_per_class=2)


def test_layout_and_counts(small):
    assert small.name == "embedded-v1-seed0-8x2"
    assert (small / MARKER).exists()
    assert len(CLASSES) >= 10
    for split, count in (("train", 8), ("val", 2)):
        assert sorted(p.name for p in (small / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            assert len(list((small / split / name).glob("*.jpg"))) == count


def test_files_are_rgb_jpegs_of_varied_size(small):
    sizes = set()
    for path in small.rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            assert all(96 <= s <= 320 for s in im.size)
            sizes.add(im.size)
    assert len(sizes) > 50


def test_deterministic_by_seed(tmp_path):
    a = ensure_embedded(tmp_path / "a", seed=3, train_per_class=3, val_per_class=2)
    b = ensure_embedded(tmp_path / "b", seed=3, train_per_class=3, val_per_class=2)
    c = ensure_embedded(tmp_path / "c", seed=4, train_per_class=3, val_per_class=2)
    assert files(a) == files(b) == files(c)
    assert len(files(a)) == 10 * 5
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files(a))


def test_second_call_reuses_the_set(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="symmim.data"):
        root = ensure_embedded(tmp_path, train_per_class=3, val_per_class=2)
    assert len(caplog.records) == 1 and "50 images" in caplog.records[0].getMessage()
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setattr(embedded, "_generate", lambda *a: pytest.fail("regenerated"))
    assert ensure_embedded(str(tmp_path), train_per_class=3, val_per_class=2) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes


def test_failed_generation_leaves_nothing_complete(tmp_path, monkeypatch):
    def crash(root, seed, per_class):
        (root / "train").mkdir()
        raise RuntimeError("crash")

    monkeypatch.setattr(embedded, "_generate", crash)
    with pytest.raises(RuntimeError):
        ensure_embedded(tmp_path, train_per_class=3, val_per_class=2)
    assert [p.name for p in tmp_path.iterdir()] == [".embedded-v1-seed0-3x2.lock"]


def test_leftover_of_a_killed_generation_is_not_complete(tmp_path):
    leftover = tmp_path / ".embedded-v1-seed0-3x2.tmp-killed"
    (leftover / "train" / "rings").mkdir(parents=True)
    (leftover / MARKER).write_text("{}")
    (tmp_path / "embedded-v1-seed0-3x2" / "train").mkdir(parents=True)  # a tree without the marker
    root = ensure_embedded(tmp_path, train_per_class=3, val_per_class=2)
    assert len(files(root)) == 50
    assert not leftover.exists()


def test_concurrent_processes_share_one_generation(tmp_path):
    cmd = [sys.executable, "-m", "data.embedded", "--cache-dir", str(tmp_path),
           "--train-per-class", "3", "--val-per-class", "2"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    roots = {out.strip() for out, _ in outs}
    assert roots == {str(tmp_path / "embedded-v1-seed0-3x2")}
    assert sum("generated embedded data set" in err for _, err in outs) == 1
    assert len(files(Path(roots.pop()))) == 50


def test_classes_not_separable_by_mean_colour(small):
    names = sorted(CLASSES)
    means, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((small / "train" / name).glob("*.jpg")):
            means.append(np.asarray(Image.open(path), np.float32).mean((0, 1)))
            labels.append(label)
    means, labels = np.array(means), np.array(labels)
    centroids = np.stack([means[labels == c].mean(0) for c in range(len(names))])
    predicted = ((means[:, None] - centroids) ** 2).sum(-1).argmin(1)
    assert (predicted == labels).mean() < 0.6  # fitted and scored on the same images: an upper bound
