"""Two gloo ranks, whose collectives time out after 2 s, take a ZeRO-0 checkpoint tag into the
universal layout (``universal_copy``) while rank 0's conversion takes 4 s longer than it does, for
tests/test_checkpoints.py: each rank writes its outcome ("passed" or the error) to
``<out>/rank<R>.json``. ``--wait-s S``: the other rank waits up to S seconds for the conversion;
without it, as long as the process group's timeout."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from symmim.core import checkpoint


def rank_main(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    convert = checkpoint.write_from_zero0
    checkpoint.write_from_zero0 = lambda *a: (time.sleep(4.0), convert(*a))[1]
    wait = datetime.timedelta(seconds=args.wait_s) if args.wait_s else None
    try:
        copy = checkpoint.universal_copy(Path(args.tag), wait)
        outcome = "passed" if (copy / checkpoint.CONVERTED).is_file() else f"no finished copy at {copy}"
    except Exception as err:  # the outcome is what the test reads
        outcome = f"{type(err).__name__}: {err}"
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--wait-s", type=float)
    mp.spawn(rank_main, args=(p.parse_args(),), nprocs=2, join=True)
