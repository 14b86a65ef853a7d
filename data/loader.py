"""Choose and build the training loader: DALI when installed, the PyTorch loader otherwise."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from data.folder import EXCLUDE_FILE, DataError, read_exclusions, scan_imagefolder

log = logging.getLogger("symmim.data")


def data_root(cfg) -> Path:
    """The data set root: ``data.root``, or the embedded set (generated on first use)."""
    if cfg.data.root is None:
        from data.embedded import ensure_embedded

        return ensure_embedded(cfg.data.cache_dir, cfg.data.embedded_seed)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist")
    return root


def build_train_loader(cfg, rank: int, world: int, device: torch.device):
    """A loader with ``epoch(epoch, start_step)``, ``steps_per_epoch``, ``name`` and state."""
    root = data_root(cfg)
    kind = cfg.data.loader
    if kind == "auto":
        kind = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"
    if kind == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        raise DataError("data.loader=dali but nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
    size = cfg.model.img_size
    if cfg.data.format == "webdataset":
        if kind != "dali":
            raise DataError("data.format=webdataset needs the DALI loader (data.loader=dali)")
        from data.dali_loader import DaliLoader, webdataset_shards
        from data.shards import count_samples

        shards = webdataset_shards(root / "train")
        loader = DaliLoader(shards, count_samples(shards), cfg, size, rank, world, device)
    else:
        exclude = read_exclusions(root, cfg.data.exclude)
        items = scan_imagefolder(root / "train", exclude)
        if exclude and rank == 0:
            log.info("data: %d files excluded by %s", len(exclude), cfg.data.exclude or root / EXCLUDE_FILE)
        if kind == "dali":
            from data.dali_loader import DaliLoader

            loader = DaliLoader(items, len(items), cfg, size, rank, world, device)
        else:
            from data.torch_loader import TorchLoader

            loader = TorchLoader(items, cfg, size, rank, world, device)
    if rank == 0:
        log.info("data: %s from %s, %d steps per epoch per rank", loader.name, root, loader.steps_per_epoch)
    return loader
