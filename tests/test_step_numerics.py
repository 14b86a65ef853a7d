"""The pre-training step's numbers on one process (``tests/step_numerics.py``): fp32 sums of bf16
gradients, one rule for a skipped round on every path, the EMA branch from fp32 weights and its
BatchNorm statistics, DeepSpeed's clipping threshold after a resume."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pretrain_runs import run

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).with_name("step_numerics.py"))
PATHS = ("fast-zero0", "fast-zero2", "engine-bf16", "engine-bf16-zero2", "engine-fp32")  # step_numerics.PATHS


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("numerics") / "numerics.pt"
    run([sys.executable, SCRIPT, "--out", str(out)])
    results = torch.load(out, weights_only=False)
    assert tuple(results["rounds"]) == PATHS
    return results


def test_bf16_micro_batches_are_summed_in_fp32(results):
    """bf16 weights, ``grad_accum=8`` of one batch: DeepSpeed scales each loss by 1/8 (exact in
    binary), so an fp32 sum of the 8 bf16 gradients is the ``grad_accum=1`` gradient bit for bit;
    a bf16 sum rounds 3/8, 5/8, ... of it."""
    one, eight = results["accum"][1], results["accum"][8]
    assert all(g.dtype == torch.float32 for g in eight)
    for a, b in zip(eight, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_a_round_with_a_non_finite_loss_is_skipped_whole_and_counts_as_a_step(results, path):
    """Rounds of 2 micro-batches, the 3rd micro-batch NaN: every path ends each round on its 2nd
    micro-batch, skips the update of the NaN round (weights, EMA branch and BatchNorm statistics as
    they were) and goes on."""
    r = results["rounds"][path]
    assert [s["stepped"] for s in r["steps"]] == [False, True] * 3
    assert [s["skipped"] for s in r["steps"]] == [None, 0.0, None, 1.0, None, 0.0]
    first, skipped, last = r["after"]
    for key in ("weights", "ema"):
        assert all(torch.equal(skipped[key][n], first[key][n]) for n in first[key]), key
        assert not all(torch.equal(last[key][n], skipped[key][n]) for n in first[key]), key
    assert all(torch.isfinite(w).all() for w in last["weights"].values())
    if path != "engine-fp32":  # DeepSpeed's fp32 ZeRO-0 engine keeps no gradient norm
        norms = [s["grad_norm"] for s in r["steps"]]
        assert norms[0] is None and norms[1] > 0 and not torch.isfinite(torch.tensor(norms[3])) and norms[5] > 0


@pytest.mark.parametrize("path", PATHS)
def test_a_skipped_round_leaves_no_batchnorm_statistics_behind(results, path):
    """The NaN round's forwards wrote NaN into the online heads' running statistics: the EMA branch
    keeps those of the last step taken, and gives them back to the online model."""
    first, skipped, last = results["rounds"][path]["after"]
    assert all(torch.equal(a, b) for a, b in zip(skipped["ema_buffers"], first["ema_buffers"]))
    for state in (first, skipped, last):
        assert all(torch.equal(a.float(), b) for a, b in zip(state["ema_buffers"], state["online_buffers"]))
        assert all(torch.isfinite(b).all() for b in state["online_buffers"])


@pytest.mark.parametrize("path", PATHS)
def test_the_ema_branch_takes_the_fp32_weights(results, path):
    """Momentum 0 after the first round: the EMA branch is the fp32 weights the optimizer steps
    (DeepSpeed's fp32 masters on its bf16 engine), not their bf16 rounding."""
    first = results["rounds"][path]["after"][0]
    for name, ema in first["ema"].items():
        assert torch.equal(ema, first["weights"][name]), name
    if "bf16" in path:  # the module's bf16 weights would differ
        assert any(not torch.equal(w, w.bfloat16().float()) for w in first["weights"].values())


def test_deepspeed_clips_with_the_configured_threshold_after_a_resume(results):
    """Under ZeRO 1-3 DeepSpeed clips, and loading a checkpoint restores the threshold it was saved
    with: the run's own ``optim.clip_grad`` is put back."""
    assert results["clip"] == {"built": 0.5, "loaded": 0.5}
