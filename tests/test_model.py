"""ViT encoder / MAE decoder / SymMIM model (core/vit.py, core/symmim.py) on the CPU."""

import numpy as np
import pytest
import torch

from symmim.core.config import load_config
from symmim.core.masking import Mask, MaskGenerator, symmetric_mask
from symmim.core.symmim import MomentumBranch, SymMIM
from symmim.core.vit import MAEDecoder, ViTEncoder, sincos_pos_embed
from symmim.kernels.dispatch import Backends
from symmim.kernels.norm_pix_loss import norm_pix_loss_reference

CPU = torch.device("cpu")
TORCH = Backends("torch", "torch", "torch")
SDPA = Backends("torch", "sdpa", "torch")
SMALL = [
    "model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=32",
    "model.decoder_depth=1", "model.decoder_heads=2", "model.proj_hidden=64", "model.proj_dim=16",
]
# (dim, depth, heads), written out here rather than read from core.vit
SIZES = {"micro": (128, 4, 4), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def small_cfg(*extra):
    return load_config(None, SMALL + list(extra))


def images(batch=4, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- sizes and shapes


@pytest.mark.parametrize("size", list(SIZES))
def test_encoder_decoder_shapes(size):
    dim, depth, heads = SIZES[size]
    img, p = 32, 16  # 2x2 patch grid: cheap at every width
    mask = symmetric_mask(2, (2, 2), 1, "random", CPU, torch.Generator().manual_seed(0))  # N_vis = 2
    heavy = size in ("base", "large")
    # base / large: parameters on the meta device, shapes only (no memory, no init cost)
    ctx = torch.device("meta") if heavy else torch.device("cpu")
    with ctx:
        enc = ViTEncoder(size, img, p, SDPA)
        dec = MAEDecoder(enc.dim, 64, 1, 2, enc.grid, p, SDPA)
        x = torch.empty(2, 3, img, img) if heavy else torch.randn(2, 3, img, img)
    if heavy:
        mask = Mask(mask.ids_keep.to("meta"), mask.mask.to("meta"), mask.grid, mask.cell, mask.phase.to("meta"))
    assert enc.dim == dim and len(enc.blocks) == depth and enc.blocks[0].attn.heads == heads
    assert enc.grid == (2, 2)
    latent = enc(x, mask)
    assert latent.shape == (2, 1 + 2, dim)
    pred = dec(latent, mask)
    assert pred.shape == (2, 4, 3 * p * p)
    full = enc(x)
    assert full.shape == (2, 1 + 4, dim)
    n_params = sum(t.numel() for t in enc.parameters())
    # ViT parameter count: patch embed + cls + depth * (4 D^2 + 8 D^2 + biases and norms) + final norm
    expected = (dim * 3 * p * p + dim) + dim + depth * (12 * dim * dim + 13 * dim) + 2 * dim
    assert n_params == expected


def test_timm_parameter_names_and_shapes():
    cfg = small_cfg()
    enc = SymMIM(cfg.model, cfg.loss, TORCH).encoder
    sd = enc.state_dict()
    d, p, n = 128, 8, 16
    expected = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + n, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "blocks.0.norm1.weight": (d,),
        "blocks.0.norm1.bias": (d,),
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.attn.qkv.bias": (3 * d,),
        "blocks.0.attn.proj.weight": (d, d),
        "blocks.0.attn.proj.bias": (d,),
        "blocks.0.norm2.weight": (d,),
        "blocks.0.mlp.fc1.weight": (4 * d, d),
        "blocks.0.mlp.fc1.bias": (4 * d,),
        "blocks.0.mlp.fc2.weight": (d, 4 * d),
        "blocks.0.mlp.fc2.bias": (d,),
        "blocks.3.mlp.fc2.weight": (d, 4 * d),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("blocks.4.") for k in sd)  # micro has 4 blocks
    # every key is one of timm's ViT names (no extra wrappers such as "_orig_mod." or "module.")
    per_block = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"}
    timm_keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "norm.bias"} | {f"blocks.{i}.{k}" for i in range(4) for k in per_block}
    assert set(sd) == timm_keys


def mae_2d_sincos(dim, h, w):
    """MAE's get_2d_sincos_pos_embed (numpy), generalised to an h x w grid, with the CLS row."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))  # w first, as MAE
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


@pytest.mark.parametrize("dim,grid", [(128, (4, 4)), (32, (14, 14)), (64, (3, 5))])
def test_sincos_pos_embed(dim, grid):
    pe = sincos_pos_embed(dim, grid)
    n = grid[0] * grid[1]
    assert pe.shape == (1, 1 + n, dim) and pe.dtype == torch.float32
    assert torch.equal(pe[0, 0], torch.zeros(dim))  # CLS row
    np.testing.assert_allclose(pe[0].numpy(), mae_2d_sincos(dim, *grid), atol=1e-6)
    assert len({tuple(r) for r in pe[0, 1:].tolist()}) == n  # every position distinct


def test_sincos_needs_dim_divisible_by_4():
    with pytest.raises(ValueError):
        sincos_pos_embed(30, (2, 2))


def test_pos_embed_is_a_fixed_buffer():
    model = SymMIM(small_cfg().model, small_cfg().loss, TORCH)
    names = {n for n, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names and "decoder.pos_embed" not in names
    torch.testing.assert_close(model.encoder.pos_embed, sincos_pos_embed(128, (4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.pos_embed, sincos_pos_embed(32, (4, 4)), rtol=0, atol=0)
    assert "pos_embed" in model.encoder.state_dict()


# ---------------------------------------------------------------- encoder behaviour


def test_encoder_without_mask_encodes_every_patch():
    torch.manual_seed(0)
    enc = ViTEncoder("micro", 32, 8, TORCH)
    x = images(3)
    full = enc(x)
    assert full.shape == (3, 17, 128)
    everything = Mask(torch.arange(16).repeat(3, 1), torch.zeros(3, 16, dtype=torch.bool), (4, 4))
    torch.testing.assert_close(full, enc(x, everything), rtol=0, atol=0)


def test_encoder_never_sees_masked_pixels():
    torch.manual_seed(0)
    enc = ViTEncoder("micro", 32, 8, TORCH)
    x = images(2)
    mask = symmetric_mask(2, (4, 4), 1, 0, CPU)
    pixel_mask = mask.mask.view(2, 4, 1, 4, 1).expand(2, 4, 8, 4, 8).reshape(2, 1, 32, 32)  # patch -> pixels
    y = torch.where(pixel_mask, torch.randn_like(x) * 10, x)  # change only the masked patches
    assert not torch.equal(x, y)
    torch.testing.assert_close(enc(x, mask), enc(y, mask), rtol=0, atol=0)
    assert not torch.allclose(enc(x), enc(y))  # a full-token encoder does see them


def test_encoder_visible_tokens_keep_their_positions():
    """Encoding the visible subset equals encoding an image whose only patches are those (same positions)."""
    torch.manual_seed(0)
    enc = ViTEncoder("micro", 32, 8, TORCH)
    x = images(2)
    mask = symmetric_mask(2, (4, 4), 1, 1, CPU)
    out = enc(x, mask)
    # the same visible set given as an explicit Mask in raster order must match
    ids = torch.tensor([[i for i in range(16) if not mask.mask[0, i]]] * 2)
    torch.testing.assert_close(out, enc(x, Mask(ids, mask.mask, (4, 4))), rtol=0, atol=0)
    # and a mask with other visible positions gives other tokens
    other = symmetric_mask(2, (4, 4), 1, 0, CPU)
    assert not torch.allclose(out, enc(x, other))


@pytest.mark.parametrize("backends", [TORCH, SDPA], ids=["torch", "sdpa"])
def test_encoder_embedding_stage(backends):
    """Input of the first block: [CLS + zero pos, conv patch embedding + pos of each visible patch]."""
    torch.manual_seed(0)
    enc = ViTEncoder("micro", 32, 8, backends)
    x = images(2)
    mask = symmetric_mask(2, (4, 4), 1, "random", CPU, torch.Generator().manual_seed(3))
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    enc(x, mask)
    tokens = seen[0]
    assert tokens.shape == (2, 1 + 8, 128)
    conv = torch.nn.functional.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=8)  # [B, D, 4, 4]
    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], enc.cls_token[0, 0].detach(), rtol=0, atol=0)
        for j, n in enumerate(mask.ids_keep[b].tolist()):
            expected = conv[b, :, n // 4, n % 4] + enc.pos_embed[0, 1 + n]
            torch.testing.assert_close(tokens[b, 1 + j], expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [True, False])
def test_attention_backends_agree(masked):
    torch.manual_seed(0)
    a = ViTEncoder("micro", 32, 8, TORCH)
    b = ViTEncoder("micro", 32, 8, SDPA)
    b.load_state_dict(a.state_dict())
    x = images(3)
    mask = symmetric_mask(3, (4, 4), 1, "random", CPU, torch.Generator().manual_seed(0)) if masked else None
    torch.testing.assert_close(a(x, mask), b(x, mask), rtol=0, atol=1e-5)


def test_decoder_puts_tokens_back_in_place():
    """With no decoder blocks, each position's prediction depends on its own token alone."""
    torch.manual_seed(0)
    dec = MAEDecoder(128, 32, 0, 2, (4, 4), 8, TORCH)
    mask = symmetric_mask(2, (4, 4), 1, "random", CPU, torch.Generator().manual_seed(1))
    latent = torch.randn(2, 1 + mask.num_visible, 128)
    pred = dec(latent, mask)
    assert pred.shape == (2, 16, 192)
    emb = dec.decoder_embed(latent)
    for b in range(2):
        vis = mask.ids_keep[b].tolist()
        for n in range(16):
            tok = emb[b, 1 + vis.index(n)] if n in vis else dec.mask_token[0, 0]
            x = tok + dec.pos_embed[0, 1 + n]
            expected = dec.pred(torch.nn.functional.layer_norm(x, (32,), dec.norm.weight, dec.norm.bias, 1e-6))
            torch.testing.assert_close(pred[b, n], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SymMIM forward / backward


def make(con_weight=1.0, seed=0, *extra):
    torch.manual_seed(seed)
    cfg = small_cfg(f"loss.con_weight={con_weight}", *extra)
    model = SymMIM(cfg.model, cfg.loss, TORCH)
    masks = MaskGenerator(cfg.mask, model.encoder.grid, CPU, seed=seed)
    return cfg, model, masks


def test_forward_with_contrastive():
    cfg, model, masks = make(con_weight=0.5)
    assert model.contrastive
    momentum = MomentumBranch(model)
    x = images(4)
    keys = momentum(x, masks.momentum(4), torch.float32)
    assert keys.shape == (4, 16) and not keys.requires_grad
    mask = masks.online(4)
    out = model(x, mask, keys, 0)
    assert {"loss", "loss_mim", "loss_con", "pred"} <= set(out)
    for k in ("loss", "loss_mim", "loss_con"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    assert out["pred"].shape == (4, 16, 3 * 8 * 8)
    assert float(out["loss_con"].detach()) > 0
    torch.testing.assert_close(out["loss"], out["loss_mim"] + 0.5 * out["loss_con"])
    torch.testing.assert_close(out["loss_mim"], norm_pix_loss_reference(out["pred"], x, mask.mask, 8, True))
    with pytest.raises(ValueError):
        model(x, mask)  # contrastive on: keys are required


def test_forward_without_contrastive():
    cfg, model, masks = make(con_weight=0.0)
    assert not model.contrastive
    assert not hasattr(model, "projector") and not hasattr(model, "predictor")
    assert not any(n.startswith(("projector", "predictor")) for n, _ in model.named_parameters())
    x = images(2)
    out = model(x, masks.online(2))  # no keys
    assert torch.equal(out["loss"], out["loss_mim"])
    assert float(out["loss_con"].detach()) == 0.0
    assert torch.isfinite(out["loss"])


def test_norm_pix_flag_reaches_the_loss():
    _, model, masks = make(con_weight=0.0)
    x, mask = images(2), masks.online(2)
    out = model(x, mask)
    model.loss_cfg.norm_pix = False
    raw = model(x, mask)
    torch.testing.assert_close(raw["loss_mim"], norm_pix_loss_reference(raw["pred"], x, mask.mask, 8, False))
    assert not torch.allclose(out["loss_mim"], raw["loss_mim"])


def test_gradients_reach_every_trained_part():
    _, model, masks = make(con_weight=1.0)
    momentum = MomentumBranch(model)
    x = images(4)
    keys = momentum(x, masks.momentum(4), torch.float32)
    model(x, masks.online(4), keys, 0)["loss"].backward()
    named = dict(model.named_parameters())
    for name, p in named.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.blocks.3.mlp.fc2.weight", "encoder.norm.weight", "decoder.decoder_embed.weight",
                 "decoder.mask_token", "decoder.pred.weight", "projector.0.weight", "projector.6.weight",
                 "predictor.0.weight", "predictor.3.weight"):
        assert float(named[name].grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in momentum.parameters())


def test_contrastive_loss_alone_trains_encoder_through_cls():
    _, model, masks = make(con_weight=1.0)
    momentum = MomentumBranch(model)
    x = images(4)
    keys = momentum(x, masks.momentum(4), torch.float32)
    model(x, masks.online(4), keys, 0)["loss_con"].backward()
    assert float(model.encoder.cls_token.grad.abs().sum()) > 0
    assert float(model.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.decoder.parameters())  # decoder is not on that path


def test_heads_without_batchnorm():
    _, model, masks = make(1.0, 0, "model.head_bn=false")
    momentum = MomentumBranch(model)
    for head in (model.projector, model.predictor, momentum.projector):
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
        assert all(lin.bias is not None for lin in head if isinstance(lin, torch.nn.Linear))
    assert [type(m).__name__ for m in model.projector] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    x = images(2)
    keys = momentum(x, masks.momentum(2), torch.float32)
    out = model(x, masks.online(2), keys, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss_con"]) and float(model.projector[0].weight.grad.abs().sum()) > 0


def test_mean_token_feeds_the_heads():
    _, model, masks = make(1.0, 0, "model.con_token=mean")
    momentum = MomentumBranch(model).eval()  # BatchNorm on running stats: rows independent of each other
    x, mask = images(3), masks.momentum(3)
    latent = momentum.encoder(x, mask)  # [B, 1 + N_vis, D]
    torch.testing.assert_close(momentum(x, mask, torch.float32), momentum.projector(latent[:, 1:].mean(1)))
    assert not torch.allclose(momentum.projector(latent[:, 1:].mean(1)), momentum.projector(latent[:, 0]))
    model(x, masks.online(3), momentum(x, mask, torch.float32), 0)["loss_con"].backward()
    assert float(model.encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum()) > 0


def test_momentum_branch_outside_the_model():
    _, model, _ = make(con_weight=1.0)
    momentum = MomentumBranch(model)
    assert not hasattr(momentum, "predictor") and not hasattr(momentum, "decoder")
    assert all(not p.requires_grad for p in momentum.parameters())
    own = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in own for p in momentum.parameters())  # a copy, not shared storage
    # identical weights at the start: the momentum encoder matches the online one
    for (n1, p1), (n2, p2) in zip(model.encoder.named_parameters(), momentum.encoder.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
