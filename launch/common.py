"""Pieces every training entry point shares: command line, logging, run position."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass


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


@dataclass
class Position:
    """Where training stands; saved with every checkpoint."""

    epoch: int = 0
    micro: int = 0  # micro-batches consumed in this epoch (this rank)
    step: int = 0  # optimizer steps
    wall_s: float = 0.0  # training seconds, summed over resumed sessions
