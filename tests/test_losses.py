"""Losses and the EMA update against hand computations: norm-pix MSE (kernels/norm_pix_loss.py),
InfoNCE and MomentumBranch.update (core/symmim.py)."""
import math

import pytest
import torch

from symmim.core.config import load_config
from symmim.kernels.patches import patchify, unpatchify
from symmim.core.symmim import MomentumBranch, SymMIM, info_nce
from symmim.kernels.dispatch import Backends
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference

EPS = 1e-6
SMALL = [
    "model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=32",
    "model.decoder_depth=1", "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16",
]

# ---------------------------------------------------------------- norm-pix loss


def image_values(b, c, y, x):
    """Explicit pixel values, no pattern a patch-ordering mistake could hide in."""
    return ((7 * c + 3 * y + 5 * x + 11 * b) % 13) / 4.0 - 1.0 + 0.1 * c * x * y


def pred_values(b, n, k):
    return ((13 * n + 7 * k + 5 * b) % 9) / 5.0 - 0.8


def hand_loss(batch, channels, size, patch, masks, norm_pix):
    """The loss with python loops: patch vectors channel-major (c, ph, pw), raster patch order."""
    grid = size // patch
    total, count = 0.0, 0
    for b in range(batch):
        for n in range(grid * grid):
            if not masks[b][n]:
                continue
            i, j = divmod(n, grid)
            vec = [image_values(b, c, i * patch + ph, j * patch + pw)
                   for c in range(channels) for ph in range(patch) for pw in range(patch)]
            k = len(vec)
            if norm_pix:
                mean = sum(vec) / k
                var = sum((v - mean) ** 2 for v in vec) / (k - 1)  # unbiased
                vec = [(v - mean) / math.sqrt(var + EPS) for v in vec]
            mse = sum((pred_values(b, n, e) - vec[e]) ** 2 for e in range(k)) / k
            total += mse
            count += 1
    return total / count


def tensors(batch, channels, size, patch):
    grid = size // patch
    k = channels * patch * patch
    img = torch.tensor([[[[image_values(b, c, y, x) for x in range(size)] for y in range(size)]
                         for c in range(channels)] for b in range(batch)], dtype=torch.float32)
    pred = torch.tensor([[[pred_values(b, n, e) for e in range(k)] for n in range(grid * grid)]
                         for b in range(batch)], dtype=torch.float32)
    return img, pred


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_loss_single_image_by_hand(norm_pix):
    masks = [[True, False, False, True]]  # 1x3x4x4, patch 2: 4 patches of 12 values
    img, pred = tensors(1, 3, 4, 2)
    got = norm_pix_loss_reference(pred, img, torch.tensor(masks), 2, norm_pix)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert float(got) == pytest.approx(hand_loss(1, 3, 4, 2, masks, norm_pix), rel=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_loss_mean_over_all_masked_patches_of_the_batch(norm_pix):
    # 1 masked patch in image 0, 3 in image 1: the mean runs over the 4 patches, not per image
    masks = [[False, True, False, False], [True, True, False, True]]
    img, pred = tensors(2, 3, 4, 2)
    got = norm_pix_loss_reference(pred, img, torch.tensor(masks), 2, norm_pix)
    assert float(got) == pytest.approx(hand_loss(2, 3, 4, 2, masks, norm_pix), rel=1e-5)
    per_image = [hand_loss(2, 3, 4, 2, [m if b == i else [False] * 4 for b, m in enumerate(masks)], norm_pix)
                 if any(masks[i]) else None for i in range(2)]
    assert float(got) != pytest.approx(sum(per_image) / 2, rel=1e-3)  # not a mean of per-image means


def test_norm_pix_loss_literal_numbers():
    img = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one 1-channel 2x2 patch: [1, 2, 3, 4]
    mask = torch.tensor([[True]])
    zero = torch.zeros(1, 1, 4)
    # mean 2.5, unbiased var 5/3; the normalised target has mean square (3/4) * var / (var + eps)
    var = 5.0 / 3.0
    assert float(norm_pix_loss_reference(zero, img, mask, 2, True)) == pytest.approx(0.75 * var / (var + EPS), rel=1e-6)
    assert float(norm_pix_loss_reference(zero, img, mask, 2, False)) == pytest.approx(7.5, rel=1e-6)
    target = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(var + EPS)
    assert float(norm_pix_loss_reference(target.view(1, 1, 4), img, mask, 2, True)) == pytest.approx(0.0, abs=1e-10)


def test_norm_pix_loss_ignores_visible_patches():
    img, pred = tensors(1, 3, 4, 2)
    mask = torch.tensor([[True, False, True, False]])
    pred = pred.clone().requires_grad_(True)
    loss = norm_pix_loss_reference(pred, img, mask, 2, True)
    loss.backward()
    assert torch.equal(pred.grad[0, 1], torch.zeros(12)) and torch.equal(pred.grad[0, 3], torch.zeros(12))
    assert float(pred.grad[0, 0].abs().sum()) > 0 and float(pred.grad[0, 2].abs().sum()) > 0
    changed = pred.detach().clone()
    changed[0, 1] += 100.0
    assert float(norm_pix_loss_reference(changed, img, mask, 2, True)) == pytest.approx(loss.item(), rel=1e-6)


def test_dispatch_torch_loss_is_the_reference():
    img, pred = tensors(2, 3, 4, 2)
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    for norm_pix in (True, False):
        assert torch.equal(Backends(ops="torch").norm_pix_loss_op(pred, img, mask, 2, norm_pix),
                           norm_pix_loss_reference(pred, img, mask, 2, norm_pix))


def test_patchify_order_and_inverse():
    img, _ = tensors(2, 3, 4, 2)
    patches = patchify(img, 2)
    assert patches.shape == (2, 4, 12)
    for b in range(2):
        for n in range(4):
            i, j = divmod(n, 2)
            expected = [img[b, c, 2 * i + ph, 2 * j + pw].item() for c in range(3) for ph in range(2) for pw in range(2)]
            assert patches[b, n].tolist() == expected
    assert torch.equal(unpatchify(patches, 2, (2, 2)), img)


# ---------------------------------------------------------------- InfoNCE


def hand_info_nce(q, k_all, offset, tau):
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    q, k_all = [unit(v) for v in q], [unit(v) for v in k_all]
    total = 0.0
    for i, qi in enumerate(q):
        logits = [sum(a * b for a, b in zip(qi, kj)) / tau for kj in k_all]
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        total += -(logits[offset + i] - lse)  # -log softmax at the own key
    return 2 * tau * total / len(q)


@pytest.mark.parametrize("offset", [0, 2, 4])
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_info_nce_by_hand(offset, tau):
    # 3 "ranks" of 2 samples each: this rank's q is positive with keys offset, offset+1
    q = [[0.3, -1.2, 0.5], [2.0, 0.1, -0.4]]
    k_all = [[1.0, 0.2, -0.3], [-0.5, 0.9, 0.4], [0.7, -0.8, 0.6],
             [0.1, 0.1, 2.0], [-1.5, -0.2, 0.3], [0.4, 0.4, -0.9]]
    got = info_nce(torch.tensor(q), torch.tensor(k_all), offset, tau)
    assert got.dim() == 0
    assert float(got) == pytest.approx(hand_info_nce(q, k_all, offset, tau), rel=1e-5)


def test_info_nce_normalises_its_inputs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 8, generator=g), torch.randn(12, 8, generator=g)
    scale_q = torch.tensor([[0.1], [3.0], [7.0], [0.5]])
    torch.testing.assert_close(info_nce(q * scale_q, k * 5.0, 4, 0.2), info_nce(q, k, 4, 0.2))


def test_info_nce_matching_key_gives_low_loss():
    tau = 0.2
    keys = torch.eye(8)[:6] * 3.0  # orthogonal keys
    q = keys[2:4].clone()  # rank 1 of 3, batch 2: q_i identical to key 2 + i
    low = float(info_nce(q, keys, 2, tau))
    # own logit 1/tau, the 5 others 0: 2 tau * log(1 + 5 exp(-1/tau))
    assert low == pytest.approx(2 * tau * math.log(1 + 5 * math.exp(-1 / tau)), rel=1e-5)
    assert low < 0.02
    wrong = float(info_nce(q, keys, 0, tau))  # the same q scored against the wrong keys
    assert wrong > 1.0


def test_info_nce_gradient_only_through_q():
    q = torch.randn(2, 4, requires_grad=True)
    k = torch.randn(4, 4)
    info_nce(q, k, 2, 0.2).backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


# ---------------------------------------------------------------- momentum (EMA) branch


@pytest.fixture(scope="module")
def online():
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    return SymMIM(cfg.model, cfg.loss, Backends("torch", "torch", "torch"))


def scramble(model, seed):
    """Give every parameter and BN buffer of the online model new, distinct values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for m in model.projector.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7 + seed)


def ema_pairs(online, momentum):
    for name in ("encoder", "projector"):
        src, dst = getattr(online, name), getattr(momentum, name)
        yield from zip(src.named_parameters(), dst.named_parameters())


@pytest.mark.parametrize("m", [0.9, 0.99, 0.5])
def test_momentum_update_is_ema(online, m):
    momentum = MomentumBranch(online)
    scramble(online, seed=100 + int(m * 100))  # distinct values from those it was copied from
    before = [xi.clone() for _, (_, xi) in ema_pairs(online, momentum)]
    momentum.update(online, m)
    pairs = list(ema_pairs(online, momentum))
    assert len(pairs) == len(before) == len(list(momentum.parameters())) > 20
    for ((n_src, theta), (n_dst, xi)), prev in zip(pairs, before):
        assert n_src == n_dst
        torch.testing.assert_close(xi, m * prev + (1 - m) * theta, rtol=1e-5, atol=1e-6)
        assert not torch.equal(xi, prev) and not torch.equal(xi, theta)


def test_momentum_update_by_numbers(online):
    momentum = MomentumBranch(online)
    with torch.no_grad():
        momentum.encoder.cls_token.fill_(2.0)
        online.encoder.cls_token.fill_(4.0)
        momentum.projector[0].weight.fill_(-1.0)
        online.projector[0].weight.fill_(1.0)
    momentum.update(online, 0.75)  # 0.75 * 2 + 0.25 * 4 = 2.5;  0.75 * -1 + 0.25 * 1 = -0.5
    assert torch.equal(momentum.encoder.cls_token, torch.full_like(momentum.encoder.cls_token, 2.5))
    assert torch.equal(momentum.projector[0].weight, torch.full_like(momentum.projector[0].weight, -0.5))


def test_momentum_one_leaves_it_unchanged(online):
    momentum = MomentumBranch(online)
    scramble(online, seed=2)
    before = {n: t.clone() for n, t in momentum.state_dict().items() if "running" not in n and "num_batches" not in n}
    momentum.update(online, 1.0)
    after = momentum.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_momentum_zero_copies(online):
    momentum = MomentumBranch(online)
    scramble(online, seed=3)
    momentum.update(online, 0.0)
    for (_, theta), (_, xi) in ema_pairs(online, momentum):
        assert torch.equal(xi, theta)


def test_momentum_branch_takes_the_bn_buffers_or_gives_them_back_after_a_skip(online):
    momentum = MomentumBranch(online)
    scramble(online, seed=4)
    momentum.take_buffers(online, torch.zeros(()))  # a step taken: the online statistics become the branch's
    src = dict(online.projector.named_buffers())
    dst = dict(momentum.projector.named_buffers())
    assert set(src) == set(dst) and any("running_mean" in n for n in src)
    for name, buf in src.items():
        assert torch.equal(dst[name], buf), name
    assert int(dst["1.num_batches_tracked"]) == 11
    kept = {n: b.clone() for n, b in dst.items()}
    with torch.no_grad():
        for name, buf in online.projector.named_buffers():
            buf.fill_(float("nan") if buf.is_floating_point() else 99)  # the statistics of a NaN round
    momentum.take_buffers(online, torch.ones(()))  # skipped: the branch keeps its own and gives them back
    for name, buf in online.projector.named_buffers():
        assert torch.equal(buf, kept[name]) and torch.equal(dst[name], kept[name]), name


def test_momentum_update_from_bf16_online(online):
    momentum = MomentumBranch(online)
    scramble(online, seed=5)
    low = SymMIM(load_config(None, SMALL).model, load_config(None, SMALL).loss)
    low.load_state_dict(online.state_dict())
    low = low.to(torch.bfloat16)
    momentum.update(low, 0.0)
    assert all(p.dtype == torch.float32 for p in momentum.parameters())
    for (_, theta), (_, xi) in ema_pairs(low, momentum):
        assert torch.equal(xi, theta.float())


def test_momentum_branch_has_no_trainable_params(online):
    momentum = MomentumBranch(online)
    params = list(momentum.parameters())
    assert params and not any(p.requires_grad for p in params)
    momentum.update(online, 0.5)
    assert not any(p.requires_grad for p in momentum.parameters())
    names = {n.split(".")[0] for n, _ in momentum.named_parameters()}
    assert names == {"encoder", "projector"}  # no predictor, no decoder
    x = torch.randn(2, 3, 32, 32)
    from symmim.core.masking import symmetric_mask
    keys = momentum(x, symmetric_mask(2, (4, 4), 2, 0, torch.device("cpu")), torch.float32)
    assert keys.shape == (2, 16) and not keys.requires_grad and keys.grad_fn is None
