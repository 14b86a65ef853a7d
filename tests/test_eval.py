"""Evaluation and export: weighted kNN, fp32 export with timm names, architecture checks,
position-embedding interpolation, fine-tuning pieces and the evaluation scripts.

One real pre-training checkpoint (``launch/pretrain.py``, 1 step, 32 px, ZeRO-2 fp32) is made
per module on a small copy of the embedded data set and shared by the export, kNN and
fine-tuning tests.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_runs import metrics, untimed

from symmim.core.classify import ViTClassifier, mix, soft_targets
from symmim.core.config import load_config
from symmim.core.distributed import DistInfo
from symmim.core.knn import knn_accuracy, knn_scores, pool_features, topk_hits
from symmim.core.optim import layer_decay_groups
from symmim.core.pretrained import (ArchitectureError, interpolate_pos_embed, load_encoder_weights, model_architecture,
                                    read_run, write_export)
from symmim.core.vit import ViTEncoder
from symmim.kernels.dispatch import Backends
from symmim.launch import export

ROOT = Path(__file__).resolve().parents[1]
TORCH = Backends("torch", "sdpa", "torch")
CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
PER_CLASS = 8  # images per class in the small data set


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def small_root(embedded_cache, tmp_path_factory):
    """10 classes x 8 embedded training images, the same files in train/ and val/."""
    src = next(Path(embedded_cache).glob("embedded-*")) / "train"
    root = tmp_path_factory.mktemp("small")
    for cls in sorted(src.iterdir()):
        for split in ("train", "val"):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:PER_CLASS]:
                shutil.copy(f, root / split / cls.name / f.name)
    return root


@pytest.fixture(scope="module")
def run(small_root, tmp_path_factory):
    """A real pre-training run folder: tiny_cpu at 32 px, one step, ZeRO-2 fp32 checkpoint."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    _run("pretrain.py", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--output-dir", str(run_dir),
         *_sets(f"data.root={small_root}", "model.img_size=32", "train.batch_size=16", "train.max_steps=1",
                "ds.zero_stage=2", "log.recon_images=0", "log.progress=false", "log.tensorboard=false"))
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    assert export.main([str(run), "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- weighted kNN


def test_knn_weighted_vote_by_hand():
    """One class-0 neighbour at cosine 1 outweighs two class-1 neighbours at 0.8 when T = 0.07
    (e^(1/T) > 2 e^(0.8/T)); a majority vote (large T) picks class 1. Norms do not matter (cosine)."""
    bank = torch.tensor([[1.0, 0.0], [8.0, 6.0], [0.4, 0.3], [0.0, 5.0]])  # cosines to q: 1, 0.8, 0.8, 0
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[3.0, 0.0]])
    votes = knn_scores(bank, labels, q, num_classes=2, k=3, temperature=0.07)
    torch.testing.assert_close(votes, torch.tensor([[math.exp(1 / 0.07), 2 * math.exp(0.8 / 0.07)]]))
    assert votes.argmax().item() == 0
    assert knn_scores(bank, labels, q, num_classes=2, k=3, temperature=100.0).argmax().item() == 1
    assert knn_scores(bank, labels, q, num_classes=2, k=10, temperature=0.07).shape == (1, 2)  # k > bank: all


def test_topk_hits_and_padding():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 1, 0, -1])  # top-1 right, 2nd, 3rd, padding
    assert topk_hits(scores, labels, (1, 2, 3)).tolist() == [1, 2, 3]


class MeanColour(torch.nn.Module):
    """Stand-in encoder: CLS = the image's mean colour, patch tokens = its negation."""

    def forward(self, images):
        cls = images.mean(dim=(2, 3))[:, None]  # [B, 1, 3]
        return torch.cat([cls, -cls.expand(-1, 4, -1)], dim=1)  # [B, 5, 3]


def test_knn_accuracy_pipeline_known_answer(tmp_path):
    """Flat-colour images whose class is their colour: kNN on mean colours is exact, through the
    real eval loader, padding, pooling and counts."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("val", 5)):
        for c, rgb in enumerate(colours):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                jitter = tuple(int(v + rng.integers(-15, 16)) for v in rgb)
                Image.new("RGB", (40 + i, 36), jitter).save(tmp_path / split / f"c{c}" / f"{i}.png")
    for pool in ("cls", "mean"):
        cfg = load_config(None, [f"data.root={tmp_path}", "model.img_size=16", "model.patch_size=8", "eval.batch_size=4",
                                 "data.workers=0", "eval.knn_k=3", f"eval.pool={pool}"])
        assert knn_accuracy(MeanColour(), cfg.eval, cfg.data, 16, CPU) == {"knn_top1": 100.0, "knn_top5": 100.0}


# ---------------------------------------------------------------- export and reload


def timm_layout(dim: int, depth: int, patch: int, tokens: int) -> dict[str, tuple[int, ...]]:
    """timm VisionTransformer (class token, qkv bias, final norm, no head) names and shapes, written out."""
    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens + 1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
        })
    return {**layout, "norm.weight": (dim,), "norm.bias": (dim,)}


@pytest.mark.parametrize("size,dim,depth", [("tiny", 192, 12), ("base", 768, 12)])
def test_exported_names_and_shapes_are_timm_vit(size, dim, depth, tmp_path):
    from safetensors import safe_open

    cfg = load_config(None, [f"model.size={size}", "model.img_size=32", "model.patch_size=16"])
    encoder = ViTEncoder(size, 32, 16, TORCH)
    out, meta = write_export(encoder.state_dict(), model_architecture(cfg.model), tmp_path / f"{size}.safetensors")
    with safe_open(str(out), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert shapes == timm_layout(dim, depth, 16, 4)
    kwargs = json.loads(meta.read_text())["timm_kwargs"]
    assert kwargs | {"embed_dim": dim, "depth": depth, "patch_size": 16, "img_size": 32, "global_pool": "token"} == kwargs


@contextlib.contextmanager
def _no_op_registrations():
    """torch.library's fake-kernel and autograd registrations as no-ops, for the duration."""
    saved = torch.library.register_fake, torch.library.register_autograd
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    torch.library.register_autograd = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.library.register_fake, torch.library.register_autograd = saved


def _timm_vit():
    """timm's ``vision_transformer`` module (installed by the README's test command, without its deps).

    timm imports torchvision. Beside the CPU build of torch on our machines, torchvision's PyPI
    build cannot load its C++ ops (they link CUDA torch), and registering fake kernels for those
    missing ops fails at import; then torchvision is imported without those registrations: timm's
    ViT uses none of its ops. Where torchvision loads (the GPU machine), nothing is changed.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        with _no_op_registrations():
            import torchvision  # noqa: F401
    return importlib.import_module("timm.models.vision_transformer")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_export_is_a_timm_vision_transformer(pool, tmp_path):
    """timm builds the model from the exported kwargs, loads the file strictly and gives our
    features and pooled output."""
    timm_vit = _timm_vit()
    from safetensors.torch import load_file

    cfg = load_config(None, ["model.size=tiny", "model.img_size=32", "model.patch_size=16", f"eval.pool={pool}"])
    torch.manual_seed(0)
    encoder = ViTEncoder("tiny", 32, 16, TORCH).eval()
    with torch.no_grad():
        for p in encoder.parameters():  # away from the init (unit norms, zero biases) so every tensor matters
            p.add_(torch.randn_like(p) * 0.05)
    out, meta = write_export(encoder.state_dict(), {**model_architecture(cfg.model), "pool": pool}, tmp_path / "e.safetensors")
    model = timm_vit.VisionTransformer(**json.loads(meta.read_text())["timm_kwargs"]).eval()
    model.load_state_dict(load_file(str(out)))  # strict: the same names and shapes, nothing left over
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder(images)  # [B, 1 + N, D]
        torch.testing.assert_close(model.forward_features(images), tokens, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(images), pool_features(tokens, pool), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_then_reload_gives_identical_encoder_outputs(run, exported):
    """Reference: the checkpoint's own module weights (fp32 run: equal to the masters), loaded by hand."""
    cfg = load_config(run / "config.yaml")
    tag = (run / "checkpoints" / "latest").read_text().strip()
    module = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    reference = ViTEncoder("micro", 32, 8, TORCH)
    reference.load_state_dict({k[len("encoder."):]: v for k, v in module.items() if k.startswith("encoder.")})
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = reference.eval()(images)
    for source in (exported, run):  # the file, and the run folder read directly
        encoder = ViTEncoder("micro", 32, 8, TORCH)
        load_encoder_weights(encoder, source, cfg.model)
        assert torch.equal(encoder.eval()(images), want)
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert {k: meta[k] for k in ("size", "embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio")} == {
        "size": "micro", "embed_dim": 128, "depth": 4, "num_heads": 4, "patch_size": 8, "img_size": 32, "mlp_ratio": 4.0}
    assert meta["source"]["tag"] == tag and meta["source"]["weights"] == "fp32 master weights (ZeRO-2)"


@pytest.mark.slow
def test_wrong_architecture_is_refused_naming_the_mismatch(run, exported, small_root):
    cfg = load_config(run / "config.yaml", ["model.size=tiny"])
    with pytest.raises(ArchitectureError, match=r"checkpoint has embed dim 128, model.size=tiny expects 192; "
                                                r"checkpoint has depth 4, model.size=tiny expects 12"):
        load_encoder_weights(ViTEncoder("tiny", 32, 8, TORCH), exported, cfg.model)
    cfg = load_config(run / "config.yaml", ["model.patch_size=16"])
    with pytest.raises(ArchitectureError, match="checkpoint has patch size 8, model.patch_size expects 16"):
        load_encoder_weights(ViTEncoder("micro", 32, 16, TORCH), run, cfg.model)
    proc = _run("knn.py", "--config", str(run / "config.yaml"), "--weights", str(exported),
                *_sets("model.size=small"), check=False)
    assert proc.returncode == 2
    assert "checkpoint has embed dim 128, model.size=small expects 384" in proc.stderr


def test_zero0_low_precision_masters_are_matched_by_name():
    """ZeRO-0 bf16 keeps one fp32 master per parameter in the optimizer's group order (DeepSpeed's
    engine checked on a real checkpoint when this was written, the fast step's FusedAdamW below); they are named via core.optim.param_groups
    and must round to the saved bf16 weights, else the upcast module weights are the fallback."""
    from symmim.core.optim import param_groups
    from symmim.core.pretrained import _stage0_masters
    from symmim.core.symmim import SymMIM

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["model.img_size=32", "loss.con_weight=0"])
    model = SymMIM(cfg.model, cfg.loss, TORCH)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[p.detach() + 1e-4 for p in g["params"]] for g in param_groups(model, 0.05)]  # not bf16-representable
    order = [names[id(p)] for g in param_groups(model, 0.05) for p in g["params"]]
    module = {n: m.to(torch.bfloat16) for n, m in zip(order, (m for g in groups for m in g))}
    module["encoder.pos_embed"] = model.encoder.pos_embed.to(torch.bfloat16)  # a buffer: not in the groups
    masters = _stage0_masters({"optimizer": {"fp32_groups": groups}, "module": module}, cfg)
    assert masters.keys() == set(order) and torch.equal(masters[order[0]], groups[0][0])
    swapped = [groups[1], groups[0]]  # another order: the masters do not line up, no guess is made
    assert _stage0_masters({"optimizer": {"fp32_groups": swapped}, "module": module}, cfg) is None
    # The fast step's FusedAdamW saves the same masters as one flat list in group order.
    flat = [m for g in groups for m in g]
    fused = _stage0_masters({"optimizer": {"masters": flat}, "module": module}, cfg)
    assert fused.keys() == masters.keys() and all(torch.equal(fused[k], masters[k]) for k in masters)


@pytest.mark.slow
def test_export_of_a_bf16_fast_step_run_takes_the_fp32_masters(small_root, tmp_path):
    """ZeRO-0 bf16 on the fast step: the module holds bf16 weights, FusedAdamW the fp32 masters;
    the export takes the masters, which round to the module's weights."""
    run_dir = tmp_path / "bf16"
    _run("pretrain.py", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--output-dir", str(run_dir),
         *_sets(f"data.root={small_root}", "model.img_size=32", "train.batch_size=16", "train.max_steps=2",
                "train.precision=bf16", "ds.zero_stage=0", "log.recon_images=0", "log.progress=false",
                "log.tensorboard=false"))
    state, arch = read_run(run_dir)
    assert arch["source"]["weights"] == "fp32 master weights (ZeRO-0)"
    module = torch.load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    weight = state["blocks.0.attn.qkv.weight"]
    assert weight.dtype == torch.float32 and torch.equal(weight.bfloat16(), module["encoder.blocks.0.attn.qkv.weight"])
    assert not torch.equal(weight, weight.bfloat16().float())  # fp32 precision the module does not hold


def test_pos_embed_interpolation():
    pos = torch.randn(1, 1 + 16, 8)  # 4x4 grid
    out = interpolate_pos_embed(pos, (6, 6))
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])  # CLS row kept
    torch.testing.assert_close(interpolate_pos_embed(pos, (4, 4)), pos)  # same grid: unchanged
    flat = torch.ones(1, 17, 8)
    torch.testing.assert_close(interpolate_pos_embed(flat, (7, 3)), torch.ones(1, 22, 8))  # constants stay


@pytest.mark.slow
def test_weights_load_at_another_resolution(exported):
    cfg = load_config(None, ["model.size=micro", "model.img_size=48", "model.patch_size=8"])
    encoder = ViTEncoder("micro", 48, 8, TORCH)
    load_encoder_weights(encoder, exported, cfg.model)
    assert encoder.pos_embed.shape == (1, 37, 128)
    assert encoder(torch.randn(2, 3, 48, 48)).shape == (2, 37, 128)


# ---------------------------------------------------------------- fine-tuning pieces


def test_mixup_cutmix_and_label_smoothing():
    rng = np.random.default_rng(0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8)  # image i is the constant i
    labels = torch.tensor([0, 1, 2, 3])
    same, smooth = mix(images, labels, 4, 0.0, 0.0, 0.1, rng)
    assert same is images and torch.allclose(smooth, soft_targets(labels, 4, 0.1))
    assert smooth[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    mixed, targets = mix(images, labels, 4, 0.8, 0.0, 0.0, rng)  # mixup: x_i -> lam x_i + (1 - lam) x_(3-i)
    lam = targets[0, 0].item()
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 3 * (1 - lam)))
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets[0, 3].item() == pytest.approx(1 - lam)
    cut, targets = mix(images, labels, 4, 0.0, 1.0, 0.0, rng)  # cutmix: target weight = pixel share
    assert targets[0, 3].item() == pytest.approx((cut[0, 0] == 3).float().mean().item())
    assert ((cut[0] == 0) | (cut[0] == 3)).all()


def test_layer_decay_groups():
    model = ViTClassifier(ViTEncoder("micro", 32, 8, TORCH), 10, "mean", linear_probe=False)
    groups = layer_decay_groups(model, 0.05, 0.5, depth=4)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.cls_token"])] == (0.5**5, 0.0)
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == (0.5**5, 0.05)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.5**4, 0.05)
    assert scale[id(named["encoder.blocks.3.norm1.bias"])] == (0.5, 0.0)
    assert scale[id(named["head.weight"])] == (1.0, 0.05) and scale[id(named["encoder.norm.weight"])] == (1.0, 0.0)
    assert len(scale) == len(named)


def test_drop_path_and_linear_probe_head():
    plain, dropped = ViTEncoder("micro", 32, 8, TORCH), ViTEncoder("micro", 32, 8, TORCH, drop_path=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # names unchanged, pre-training untouched
    assert [getattr(b.drop_path, "rate", 0.0) for b in dropped.blocks] == pytest.approx([0, 1 / 6, 1 / 3, 0.5])
    x = torch.randn(64, 5, 8)
    torch.testing.assert_close(dropped.blocks[3].drop_path.eval()(x), x)
    kept = dropped.blocks[3].drop_path.train()(x).flatten(1).ne(0).any(1).float().mean()
    assert 0.2 < kept < 0.8  # about half the samples keep their branch (scaled by 2)
    probe = ViTClassifier(ViTEncoder("micro", 32, 8, TORCH), 10, "cls", linear_probe=True)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert not probe.head[0].affine


# ---------------------------------------------------------------- the scripts, end to end


@pytest.mark.slow
def test_knn_script_writes_its_result(run, small_root):
    proc = _run("knn.py", "--config", str(run / "config.yaml"), "--weights", str(run), *_sets("data.workers=0"))
    result = json.loads((run / "knn.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {k: result[k] for k in ("knn_top1", "knn_top5")}
    assert 0 <= result["knn_top1"] <= result["knn_top5"] <= 100 and result["k"] == 20 and result["pool"] == "cls"


@pytest.mark.slow
def test_finetune_steps_beat_chance_and_resume_exactly(exported, small_root, tmp_path):
    """20 fine-tuning steps (the preset's lr) from exported weights on 80 embedded images, scored
    on the same 80 images (val/ holds copies of train/): train-set accuracy after overfitting a
    small subset, since a few steps on the real split do not move val accuracy off chance
    reliably. No augmentation, mixing or drop path, so the model can memorise; chance is 10%.
    Then a resume from the step-10 checkpoint replays the same losses and accuracies (fp32)."""
    args = ["--config", str(ROOT / "configs" / "finetune_tiny_cpu.yaml"), "--weights", str(exported),
            *_sets(f"data.root={small_root}", "model.img_size=32", "train.batch_size=16", "data.workers=0",
                   "data.crop_scale=[1.0, 1.0]", "data.hflip=false", "finetune.mixup=0", "finetune.cutmix=0",
                   "finetune.label_smoothing=0", "finetune.drop_path=0", "finetune.layer_decay=1",
                   "finetune.warmup_epochs=0", "finetune.epochs=4", "log.every_steps=5", "log.progress=false",
                   "log.tensorboard=false")]
    out = tmp_path / "ft"
    _run("finetune.py", *args, "--output-dir", str(out))
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "finetune" and result["top1"] > 10.0, result
    records = untimed(metrics(out))
    assert [r["step"] for r in records if "val_top1" in r] == [5, 10, 15, 20]
    assert records[-1]["val_top1"] == result["top1"]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").read_text().strip() == "step00000020"

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for tag in (resumed / "checkpoints").glob("step*"):
        if tag.name > "step00000010":
            shutil.rmtree(tag)
    (resumed / "checkpoints" / "latest").write_text("step00000010")  # as after a crash
    proc = _run("finetune.py", *args, "--output-dir", str(resumed), "--resume")
    assert "resumed from" in proc.stderr
    assert untimed(metrics(resumed)) == records
    assert json.loads((resumed / "results.json").read_text()) == result


def test_time_to_accuracy_reads_the_knn_records(tmp_path, capsys):
    from symmim.benchmarks import time_to_accuracy as tta

    records = [{"step": 5, "loss": 1.0}, {"step": 31, "epoch": 1.0, "wall_s": 40.0, "knn_top1": 20.0, "knn_top5": 60.0},
               {"step": 62, "epoch": 2.0, "wall_s": 85.0, "knn_top1": 31.5, "knn_top5": 70.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = tta.knn_curve(tmp_path)
    assert [p["wall_s"] for p in curve] == [40.0, 85.0]
    assert (tta.time_to(curve, 25.0), tta.time_to(curve, 20.0), tta.time_to(curve, 40.0)) == (85.0, 40.0, None)
    assert tta.main(["--dry-run", "--minutes", "2", "--runs-dir", str(tmp_path)]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 3 and all("train.time_limit_min=2.0" in c and "eval.knn_every_epochs=1" in c for c in commands)
    assert "mask.ratio=0.5" in commands[2]


def test_a_resumed_fine_tuning_clips_by_its_configured_threshold():
    """DeepSpeed's ZeRO and bf16 optimizers load the clipping threshold they were saved with; the
    resumed run clips by its config's (the engine's ``gradient_clipping``), as pre-training does."""
    from types import SimpleNamespace

    from symmim.core.finetune_step import ClassifierTraining

    engine = SimpleNamespace(gradient_clipping=lambda: 3.0)
    optimizer = SimpleNamespace(clip_grad=1.0)  # as loaded from a checkpoint saved with optim.clip_grad=1
    ClassifierTraining(engine, optimizer, 10, 0.0, 0.0, 0.0, 0, 0).load_state_dict({}, None)
    assert optimizer.clip_grad == 3.0
