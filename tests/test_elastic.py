"""Resuming on another number of processes: ZeRO-0 checkpoints carry over (weights, Adam moments and
fp32 masters, EMA branch, step, schedules, the epoch position in images, the global batch), ZeRO-1/2
ones through DeepSpeed's universal conversion (also between the two stages); ZeRO-3 checkpoints are
refused on another count, and a change between ZeRO-0 and a partitioned stage is refused."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from pretrain_runs import PRETRAIN, ROOT, clean_env, free_port, metrics, quiet, rewind, run

pytestmark = pytest.mark.slow
PROBE = str(ROOT / "tests" / "restore_probe.py")
SETS = ("data.loader=torch", "train.batch_size=16", "train.max_steps=8", "train.ckpt_every_steps=4",
        "log.every_steps=1", "log.recon_images=0", "optim.warmup_epochs=0.2")


def launch(processes: int, args: list[str], probe: bool = False) -> list[str]:
    """The command for ``processes`` CPU processes (the DeepSpeed launcher for two), optionally
    through the probe that records the optimizer state right after a resume."""
    script = [PROBE] if probe else [PRETRAIN]
    if processes == 1:
        return [sys.executable, *script, *args]
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), *script, *args]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_zero0_run_continues_on_another_number_of_processes(embedded_cache, tmp_path, monkeypatch, before, after):
    accum = {1: 2, 2: 1}  # 32 images per optimizer step either way
    args = quiet(embedded_cache, *SETS, f"train.grad_accum={accum[before]}")
    first = tmp_path / "first"
    run(launch(before, [*args, "--output-dir", str(first)]))
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    rewind(moved, 4)
    probe = tmp_path / "restored.pt"
    monkeypatch.setenv("SYMMIM_RESTORE_PROBE", str(probe))
    proc = run(launch(after, [*args, "--output-dir", str(moved), "--resume"], probe=True))
    log = proc.stdout + proc.stderr
    assert f"train.grad_accum {accum[before]} -> {accum[after]} keeps the global batch of 32" in log
    assert "position carried over in images: epoch 0, 128 images in" in log

    # The Adam moments, step counts and masters come back exactly as they were saved.
    saved = torch.load(first / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    restored = torch.load(probe, weights_only=False)
    assert saved["state"].keys() == restored["state"].keys()
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][i][key], value), (i, key)

    # The run goes on where it was: the same lr at every step, no warm-up restart, and the same
    # images (the torch loader's order in images does not depend on the process count); only the
    # masks are drawn anew (per-rank streams), so the reconstruction loss continues to within a
    # percent. The contrastive loss is not comparable: its negatives are the keys of one micro-batch
    # round across ranks, 32 on two processes, 16 per accumulated micro-batch on one.
    a = {r["step"]: r for r in metrics(first) if "loss" in r}
    b = {r["step"]: r for r in metrics(moved) if "loss" in r}
    assert sorted(b) == list(range(1, 9))
    assert all(a[s]["lr"] == b[s]["lr"] for s in range(1, 9))
    for s in range(5, 9):
        assert b[s]["loss_mim"] == pytest.approx(a[s]["loss_mim"], rel=1e-2), s


def _flat_moments(state: dict) -> dict[tuple[int, str], torch.Tensor]:
    """``(group, moment) -> the group's moments flattened in parameter order``, from an AdamW state
    dict: one flat partition per group under ZeRO-1/2, one tensor per parameter under ZeRO-0."""
    return {(g, key): torch.cat([state["state"][i][key].reshape(-1) for i in group["params"]])
            for g, group in enumerate(state["param_groups"]) for key in ("exp_avg", "exp_avg_sq")}


def _saved_moments(tag_dir) -> dict[tuple[int, str], torch.Tensor]:
    """The Adam moments of a tag as :func:`_flat_moments` lays them out: ZeRO-1/2 partitions of all
    ranks joined, the group padding dropped; ZeRO-0's optimizer state as it is."""
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not files:
        return _flat_moments(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"])
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    joined = {}
    for key in _flat_moments(parts[0]["base_optimizer_state"]):
        flat = torch.cat([_flat_moments(p["base_optimizer_state"])[key] for p in parts])
        joined[key] = flat[:flat.numel() - parts[-1]["group_paddings"][key[0]]]
    return joined


@pytest.mark.parametrize("before,after", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 0), (1, 2)), ((1, 2), (2, 0))])
def test_a_run_continues_under_another_zero_layout(embedded_cache, tmp_path, monkeypatch, before, after):
    """(processes, ZeRO stage) before and after: ZeRO-2 on two -> ZeRO-1 on one and back, ZeRO-0 -> ZeRO-2
    and back. The tag is converted once into DeepSpeed's universal layout beside the original (left as
    it was), the Adam moments come back exactly as saved, and the run continues with the same lr and
    its reconstruction loss."""
    accum = {1: 2, 2: 1}  # 32 images per optimizer step either way
    args = quiet(embedded_cache, *SETS)
    first = tmp_path / "first"
    run(launch(before[0], [*args, "--set", f"ds.zero_stage={before[1]}", "--set", f"train.grad_accum={accum[before[0]]}",
                           "--output-dir", str(first)]))
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    rewind(moved, 4)
    tag = moved / "checkpoints" / "step00000004"
    original = {f.name: f.read_bytes() for f in tag.iterdir()}
    probe = tmp_path / "restored.pt"
    monkeypatch.setenv("SYMMIM_RESTORE_PROBE", str(probe))
    proc = run(launch(after[0], [*args, "--set", f"ds.zero_stage={after[1]}", "--set", f"train.grad_accum={accum[after[0]]}",
                                 "--output-dir", str(moved), "--resume"], probe=True))
    log = proc.stdout + proc.stderr
    universal = moved / "checkpoints" / "universal" / "step00000004"
    assert f"converting {tag} for another ZeRO layout into {universal}" in log
    assert f"resumed from {universal} (written by {before[0]} processes)" in log
    assert "position carried over in images: epoch 0, 128 images in" in log
    assert {f.name: f.read_bytes() for f in tag.iterdir()} == original  # the original tag is untouched
    assert (moved / "checkpoints" / "latest").read_text() == "step00000008"

    # Rank 0's restored moments are the matching stretch of the saved ones, bit for bit (rank 0 holds
    # all of them on one process or under ZeRO-0, the first half of each group under ZeRO-1/2 on two).
    saved, restored = _saved_moments(tag), _flat_moments(torch.load(probe, weights_only=False))
    assert saved.keys() == restored.keys()
    for key, flat in saved.items():
        n = min(flat.numel(), restored[key].numel())
        assert n >= flat.numel() // 2 and torch.equal(restored[key][:n], flat[:n]), key

    # No warm-up restart and the same images; the masks are drawn anew, so mim continues within a percent.
    a = {r["step"]: r for r in metrics(first) if "loss" in r}
    b = {r["step"]: r for r in metrics(moved) if "loss" in r}
    assert sorted(b) == list(range(1, 9)) and all(a[s]["lr"] == b[s]["lr"] for s in range(1, 9))
    for s in range(5, 9):
        assert b[s]["loss_mim"] == pytest.approx(a[s]["loss_mim"], rel=1e-2), s


def test_zero3_checkpoints_resume_only_on_their_own_process_count_and_zero0_is_not_converted(embedded_cache, tmp_path):
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    args = quiet(embedded_cache, *SETS, "ds.zero_stage=3", "train.max_steps=4")
    run_dir = tmp_path / "z3"
    run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN, *args, "--output-dir", str(run_dir)])
    proc = run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir), "--resume"], expect=2)
    assert "written by 2 processes under ZeRO-3, this run has 1" in proc.stderr
    proc = run([sys.executable, PRETRAIN, *args, "--set", "ds.zero_stage=0", "--output-dir", str(run_dir), "--resume"],
               expect=2)
    assert "written under ZeRO-3, this run uses ZeRO-0" in proc.stderr
    assert json.loads((run_dir / "checkpoints" / "step00000004" / "manifest.json").read_text())["layout"] == {
        "zero_stage": 3, "batch_size": 16, "grad_accum": 1}


def test_a_global_batch_that_cannot_be_kept_is_refused_with_what_to_set(embedded_cache, tmp_path):
    """12 images per step on one process cannot be split over two processes of 12."""
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    args = quiet(embedded_cache, *SETS, "train.batch_size=12", "train.max_steps=2", "train.ckpt_every_steps=1")
    run_dir = tmp_path / "odd"
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir)])
    before = (run_dir / "config.yaml").read_text()
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN, *args,
                           "--output-dir", str(run_dir), "--resume"], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "no accumulation keeps the global batch of 12 (1 processes x 12 x 1) on 2 processes of 12 images; set " \
           "train.batch_size to a divisor of 6" in proc.stdout + proc.stderr
    assert (run_dir / "config.yaml").read_text() == before
