"""End-to-end pre-training runs: plain python, torchrun and the DeepSpeed launcher, on CPU.

Each run is the real ``symmim.launch.pretrain`` (DALI CPU pipeline, DeepSpeed engine) on the
embedded data set, cut to a few steps with ``train.max_steps``.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml
from pretrain_runs import PRETRAIN, ROOT, free_port, metrics, quiet, rewind, run, untimed

from symmim.core.config import load_config
from symmim.core.schedules import lr_at, momentum_at

pytestmark = pytest.mark.slow


def test_single_process_run_learns_and_leaves_a_complete_run_folder(embedded_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, PRETRAIN, *quiet(embedded_cache, "train.epochs=2", "log.every_steps=5",
                                                   "log.tensorboard=true", "eval.knn_every_epochs=1"),
                "--output-dir", str(run_dir)])
    log = proc.stdout + proc.stderr
    assert "data: DALI (imagefolder" in log and "decode=cpu" in log  # the loader line names the backend
    assert "kernels: ops=torch attention=sdpa" in log
    records = metrics(run_dir)
    knn = [r for r in records if "knn_top1" in r]
    records = [r for r in records if "loss" in r]
    for key in ("step", "epoch", "loss", "loss_mim", "loss_con", "lr", "grad_norm", "img_per_s", "data_wait_frac"):
        assert key in records[0]
    assert all(0 < r["grad_norm"] < 1e3 for r in records)  # the mean global norm of the window's rounds
    assert [(r["step"], r["epoch"]) for r in knn] == [(31, 1.0), (62, 2.0)]  # periodic kNN at epoch ends
    assert 0 < knn[0]["wall_s"] < knn[1]["wall_s"]
    # The periodic kNN is the one symmim-knn computes from the checkpoint of the same step.
    standalone = run([sys.executable, "-m", "symmim.launch.knn", "--config", str(run_dir / "config.yaml"),
                      "--weights", str(run_dir), "--set", f"data.cache_dir={embedded_cache}"])
    result = json.loads(standalone.stdout.strip().splitlines()[-1])
    assert result == {"knn_top1": knn[1]["knn_top1"], "knn_top5": knn[1]["knn_top5"]}
    assert records[-1]["step"] == 62  # 2 epochs x 31 steps (2,000 images / 64)
    assert records[-1]["loss_mim"] < 0.8 * records[0]["loss_mim"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000062"
    assert sorted(p.name for p in (run_dir / "recon").glob("*.png")) == ["epoch0001_step00000031.png", "epoch0002_step00000062.png"]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("loader,accum", [("dali", 1), ("torch", 1), ("dali", 2)])
def test_resume_after_a_crash_replays_the_same_losses_bitwise(embedded_cache, tmp_path, loader, accum):
    """fp32, one process: the resumed run's loss stream equals the uninterrupted one. With
    ``grad_accum=2`` the checkpoint of step 3 sits after micro-batch 6 of the epoch, and a crash
    anywhere later (inside an accumulation round too) replays from there."""
    args = quiet(embedded_cache, f"data.loader={loader}", "train.max_steps=8", "train.ckpt_every_steps=3",
                  f"train.grad_accum={accum}", "log.every_steps=1", "train.batch_size=16", "log.recon_images=0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(full)])
    shutil.copytree(full, resumed)
    rewind(resumed, 3)
    proc = run([sys.executable, PRETRAIN, *args, "--output-dir", str(resumed), "--resume"])
    assert "resumed from" in proc.stderr + proc.stdout
    assert untimed(metrics(resumed)) == untimed(metrics(full))
    assert [r["step"] for r in metrics(resumed)] == list(range(1, 9))
    assert metrics(full)[2]["epoch"] == pytest.approx(3 * accum / (2000 // 16 // accum * accum))  # micro-batches


def test_grad_accum_steps_the_optimizer_and_the_ema_once_per_round(embedded_cache, tmp_path):
    """``grad_accum=2``: both micro-batches of a round run at the lr of that optimizer step, the
    optimizer steps on the second, and the EMA branch moves once per step with that step's momentum."""
    out = tmp_path / "probe.json"
    run([sys.executable, str(ROOT / "tests" / "step_probe.py"), str(out),
         *quiet(embedded_cache, "train.max_steps=5", "train.grad_accum=2", "train.batch_size=8", "train.epochs=2",
                "optim.warmup_epochs=0.05", "log.recon_images=0"), "--output-dir", str(tmp_path / "run")])
    probe = json.loads(out.read_text())
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["train.batch_size=8", "train.grad_accum=2", "train.epochs=2",
                                                         "optim.warmup_epochs=0.05"])
    steps_per_epoch = 2000 // 8 // 2
    total, warmup = 5, int(0.05 * steps_per_epoch)
    assert len(probe["steps"]) == 10
    assert [s for _, _, s in probe["steps"]] == [False, True] * 5
    for k in range(5):  # micro-batches 2k and 2k + 1 make optimizer step k
        lr = lr_at(k, total, warmup, cfg.optim.lr, cfg.optim.min_lr)
        assert probe["steps"][2 * k][0] == probe["steps"][2 * k + 1][0] == pytest.approx(lr, rel=1e-12)
    expected = [momentum_at(k + 1, total, cfg.loss.momentum, cfg.loss.momentum_end) for k in range(5)]
    assert probe["ema"] == pytest.approx(expected, rel=1e-7)  # the fast step forms it in fp32 on the device
    assert len(set(probe["ema"])) == 5 and warmup > 0


@pytest.mark.parametrize("zero", [0, 2])
def test_two_process_deepspeed_bf16_saves_resumes_and_continues(embedded_cache, tmp_path, zero):
    """The fast step on two bf16 processes: ZeRO-0 (bf16 weights, fp32 masters in the optimizer,
    one flat all-reduce) and ZeRO-2 (fp32 weights under autocast, DeepSpeed's partitions)."""
    launcher = shutil.which("deepspeed") or pytest.skip("deepspeed launcher not on PATH")
    run_dir = tmp_path / "ds"
    # The documented form: the DeepSpeed launcher runs the installed module on every rank.
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "symmim.launch.pretrain",
           *quiet(embedded_cache, "train.precision=bf16", f"ds.zero_stage={zero}", "train.max_steps=8",
                  "optim.warmup_epochs=0", "train.ckpt_every_steps=4", "log.every_steps=1", "train.batch_size=32",
                  "log.recon_images=2"),
           "--output-dir", str(run_dir)]
    proc = run(cmd)
    assert "2 process(es)" in proc.stdout + proc.stderr and "step: fast" in proc.stdout + proc.stderr
    step4 = run_dir / "checkpoints" / "step00000004"
    assert {p.name for p in step4.glob("rank*_state.pt")} == {"rank0_state.pt", "rank1_state.pt"}
    shards = sorted(p.name for p in step4.glob("*zero_pp_rank_*optim_states.pt"))
    if zero:  # ZeRO-2 partitions the optimizer state: one shard per rank
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    else:  # ZeRO-0: the optimizer state, fp32 masters included, sits beside the module's
        optimizer = torch.load(step4 / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
        assert not shards and optimizer["masters"][0].dtype == torch.float32
    first = metrics(run_dir)
    rewind(run_dir, 4)
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    proc = run(cmd + ["--resume"])
    assert "resumed from" in proc.stdout + proc.stderr
    again = metrics(run_dir)
    assert [r["step"] for r in again] == list(range(1, 9))
    assert again[:4] == first[:4]  # records up to the resumed step are kept as they were
    # At the peak lr from step 0, the continued run repeats both losses bit for bit: weights, Adam
    # moments, EMA branch, data and mask positions all came back on both ranks.
    assert untimed(again[4:]) == untimed(first[4:])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000008"


def test_torchrun_launch(embedded_cache, tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    run_dir = tmp_path / "tr"
    run([torchrun, "--nproc_per_node", "1", "--master_port", str(free_port()), "-m", "symmim.launch.pretrain",
          *quiet(embedded_cache, "train.max_steps=3", "log.every_steps=1", "train.batch_size=16", "log.recon_images=0"),
          "--output-dir", str(run_dir)])
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_zero3_ema_update_uses_the_gathered_online_weights(embedded_cache, tmp_path):
    """Under ZeRO-3 the online weights are partitioned; the EMA update gathers them: after step 2
    the EMA branch is exactly ``m * ema_1 + (1 - m) * online_2`` (fp32), with step 2's momentum."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "z3"
    run([sys.executable, PRETRAIN, *quiet(embedded_cache, "ds.zero_stage=3", "train.max_steps=3", "train.ckpt_every_steps=1",
                                          "optim.warmup_epochs=0", "train.batch_size=16", "log.every_steps=1",
                                          "log.recon_images=0"),
         "--output-dir", str(run_dir)])
    ckpt = run_dir / "checkpoints"

    def ema(step: int) -> dict:
        state = torch.load(ckpt / f"step{step:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
        return state["momentum"]  # ZeRO-3 layout

    first, second = ema(1), ema(2)
    online = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step00000002")
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    m = momentum_at(2, 3, cfg.loss.momentum, cfg.loss.momentum_end)
    params = [k for k in first if k.endswith(("weight", "bias", "cls_token")) and "running" not in k]
    assert "encoder.blocks.0.attn.qkv.weight" in params and "projector.0.weight" in params
    for key in params:
        torch.testing.assert_close(second[key], torch.lerp(first[key], online[key].float(), 1 - m), rtol=1e-6, atol=1e-7,
                                   msg=key)
    assert not torch.equal(first["projector.0.weight"], second["projector.0.weight"])


def test_compiled_step_gives_the_eager_losses(embedded_cache, tmp_path):
    """``train.compile``: the encoders, decoder and heads under torch.compile (CPU inductor here)
    give the eager run's losses to float rounding, and the checkpoint keeps the module's names."""
    args = quiet(embedded_cache, "train.max_steps=4", "log.every_steps=1", "train.batch_size=16", "log.recon_images=0")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run([sys.executable, PRETRAIN, *args, "--output-dir", str(eager)])
    run([sys.executable, PRETRAIN, *args, "--set", "train.compile=true", "--output-dir", str(compiled)])
    for a, b in zip(metrics(eager), metrics(compiled), strict=True):
        for key in ("loss", "loss_mim", "loss_con"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    module = torch.load(compiled / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "encoder.blocks.0.attn.qkv.weight" in module and not any("_orig_mod" in k for k in module)
