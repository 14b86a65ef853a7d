"""The one configuration schema of a run: dataclasses, YAML presets, dotted overrides.

``load_config("configs/tiny_cpu.yaml", ["train.epochs=3"])`` starts from the defaults
below, applies the YAML file (after the preset it names as ``base:``, if any), then each
``dotted.key=value`` override (values parsed as YAML), and checks every key and type. A bad
key or value raises :class:`ConfigError` whose message names it. A bare preset name
(``tiny_cpu``) that is not a file here names one of the presets shipped with the package.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


PRESETS = Path(__file__).resolve().parents[1] / "configs"  # shipped presets (the checkout's configs/)


class ConfigError(ValueError):
    """A configuration key or value that the schema does not accept."""


class _Loader(yaml.SafeLoader):
    """YAML with ``1e-4`` read as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass
class ModelConfig:
    size: Literal["micro", "tiny", "small", "base", "large"] = "base"
    img_size: int = 224
    patch_size: int = 16
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    proj_hidden: int = 4096  # projector / predictor MLP hidden width (MoCo v3)
    proj_dim: int = 256  # contrastive embedding width
    head_bn: bool = True  # BatchNorm (over the global batch) in the projector / predictor, as MoCo v3
    con_token: Literal["cls", "mean"] = "cls"  # what feeds the heads: CLS, or the mean of the visible tokens


@dataclass
class MaskConfig:
    strategy: Literal["symmetric", "random", "block"] = "symmetric"
    cell: int = 1  # symmetric: online (fine) checkerboard cell size, in patches
    coarse_cell: int = 2  # symmetric: momentum-branch (coarse) cell size
    # symmetric: 0, 1 or random; random draws per sample on even cell grids and once per
    # batch on odd ones (e.g. 14x14 patches with cell 2), so a batch shares one count.
    phase: Literal[0, 1, "random"] = "random"
    ratio: float = 0.75  # random / block: fraction of patches masked


@dataclass
class LossConfig:
    norm_pix: bool = True  # MAE's per-patch normalised target
    con_weight: float = 1.0  # lambda; 0 turns the contrastive branch off (not computed)
    temperature: float = 0.2  # InfoNCE tau
    momentum: float = 0.99  # EMA momentum at step 0, cosine schedule to momentum_end
    momentum_end: float = 1.0


@dataclass
class DataConfig:
    root: Optional[str] = None  # ImageFolder root with train/ and val/; None = embedded set
    exclude: Optional[str] = None  # file list to skip (symmim-verify-data); default ROOT/symmim_exclude.txt
    format: Literal["imagefolder", "webdataset"] = "imagefolder"
    loader: Literal["auto", "dali", "torch"] = "auto"
    workers: int = 4  # decode threads (DALI) or worker processes (torch)
    precheck: bool = True  # DALI ImageFolder: find truncated files first (reads each file's last KiB)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    # the momentum (key) branch's input: `same` (the online view; the loader yields one tensor),
    # `independent` (MoCo v3's second view: its own crop and flip, colour jitter, grayscale, blur,
    # solarize) or `shifted` (the online crop box moved by up to key_shift output pixels per axis,
    # CMAE's pixel shift; same flip, no colour change); the other two yield data.views.Views(online, key)
    key_view: Literal["same", "independent", "shifted"] = "same"
    key_shift: int = 16  # shifted: largest move, output pixels per axis (16: one patch of ViT-B/16 at 224 px)
    # DALI's GPU (`mixed`) decoder: the share of JPEGs sent to the hardware decoder (A100/H100/H200),
    # and nvJPEG buffers reserved up front for ImageNet-size images (NVIDIA's example values)
    hw_decoder_load: float = 0.65
    decoder_prealloc: bool = True
    cache_dir: str = "~/.cache/symmim"  # where the embedded data set is generated
    embedded_seed: int = 0


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # scaled by effective batch / 256
    lr: Optional[float] = None  # absolute peak lr; overrides base_lr scaling when set
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    clip_grad: float = 0.0  # 0 = no clipping


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64  # micro batch per process
    grad_accum: int = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # fast step: fp32 weights under bf16 autocast, a fused multi-tensor AdamW with foreach clipping,
    # non-finite steps skipped on the device (no host sync); false (and fp16): DeepSpeed's own
    # low-precision engine (bf16/fp16 weights, fp32 masters, dynamic loss scaling for fp16)
    fast_step: bool = True
    compile: bool = False  # torch.compile the encoders, decoder and heads (static shapes; the first steps compile)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    seed: int = 0
    max_steps: int = 0  # run length in optimizer steps; schedules span it (0 = train.epochs)
    time_limit_min: float = 0.0  # stop (with a checkpoint) after this many minutes (0 = none)
    ckpt_every_steps: int = 0  # 0 = checkpoint at the end of each epoch only
    ckpt_every_min: float = 0.0  # also checkpoint every this many minutes (0 = off)
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row (each one skips its step)
    dist_timeout_min: float = 30.0  # a collective waiting longer than this fails the job
    convert_timeout_min: float = 240.0  # how long the other ranks wait for rank 0 to convert a checkpoint (resume)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class KernelsConfig:
    """Which implementation runs each hot-path op. ``auto``: on a GPU that ``kernels/measured.json``
    lists, the fastest measured at the nearest shape, chosen per call shape; elsewhere torch."""

    backend: Literal["auto", "triton", "torch"] = "auto"  # patch-gather-embed, norm-pix loss
    attention: Literal["auto", "triton", "sdpa", "xformers", "torch"] = "auto"  # auto off the table: torch SDPA


@dataclass
class EvalConfig:
    knn_every_epochs: int = 0  # periodic kNN on frozen features during pre-training (0 = off)
    knn_k: int = 20
    knn_temperature: float = 0.07
    pool: Literal["cls", "mean"] = "cls"  # feature: CLS token or mean of patch tokens
    batch_size: int = 128  # per process, feature extraction


@dataclass
class FinetuneConfig:
    """Supervised recipe of ``symmim-finetune`` (MAE fine-tuning) and ``symmim-linprobe``.

    Batch size, precision, ZeRO stage, gradient clipping, seed and the crop scale come from
    ``train``, ``ds``, ``optim.clip_grad`` and ``data`` as in pre-training; the feature is
    ``eval.pool``. The ``*_finetune.yaml`` / ``*_linprobe.yaml`` presets set MAE's values;
    the linear probe uses the schedule keys only (no layer decay, drop path or mixing).
    """

    epochs: int = 100
    max_steps: int = 0  # run length in optimizer steps; schedules span it (0 = finetune.epochs)
    base_lr: float = 5e-4  # scaled by effective batch / 256
    lr: Optional[float] = None  # absolute peak lr; overrides base_lr scaling when set
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.65  # lr scale layer_decay ** (depth + 1 - layer); layer 0 = embeddings
    drop_path: float = 0.1  # stochastic depth of the last block, linear from 0 at the first
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup Beta(alpha, alpha); 0 = off
    cutmix: float = 1.0  # cutmix Beta(alpha, alpha); 0 = off; with both on, one of them per batch, 50/50


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    recon_images: int = 4  # val images in each epoch's reconstruction PNG (0 = none)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the YAML dump reads back as the same config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to the type ``hint``, or ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        choices = "|".join(str(a) for a in args)
        raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        return value
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto dataclass ``obj``, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ConfigError(f"{key}: unknown key (known here: {known})")
        if dataclasses.is_dataclass(hints[name]):
            _merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check(value, hints[name], key))


def parse_override(text: str) -> dict:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {err}") from None
    node: dict = {}
    top = node
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return top


def _preset_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The YAML mappings to apply, base presets first (``base: other.yaml`` inherits)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' presets form a cycle")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the file name of another preset, got {base!r}")
    chain = _preset_chain(path.parent / base, seen + (path.resolve(),)) if base else []
    return chain + [data]


def preset_path(name: str | Path) -> Path:
    """``name`` itself when it is a file or a path with folders, else the shipped preset of that name
    (``tiny_cpu`` or ``tiny_cpu.yaml``); ConfigError listing the shipped presets when neither exists."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = PRESETS / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist, nor is it a shipped preset ({names})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML preset at ``path`` (a file or a shipped preset's name), then
    ``dotted.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        for data in _preset_chain(preset_path(path)):
            _merge(cfg, data)
    for text in overrides:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that involve more than one key or a value range."""
    m, t = cfg.model, cfg.train
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size: {m.img_size} is not a multiple of model.patch_size {m.patch_size}")
    grid = m.img_size // m.patch_size
    for key in ("cell", "coarse_cell"):
        cell = getattr(cfg.mask, key)
        if not 1 <= cell <= grid:
            raise ConfigError(f"mask.{key}: {cell} does not fit the {grid}x{grid} patch grid")
    if not 0.0 < cfg.mask.ratio < 1.0:
        raise ConfigError(f"mask.ratio: must lie in (0, 1), got {cfg.mask.ratio}")
    for key in ("batch_size", "grad_accum", "epochs"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    for key in ("dist_timeout_min", "convert_timeout_min"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}: minutes above 0, got {getattr(t, key)}")
    shift_limit = m.img_size if cfg.data.key_view == "shifted" else float("inf")
    if not 0 <= cfg.data.key_shift < shift_limit:
        raise ConfigError(f"data.key_shift: output pixels in [0, model.img_size {m.img_size}) with data.key_view "
                          f"shifted, >= 0 otherwise; got {cfg.data.key_shift}")
    if not 0.0 <= cfg.data.hw_decoder_load <= 1.0:
        raise ConfigError(f"data.hw_decoder_load: a share in [0, 1], got {cfg.data.hw_decoder_load}")
    if cfg.loss.con_weight > 0 and t.batch_size < 2:
        raise ConfigError("train.batch_size: the contrastive heads' BatchNorm needs at least 2 images per process")
    if cfg.loss.con_weight < 0 or cfg.loss.temperature <= 0:
        raise ConfigError("loss.con_weight must be >= 0 and loss.temperature > 0")
    if not 0.0 <= cfg.loss.momentum <= cfg.loss.momentum_end <= 1.0:
        raise ConfigError("loss.momentum: need 0 <= loss.momentum <= loss.momentum_end <= 1")
    f = cfg.finetune
    if f.epochs < 1 or not 0.0 < f.layer_decay <= 1.0 or not 0.0 <= f.drop_path < 1.0 or not 0.0 <= f.label_smoothing < 1.0:
        raise ConfigError("finetune: need epochs >= 1, 0 < layer_decay <= 1, 0 <= drop_path < 1, 0 <= label_smoothing < 1")
    if f.mixup < 0 or f.cutmix < 0:
        raise ConfigError("finetune.mixup / finetune.cutmix: Beta parameters must be >= 0 (0 = off)")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; ``load_config(path)`` reads back the same config."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
