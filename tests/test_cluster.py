"""Two nodes on one machine, as a cluster runs: the DeepSpeed launcher's multi-node form without ssh,
one launcher per node (``--hostfile H --no_ssh --node_rank R``), one CPU process each, so rank 1
runs with ``LOCAL_RANK`` 0; gloo; the run folder shared. A node lost mid-run stops the job with its
checkpoints intact; the run resumes on both nodes, or on one; nodes that see two different run
folders are refused at start."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pretrain_runs import PRETRAIN, ROOT, clean_env, free_port, metrics, quiet, run

pytestmark = pytest.mark.slow
SETS = ("train.batch_size=16", "log.every_steps=1", "log.recon_images=0", "train.ckpt_every_steps=4",
        "eval.knn_every_epochs=0", "train.dist_timeout_min=1.0")


class Nodes:
    """The launchers of a two-node job, each in its own process group (a node that can be lost whole)."""

    def __init__(self, tmp_path: Path, name: str, args_of_node):
        launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
        hosts = tmp_path / "hostfile"
        hosts.write_text("node0 slots=1\nnode1 slots=1\n")
        port = str(free_port())
        self.logs = [tmp_path / f"{name}-node{r}.log" for r in (0, 1)]
        self.procs = []
        for r, log in enumerate(self.logs):
            cmd = [launcher, "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(r), "--master_addr", "127.0.0.1",
                   "--master_port", port, PRETRAIN, *args_of_node(r)]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def wait(self, timeout: float = 300) -> list[int]:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        return codes

    def text(self) -> str:
        return "".join(log.read_text() for log in self.logs)

    def lose(self, node: int) -> None:
        os.killpg(self.procs[node].pid, signal.SIGKILL)  # the launcher and its training process: a node gone


def latest_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "latest"
    return int(path.read_text()[4:]) if path.is_file() else 0


def test_a_two_node_run_loses_a_node_and_resumes_on_two_nodes_and_on_one(embedded_cache, tmp_path):
    run_dir = tmp_path / "run"
    args = [*quiet(embedded_cache, *SETS, "train.max_steps=400"), "--output-dir", str(run_dir)]
    job = Nodes(tmp_path, "first", lambda node: args)
    deadline = time.time() + 240
    while latest_step(run_dir) < 8:
        assert all(p.poll() is None for p in job.procs), job.text()[-5000:]
        assert time.time() < deadline, job.text()[-5000:]
        time.sleep(0.1)
    job.lose(1)
    codes = job.wait(timeout=180)
    assert codes[0] != 0 and "another process of this job failed" in job.logs[0].read_text(), job.text()[-5000:]
    saved = latest_step(run_dir)
    tag = run_dir / "checkpoints" / f"step{saved:08d}"
    assert {p.name for p in tag.glob("rank*_state.pt")} == {"rank0_state.pt", "rank1_state.pt"}  # node 1 wrote rank 1's
    alone = tmp_path / "alone"
    shutil.copytree(run_dir, alone)

    until = ["--set", f"train.max_steps={saved + 4}", "--resume"]
    job = Nodes(tmp_path, "resumed", lambda node: [*args, *until])
    assert job.wait() == [0, 0], job.text()[-5000:]
    assert f"resumed from {tag}" in job.text()
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps[-5:] == list(range(saved, saved + 5)) and latest_step(run_dir) == saved + 4

    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *SETS, "train.max_steps=400"), "--output-dir",
                str(alone), *until])
    log = proc.stderr
    assert f"resumed from {alone / 'checkpoints' / tag.name} (written by 2 processes)" in log
    assert "train.grad_accum 1 -> 2 keeps the global batch of 32" in log
    assert latest_step(alone) == saved + 4


def test_nodes_that_see_two_different_run_folders_are_refused_at_start(embedded_cache, tmp_path):
    """Each node's launcher names a run folder on its own disk (``/scratch/run`` on each, say)."""
    folders = [tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run"]
    job = Nodes(tmp_path, "apart", lambda node: [*quiet(embedded_cache, *SETS, "train.max_steps=8"), "--output-dir",
                                                 str(folders[node])])
    codes = job.wait()
    text = job.text()
    assert all(code != 0 for code in codes), text[-5000:]
    assert re.search(rf"rank\(s\) 1 do not see the run folder {re.escape(str(folders[0]))} that rank 0 writes", text), \
        text[-5000:]
    assert "filesystem they share" in text and "model:" not in text  # refused before any engine was built
    assert not any(f.parent.exists() for f in folders)  # nor the folders made to hold them
