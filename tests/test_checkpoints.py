"""The checkpoint files' own rules, on a stand-in engine in one gloo process: order from the
manifests' content (never file times), a step saved once, retention that never touches the tag
``latest`` names and takes universal copies along, universal copies checked against their
source, and a half-written metrics line that does not stop a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain_runs import clean_env, free_port

from symmim.core.checkpoint import (ARCH_ADDED, CONVERTED, UNIVERSAL, CheckpointError, resumable_tag, save_checkpoint,
                                    universal_copy)
from symmim.core.metrics import truncate_metrics
from symmim.core.universal import NAMES, ZERO0_STATES

ARCH = {"size": "micro", **ARCH_ADDED}  # a manifest of today holds every key


class StandInEngine:
    """What ``save_checkpoint`` asks of a DeepSpeed engine under ZeRO-0: one model-states file per tag,
    holding ``weight`` (and the names a universal conversion reads)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.optimizer = None

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        w = torch.full((3,), self.weight)
        states = {"module": {"w": w}, "ds_version": "test", NAMES: [["w"]],
                  "optimizer": {"state": {0: {"exp_avg": w * 0.1, "exp_avg_sq": w * 0.01, "step": torch.tensor(1.0)}},
                                "param_groups": [{"lr": 0.0, "params": [0]}]}}
        torch.save(states, Path(save_dir) / tag / ZERO0_STATES)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


def save(ckpt: Path, step: int, keep: int = 0, weight: float = 1.0) -> Path:
    return save_checkpoint(StandInEngine(weight), ckpt, step, {}, {}, ARCH, keep, {"zero_stage": 0})


def seq(tag: Path) -> int:
    return json.loads((tag / "manifest.json").read_text())["seq"]


def test_the_newest_tag_is_the_one_written_last_whatever_the_file_times(tmp_path):
    """A run folder copied without its times (``cp -r``), or touched by a backup tool: the tag the run
    wrote last is still the one resumed."""
    ckpt = tmp_path / "checkpoints"
    older, newer = save(ckpt, 4), save(ckpt, 8)
    assert (seq(older), seq(newer)) == (1, 2)
    for path in newer.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # the newer tag's files now look decades older
    os.utime(newer, (1_000_000, 1_000_000))
    assert resumable_tag(ckpt, ARCH, 1, 0) == newer


def test_a_rewound_run_orders_its_new_tags_after_the_old_timeline(tmp_path):
    """After resuming from step 4 (step 8 left behind by an earlier timeline), the new step 6 is newest."""
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 4), save(ckpt, 8)
    six = save(ckpt, 6, keep=2)
    assert resumable_tag(ckpt, ARCH, 1, 0) == six
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000006", "step00000008"]  # step 4 went first


def test_a_step_is_saved_once_and_its_complete_tag_is_never_deleted(tmp_path):
    """The epoch's end on a periodic step, or a stop right after a save, saves the same step again: the
    complete tag that ``latest`` names stays as it is (with keep 1 nothing else could be resumed)."""
    ckpt = tmp_path / "checkpoints"
    tag = save(ckpt, 8, keep=1)
    marker = tag / "written-first"
    marker.touch()
    manifest = (tag / "manifest.json").read_text()
    assert save(ckpt, 8, keep=1, weight=2.0) == tag
    assert marker.is_file() and (tag / "manifest.json").read_text() == manifest
    assert (ckpt / "latest").read_text() == tag.name


def test_an_interrupted_tag_of_the_same_step_is_replaced(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 4)
    tag = save(ckpt, 8)
    (tag / "manifest.json").unlink()  # the save was cut short
    save(ckpt, 8, weight=3.0)
    assert seq(tag) == 2 and resumable_tag(ckpt, ARCH, 1, 0) == tag
    assert torch.load(tag / ZERO0_STATES, weights_only=False)["module"]["w"][0] == 3.0


def test_retention_takes_universal_copies_along_and_keeps_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    first = save(ckpt, 4)
    copy = universal_copy(first)
    assert (copy / CONVERTED).is_file()
    (ckpt / UNIVERSAL / "step00000002").mkdir()  # a copy whose source is gone already
    save(ckpt, 8, keep=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000008", UNIVERSAL]
    assert not list((ckpt / UNIVERSAL).iterdir())
    assert (ckpt / "latest").read_text() == "step00000008"


def test_a_universal_copy_of_an_earlier_tag_of_that_name_is_converted_anew(tmp_path, caplog):
    """Convert step 4, then put another step 4 in its place (a tag copied in from elsewhere): the
    copy no longer matches its source's manifest and is converted again."""
    ckpt = tmp_path / "checkpoints"
    tag = save(ckpt, 4, weight=1.0)
    copy = universal_copy(tag)
    weights = copy / "zero" / "w" / "fp32.pt"
    assert torch.load(weights, weights_only=False)["param"][0] == 1.0
    with caplog.at_level("INFO"):
        assert universal_copy(tag) == copy and "converting" not in caplog.text  # current: kept as it is
        other = tmp_path / "other" / "checkpoints"
        save(other, 1), save(other, 4, weight=7.0)  # step 4 of another run (its manifest says seq 2)
        for f in (ZERO0_STATES, "manifest.json"):
            (tag / f).write_bytes((other / "step00000004" / f).read_bytes())
        universal_copy(tag)
    assert "the copy there was of an earlier tag of that name" in caplog.text
    assert torch.load(weights, weights_only=False)["param"][0] == 7.0


def test_saving_a_step_again_drops_the_universal_copy_of_its_earlier_tag(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 2)
    tag = save(ckpt, 4)
    copy = universal_copy(tag)
    (tag / "manifest.json").unlink()  # rewound past step 4, which is then saved anew
    save(ckpt, 4, weight=2.0)
    assert not copy.exists()


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "loss": 0.8}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_an_error_pickle_cannot_carry_reaches_the_other_ranks_as_its_type_and_message():
    """Rank 0's decision fails with an error the broadcast cannot pickle (a class of its own, an
    open handle inside): the other ranks get a RuntimeError naming it instead of waiting forever."""
    from symmim.core.distributed import sendable

    class StorageGone(Exception):  # local: pickle cannot find it by name
        pass

    err = sendable(StorageGone("/shared/run is gone"))
    assert type(err) is RuntimeError and str(err) == "StorageGone: /shared/run is gone"
    plain = CheckpointError("step00000004: incomplete")
    assert sendable(plain) is plain


def test_a_manifest_names_only_files_already_flushed_to_storage(tmp_path, monkeypatch):
    """A node that dies right after the save must not leave a manifest over data still in its page
    cache: every file of the tag is fsynced before the manifest (and ``latest``) is written."""
    synced, order = set(), []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    real_replace = os.replace

    def replace(src, dst) -> None:
        order.append((Path(dst).name, set(synced)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    tag = save(tmp_path / "checkpoints", 4)
    data = {os.path.realpath(p) for p in tag.iterdir() if p.name != "manifest.json"}
    assert data and [name for name, _ in order] == ["manifest.json", "latest"]
    assert all(data <= synced_then for _, synced_then in order)
    for path in (tag / ".manifest.json.tmp", tag, tag.parent / ".latest.tmp", tag.parent):  # each text, each rename
        assert os.path.realpath(path) in synced


@pytest.mark.parametrize("wait_s", [None, 60.0])
def test_the_other_ranks_wait_out_a_conversion_longer_than_the_collective_timeout(tmp_path, wait_s):
    """Rank 0 converts for about 4 s in a job whose collectives time out after 2 s: waiting up to
    ``train.convert_timeout_min`` (here 60 s), both ranks go on with the copy; with only the
    collective timeout, the waiting rank fails."""
    tag, out = save(tmp_path / "checkpoints", 4), tmp_path / "outcomes"
    out.mkdir()
    cmd = [sys.executable, str(Path(__file__).with_name("slow_conversion_ranks.py")), "--tag", str(tag), "--out", str(out),
           "--port", str(free_port()), *(["--wait-s", str(wait_s)] if wait_s else [])]
    subprocess.run(cmd, env=clean_env(), capture_output=True, timeout=120)
    outcomes = [json.loads(f.read_text()) if (f := out / f"rank{r}.json").is_file() else "none" for r in range(2)]
    if wait_s:
        assert outcomes == ["passed", "passed"]
    else:  # rank 0 then fails at its broadcast, or is ended with the job before it writes
        assert "timed out" in outcomes[1].lower(), outcomes  # gloo: "Timed out waiting 2000ms for recv ..."
