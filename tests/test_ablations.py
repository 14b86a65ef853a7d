"""The ablation runner (``benchmarks/ablations.py``): the commands it plans, its summary, what
``--extend`` accepts, the digits set.
"""
from __future__ import annotations

import json
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

from symmim.benchmarks import ablations


def _plan(capsys, *argv: str) -> list[list[str]]:
    """The command lines a dry run prints, split."""
    assert ablations.main(["--dry-run", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _sets(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


def _launcher(cmd: list[str]) -> str:
    return cmd[cmd.index("-m") + 1].rsplit(".", 1)[1]


def test_every_run_is_pretrained_then_probed_and_finetuned_on_its_own_encoder(capsys, tmp_path):
    commands = _plan(capsys, "--minutes", "1.5", "--epochs", "3", "--seeds", "0", "1", "--runs-dir", str(tmp_path),
                     "--variants", "symmim", "random75", "fixed phase")
    assert len(commands) == 2 * 3 * 2 * 3  # modes x variants x seeds x (pre-training, linear probe, fine-tuning)
    runs = [commands[i:i + 3] for i in range(0, len(commands), 3)]
    for pretrain, linprobe, finetune in runs:
        assert [_launcher(c) for c in (pretrain, linprobe, finetune)] == ["pretrain", "linprobe", "finetune"]
        run_dir = pretrain[pretrain.index("--output-dir") + 1]
        seed = next(s for s in _sets(pretrain) if s.startswith("train.seed="))
        for name, cmd in (("linprobe", linprobe), ("finetune", finetune)):
            assert cmd[cmd.index("--weights") + 1] == run_dir and cmd[cmd.index("--output-dir") + 1] == f"{run_dir}/{name}"
            assert cmd[cmd.index("--config") + 1].endswith(f"{name}_ablation.yaml")
            # the same recipe for every encoder: no variant, no budget; the seed and the data as its pre-training
            assert seed in _sets(cmd) and "data.root=null" in _sets(cmd)
            assert not any(s.startswith(("mask.", "loss.", "train.epochs", "train.time_limit", "eval.knn")) for s in _sets(cmd))
    timed = [p for p, _, _ in runs if "train.time_limit_min=1.5" in _sets(p)]
    assert len(timed) == 6 and all("eval.knn_every_epochs=20" in _sets(p) for p in timed)  # tiny_cpu's schedule: kNN at the end
    counted = [p for p, _, _ in runs if "train.epochs=3" in _sets(p)]
    assert len(counted) == 6 and all("eval.knn_every_epochs=3" in _sets(p) for p in counted)
    assert sum("mask.phase=0" in _sets(p) for p, _, _ in runs) == 4


def test_the_default_variants_are_the_table_and_a_dataset_reaches_every_command(capsys, tmp_path):
    commands = _plan(capsys, "--modes", "epochs", "--epochs", "2", "4", "--seeds", "0", "--dataset", "digits",
                     "--runs-dir", str(tmp_path))
    pretrains = [c for c in commands if _launcher(c) == "pretrain"]
    assert len(pretrains) == 2 * len(ablations.GROUPS["table"])  # one budget per --epochs value
    assert sum("data.key_view=independent" in _sets(c) for c in pretrains) == 2
    assert sum("data.key_view=shifted" in _sets(c) for c in pretrains) == 2
    assert all(f"data.root={tmp_path / 'data-digits'}" in _sets(c) for c in commands)
    assert len(_plan(capsys, "--variants", "all", "--modes", "time", "--seeds", "0")) == 3 * len(ablations.VARIANTS)
    folder = _plan(capsys, "--dataset", str(tmp_path / "sub" / "in100"), "--variants", "random75", "--modes", "time",
                   "--seeds", "0", "--runs-dir", str(tmp_path))
    assert all(f"data.root={tmp_path / 'sub' / 'in100'}" in _sets(c) for c in folder)
    assert folder[0][folder[0].index("--output-dir") + 1] == str(tmp_path / "in100" / "0.6_min-random75-0")


def _run(knn: float, linprobe: float, finetune: float, seed: int = 0) -> dict:
    return {"seed": seed, "knn_top1": knn, "linprobe_top1": linprobe, "finetune_top1": finetune, "epochs": 3.0,
            "wall_s": 30.0, "s_per_epoch": 10.0, "seconds": {"pretrain": 40.0, "linprobe": 10.0, "finetune": 20.0}}


def test_a_summary_gives_each_evaluation_over_the_seeds():
    summary = ablations.summarise([_run(20.0, 30.0, 40.0), _run(24.0, 30.0, 50.0, seed=1)])
    assert summary["knn_mean"] == 22.0 and summary["knn_std"] == pytest.approx(2 ** 1.5)
    assert (summary["linprobe_mean"], summary["linprobe_std"]) == (30.0, 0.0)
    assert (summary["finetune_min"], summary["finetune_max"]) == (40.0, 50.0)
    assert summary["s_per_epoch"] == 10.0 and summary["s_per_run"] == 70.0 and summary["seeds"] == 2


def test_extend_runs_only_what_the_table_lacks_and_refuses_another_plan(tmp_path, capsys):
    table = tmp_path / "abl.json"
    plan = ["--minutes", "1.5", "--epochs", "3", "--seeds", "0", "1", "--runs-dir", str(tmp_path), "--json", str(table)]
    args = ablations.parser().parse_args(plan)
    args.set = ["data.root=null"]
    table.write_text(json.dumps({**ablations.same_plan(args), "commands": ["python benchmarks/ablations.py ..."],
                                 "runs": {"1.5 min": {"symmim": [_run(20, 30, 40), _run(20, 30, 40, seed=1)]},
                                          "3 epochs": {"symmim": [_run(20, 30, 40)]}}}))
    pretrains = [c for c in _plan(capsys, "--extend", *plan, "--variants", "symmim", "fixed phase")
                 if _launcher(c) == "pretrain"]
    # fixed phase under both budgets for both seeds, and the one symmim run the table lacks (3 epochs, seed 1)
    assert len(pretrains) == 5 and sum("mask.phase=0" in _sets(c) for c in pretrains) == 4
    assert [c[c.index("--output-dir") + 1].rsplit("/", 1)[1] for c in pretrains if "mask.phase=0" not in _sets(c)] == [
        "3_epochs-symmim-1"]
    with pytest.raises(SystemExit, match="another plan \\(minutes 1.5 there, 2.0 here\\)"):
        ablations.main(["--dry-run", "--extend", *plan, "--minutes", "2"])
    with pytest.raises(SystemExit, match="another plan \\(dataset 'embedded' there, 'digits' here; overrides"):
        ablations.main(["--dry-run", "--extend", *plan, "--dataset", "digits"])
    with pytest.raises(SystemExit, match="another plan \\(other budgets\\)"):
        ablations.main(["--dry-run", "--extend", *plan, "--modes", "time"])


def test_a_table_keeps_every_command_that_added_to_it():
    args = ablations.parser().parse_args(["--modes", "time", "--seeds", "0"])
    runs = {"0.6 min": {"symmim": [_run(20.0, 30.0, 40.0)]}}
    this = shlex.join(["python", *sys.argv])
    first = ablations.record(args, {}, {"0.6 min": []}, runs)
    assert first["commands"] == [this]
    assert ablations.record(args, first, {"0.6 min": []}, runs)["commands"] == [this, this]
    assert first["summary"]["0.6 min"]["symmim"]["finetune_mean"] == 40.0
    assert first["variants"] == {"symmim": ["loss.con_weight=1.0", "data.key_view=same"]}


def test_digits_become_an_imagefolder_with_a_fifth_of_each_class_held_out(tmp_path):
    root = ablations.write_digits(tmp_path / "digits")
    counts = {split: len(list((root / split).rglob("*.jpg"))) for split in ("train", "val")}
    assert counts == {"train": 1442, "val": 355}  # 1,797 images; per class every fifth held out
    assert sorted(p.name for p in (root / "val").iterdir()) == [str(d) for d in range(10)]
    first = sorted((root / "train" / "7").iterdir())[0]
    with Image.open(first) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
    assert pixels.min() < 30 and pixels.max() > 200  # ink on paper, not a blank
    stamp = first.stat().st_mtime_ns
    assert ablations.write_digits(root) == root and first.stat().st_mtime_ns == stamp  # written once
    assert not root.with_name("digits.partial").exists()
