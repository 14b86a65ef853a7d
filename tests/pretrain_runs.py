"""Helpers for tests that run ``launch/pretrain.py`` as a subprocess on the embedded data."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet(cache: Path, *extra: str) -> list[str]:
    sets = [f"data.cache_dir={cache}", "log.progress=false", "log.tensorboard=false", *extra]
    return ["--config", str(ROOT / "configs" / "tiny_cpu.yaml")] + [a for s in sets for a in ("--set", s)]


def clean_env() -> dict:
    """This environment without a surrounding launcher's rank variables."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def run(cmd: list[str], timeout: int = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root; assert its exit code, showing its output if it differs."""
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(records: list[dict]) -> list[dict]:
    """Records without the fields that measure time (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "data_wait_frac", "wall_s")} for r in records]


def rewind(run_dir: Path, step: int) -> None:
    """Make ``step`` the latest checkpoint and drop later ones, as after a crash."""
    ckpt = run_dir / "checkpoints"
    for tag in ckpt.glob("step*"):
        if int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(f"step{step:08d}")
    kept = [r for r in metrics(run_dir) if r["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
