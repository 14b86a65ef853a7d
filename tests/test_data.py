"""Loaders: exact, disjoint per-rank epochs for DALI (ImageFolder and WebDataset) and torch.

Each test image is one flat colour that encodes its index, so any crop or flip of it
still tells which file a batch row came from.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from symmim.core.config import load_config
from symmim.data.folder import MEAN, STD, DataError, batches_per_epoch, scan_imagefolder
from symmim.data.shards import count_samples, write_shards

COUNT = 42  # not a multiple of world * batch: the tail is dropped on every rank


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for i in range(COUNT):
        cls = root / f"c{i % 3}"
        cls.mkdir(exist_ok=True)
        Image.new("RGB", (40 + i, 30 + 2 * i), (10 + 5 * i, 128, 64)).save(cls / f"{i:03d}.jpg", quality=95)
    return root


def _ids(images: torch.Tensor) -> list[int]:
    """Image index from the (normalised) red channel of each batch row."""
    red = images[:, 0].float().mean(dim=(1, 2)) * STD[0] * 255 + MEAN[0] * 255
    return [round((r - 10) / 5) for r in red.tolist()]


def _cfg(loader: str, key_view: str = "same"):
    return load_config(None, [f"data.loader={loader}", "train.batch_size=4", "data.workers=1", "model.img_size=16",
                              "model.patch_size=8", f"data.key_view={key_view}"])


def _equal(a, b) -> bool:
    """Two batches (tensors or Views) hold the same values."""
    return all(torch.equal(x, y) for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (a, b))))


def _epoch_ids(make_loader, epoch: int) -> list[list[int]]:
    seen = []
    for rank in range(2):
        loader = make_loader(rank)
        assert loader.steps_per_epoch == batches_per_epoch(COUNT, 2, 4) == 5
        batches = list(loader.epoch(epoch))
        assert len(batches) == 5 and all(b.shape == (4, 3, 16, 16) and b.dtype == torch.float32 for b in batches)
        seen.append([i for b in batches for i in _ids(b)])
    return seen


def _assert_disjoint_shards(seen: list[list[int]]) -> None:
    r0, r1 = seen
    assert len(set(r0)) == len(r0) == 20 and len(set(r1)) == len(r1) == 20, "an image repeats inside an epoch"
    assert not set(r0) & set(r1), "ranks overlap"
    assert set(r0) | set(r1) <= set(range(COUNT))


def test_dali_imagefolder_shards_are_disjoint_and_exact(colour_folder):
    from symmim.data.dali_loader import DaliLoader

    items = scan_imagefolder(colour_folder)
    cfg = _cfg("dali")
    _assert_disjoint_shards(_epoch_ids(lambda r: DaliLoader(items, len(items), cfg.data, 16, 4, 0, r, 2, torch.device("cpu")), 0))


def test_dali_webdataset_shards_are_disjoint_and_exact(colour_folder, tmp_path):
    from symmim.data.dali_loader import DaliLoader

    shards = [str(p) for p in write_shards(colour_folder, tmp_path, per_shard=10)]
    assert len(shards) == 5 and count_samples(shards) == COUNT
    cfg = _cfg("dali")
    _assert_disjoint_shards(_epoch_ids(lambda r: DaliLoader(shards, COUNT, cfg.data, 16, 4, 0, r, 2, torch.device("cpu")), 0))


def test_torch_loader_shards_are_disjoint_exact_and_reshuffled(colour_folder):
    from symmim.data.torch_loader import TorchLoader

    items = scan_imagefolder(colour_folder)
    cfg = _cfg("torch")
    make = lambda r: TorchLoader(items, cfg.data, 16, 4, 0, r, 2, torch.device("cpu"))  # noqa: E731
    first, second = _epoch_ids(make, 0), _epoch_ids(make, 1)
    _assert_disjoint_shards(first)
    _assert_disjoint_shards(second)
    assert first != second
    # Resuming inside an epoch yields exactly the rest of that epoch.
    rest = [i for b in make(0).epoch(0, start_step=3) for i in _ids(b)]
    assert rest == first[0][12:]


@pytest.mark.parametrize("key_view", ["same", "independent"])
def test_dali_resumes_mid_epoch_from_its_checkpoint(colour_folder, key_view):
    from symmim.data.dali_loader import DaliLoader

    items = scan_imagefolder(colour_folder)
    cfg = _cfg("dali", key_view)
    loader = DaliLoader(items, len(items), cfg.data, 16, 4, 0, 0, 2, torch.device("cpu"))
    batches = loader.epoch(0)
    head = [next(batches) for _ in range(2)]
    state = loader.state_dict()
    tail = list(batches)
    restored = DaliLoader(items, len(items), cfg.data, 16, 4, 0, 0, 2, torch.device("cpu"))
    restored.load_state_dict(state)
    again = list(restored.epoch(0, start_step=2))
    assert len(head) + len(tail) == 5
    assert all(_equal(a, b) for a, b in zip(tail, again)) and len(again) == len(tail)


def test_dali_checkpoint_of_another_key_view_resumes_over_a_fresh_pass(colour_folder, caplog):
    """A resume that changes ``data.key_view`` changes DALI's graph, which cannot take the old
    graph's checkpoint: the epoch goes on at its step over a fresh pass, with a warning."""
    from symmim.data.dali_loader import DaliLoader

    items = scan_imagefolder(colour_folder)
    loader = DaliLoader(items, len(items), _cfg("dali", "same").data, 16, 4, 0, 0, 2, torch.device("cpu"))
    batches = loader.epoch(0)
    next(batches), next(batches)
    state = loader.state_dict()
    changed = DaliLoader(items, len(items), _cfg("dali", "independent").data, 16, 4, 0, 0, 2, torch.device("cpu"))
    changed.load_state_dict(state)
    rest = list(changed.epoch(0, start_step=2))
    assert len(rest) == 3 and all(isinstance(b, tuple) for b in rest)
    assert "other data settings" in caplog.text


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_imagefolder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class holds no images"):
        scan_imagefolder(tmp_path)
    with pytest.raises(DataError, match="cannot fill one global batch"):
        batches_per_epoch(10, 2, 8)


def test_dali_next_epoch_is_complete_after_an_epoch_cut_short(colour_folder):
    """A consumer that stops early (grad accumulation) still gets full, fresh epochs after."""
    from symmim.data.dali_loader import DaliLoader

    items = scan_imagefolder(colour_folder)
    loader = DaliLoader(items, len(items), _cfg("dali").data, 16, 4, 0, 0, 2, torch.device("cpu"))
    assert len(list(loader.epoch(0, 0, 3))) == 3
    second = [i for b in loader.epoch(1) for i in _ids(b)]
    assert len(second) == len(set(second)) == 20


def test_dali_with_no_workers_decodes_on_one_thread(colour_folder):
    """``data.workers=0`` (the torch loader's "in the main process") gives DALI one thread, not a
    pipeline that can only be serialised."""
    from symmim.data.dali_loader import DaliLoader

    items = scan_imagefolder(colour_folder)
    cfg = load_config(None, ["data.loader=dali", "train.batch_size=4", "data.workers=0", "model.img_size=16",
                             "model.patch_size=8"])
    loader = DaliLoader(items, len(items), cfg.data, 16, 4, 0, 0, 2, torch.device("cpu"))
    assert "1 threads" in loader.name
    epoch = [i for b in loader.epoch(0) for i in _ids(b)]
    assert len(epoch) == len(set(epoch)) == 20


def test_excluded_files_are_skipped(colour_folder, tmp_path):
    from symmim.data.folder import read_exclusions

    listing = tmp_path / "skip.txt"
    listing.write_text("# broken\nc0/000.jpg\nc1/004.jpg  # trailing comment\n")
    exclude = read_exclusions(colour_folder, str(listing))
    items = scan_imagefolder(colour_folder, exclude)
    assert len(items) == COUNT - 2
    assert not {str(colour_folder / "c0/000.jpg"), str(colour_folder / "c1/004.jpg")} & set(items.files)
    with pytest.raises(DataError, match="does not exist"):
        read_exclusions(colour_folder, str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("key_view", ["same", "independent"])
def test_dali_uint8_batches_normalised_on_the_device_equal_the_pipelines_own(colour_folder, key_view):
    """The GPU path (uint8 out of DALI, normalised by torch on the device) gives the CPU path's
    floats (DALI normalising in its threads) for the same reader order, crops and key views; the
    mixed decoder's tuning reaches only the mixed decoder."""
    from symmim.data.dali_loader import MIXED_PREALLOCATION, DaliLoader
    from symmim.data.folder import normalize, pixel_stats

    cfg = _cfg("dali", key_view)
    items = scan_imagefolder(colour_folder)
    loader = DaliLoader(items, len(items), cfg.data, 16, 4, 0, 0, 1, torch.device("cpu"))
    assert loader._build_args["decoder_args"] == {} and loader._build_args["normalize"]
    outputs = {}
    for normalize_in_pipeline in (True, False):
        pipe = loader.pipeline(normalize=normalize_in_pipeline)
        outputs[normalize_in_pipeline] = [torch.from_numpy(view.as_array()) for _ in range(3) for view in pipe.run()]
    for floats, pixels in zip(outputs[True], outputs[False]):
        assert pixels.dtype == torch.uint8 and pixels.shape == floats.shape == (4, 3, 16, 16)
        torch.testing.assert_close(normalize(pixels, pixel_stats(torch.device("cpu"))), floats, rtol=0, atol=2e-5)
    gpu = DaliLoader.__new__(DaliLoader)
    gpu.decode = "mixed"
    tuned = load_config(None, ["data.hw_decoder_load=0.3", "data.decoder_prealloc=false"]).data
    assert gpu._decoder_args(tuned) == {"hw_decoder_load": 0.3}
    assert gpu._decoder_args(cfg.data) == {"hw_decoder_load": 0.65, **MIXED_PREALLOCATION}
