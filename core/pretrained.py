"""Pre-trained encoder weights: read from a run folder or an exported file, checked, loaded, exported.

- A **run folder** (``symmim-pretrain``) is read from a DeepSpeed checkpoint tag
  (``checkpoints/latest`` by default) and consolidated to fp32: ZeRO 1-3 through DeepSpeed's
  ``zero_to_fp32`` (the fp32 master weights); ZeRO-0 from the module weights when training ran
  in fp32, else from the fp32 masters DeepSpeed's optimizer saved, else (with a warning) the
  low-precision module weights upcast. The architecture comes from the run's ``config.yaml``.
- An **exported file** (``symmim-export``) is ``FILE.safetensors``: the fp32 encoder under
  timm's ViT names, beside ``FILE.json``: the architecture.

Loading into an encoder refuses another architecture with a message naming the mismatch and
interpolates the position embedding when the patch grid differs.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from symmim.core.config import ModelConfig, load_config
from symmim.core.optim import param_groups
from symmim.core.symmim import SymMIM
from symmim.core.vit import VIT_SIZES, ViTEncoder

log = logging.getLogger("symmim.pretrained")
PREFIX = "encoder."  # the encoder's place in the pre-training module


class WeightsError(RuntimeError):
    """Weights that cannot be read, or do not fit the model."""


class ArchitectureError(WeightsError):
    """Weights of another architecture than the config's model."""


def state_architecture(state: dict[str, Tensor], source: str = "weights") -> dict:
    """What the tensors of a timm-named ViT state fix: width, depth, patch, grid, MLP ratio."""
    try:
        dim = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"{source}: not a ViT encoder state ({err.args[0]} is missing)") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return {"embed_dim": dim, "depth": depth, "patch_size": patch, "img_size": grid * patch, "mlp_ratio": mlp / dim}


def model_architecture(m: ModelConfig) -> dict:
    """The architecture a config's ``model`` section builds (as :func:`state_architecture`, plus size and heads)."""
    s = VIT_SIZES[m.size]
    return {"size": m.size, "embed_dim": s.dim, "depth": s.depth, "num_heads": s.heads,
            "patch_size": m.patch_size, "img_size": m.img_size, "mlp_ratio": 4.0}


def check_architecture(arch: dict, m: ModelConfig, source: str) -> None:
    """ArchitectureError naming every mismatch between ``arch`` (weights) and the config's model.

    The image size may differ (the position embedding is interpolated); the number of heads
    is checked only when ``arch`` states it (an exported file's JSON, a run's config).
    """
    want = model_architecture(m)
    where = {"embed_dim": f"model.size={m.size}", "depth": f"model.size={m.size}", "num_heads": f"model.size={m.size}",
             "mlp_ratio": "this encoder", "patch_size": "model.patch_size"}
    wrong = [f"checkpoint has {key.replace('_', ' ')} {arch[key]:g}, {setting} expects {want[key]:g}"
             for key, setting in where.items() if key in arch and arch[key] != want[key]]
    if wrong:
        raise ArchitectureError(f"{source} does not fit the configured model: " + "; ".join(wrong))


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[1, 1 + n*n, D]`` -> ``[1, 1 + h*w, D]``: bicubic over the patch grid, the CLS row kept."""
    cls, table = pos_embed[:, :1], pos_embed[:, 1:]
    n, d = math.isqrt(table.shape[1]), table.shape[2]
    if n * n != table.shape[1]:
        raise WeightsError(f"position embedding of {table.shape[1]} patches is not a square grid")
    table = table.reshape(1, n, n, d).permute(0, 3, 1, 2).float()  # [1, D, n, n]
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False, antialias=True)  # [1, D, h, w]
    return torch.cat([cls.float(), table.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1).to(pos_embed.dtype)


# ---- run folders ----

def _stage0_masters(meta: dict, cfg) -> dict[str, Tensor] | None:
    """fp32 masters of a ZeRO-0 bf16/fp16 run, by name; None if absent or not lined up.

    DeepSpeed's unfused low-precision optimizer (``fp32_groups``) and the fast step's
    :class:`~symmim.core.optim.FusedAdamW` (``masters``) save one fp32 copy per parameter, in the
    order of the optimizer's groups (``core.optim.param_groups`` of the SymMIM module); each copy
    must round to the saved module weight.
    """
    optimizer = meta.get("optimizer") or {}
    groups = optimizer.get("fp32_groups") or ([optimizer["masters"]] if "masters" in optimizer else None)
    if groups is None:
        return None
    with torch.device("meta"):
        model = SymMIM(cfg.model, cfg.loss)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]
    masters = [t for g in groups for t in g]
    module = meta["module"]
    if len(order) != len(masters) or any(
            n not in module or m.shape != module[n].shape or not torch.equal(m.to(module[n].dtype), module[n])
            for n, m in zip(order, masters)):
        return None
    return dict(zip(order, masters))


def _fp32_module_state(ckpt_dir: Path, tag: str, cfg) -> tuple[dict[str, Tensor], str]:
    """The pre-training module's state in fp32, and how it was obtained."""
    model_files = sorted((ckpt_dir / tag).glob("*model_states.pt"))
    if not model_files:
        raise WeightsError(f"{ckpt_dir / tag} holds no DeepSpeed model states (*model_states.pt)")
    meta = torch.load(model_files[0], map_location="cpu", weights_only=False)
    stage = meta["ds_config"].get("zero_optimization", {}).get("stage", 0)
    if stage > 0:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # no detection warning
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag), f"fp32 master weights (ZeRO-{stage})"
    module = meta["module"]
    if all(v.dtype == torch.float32 for v in module.values() if v.is_floating_point()):
        return module, "fp32 module weights (ZeRO-0, fp32 training)"
    masters = _stage0_masters(meta, cfg)
    if masters is not None:
        return {**module, **masters}, "fp32 master weights (ZeRO-0)"
    log.warning("%s: no fp32 master weights found; exporting the %s module weights upcast to fp32",
                ckpt_dir / tag, next(iter(module.values())).dtype)
    return module, "low-precision module weights upcast to fp32 (no fp32 master found)"


def read_run(run_dir: str | Path, tag: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """fp32 encoder state (timm names) of a pre-training run folder and its architecture (with ``source``)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{run_dir} is not a run folder (no config.yaml)")
    if tag is None:
        if not (ckpt_dir / "latest").is_file():
            raise WeightsError(f"{run_dir} has no checkpoint ({ckpt_dir / 'latest'} is missing)")
        tag = (ckpt_dir / "latest").read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        tags = sorted(p.name for p in ckpt_dir.glob("step*")) if ckpt_dir.is_dir() else []
        raise WeightsError(f"{run_dir}: no checkpoint tag {tag!r} (found: {', '.join(tags) or 'none'})")
    cfg = load_config(run_dir / "config.yaml")
    state, how = _fp32_module_state(ckpt_dir, tag, cfg)
    encoder = {k[len(PREFIX):]: v.float().clone() for k, v in state.items() if k.startswith(PREFIX)}
    if not encoder:
        raise WeightsError(f"{ckpt_dir / tag} holds no {PREFIX}* weights: not a pre-training checkpoint")
    arch = {**model_architecture(cfg.model), **state_architecture(encoder, str(ckpt_dir / tag)), "pool": cfg.eval.pool,
            "source": {"run": str(run_dir.resolve()), "tag": tag, "weights": how}}
    return encoder, arch


# ---- exported files ----

def export_architecture(arch: dict) -> dict:
    """``arch`` plus the keyword arguments of timm's ``VisionTransformer`` that rebuild this encoder."""
    timm = {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    pool = {"cls": {"global_pool": "token"}, "mean": {"global_pool": "avg", "fc_norm": False}}[arch.get("pool", "cls")]
    return {**arch, "pos_embed": "fixed 2-D sin-cos, zero CLS row",
            "timm_kwargs": {**timm, "qkv_bias": True, "class_token": True, "num_classes": 0, **pool}}


def write_export(state: dict[str, Tensor], arch: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (.safetensors, fp32) and ``out`` with suffix .json (the architecture)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"--out {out}: expected a .safetensors file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    meta = out.with_suffix(".json")
    meta.write_text(json.dumps(export_architecture(arch), indent=2) + "\n")
    os.chmod(out, meta.stat().st_mode & 0o777)  # safetensors writes 0600: both files get the umask's mode
    return out, meta


def read_export(path: Path) -> tuple[dict[str, Tensor], dict]:
    """An exported encoder and its architecture (shapes, plus FILE.json when present)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    arch = state_architecture(state, str(path))
    meta = path.with_suffix(".json")
    if meta.is_file():
        saved = json.loads(meta.read_text())
        arch.update({k: saved[k] for k in ("size", "num_heads") if k in saved}, source={"file": str(path.resolve())})
    else:
        log.warning("%s is missing: the number of heads of %s is not checked", meta, path)
    return state, arch


def read_weights(path: str | Path, tag: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Encoder state and architecture from a run folder or an exported .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return read_run(path, tag)
    if path.suffix == ".safetensors" and path.is_file():
        return read_export(path)
    raise WeightsError(f"--weights {path}: expected a run folder or an exported .safetensors file")


def load_encoder_weights(encoder: ViTEncoder, path: str | Path, m: ModelConfig) -> str:
    """Load ``path`` into ``encoder`` (built from ``m``): architecture check, pos-embed interpolation.

    Returns a one-line description of what was loaded.
    """
    state, arch = read_weights(path)
    check_architecture(arch, m, str(path))
    pos = state["pos_embed"]
    if pos.shape != encoder.pos_embed.shape:
        state["pos_embed"] = interpolate_pos_embed(pos, encoder.grid)
        log.info("position embedding interpolated from %d to %d patches", pos.shape[1] - 1, state["pos_embed"].shape[1] - 1)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
    source = arch.get("source", {})
    return f"{path} ({source.get('tag', 'exported')}, {source.get('weights', 'fp32')})"
