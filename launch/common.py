"""Pieces every entry point shares: command line, logging, process group, run folder, exit codes."""
from __future__ import annotations

import argparse
import faulthandler
import logging
from collections.abc import Callable
from pathlib import Path

import torch.distributed

from symmim.core.checkpoint import CheckpointError
from symmim.core.config import Config, ConfigError, load_config, save_config
from symmim.core.distributed import DistInfo, init_distributed
from symmim.core.loop import TrainingError
from symmim.core.pretrained import WeightsError
from symmim.data.folder import DataError
from symmim.kernels.dispatch import BackendError

log = logging.getLogger("symmim")
BAD_INPUT = (ConfigError, DataError, BackendError, CheckpointError, WeightsError)


def run_parser(description: str, example_config: str) -> argparse.ArgumentParser:
    """``--config``, ``--output-dir``, ``--set``, ``--resume`` (and the DeepSpeed launcher's ``--local_rank``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help=f"YAML preset, e.g. {example_config}")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings and errors only elsewhere; every line names its rank."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True,
    )


def launch(args: argparse.Namespace, train: Callable[[Config, Path, DistInfo], None],
           adjust: Callable[[Config], None] | None = None) -> int:
    """Load the config, join the process group, write ``config.yaml`` into the run folder, train.

    Returns the process exit code: 0 done (or stopped on request), 2 bad input (config, data,
    weights, checkpoint, backend), 3 training could not go on, 1 anything else (logged with
    its traceback and the rank).
    """
    faulthandler.enable()  # a crash in native code (DALI, NCCL) still leaves a Python traceback
    setup_logging(0)
    rank = 0
    try:
        cfg = load_config(args.config, args.set)
        if adjust:
            adjust(cfg)
        dist_info = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
        rank = dist_info.rank
        setup_logging(rank)
        run_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        train(cfg, run_dir, dist_info)
        torch.distributed.destroy_process_group()  # a clean exit: no communication thread torn down mid-flight
    except BAD_INPUT as err:
        log.error("rank %d: %s%s", rank, "config error: " if isinstance(err, ConfigError) else "", err)
        return 2
    except TrainingError as err:
        log.error("rank %d: %s", rank, err)
        return 3
    except Exception:
        log.exception("rank %d failed", rank)
        return 1
    return 0
