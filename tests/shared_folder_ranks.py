"""Two gloo ranks on this machine check that they share a run folder (``RunFolder.check_shared``),
for tests/test_run_folder.py: each rank writes its outcome ("passed" or the error) to
``<out>/rank<R>.json``. ``--other-job DIR``: while rank 1 is slow inside the check, another job
starts a run at DIR (a sibling of the checked folder, in a parent folder rank 0 made)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from symmim.core.distributed import DistInfo
from symmim.launch import common


def rank_main(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    if args.other_job and rank == 1:
        gather = common.all_gather
        common.all_gather = lambda x: (time.sleep(2.0), gather(x))[1]
    if args.other_job and rank == 0:
        threading.Timer(0.5, lambda: (Path(args.other_job) / "checkpoints").mkdir(parents=True)).start()
    try:
        common.RunFolder(Path(args.folder), resume=False).check_shared(DistInfo(rank, 2, rank, torch.device("cpu")))
        outcome = "passed"
    except common.RunFolderError as err:
        outcome = str(err)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--other-job")
    mp.spawn(rank_main, args=(p.parse_args(),), nprocs=2, join=True)
