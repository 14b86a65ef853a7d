"""End-to-end pre-training runs: plain python, torchrun and the DeepSpeed launcher, on CPU.

Each run is the real ``launch/pretrain.py`` (DALI CPU pipeline, DeepSpeed engine) on the
embedded data set, cut to a few steps with ``train.max_steps``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(cache: Path, *extra: str) -> list[str]:
    sets = [f"data.cache_dir={cache}", "log.progress=false", "log.tensorboard=false", *extra]
    return ["--config", str(ROOT / "configs" / "tiny_cpu.yaml")] + [a for s in sets for a in ("--set", s)]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    """Records without the fields that measure time (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "data_wait_frac", "wall_s")} for r in records]


def _rewind(run: Path, step: int) -> None:
    """Make ``step`` the latest checkpoint and drop later ones, as after a crash."""
    ckpt = run / "checkpoints"
    for tag in ckpt.glob("step*"):
        if int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(f"step{step:08d}")
    kept = [r for r in _metrics(run) if r["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def test_single_process_run_learns_and_leaves_a_complete_run_folder(embedded_cache, tmp_path):
    run = tmp_path / "run"
    proc = _run([sys.executable, PRETRAIN, *_quiet(embedded_cache, "train.epochs=2", "log.every_steps=5",
                                                   "log.tensorboard=true"), "--output-dir", str(run)])
    log = proc.stdout + proc.stderr
    assert "data: DALI (imagefolder" in log and "decode=cpu" in log  # the loader line names the backend
    assert "kernels: ops=torch attention=sdpa" in log
    records = _metrics(run)
    for key in ("step", "epoch", "loss", "loss_mim", "loss_con", "lr", "img_per_s", "data_wait_frac"):
        assert key in records[0]
    assert records[-1]["step"] == 62  # 2 epochs x 31 steps (2,000 images / 64)
    assert records[-1]["loss_mim"] < 0.8 * records[0]["loss_mim"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000062"
    assert sorted(p.name for p in (run / "recon").glob("*.png")) == ["epoch0001_step00000031.png", "epoch0002_step00000062.png"]
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_resume_after_a_crash_replays_the_same_losses_bitwise(embedded_cache, tmp_path, loader):
    """fp32, one process: the resumed run's loss stream equals the uninterrupted one."""
    args = _quiet(embedded_cache, f"data.loader={loader}", "train.max_steps=8", "train.ckpt_every_steps=4",
                  "log.every_steps=1", "train.batch_size=32", "log.recon_images=0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run([sys.executable, PRETRAIN, *args, "--output-dir", str(full)])
    shutil.copytree(full, resumed)
    _rewind(resumed, 4)
    proc = _run([sys.executable, PRETRAIN, *args, "--output-dir", str(resumed), "--resume"])
    assert "resumed from" in proc.stderr + proc.stdout
    assert _untimed(_metrics(resumed)) == _untimed(_metrics(full))
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 9))


def test_two_process_deepspeed_zero2_bf16_saves_resumes_and_continues(embedded_cache, tmp_path):
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    run = tmp_path / "ds"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), PRETRAIN,
           *_quiet(embedded_cache, "train.precision=bf16", "ds.zero_stage=2", "train.max_steps=8",
                   "train.ckpt_every_steps=4", "log.every_steps=2", "train.batch_size=32", "log.recon_images=2"),
           "--output-dir", str(run)]
    proc = _run(cmd)
    assert "2 process(es)" in proc.stdout + proc.stderr
    step4 = run / "checkpoints" / "step00000004"
    # ZeRO-2 partitions the optimizer state: one shard per rank, plus our per-rank state.
    assert sorted(p.name for p in step4.glob("bf16_zero_pp_rank_*")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert {p.name for p in step4.glob("rank*_state.pt")} == {"rank0_state.pt", "rank1_state.pt"}
    first = _metrics(run)
    _rewind(run, 4)
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    proc = _run(cmd + ["--resume"])
    assert "resumed from" in proc.stdout + proc.stderr
    again = _metrics(run)
    assert [r["step"] for r in again] == [2, 4, 6, 8]
    assert again[:2] == first[:2]  # records up to the resumed step are kept as they were
    # Two gloo processes on CPU are not bitwise reproducible even without a resume
    # (reduction order), so the continued losses are compared loosely.
    for a, b in zip(first[2:], again[2:]):
        assert a["loss_mim"] == pytest.approx(b["loss_mim"], rel=0.05)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000008"


def test_torchrun_launch(embedded_cache, tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    run = tmp_path / "tr"
    _run([torchrun, "--nproc_per_node", "1", "--master_port", str(_free_port()), PRETRAIN,
          *_quiet(embedded_cache, "train.max_steps=3", "log.every_steps=1", "train.batch_size=16", "log.recon_images=0"),
          "--output-dir", str(run)])
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]


def test_missing_data_root_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, PRETRAIN, *_quiet(tmp_path, f"data.root={tmp_path / 'nope'}"),
                           "--output-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"data.root {tmp_path / 'nope'} does not exist" in proc.stderr
