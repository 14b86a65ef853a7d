"""A run folder holds one run, a refused launch changes nothing in it, and the command line says
what a user needs: the resolved config, the changes a resume makes, a closing summary."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_runs import PRETRAIN, ROOT, clean_env, free_port, metrics, quiet, run

from symmim.core.checkpoint import CheckpointError, resumable_tag
from symmim.core.config import load_config
from symmim.core.pretrain_step import architecture

pytestmark = pytest.mark.slow
SHORT = ("train.batch_size=32", "log.every_steps=2", "log.recon_images=0", "train.max_steps=4",
         "train.ckpt_every_steps=2")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(embedded_cache, tmp_path_factory) -> tuple[Path, list[str], str]:
    run_dir = tmp_path_factory.mktemp("folder") / "run"
    args = quiet(embedded_cache, *SHORT)
    proc = run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir)])
    return run_dir, args, proc.stderr


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(finished):
    run_dir, args, _ = finished
    before = snapshot(run_dir)
    proc = run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir)], expect=2)
    assert f"{run_dir} holds a run already" in proc.stderr and "--resume" in proc.stderr and "--output-dir" in proc.stderr
    assert "device cpu" not in proc.stderr  # refused before any engine was built
    assert snapshot(run_dir) == before


def test_a_refused_resume_leaves_config_yaml_as_it_was(finished):
    run_dir, args, _ = finished
    before = snapshot(run_dir)
    proc = run([sys.executable, PRETRAIN, *args, "--set", "model.size=tiny", "--output-dir", str(run_dir), "--resume"],
               expect=2)
    assert "holds another model (size: checkpoint 'micro' vs this run 'tiny')" in proc.stderr
    assert "device cpu" not in proc.stderr  # the checkpoint was checked before the engine was built
    assert snapshot(run_dir) == before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["size"] == "micro"


def test_checkpoints_from_before_the_head_options_resume_under_their_defaults(finished, tmp_path):
    """Manifests written before ``model.head_bn`` and ``model.con_token`` existed lack them; they
    held BatchNorm heads fed by CLS, so they resume as such and under nothing else."""
    src, _, _ = finished
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(src / "checkpoints", ckpt, symlinks=True)
    for manifest in ckpt.glob("step*/manifest.json"):
        saved = json.loads(manifest.read_text())
        del saved["arch"]["head_bn"], saved["arch"]["con_token"]
        manifest.write_text(json.dumps(saved))
    cfg = load_config(str(src / "config.yaml"))
    assert resumable_tag(ckpt, architecture(cfg), 1, 0).name == "step00000004"
    cfg.model.head_bn = False
    with pytest.raises(CheckpointError, match="holds another model \\(head_bn: checkpoint True vs this run False\\)"):
        resumable_tag(ckpt, architecture(cfg), 1, 0)


def test_a_missing_data_root_fails_before_anything_is_built_or_written(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(tmp_path, f"data.root={tmp_path / 'nope'}"), "--output-dir", str(run_dir)],
               expect=2)
    assert f"data.root {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "device cpu" not in proc.stderr and not run_dir.exists()
    assert proc.stderr.count("does not exist") == 1 and "rank 0:" not in proc.stderr  # one line, no repeated prefix


def test_the_run_ends_with_a_summary_and_keeps_its_newest_checkpoints(finished):
    run_dir, _, log = finished
    summary = [line for line in log.splitlines() if "symmim: done:" in line]
    assert len(summary) == 1 and "step 4 of 4" in summary[0] and "final loss" in summary[0] and str(run_dir) in summary[0]
    assert "step 2/4" in log  # not a terminal: a plain line per logging window
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_checkpoints_are_kept_by_the_order_the_run_wrote_them(embedded_cache, tmp_path):
    """A resume from an earlier step writes tags with lower numbers than older leftovers; retention
    keeps what this run wrote last, and latest names a tag that exists."""
    run_dir = tmp_path / "run"
    args = quiet(embedded_cache, "train.batch_size=32", "log.every_steps=1", "log.recon_images=0", "train.max_steps=6",
                 "train.ckpt_every_steps=1", "train.keep_checkpoints=2")
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(run_dir)])
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000005", "step00000006"]
    (ckpt / "step00000006" / "manifest.json").unlink()  # as if the last save had been cut short
    time.sleep(0.05)
    run([sys.executable, PRETRAIN, *args, "--set", "train.max_steps=7", "--output-dir", str(run_dir), "--resume"])
    kept = sorted(p.name for p in ckpt.glob("step*"))
    assert kept == ["step00000006", "step00000007"] and (ckpt / "latest").read_text().strip() == "step00000007"


def test_a_resume_says_what_it_changes(finished, tmp_path):
    run_dir, args, _ = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    proc = run([sys.executable, PRETRAIN, *args, "--set", "train.max_steps=6", "--output-dir", str(copy), "--resume"])
    assert "resume changes train.max_steps: 4 -> 6" in proc.stderr
    assert "schedules are re-planned: 6 steps (were 4)" in proc.stderr
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["max_steps"] == 6  # accepted: written
    assert [r["step"] for r in metrics(copy) if "loss" in r][-1] == 6


def test_a_resume_takes_the_optimizer_settings_of_its_config(finished, tmp_path):
    """Weight decay and betas changed at a resume are what the optimizer then uses (the checkpoint's
    groups carried the old ones); the moments stay the checkpoint's."""
    run_dir, args, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    probe = tmp_path / "restored.pt"
    env = {**clean_env(), "SYMMIM_RESTORE_PROBE": str(probe)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "restore_probe.py"), *args, "--set", "optim.weight_decay=0.2",
                    "--set", "optim.betas=[0.8,0.9]", "--output-dir", str(copy), "--resume"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    groups = torch.load(probe, weights_only=False)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def test_a_refused_conversion_leaves_config_yaml_as_it_was(finished, tmp_path):
    """A ZeRO-0 tag saved before the parameter names were recorded cannot move to ZeRO-2: refused
    before config.yaml is rewritten or anything is converted."""
    run_dir, args, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for tag in (copy / "checkpoints").glob("step*"):
        states_file = tag / "mp_rank_00_model_states.pt"
        states = torch.load(states_file, weights_only=False)
        del states["param_names"]
        torch.save(states, states_file)
        manifest = json.loads((tag / "manifest.json").read_text())
        manifest["files"]["mp_rank_00_model_states.pt"] = states_file.stat().st_size
        (tag / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(copy)
    proc = run([sys.executable, PRETRAIN, *args, "--set", "ds.zero_stage=2", "--output-dir", str(copy), "--resume"],
               expect=2)
    assert "predates the parameter names a conversion to ZeRO 1-2 needs" in proc.stderr
    assert snapshot(copy) == before


def test_print_config_prints_every_key_and_writes_nothing(tmp_path):
    out = run([sys.executable, PRETRAIN, "--config", "tiny_cpu", "--set", "train.epochs=3", "--print-config",
               "--output-dir", str(tmp_path / "run")]).stdout
    printed = yaml.safe_load(out)
    assert printed["train"]["epochs"] == 3 and printed["train"]["fast_step"] is True and "kernels" in printed
    assert not (tmp_path / "run").exists()
    assert "--print-config" in run([sys.executable, PRETRAIN, "--help"]).stdout


def test_a_second_ctrl_c_exits_at_once(embedded_cache, tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, PRETRAIN, *quiet(embedded_cache, "train.batch_size=32", "log.every_steps=1000",
                                                                   "log.recon_images=0", "train.max_steps=100000"),
                                 "--output-dir", str(run_dir)], cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while "model:" not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    while "again to exit at once" not in log_path.read_text():  # two signals before the handler runs make one
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    text = log_path.read_text()
    assert "again to exit at once" in text and "second SIGINT: exiting now" in text
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_exported_files_share_one_mode(finished, tmp_path):
    run_dir, _, _ = finished
    out = tmp_path / "exports" / "e.safetensors"
    run([sys.executable, "-m", "symmim.launch.export", str(run_dir), "--out", str(out)])
    assert os.stat(out).st_mode & 0o777 == os.stat(out.with_suffix(".json")).st_mode & 0o777
    assert json.loads(out.with_suffix(".json").read_text())["source"]["tag"] == "step00000004"


def _check_shared(tmp_path: Path, folder: Path, *extra: str) -> list[str]:
    """Each rank's outcome of ``check_shared`` on ``folder`` in a two-rank job."""
    out = tmp_path / "outcomes"
    out.mkdir()
    run([sys.executable, str(Path(__file__).with_name("shared_folder_ranks.py")), "--folder", str(folder),
         "--out", str(out), "--port", str(free_port()), *extra])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_shared_folder_check_leaves_a_run_another_job_started_meanwhile(tmp_path):
    """Rank 0 makes ``sweep/a`` for the check; another job starts ``sweep/b`` before it ends: the
    check removes the empty ``a`` only, not ``sweep`` with the other run inside."""
    assert _check_shared(tmp_path, tmp_path / "sweep" / "a", "--other-job", str(tmp_path / "sweep" / "b")) == \
        ["passed", "passed"]
    assert (tmp_path / "sweep" / "b" / "checkpoints").is_dir()
    assert not (tmp_path / "sweep" / "a").exists()


def test_a_run_folder_rank_0_cannot_write_is_refused_on_every_rank(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    outcomes = _check_shared(tmp_path, tmp_path / "a_file" / "run")
    assert all(o.startswith(f"cannot write into the run folder {tmp_path / 'a_file' / 'run'}") for o in outcomes)
