"""Learning-rate and EMA-momentum schedules (core/schedules.py) and AdamW groups (core/optim.py)."""
import math

import pytest
import torch

from symmim.core.config import load_config
from symmim.core.optim import FusedAdamW, build_optimizer, param_groups
from symmim.core.schedules import Schedule, lr_at, momentum_at
from symmim.core.symmim import SymMIM
from symmim.kernels.dispatch import Backends

TOTAL, WARMUP, PEAK, FINAL = 100, 10, 1.0e-3, 1.0e-5


# ---------------------------------------------------------------- lr


def test_lr_warmup_is_linear_from_zero():
    assert lr_at(0, TOTAL, WARMUP, PEAK, FINAL) == 0.0
    for step in range(WARMUP + 1):
        assert lr_at(step, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx(PEAK * step / WARMUP, rel=1e-12, abs=0)
    assert lr_at(WARMUP, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx(PEAK, rel=1e-12)


def test_lr_cosine_to_final():
    assert lr_at(TOTAL, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx(FINAL, rel=1e-12)
    mid = WARMUP + (TOTAL - WARMUP) // 2  # half way through the cosine: the mean of peak and final
    assert lr_at(mid, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx((PEAK + FINAL) / 2, rel=1e-12)
    quarter = WARMUP + (TOTAL - WARMUP) / 4
    expected = FINAL + (PEAK - FINAL) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(quarter, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx(expected, rel=1e-12)
    # the last step the loop runs (TOTAL - 1) is already within 0.1% of the peak-final gap of final
    assert lr_at(TOTAL - 1, TOTAL, WARMUP, PEAK, FINAL) - FINAL < 1e-3 * (PEAK - FINAL)


def test_lr_monotone():
    values = [lr_at(s, TOTAL, WARMUP, PEAK, FINAL) for s in range(TOTAL + 1)]
    assert all(a < b for a, b in zip(values[:WARMUP], values[1:WARMUP + 1]))  # rising warm-up
    assert all(a > b for a, b in zip(values[WARMUP:], values[WARMUP + 1:]))  # strictly falling after
    assert max(values) == pytest.approx(PEAK) and min(values[WARMUP:]) == pytest.approx(FINAL)
    assert all(FINAL - 1e-15 <= v <= PEAK + 1e-15 for v in values[WARMUP:])


def test_lr_without_warmup_and_past_the_end():
    assert lr_at(0, TOTAL, 0, PEAK, FINAL) == pytest.approx(PEAK)
    assert lr_at(TOTAL + 50, TOTAL, WARMUP, PEAK, FINAL) == pytest.approx(FINAL)  # clamped, no rebound
    assert lr_at(5, 1, 0, PEAK, 0.0) == pytest.approx(0.0, abs=1e-15)


def test_lr_depends_on_step_only():
    a = [lr_at(s, TOTAL, WARMUP, PEAK, FINAL) for s in range(TOTAL)]
    b = [lr_at(s, TOTAL, WARMUP, PEAK, FINAL) for s in reversed(range(TOTAL))][::-1]
    assert a == b


@pytest.mark.parametrize("lr,peak", [(None, 1.5e-4 * 512 / 256), (2e-3, 2e-3), (0.0, 0.0)])
def test_peak_lr_is_the_absolute_lr_when_set_even_zero(lr, peak):
    """``optim.lr`` set (0 included: the ablations' untrained floor) is the peak; unset, base_lr x batch / 256."""
    plan = Schedule.plan(10, 1, 2, 0, 512, lr, 1.5e-4, 1, 0.0)
    assert plan.peak_lr == pytest.approx(peak, rel=1e-12, abs=0)
    assert max(plan.lr(s) for s in range(plan.total_steps)) == pytest.approx(peak, rel=1e-12, abs=0)


# ---------------------------------------------------------------- momentum


@pytest.mark.parametrize("start,end", [(0.99, 1.0), (0.996, 1.0), (0.9, 0.99)])
def test_momentum_schedule(start, end):
    values = [momentum_at(s, TOTAL, start, end) for s in range(TOTAL + 1)]
    assert values[0] == pytest.approx(start, rel=1e-12)
    assert values[-1] == pytest.approx(end, rel=1e-12)
    assert values[TOTAL // 2] == pytest.approx((start + end) / 2, rel=1e-12)
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising
    assert all(start - 1e-15 <= v <= end for v in values)  # never above end (m > 1 would diverge)
    assert momentum_at(TOTAL + 20, TOTAL, start, end) == pytest.approx(end)


def test_momentum_constant_when_start_is_end():
    assert {momentum_at(s, TOTAL, 0.99, 0.99) for s in range(TOTAL + 1)} == {0.99}


# ---------------------------------------------------------------- optimizer groups

SMALL = [
    "model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=32",
    "model.decoder_depth=1", "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16",
]


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, SMALL)
    return SymMIM(cfg.model, cfg.loss, Backends("torch", "torch", "torch"))


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_param_groups(model):
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = group_names(model, groups)
    everything = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == everything and not decay & no_decay
    assert sum(len(g["params"]) for g in groups) == len(everything)  # no parameter twice
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.blocks.0.attn.proj.weight", "encoder.blocks.3.mlp.fc1.weight",
                 "encoder.blocks.3.mlp.fc2.weight", "decoder.decoder_embed.weight", "decoder.blocks.0.attn.qkv.weight",
                 "decoder.pred.weight", "projector.0.weight", "projector.3.weight", "projector.6.weight",
                 "predictor.0.weight", "predictor.3.weight"):
        assert name in decay, name
    for name in ("encoder.cls_token", "decoder.mask_token", "encoder.patch_embed.proj.bias",
                 "encoder.blocks.0.norm1.weight", "encoder.blocks.0.norm1.bias", "encoder.blocks.0.norm2.weight",
                 "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.mlp.fc2.bias", "encoder.norm.weight",
                 "encoder.norm.bias", "decoder.norm.weight", "decoder.pred.bias",
                 "projector.1.weight", "projector.1.bias", "predictor.1.weight"):
        assert name in no_decay, name
    # the rule in full: decay exactly the weight matrices / conv kernels
    for name, p in model.named_parameters():
        assert (name in decay) == (p.ndim >= 2 and not name.endswith(("cls_token", "mask_token"))), name
    assert not any("pos_embed" in n for n in decay | no_decay)  # fixed buffers, never optimised


def test_param_groups_skip_frozen():
    cfg = load_config(None, SMALL + ["loss.con_weight=0"])
    m = SymMIM(cfg.model, cfg.loss, Backends("torch", "torch", "torch"))
    m.encoder.patch_embed.requires_grad_(False)
    m.encoder.cls_token.requires_grad_(False)
    decay, no_decay = group_names(m, param_groups(m, 0.1))
    frozen = {"encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.cls_token"}
    assert not frozen & (decay | no_decay)
    assert "decoder.mask_token" in no_decay and "decoder.pred.weight" in decay


@pytest.mark.parametrize("fast", [True, False])
def test_build_optimizer(model, fast):
    cfg = load_config(None, SMALL + ["optim.betas=[0.8, 0.9]", "optim.weight_decay=0.1"])
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"), fast)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, FusedAdamW) == fast
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["lr"] == 0.0 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
