"""Training survives preemption, crashes, damaged checkpoints, divergence and bad data.

Each test corrupts or interrupts a real ``launch/pretrain.py`` run (one CPU process unless
ranks matter) on the embedded data set or on a damaged copy of it that the test makes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pretrain_runs import PRETRAIN, ROOT, clean_env, free_port, metrics, quiet, rewind, run, untimed

from symmim.data.folder import scan_imagefolder
from symmim.data.verify import find_truncated, suspect

pytestmark = pytest.mark.slow
SHORT = ("train.batch_size=32", "log.every_steps=1", "log.recon_images=0")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a run in the background, its output going to ``log`` (a pipe could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, PRETRAIN, *args], cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.1)


def _latest(run_dir: Path) -> str:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else ""


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(embedded_cache, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = _start([*quiet(embedded_cache, *SHORT, "train.max_steps=200"), "--output-dir", str(run_dir)], log)
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 3, proc, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    step = metrics(run_dir)[-1]["step"]
    assert f"received SIGTERM: stopped at step {step}, checkpoint" in out
    assert _latest(run_dir) == f"step{step:08d}" and step < 200
    assert (run_dir / "checkpoints" / f"step{step:08d}" / "manifest.json").is_file()


def test_time_based_checkpoints_and_time_limit(embedded_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *SHORT, "train.max_steps=500", "train.keep_checkpoints=50",
                                                 "train.ckpt_every_min=0.02", "train.time_limit_min=0.25"),
                "--output-dir", str(run_dir)])
    assert "time limit of 0.25 min reached" in proc.stderr
    steps = sorted(int(p.name[4:]) for p in (run_dir / "checkpoints").glob("step*"))
    assert len(steps) >= 3, "a checkpoint about every 1.2 s over 15 s"
    assert steps[-1] == metrics(run_dir)[-1]["step"] < 500


def test_resume_after_sigkill_gives_the_uninterrupted_loss_stream(embedded_cache, tmp_path):
    """fp32 on one process: bitwise equal losses, lr and epoch after the resume point."""
    args = quiet(embedded_cache, *SHORT, "train.max_steps=16", "train.ckpt_every_steps=4")
    full, killed = tmp_path / "full", tmp_path / "killed"
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(full)])
    proc = _start([*args, "--output-dir", str(killed)], tmp_path / "log")
    _wait_for(lambda: _latest(killed) >= "step00000008", proc, tmp_path / "log")
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    logged_before = metrics(killed)[-1]["step"]
    resumed = run([sys.executable, PRETRAIN, *args, "--output-dir", str(killed), "--resume"])
    start = int(_latest_resumed(resumed.stderr))
    assert start >= 8 and logged_before >= start
    assert untimed(metrics(killed)) == untimed(metrics(full)), "steps logged after the checkpoint were replaced, not duplicated"


def _latest_resumed(log: str) -> str:
    line = next(line for line in log.splitlines() if "resumed from" in line)
    return line.rsplit("step", 1)[1]


@pytest.fixture(scope="module")
def finished_run(embedded_cache, tmp_path_factory):
    """A run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    args = quiet(embedded_cache, *SHORT, "train.max_steps=8", "train.ckpt_every_steps=4")
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir)])
    return run_dir, args


def _copy(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    return run_dir


def test_an_epoch_ending_on_a_periodic_step_saves_that_step_once(embedded_cache, tmp_path):
    """8 steps an epoch, a checkpoint every 4, keep 1: step 8 is saved once, at the epoch's end (a
    second save would first delete the only complete tag)."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, "train.batch_size=250", "train.max_steps=9", "model.img_size=32",
                                                 "train.ckpt_every_steps=4", "train.keep_checkpoints=1",
                                                 "log.every_steps=1", "log.recon_images=0", "eval.knn_every_epochs=0"),
                "--output-dir", str(run_dir)])
    saves = re.findall(r"checkpoint saved: \S+/(step\d+)", proc.stderr)
    assert saves == ["step00000004", "step00000008", "step00000009"], saves
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000009"]


EPOCH_OF_8 = ("train.batch_size=250", "model.img_size=32", "log.recon_images=0", "eval.knn_every_epochs=1",
              "train.max_steps=12", "train.ckpt_every_steps=4")  # 8 steps an epoch


@pytest.fixture(scope="module")
def epochs_of_8(embedded_cache, tmp_path_factory) -> Path:
    """An uninterrupted run of EPOCH_OF_8: 12 steps, checkpoints at 4, 8 and 12."""
    full = tmp_path_factory.mktemp("epochs_of_8") / "run"
    run([sys.executable, PRETRAIN, *quiet(embedded_cache, *EPOCH_OF_8, "log.every_steps=4"), "--output-dir", str(full)])
    return full


@pytest.mark.parametrize("stop", ["periodic save", "time limit"])
def test_a_resume_at_an_epoch_end_logs_what_the_uninterrupted_run_logged(embedded_cache, epochs_of_8, tmp_path, stop):
    """kNN after each 8-step epoch. The first session ends at step 8 (the epoch's last): after its
    checkpoint of every 4 steps, or stopped by a time limit at its first logging step (which
    evaluates before it saves). Resumed from step 8, the run logs what one uninterrupted run logs:
    that epoch's evaluation once, not again after the resume."""
    full, resumed = epochs_of_8, tmp_path / "resumed"
    if stop == "periodic save":
        shutil.copytree(full, resumed)
        rewind(resumed, 8)
    else:
        proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *EPOCH_OF_8, "log.every_steps=8",
                                                     "train.time_limit_min=0.0001"), "--output-dir", str(resumed)])
        assert "stopped at step 8" in proc.stderr
    run([sys.executable, PRETRAIN, *quiet(embedded_cache, *EPOCH_OF_8, "log.every_steps=4"), "--output-dir", str(resumed),
         "--resume"])
    evaluated = [r["step"] for r in metrics(resumed) if "knn_top1" in r]
    assert evaluated == [8, 12], evaluated

    def from_epoch_end(records: list[dict]) -> list[dict]:  # the time-limited session logged its window at step 8 only
        return [r for r in untimed(records) if r["step"] > 8 or "knn_top1" in r]
    assert from_epoch_end(metrics(resumed)) == from_epoch_end(metrics(full))


def test_a_run_folder_copied_without_its_times_resumes_its_newest_checkpoint(finished_run, tmp_path):
    """``cp -r`` sets every file's time to the copy's; here step 8's files even come out older than
    step 4's. The resume still takes step 8, and no save replaces it."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run[0]), str(run_dir)], check=True)
    step8 = run_dir / "checkpoints" / "step00000008"
    for path in [step8, *step8.iterdir()]:
        os.utime(path, (1_000_000, 1_000_000))
    proc = run([sys.executable, PRETRAIN, *finished_run[1], "--output-dir", str(run_dir), "--resume"])
    assert f"resumed from {step8}" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000004", "step00000008"]
    assert os.stat(step8 / "manifest.json").st_mtime == 1_000_000


@pytest.mark.parametrize("damage", ["truncated", "no-manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, damage):
    run_dir = _copy(finished_run, tmp_path)
    step8 = run_dir / "checkpoints" / "step00000008"
    if damage == "truncated":
        model = step8 / "mp_rank_00_model_states.pt"
        model.write_bytes(model.read_bytes()[:1000])
    else:
        (step8 / "manifest.json").unlink()  # the save was interrupted before it finished
    proc = run([sys.executable, PRETRAIN, *finished_run[1], "--output-dir", str(run_dir), "--resume"])
    assert f"skipping checkpoint {step8}" in proc.stderr
    assert "resumed from" in proc.stderr and "step00000004" in proc.stderr
    assert metrics(run_dir)[-1]["step"] == 8


def test_checkpoint_of_another_model_is_refused(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    proc = run([sys.executable, PRETRAIN, *finished_run[1], "--set", "model.size=tiny", "--output-dir", str(run_dir),
                "--resume"], expect=2)
    assert "holds another model (size: checkpoint 'micro' vs this run 'tiny')" in proc.stderr


def test_diverging_run_skips_counts_then_stops_with_a_debug_checkpoint(embedded_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *SHORT, "optim.lr=1.0e+12", "optim.clip_grad=0.0",
                                                 "optim.warmup_epochs=0", "train.max_nonfinite=3", "train.max_steps=200"),
                "--output-dir", str(run_dir)], expect=3)
    assert "non-finite loss: 1 update(s) skipped" in proc.stderr
    assert "loss non-finite for 3 updates in a row, last at step" in proc.stderr
    assert list((run_dir / "debug").glob("step*/manifest.json")), "debug checkpoint written"
    assert not (run_dir / "checkpoints" / "latest").exists(), "nothing non-finite became a resumable checkpoint"


# ---- data faults ----

def _damaged_copy(embedded_cache: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the embedded set with one file of each kind of fault; returns kind -> relative path."""
    src = next(embedded_cache.glob("embedded-*"))
    shutil.copytree(src, dest)
    files = sorted((dest / "train").rglob("*.jpg"))
    faults = {"corrupt": files[3], "empty": files[250], "not-an-image": files[500],
              "grayscale": files[750], "cmyk": files[1000], "not-jpeg": files[1250]}
    faults["corrupt"].write_bytes(faults["corrupt"].read_bytes()[:400])
    faults["empty"].write_bytes(b"")
    faults["not-an-image"].write_text("this is not an image\n")
    Image.open(faults["grayscale"]).convert("L").save(faults["grayscale"], "JPEG")
    Image.open(faults["cmyk"]).convert("CMYK").save(faults["cmyk"], "JPEG")
    Image.open(faults["not-jpeg"]).save(faults["not-jpeg"], "PNG")
    return dest, {k: str(p.relative_to(dest)) for k, p in faults.items()}


def test_verify_data_lists_broken_files_and_loaders_skip_them(embedded_cache, tmp_path):
    root, faults = _damaged_copy(embedded_cache, tmp_path / "data")
    out = run([sys.executable, "launch/verify_data.py", str(root), "--workers", "2"]).stdout
    for kind, rel in faults.items():
        assert f"{kind:12s} {rel}" in out
    excluded = [line for line in (root / "symmim_exclude.txt").read_text().splitlines() if not line.startswith("#")]
    assert sorted(excluded) == sorted(faults[k] for k in ("corrupt", "empty", "not-an-image"))
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *SHORT, f"data.root={root}", "train.max_steps=70"),
                "--output-dir", str(tmp_path / "run")])  # 2 epochs over every remaining file
    assert "data: 3 files excluded by" in proc.stderr


def test_quick_check_finds_the_truncated_empty_and_non_image_files_only(embedded_cache, tmp_path):
    """It reads file ends, so a JPEG with bytes after its end marker is a suspect, but the full
    decode clears it; grayscale, CMYK and PNG-named-.jpg files decode and are not broken."""
    root, faults = _damaged_copy(embedded_cache, tmp_path / "data")
    trailing = sorted((root / "train").rglob("*.jpg"))[1500]
    trailing.write_bytes(trailing.read_bytes() + b"\0" * 2000)  # e.g. a camera's appended data
    assert suspect(str(trailing)) and not suspect(str(sorted((root / "train").rglob("*.jpg"))[1501]))
    files = [str(p) for p in sorted((root / "train").rglob("*.jpg"))]
    found = {str(Path(f.path).relative_to(root)): f.kind for f in find_truncated(files, threads=4)}
    assert found == {faults["corrupt"]: "corrupt", faults["empty"]: "empty", faults["not-an-image"]: "not-an-image"}


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_without_a_scan_a_decode_failure_names_the_file(embedded_cache, tmp_path, loader):
    root, faults = _damaged_copy(embedded_cache, tmp_path / "data")
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, *SHORT, f"data.root={root}", f"data.loader={loader}",
                                                 "train.max_steps=70", "data.workers=1"),
                "--output-dir", str(tmp_path / "run")], expect=2)
    named = [rel for kind, rel in faults.items() if kind in ("corrupt", "empty", "not-an-image") and rel in proc.stderr]
    assert named, proc.stderr[-2000:]
    assert "cannot decode" in proc.stderr


def test_data_set_smaller_than_one_global_batch_is_refused(embedded_cache, tmp_path):
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, "train.batch_size=4096"), "--output-dir", str(tmp_path / "r")],
               expect=2)
    assert "2000 samples cannot fill one global batch of 1 x 4096" in proc.stderr


@pytest.mark.parametrize("precheck", [False, True])
def test_a_dying_rank_ends_the_job_quickly_and_is_named(precheck, embedded_cache, tmp_path):
    """A truncated file in rank 1's shard. Without the precheck rank 1 meets it while training and
    the job exits non-zero, no hang; with it (the default) every rank names it before training."""
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    src = next(embedded_cache.glob("embedded-*"))
    root = tmp_path / "data"
    shutil.copytree(src, root)
    items = scan_imagefolder(root / "train")
    order = np.random.default_rng(0).permutation(len(items))  # DaliLoader's shuffle (train.seed 0)
    victim = Path(items.files[order[len(items) * 3 // 4]])  # inside rank 1's half of the list
    victim.write_bytes(victim.read_bytes()[:300])
    t0, port = time.time(), free_port()
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(port), PRETRAIN,
                           *quiet(embedded_cache, *SHORT, f"data.root={root}", "train.dist_timeout_min=1.0",
                                  "train.max_steps=100", f"data.precheck={str(precheck).lower()}"),
                           "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert time.time() - t0 < 240
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's, unlinked at start
    if precheck:
        for rank in (0, 1):
            assert f"[rank{rank}] symmim: cannot decode 1 file(s): {victim}" in log, log[-5000:]
        return
    # Rank 1 names the file and exits 2 (bad input), unless DALI 2.4 crashes in native code after its
    # decode error (it sometimes does): then a signal kills it. Rank 0 then loses its peer in a
    # collective and exits 3 with one line, no traceback. The launcher reports the code of the first
    # failed process it polls (always under the last rank's command line).
    named = f"[rank1] symmim: cannot decode 1 file(s): {victim}" in log
    codes = [int(m.group(1)) for m in re.finditer(r"exits with return code = (-?\d+)", log)]
    assert codes, log[-5000:]
    assert codes[0] in (2, 3) if named else (codes[0] == 3 or codes[0] < 0), (codes, log[-5000:])
    if codes[0] == 3:
        assert "[rank0] symmim: another process of this job failed, so this one stops" in log, log[-5000:]
    assert "[rank0] symmim: failed" not in log, log[-5000:]


def test_manifest_records_world_size_and_architecture(finished_run):
    manifest = json.loads((finished_run[0] / "checkpoints" / "step00000008" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["arch"]["size"] == "micro" and manifest["arch"]["contrastive"]
    assert "rank0_state.pt" in manifest["files"] and "mp_rank_00_model_states.pt" in manifest["files"]
