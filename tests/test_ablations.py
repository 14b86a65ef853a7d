"""The ablation runner (``benchmarks/ablations.py``) and the paper's-claim plan built on it
(``benchmarks/paper_claim.py``): the commands they plan, what ``--extend`` accepts, the digits set,
the ImageNet-100 subset, the GPU-hour estimate, and one real run of pre-training, linear probe and
fine-tuning on CPU.
"""
from __future__ import annotations

import json
import re
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

from symmim.benchmarks import ablations, paper_claim


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
            assert cmd[cmd.index("--weights") + 1] == run_dir
            assert cmd[cmd.index("--output-dir") + 1] == f"{run_dir}/{name}"
            assert cmd[cmd.index("--config") + 1].endswith(f"{name}_ablation.yaml")
            # the same recipe for every encoder: no variant, no budget; the seed and the data as its pre-training
            assert seed in _sets(cmd) and "data.root=null" in _sets(cmd)
            pretraining_only = ("mask.", "loss.", "data.key_view", "train.epochs", "train.time_limit", "eval.knn")
            assert not any(s.startswith(pretraining_only) for s in _sets(cmd))
    timed = [p for p, _, _ in runs if "train.time_limit_min=1.5" in _sets(p)]
    # kNN at the end of the run: every tiny_cpu schedule's 20 epochs
    assert len(timed) == 6 and all("eval.knn_every_epochs=20" in _sets(p) for p in timed)
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
    assert folder[0][folder[0].index("--output-dir") + 1] == str(tmp_path / "in100" / "0.4_min-random75-0")


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


# ---------------------------------------------------------------- the paper's claim


def test_imagenet100_is_cmcs_hundred_classes():
    wnids = paper_claim.imagenet100()
    assert len(wnids) == len(set(wnids)) == 100 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"] and wnids[-1] == "n02090622"


def test_the_subset_links_the_hundred_class_folders_once(tmp_path):
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        for w in [*paper_claim.imagenet100(), "n01440764"]:  # and a class that is not in the subset
            (imagenet / split / w).mkdir(parents=True)
    out = paper_claim.build_subset(imagenet, tmp_path / "in100")
    for split in ("train", "val"):
        links = sorted((out / split).iterdir())
        assert [p.name for p in links] == sorted(paper_claim.imagenet100())
        assert all(p.is_symlink() and p.resolve() == (imagenet / split / p.name).resolve() for p in links)
    assert paper_claim.build_subset(imagenet, out) == out  # again: nothing to do
    (imagenet / "val" / "n02090622").rmdir()
    with pytest.raises(SystemExit, match="1 of the 200 class folders are missing, e.g. .*val/n02090622"):
        paper_claim.build_subset(imagenet, tmp_path / "other")


def test_the_gpu_hour_estimate_scales_the_measured_vit_b_step_by_flops():
    measured, rows = paper_claim.estimate()
    assert measured["env"]["device"] == "NVIDIA H200"
    by_run = {r["run"].split(",")[0]: r for r in rows}
    vit_b = {r["variant"]: r for r in measured["rows"] if r["system"] == "optimized"}
    symmim = by_run["pre-train symmim"]
    assert symmim["gflop_per_img"] < vit_b["symmim"]["gflop_per_img"]
    rate = vit_b["symmim"]["img_per_s"] * vit_b["symmim"]["gflop_per_img"]  # ViT-B's GFLOP/s, ViT-S's too
    assert symmim["img_per_s"] * symmim["gflop_per_img"] == pytest.approx(rate)
    assert symmim["hours_at_vit_b_img_s"] > symmim["hours"]
    assert by_run["total"]["hours"] == pytest.approx(sum(r["hours"] for r in rows[:-1]))


def test_the_paper_claim_plan(capsys, tmp_path):
    assert paper_claim.main(["--dry-run", "--data-root", str(tmp_path / "in100")]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2 * 2 * 3  # variants x epoch budgets x (pre-training, linear probe, fine-tuning)
    pretrains = [c for c in commands if _launcher(c) == "pretrain"]
    assert sorted(next(s for s in _sets(c) if s.startswith("train.epochs=")) for c in pretrains) == [
        "train.epochs=100", "train.epochs=100", "train.epochs=200", "train.epochs=200"]
    assert all(c[c.index("--config") + 1].endswith("vit_s16_in100_symmim.yaml") for c in pretrains)
    assert sum("mask.ratio=0.75" in _sets(c) for c in pretrains) == 2
    assert {c[c.index("--config") + 1].rsplit("/", 1)[1] for c in commands if c not in pretrains} == {
        "finetune_vit_s16_in100.yaml", "linprobe_vit_s16_in100.yaml"}
    assert all(f"data.root={tmp_path / 'in100'}" in _sets(c) and "train.seed=0" in _sets(c) for c in commands)
    assert paper_claim.main(["--dry-run"]) == 0  # the default subset lies outside the run folders
    run_dirs = {c[c.index("--output-dir") + 1] for line in capsys.readouterr().out.splitlines()
                if (c := shlex.split(line)) and _launcher(c) == "pretrain"}
    data_root = str(paper_claim.ROOT / "runs" / "imagenet100")
    assert len(run_dirs) == 4 and not any(d.startswith(data_root + "/") for d in run_dirs)


@pytest.mark.slow
def test_the_paper_claim_plan_runs_end_to_end_on_cpu(embedded_cache, tmp_path):
    """The ViT-S presets with the CPU check's overrides: one pre-training (2 steps, kNN at its end), its
    linear probe and its fine-tuning (2 steps each); then the table, its JSON and chart."""
    table = tmp_path / "claim.json"
    assert paper_claim.main(["--cpu-check", "--epochs", "100", "--variants", "symmim", "--runs-dir", str(tmp_path),
                             "--set", f"data.cache_dir={embedded_cache}", "--json", str(table)]) == 0
    record = json.loads(table.read_text())
    (run,) = record["runs"]["100 epochs"]["symmim"]
    assert all(0.0 <= run[f"{m}_top1"] <= 100.0 for m in ablations.METRICS)
    assert set(run["seconds"]) == {"pretrain", "linprobe", "finetune"}
    assert record["summary"]["100 epochs"]["symmim"]["seeds"] == 1 and "partial" not in record
    assert table.with_suffix(".png").stat().st_size > 0
