"""FusedAdamW, the fast step's optimizer: torch's AdamW and clipping as reference, fp32 masters and
fp32 gradient sums for bf16 weights, a non-finite step skipped on the device, and no host sync."""
from __future__ import annotations

import pytest
import torch

from symmim.benchmarks.step_ops import StepOps
from symmim.core.optim import FusedAdamW

BETAS = (0.9, 0.95)


def params(n: int, dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)] * (n // 4 + 1)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes[:n]]


def groups(ps: list) -> list[dict]:
    return [{"params": ps[::2], "weight_decay": 0.05}, {"params": ps[1::2], "weight_decay": 0.0}]


def grads(ps: list, step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in ps]


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_fp32_matches_torch_adamw_with_clipping(clip):
    ours, ref = params(9), params(9)
    opt = FusedAdamW(groups(ours), betas=BETAS, clip=clip)
    ref_opt = torch.optim.AdamW(groups(ref), lr=0.0, betas=BETAS, foreach=False)
    for step in range(4):
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = 1e-2 * (step + 1)
        for p, q, g in zip(ours, ref, grads(ours, step, scale=3.0)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref, clip)
        ref_opt.step()
        assert float(opt.found_inf) == 0.0
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_weights_step_fp32_masters():
    """bf16 module weights: the optimizer steps fp32 masters (as fp32 AdamW would on the same
    gradients) and writes them back into the module rounded to bf16."""
    module, ref = params(6, torch.bfloat16), params(6)
    with torch.no_grad():
        for q, p in zip(ref, module):
            q.copy_(p.float())
    opt = FusedAdamW(groups(module), betas=BETAS, clip=0.0)
    ref_opt = torch.optim.AdamW(groups(ref), lr=0.0, betas=BETAS, foreach=False)
    assert opt.has_masters and all(m.dtype == torch.float32 for m in opt.params)
    for step in range(3):
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = 1e-3
        for p, q, g in zip(module, ref, grads(module, step)):  # bf16 gradients, exactly representable in fp32
            p.grad, q.grad = g, g.float()
        opt.step()
        ref_opt.step()
    masters = opt.master_of()
    for p, q in zip(module, ref):
        torch.testing.assert_close(masters[id(p)], q, rtol=1e-6, atol=1e-7)
        assert p.dtype == torch.bfloat16 and torch.equal(p, masters[id(p)].to(torch.bfloat16))


def test_micro_batches_of_bf16_gradients_are_summed_in_fp32():
    """Eight micro-batches of bf16 gradients, handed over as autograd does (a fresh ``.grad``, then
    ``accumulate()``): the masters' gradient is their fp32 sum, where autograd's own accumulation
    into a bf16 ``.grad`` is off by about 1e-3. A step ends the round: the next sum starts afresh."""
    ps = params(6, torch.bfloat16)
    opt = FusedAdamW(groups(ps), betas=BETAS, clip=0.0)
    micro = [grads(ps, step) for step in range(9)]
    for gs in micro[:8]:
        for p, g in zip(ps, gs):
            p.grad = g
        opt.accumulate()
        assert all(p.grad is None for p in ps)  # autograd hands over a fresh tensor next time
    masters = opt.master_of()
    for i, p in enumerate(ps):
        exact = sum(gs[i].double() for gs in micro[:8])
        in_bf16 = sum(gs[i] for gs in micro[:8])  # bf16 additions, as into a bf16 .grad
        assert masters[id(p)].grad.dtype == torch.float32
        assert (masters[id(p)].grad - exact).norm() <= 1e-7 * exact.norm()
        assert (in_bf16.double() - exact).norm() >= 1e-4 * exact.norm()
    opt.step()
    for p, g in zip(ps, micro[8]):
        p.grad = g
    opt.accumulate()
    assert all(torch.equal(masters[id(p)].grad, g.float()) for p, g in zip(ps, micro[8]))


def test_under_zero_deepspeed_clips():
    """ZeRO 1-3 hand one parameter group at a time to the optimizer: a clip there would be per group."""
    with pytest.raises(ValueError, match="DeepSpeed clips"):
        FusedAdamW(groups(params(4)), betas=BETAS, clip=1.0, reduce="partitioned")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_gradient_skips_the_step_on_the_device(dtype):
    """A NaN in one gradient: nothing moves (weights, masters, moments, step counts); the next
    finite step proceeds as if the skipped one had not happened."""
    ps, twin = params(5, dtype), params(5, dtype)
    opt, twin_opt = (FusedAdamW(groups(x), betas=BETAS, clip=1.0) for x in (ps, twin))
    for o in (opt, twin_opt):
        for group in o.param_groups:
            group["lr"] = 1e-2
    for p, q, g in zip(ps, twin, grads(ps, 0)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin_opt.step()
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[m].items()} for m in opt.params]
    bad = grads(ps, 1)
    bad[2].view(-1)[0] = float("nan")
    for p, g in zip(ps, bad):
        p.grad = g
    opt.step()
    assert float(opt.found_inf) == 1.0 and not torch.isfinite(opt.grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    for m, saved in zip(opt.params, state):
        assert all(torch.equal(opt.state[m][k], v) for k, v in saved.items())
    for p, q, g in zip(ps, twin, grads(ps, 2)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin_opt.step()
    assert float(opt.found_inf) == 0.0 and all(torch.equal(p, q) for p, q in zip(ps, twin))


def test_one_step_is_a_few_multi_tensor_ops_and_no_host_sync():
    counts = []
    for n in (8, 64):
        ps = params(n, torch.bfloat16)
        opt = FusedAdamW(groups(ps), betas=BETAS, clip=1.0)
        for p, g in zip(ps, grads(ps, 0)):
            p.grad = g
        opt.step()  # first step allocates the state
        counter = StepOps()
        with counter:
            opt.step()
        assert counter.syncs == 0 and counter.host_reads == 0
        counts.append(counter.total)
    assert counts[0] == counts[1] <= 30, counts  # independent of the number of tensors


def test_state_dict_carries_the_masters():
    ps = params(4, torch.bfloat16)
    opt = FusedAdamW(groups(ps), betas=BETAS, clip=0.0)
    for group in opt.param_groups:
        group["lr"] = 1e-2
    for p, g in zip(ps, grads(ps, 0)):
        p.grad = g
    opt.step()
    state = opt.state_dict()
    fresh_params = params(4, torch.bfloat16, seed=9)
    fresh = FusedAdamW(groups(fresh_params), betas=BETAS, clip=0.0)
    fresh.load_state_dict(state)
    for m, f in zip(opt.params, fresh.params):
        assert torch.equal(m, f) and torch.equal(opt.state[m]["exp_avg"], fresh.state[f]["exp_avg"])
    assert all(torch.equal(p, q) for p, q in zip(ps, fresh_params))  # the module gets the masters back
