"""Two processes compute what one process computes on the concatenated batch (fp32, gloo, CPU).

``tests/dist_step.py`` runs the real pre-training step (``build_training``: DeepSpeed engine, EMA
branch, cross-rank keys) once with one process on a global batch of 8 and once with two processes
on 4 images each, sharing one fixed mask per branch, for SymMIM (contrastive branch on: keys
gathered from every rank, the ``rank * batch`` positive offset, global-batch BatchNorm in the
heads) and MAE-style random masking, on the fast step under ZeRO 0, 1, 2 and 3; and a few MAE
steps clipped by the global gradient norm under each stage, against torch's AdamW and
``clip_grad_norm_`` on the whole batch.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from pretrain_runs import free_port, run

from symmim.core.config import load_config
from symmim.core.masking import MaskGenerator

pytestmark = pytest.mark.slow
DIST_STEP = str(Path(__file__).with_name("dist_step.py"))
CLIP = 0.02  # dist_step.CLIP
CASES = [(variant, stage) for variant in ("symmim", "random75") for stage in (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, dict]:
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, DIST_STEP, "--out", str(out / "one.pt")])
    run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), DIST_STEP, "--out", str(out / "two.pt")])
    one, two = (torch.load(out / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    return one["results"], two["results"], one["clipped"], two["clipped"]


@pytest.mark.parametrize("variant,stage", CASES)
def test_losses_and_gradients_match_one_process(results, variant, stage):
    one, two = results[0][(variant, stage)], results[1][(variant, stage)]
    assert two["loss_mim"] == pytest.approx(one["loss_mim"], rel=1e-6)
    assert two["loss_con"] == pytest.approx(one["loss_con"], rel=1e-6, abs=1e-9)
    assert (one["loss_con"] > 0) == (variant == "symmim")
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_every_rank_keeps_the_same_ema_branch(results):
    for stage in (0, 1, 2, 3):
        sums = results[1][("symmim", stage)]["ema_checksums"]  # [2, tensors] after one step and EMA update
        assert torch.equal(sums[0], sums[1])


def test_each_rank_draws_its_own_masks(results):
    """Ranks seed their mask streams apart (``seed * 1000 + rank``): no two ranks mask alike."""
    cfg = load_config("tiny_cpu")
    for variant in ("symmim", "random75"):
        own = results[1][(variant, 0)]["own_masks"]  # [2 ranks x 4, N]
        mask_cfg = cfg.mask if variant == "symmim" else load_config("tiny_cpu", ["mask.strategy=random"]).mask
        for rank in (0, 1):
            expected = MaskGenerator(mask_cfg, (8, 8), torch.device("cpu"), seed=rank).online(4).mask
            assert torch.equal(own[4 * rank:4 * rank + 4], expected), (variant, rank)
        assert not torch.equal(own[:4], own[4:])


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_clipping_is_by_the_global_norm_under_every_zero_stage(results, stage, world):
    """DeepSpeed steps a ZeRO optimizer group by group: the norm, the clip and the reported norm
    cover every group and rank all the same (torch's AdamW after ``clip_grad_norm_`` to 1e-6)."""
    reference, clipped = results[2]["reference"], results[1 + world][stage]
    assert min(reference["norms"]) > 10 * CLIP  # every step clipped
    assert clipped["norms"] == pytest.approx(reference["norms"], rel=1e-5)
    for name, want in reference["weights"].items():
        torch.testing.assert_close(clipped["weights"][name], want, rtol=0, atol=1e-6, msg=name)
