"""Choose and build the training loader: DALI when installed, the PyTorch loader otherwise."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from symmim.data.folder import EXCLUDE_FILE, DataError, read_exclusions, scan_imagefolder

if TYPE_CHECKING:
    from symmim.core.config import DataConfig

log = logging.getLogger("symmim.data")


def data_root(data: DataConfig) -> Path:
    """The data set root: ``data.root``, or the embedded set (generated on first use)."""
    if data.root is None:
        from symmim.data.embedded import ensure_embedded

        return ensure_embedded(data.cache_dir, data.embedded_seed)
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist")
    return root


def build_train_loader(data: DataConfig, size: int, batch: int, seed: int, rank: int, world: int,
                       device: torch.device):
    """This rank's loader of ``batch`` augmented ``size`` px crops per step: ``epoch(epoch, start_step)``,
    ``steps_per_epoch``, ``name`` and state; ``data`` is the config's data section."""
    root = data_root(data)
    kind = data.loader
    if kind == "auto":
        kind = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"
    if kind == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        raise DataError("data.loader=dali but nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
    if data.format == "webdataset":
        if kind != "dali":
            raise DataError("data.format=webdataset needs the DALI loader (data.loader=dali)")
        from symmim.data.dali_loader import DaliLoader, webdataset_shards
        from symmim.data.shards import count_samples

        shards = webdataset_shards(root / "train")
        loader = DaliLoader(shards, count_samples(shards), data, size, batch, seed, rank, world, device)
    else:
        exclude = read_exclusions(root, data.exclude)
        items = scan_imagefolder(root / "train", exclude)
        if exclude and rank == 0:
            log.info("data: %d files excluded by %s", len(exclude), data.exclude or root / EXCLUDE_FILE)
        if kind == "dali":
            from symmim.data.dali_loader import DaliLoader

            loader = DaliLoader(items, len(items), data, size, batch, seed, rank, world, device)
        else:
            from symmim.data.torch_loader import TorchLoader

            loader = TorchLoader(items, data, size, batch, seed, rank, world, device)
    if rank == 0:
        log.info("data: %s from %s, %d steps per epoch per rank", loader.name, root, loader.steps_per_epoch)
    return loader
