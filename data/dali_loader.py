"""DALI training pipeline: read this rank's shard, decode, random-resized-crop, flip; with a key
view of its own (``data.key_view``, ``data/views.py``), one whole-image decode and two views.

Decoding runs on the GPU (``mixed``, nvJPEG and the hardware JPEG decoder) when training on
CUDA and on the CPU otherwise. Training on a GPU, the pipeline emits uint8 ``[B, 3, S, S]`` (a
quarter of float's bytes) and the GPU normalises it; on a CPU, DALI's threads normalise, since
there the training process's own thread is the scarce one (normalising there cost 15% of the
loader's throughput on 2 cores, ``benchmarks/dataloader.py``). The pipeline is built with DALI checkpointing, so its exact position (reader
order, shuffle buffer, augmentation RNG) travels with a training checkpoint.

Before an ImageFolder pipeline is built, the files' ends are checked for truncation
(``data.precheck``): DALI 2.4 can crash on a truncated JPEG instead of raising an error.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from symmim.data import views as moco
from symmim.data.folder import MEAN, STD, DataError, ImageList, batches_per_epoch, normalize, pixel_stats
from symmim.data.views import Views
from symmim.data.verify import Finding, find_truncated, verify_files

if TYPE_CHECKING:
    from symmim.core.config import DataConfig

log = logging.getLogger("symmim.data")

READER = "reader"
# nvJPEG's buffers reserved up front for ImageNet-size images, so the first large JPEGs do not
# reallocate mid-epoch (the values of NVIDIA's DALI ResNet-50 example)
MIXED_PREALLOCATION = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                           preallocate_width_hint=5980, preallocate_height_hint=6430)
SCAN_ON_FAILURE = 20_000  # on a decode failure, find the broken files of lists up to this size
SOLARIZED = [v if v < moco.SOLARIZE_AT else 255 - v for v in range(256)]  # solarize as a lookup table


@pipeline_def(enable_checkpointing=True)
def _train_pipeline(source, shard_id, num_shards, size, scale, hflip, decode_device, decoder_args, normalize,
                    key_view="same", key_shift=0, until=None, antialias=True):
    """The training images (with ``key_view`` other than ``same``: the online and the key views);
    ``until`` ("read", "decode" or "resize") returns what that stage made, for profiling
    (``benchmarks/dataloader.py --stages``)."""
    if isinstance(source, ImageList):
        encoded, _ = fn.readers.file(
            files=source.files, labels=source.labels, shard_id=shard_id, num_shards=num_shards,
            random_shuffle=True, name=READER,
        )
    else:  # webdataset tar shards
        encoded = fn.readers.webdataset(
            paths=source, ext=["jpg;jpeg;png"], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=True, missing_component_behavior="error", name=READER,
        )
    if until == "read":
        return encoded
    if key_view != "same":
        return _two_views(encoded, size, scale, hflip, decode_device, decoder_args, normalize, key_view, key_shift,
                          until, antialias)
    images = fn.decoders.image_random_crop(
        encoded, device=decode_device, output_type=types.RGB,
        random_area=list(scale), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decoder_args,
    )
    if until == "decode":
        return images
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=antialias)
    if until == "resize":
        return images
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return _emit(images, mirror, normalize)


def _emit(images, mirror, normalize: bool):
    """HWC uint8 views -> ``[B, 3, S, S]``, mirrored where ``mirror``: uint8, or floats normalised with MEAN / STD."""
    if not normalize:
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)  # [B, 3, S, S]
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
        mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
    )  # [B, 3, S, S] float


def _two_views(encoded, size, scale, hflip, decode_device, decoder_args, normalize, key_view, key_shift, until,
               antialias):
    """The online and key views (``data/views.py``) from one whole-image decode. The crop boxes are
    drawn on the CPU from the JPEG headers (``anchor``, ``extent``: ``[2]``, y then x, source pixels)
    and passed as per-sample arguments, so the same graph serves the ``cpu`` and ``mixed`` decoders."""
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **decoder_args)  # [H, W, 3]
    if until == "decode":
        return images
    shape = fn.peek_image_shape(encoded)  # [3]: H, W, C
    window = dict(random_area=list(scale), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
    anchor, extent = fn.random_crop_generator(shape, **window)  # [2] each
    mirror = fn.random.coin_flip(probability=0.5 if hflip else 0.0)
    online = _crop_resize(images, anchor, extent, mirror, size, antialias)
    if key_view == "shifted":  # the same box, moved by whole output pixels, kept inside; the same flip
        moves = fn.random.uniform(values=[float(d) for d in range(-key_shift, key_shift + 1)], shape=[2])  # [2]
        room = fn.cast(shape[0:2], dtype=types.FLOAT) - extent  # [2]: the largest anchor that fits
        key = _crop_resize(images, dmath.clamp(anchor + moves * extent / size, 0.0, room), extent, mirror, size,
                           antialias)
    else:  # independent: a box and a flip of its own
        key_anchor, key_extent = fn.random_crop_generator(shape, **window)
        key_mirror = fn.random.coin_flip(probability=0.5 if hflip else 0.0)
        key = _crop_resize(images, key_anchor, key_extent, key_mirror, size, antialias)
    if until == "resize":
        return online, key
    if key_view == "independent":
        key = _moco_colour(key)
    return _emit(online, 0, normalize), _emit(key, 0, normalize)


def _crop_resize(images, anchor, extent, mirror, size: int, antialias: bool):
    """The box ``anchor``, ``extent`` of each image resized to ``size`` x ``size``, mirrored where ``mirror``
    (a region whose x runs backwards)."""
    flip = types.Constant(np.array([0.0, 1.0], np.float32)) * mirror  # [2]: 0, mirror
    return fn.resize(images, size=[size, size], roi_start=anchor + flip * extent, roi_end=anchor + (1 - flip) * extent,
                     interp_type=types.INTERP_LINEAR, antialias=antialias)  # [S, S, 3] uint8


def _moco_colour(key):
    """MoCo v3's key-view colour changes, each on the images its coin picks (pipeline conditionals):
    jitter, grayscale (a colour twist to saturation 0), blur, solarize. Where they differ from
    torchvision (the PyTorch loader): the twist changes contrast about mid-grey (128), not the
    image's mean grey (a per-image mean would have to come back from the GPU to the CPU to be an
    argument); it turns hue in YIQ space, which keeps the luma, where HSV keeps the largest channel;
    and it applies the four jitter changes in one fixed order, not a random one."""
    jitter, gray, blur, solarize = (fn.random.coin_flip(probability=p, dtype=types.BOOL)
                                    for p in (moco.JITTER_P, moco.GRAY_P, moco.BLUR_P, moco.SOLARIZE_P))
    factors = {name: fn.random.uniform(range=[1 - x, 1 + x]) for name, x in
               [("brightness", moco.BRIGHTNESS), ("contrast", moco.CONTRAST), ("saturation", moco.SATURATION)]}
    hue = fn.random.uniform(range=[-moco.HUE * 360, moco.HUE * 360])  # degrees
    sigma = fn.random.uniform(range=list(moco.BLUR_SIGMA))
    if jitter:
        key = fn.color_twist(key, hue=hue, **factors)
    if gray:
        key = fn.color_twist(key, saturation=0.0)  # R = G = B = luma
    if blur:
        key = fn.gaussian_blur(key, sigma=sigma)
    if solarize:
        key = fn.lookup_table(key, keys=list(range(256)), values=SOLARIZED, dtype=types.UINT8)
    return key  # [S, S, 3] uint8


def _broken_files_error(broken: list[Finding]) -> DataError:
    names = "; ".join(f"{f.path} ({f.detail})" for f in broken[:10])
    return DataError(f"cannot decode {len(broken)} file(s): {names}. "
                     "Write an exclusion list with: symmim-verify-data DATA_ROOT")


def _refuse_truncated(files: list[str], rank: int, world: int) -> None:
    """Raise a DataError naming the empty, truncated or non-image files among ``files``; each
    rank checks every ``world``-th file and all ranks learn the result."""
    t0 = time.perf_counter()
    broken = find_truncated(files[rank::world])
    if world > 1 and dist.is_initialized():
        parts: list[list[Finding]] = [[] for _ in range(world)]
        dist.all_gather_object(parts, broken)
        broken = [f for part in parts for f in part]
    if rank == 0:
        log.info("data: checked the ends of %d files for truncation in %.1f s (data.precheck)", len(files),
                 time.perf_counter() - t0)
    if broken:
        raise _broken_files_error(broken)


def webdataset_shards(root: str | Path) -> list[str]:
    shards = sorted(str(p) for p in Path(root).glob("*.tar"))
    if not shards:
        raise DataError(f"no webdataset .tar shards in {root}")
    return shards


class DaliLoader:
    """Per-rank batches from a DALI pipeline, as tensors on the training device."""

    def __init__(self, source: ImageList | list[str], num_samples: int, data: DataConfig, size: int, batch: int,
                 seed: int, rank: int, world: int, device: torch.device):
        """``source`` is an ImageFolder list or WebDataset shard paths; ``data`` the config's data section."""
        self.device = torch.device(device)
        self.decode = "mixed" if self.device.type == "cuda" else "cpu"
        self.batch = batch
        self.steps_per_epoch = batches_per_epoch(num_samples, world, self.batch)
        if isinstance(source, ImageList):
            # Shuffle the list once so DALI's contiguous shards mix classes on every rank.
            perm = np.random.default_rng(seed).permutation(len(source))
            source = ImageList([source.files[i] for i in perm], [source.labels[i] for i in perm], source.classes)
            if data.precheck:
                _refuse_truncated(source.files, rank, world)
        threads = max(1, data.workers)  # 0 (no worker processes): one thread
        self._build_args = dict(
            source=source, shard_id=rank, num_shards=world, size=size, scale=data.crop_scale,
            hflip=data.hflip, decode_device=self.decode, decoder_args=self._decoder_args(data),
            normalize=self.decode == "cpu", key_view=data.key_view, key_shift=data.key_shift,
            enable_conditionals=data.key_view == "independent",  # the key's colour changes; same: the graph as it was
            seed=seed + 1 + rank,  # reader and augmentations
            batch_size=self.batch, num_threads=threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
        )
        self.stats = pixel_stats(self.device) if self.decode == "mixed" else None  # uint8 arrives: the GPU normalises
        self.outputs = ["images"] if data.key_view == "same" else list(Views._fields)
        self._restored = False
        self._iterator = self._make_iterator(None)
        self.name = f"DALI ({data.format}, {threads} threads, decode={self.decode})"

    def _decoder_args(self, data: DataConfig) -> dict:
        """The ``mixed`` decoder's tuning (``data.hw_decoder_load``, ``data.decoder_prealloc``); none on CPU."""
        if self.decode != "mixed":
            return {}
        return {"hw_decoder_load": data.hw_decoder_load} | (MIXED_PREALLOCATION if data.decoder_prealloc else {})

    def pipeline(self, **changes):
        """A built copy of this loader's pipeline with ``changes`` to its arguments (``until``,
        ``normalize``, ``antialias``): for profiling its stages."""
        pipe = _train_pipeline(**{**self._build_args, **changes})
        pipe.build()
        return pipe

    def _make_iterator(self, checkpoint: bytes | None) -> DALIGenericIterator:
        if self.device.type == "cuda" and self.device.index is None:
            self._build_args["device_id"] = torch.cuda.current_device()
        pipe = _train_pipeline(**self._build_args, checkpoint=checkpoint)
        pipe.build()
        try:  # the iterator decodes its first batch right away
            return DALIGenericIterator(pipe, self.outputs, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        except RuntimeError as err:
            raise self._decode_failure(err) from None

    def _decode_failure(self, err: RuntimeError) -> DataError:
        """A DataError naming the broken files (DALI's message gives only a batch index)."""
        dali_says = " ".join(line.strip() for line in str(err).splitlines() if "failure" in line or "rror" in line)[:300]
        source = self._build_args["source"]
        if isinstance(source, ImageList) and len(source) <= SCAN_ON_FAILURE:
            broken = [f for f in verify_files(source.files) if f.broken]
            if broken:
                return _broken_files_error(broken)
        return DataError(f"DALI failed to read or decode this rank's data ({dali_says}); find the broken files and "
                         "write an exclusion list with: symmim-verify-data DATA_ROOT")

    def epoch(self, epoch: int, start_step: int = 0, stop_step: int | None = None) -> Iterator[torch.Tensor | Views]:
        """This rank's batches ``[B, 3, S, S]`` (float, normalised on the training device; :class:`Views`
        of two unless ``data.key_view`` is ``same``) from ``start_step`` up to ``stop_step`` (default
        ``steps_per_epoch``).

        A restored DALI checkpoint already sits at ``start_step``; without one the first
        ``start_step`` batches are decoded and dropped to reach the same position. Before the
        last batch is handed out, the rest of the shard is drained (shards can differ by a
        batch) and the reader reset, so the next epoch, or a checkpoint, starts cleanly.
        """
        stop = stop_step or self.steps_per_epoch
        step = start_step if self._restored else 0
        self._restored = False
        while (out := self._next()) is not None:
            if step == stop - 1:
                images = self._batch(out, keep=True)  # DALI reuses its buffers while draining
                while self._next() is not None:
                    pass
                self._iterator.reset()
                yield images
                return
            if step >= start_step:
                yield self._batch(out, keep=False)
            step += 1
        self._iterator.reset()

    def _batch(self, out, keep: bool) -> torch.Tensor | Views:
        """One iterator output as normalised floats ``[B, 3, S, S]`` on the device (:class:`Views` of two
        with key views); ``keep``: tensors of their own, not DALI's buffers."""
        views = []
        for name in self.outputs:
            images = out[0][name]
            if self.stats is not None:  # uint8 on the GPU
                views.append(normalize(images, self.stats))
            else:
                views.append(images.clone() if keep else images)
        return views[0] if len(views) == 1 else Views(*views)

    def _next(self):
        """The iterator's next output, None at the end of the epoch; decode errors named."""
        try:
            return next(self._iterator)
        except StopIteration:
            return None
        except RuntimeError as err:
            raise self._decode_failure(err) from None

    def state_dict(self) -> dict:
        return {"dali": self._iterator.checkpoints()[0]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore DALI's own checkpoint. None (written by another number of processes, whose shards
        differ), or one from a pipeline of other data settings (``data.key_view`` changed on resume):
        the next epoch call starts at its ``start_step`` from a fresh pass over this rank's shard, so
        the epoch keeps its length in images while the rest of its order is drawn anew."""
        if state is not None and "dali" in state:
            try:
                self._iterator = self._make_iterator(state["dali"])
            except RuntimeError as err:
                if "another pipeline" not in str(err):
                    raise
                log.warning("the data loader's checkpoint is from a pipeline of other data settings "
                            "(data.key_view?); this epoch goes on over a fresh pass of the shard")
        if state is None or "dali" in state:
            self._restored = True
