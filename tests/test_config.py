"""Config schema (core/config.py): keys, types, choices, overrides, YAML round trip, presets, CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from symmim.core.config import Config, ConfigError, load_config, parse_override, save_config, validate
from symmim.core.masking import checkerboard_masked_counts

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def error_of(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- defaults


def test_defaults_are_the_documented_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.size == "base" and cfg.model.img_size == 224 and cfg.model.patch_size == 16
    assert (cfg.mask.strategy, cfg.mask.cell, cfg.mask.coarse_cell, cfg.mask.phase) == ("symmetric", 1, 2, "random")
    assert cfg.loss.temperature == 0.2 and cfg.loss.con_weight == 1.0 and cfg.loss.norm_pix is True
    assert (cfg.loss.momentum, cfg.loss.momentum_end) == (0.99, 1.0)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.base_lr == 1.5e-4
    assert cfg.data.crop_scale == (0.2, 1.0)


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override,key", [
    ("modle.size=tiny", "modle"),
    ("train.epoch=3", "train.epoch"),
    ("model.sizee=tiny", "model.sizee"),
    ("loss.tau=0.1", "loss.tau"),
])
def test_unknown_key_names_it(override, key):
    msg = error_of([override])
    assert msg.startswith(key + ":") and "unknown key" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  size: micro\n  widht: 3\n")
    assert error_of([], path).startswith("model.widht:")
    path.write_text("optimizer:\n  lr: 0.1\n")
    assert error_of([], path).startswith("optimizer:")


def test_section_must_be_a_mapping():
    assert "model" in error_of(["model=3"])


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("override,key", [
    ("train.epochs=ten", "train.epochs"),  # str for int
    ("train.epochs=3.5", "train.epochs"),  # float for int
    ("train.epochs=3.0", "train.epochs"),  # float for int, even integral
    ("train.epochs=true", "train.epochs"),  # bool for int
    ("train.batch_size=[1, 2]", "train.batch_size"),
    ("data.hflip=1", "data.hflip"),  # int for bool
    ("data.hflip=yes_please", "data.hflip"),
    ("optim.weight_decay=high", "optim.weight_decay"),  # str for float
    ("optim.weight_decay=true", "optim.weight_decay"),  # bool for float
    ("data.cache_dir=5", "data.cache_dir"),  # int for str
    ("data.root=5", "data.root"),  # int for Optional[str]
    ("optim.betas=[0.9]", "optim.betas"),  # wrong tuple length
    ("optim.betas=0.9", "optim.betas"),
    ("optim.betas=[0.9, fast]", "optim.betas[1]"),
    ("ds.extra=3", "ds.extra"),
])
def test_wrong_type_names_the_key(override, key):
    msg = error_of([override])
    assert msg.startswith(key + ":"), msg


def test_int_accepted_for_float():
    cfg = load_config(None, ["optim.weight_decay=0", "loss.temperature=1"])
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert type(cfg.loss.temperature) is float


def test_exponent_float_without_dot():
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)


def test_exponent_float_with_dot():
    cfg = load_config(None, ["optim.lr=1.0e-4", "optim.min_lr=2.5e-7"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.min_lr == pytest.approx(2.5e-7)


# ---------------------------------------------------------------- choices (Literal)


@pytest.mark.parametrize("override,key", [
    ("model.size=huge", "model.size"),
    ("mask.strategy=grid", "mask.strategy"),
    ("mask.phase=2", "mask.phase"),
    ("mask.phase=true", "mask.phase"),  # bool is not the int 1
    ("mask.phase=1.0", "mask.phase"),
    ("mask.phase=Random", "mask.phase"),
    ("train.precision=fp8", "train.precision"),
    ("kernels.attention=flash", "kernels.attention"),
    ("ds.zero_stage=4", "ds.zero_stage"),
    ("ds.zero_stage='2'", "ds.zero_stage"),
])
def test_choice_errors(override, key):
    msg = error_of([override])
    assert msg.startswith(key + ":") and "one of" in msg, msg


def test_choice_error_lists_the_choices():
    msg = error_of(["model.size=huge"])
    for choice in ("micro", "tiny", "small", "base", "large", "huge"):
        assert choice in msg


@pytest.mark.parametrize("value,expected", [("0", 0), ("1", 1), ("random", "random")])
def test_phase_choices(value, expected):
    phase = load_config(None, [f"mask.phase={value}"]).mask.phase
    assert phase == expected and type(phase) is type(expected)


# ---------------------------------------------------------------- override parsing


def test_parse_override():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}
    assert parse_override("a=[0.3, 1.0]") == {"a": [0.3, 1.0]}
    assert parse_override("a.b=null") == {"a": {"b": None}}
    assert parse_override("a.b=") == {"a": {"b": None}}
    assert parse_override("a.b=x=y") == {"a": {"b": "x=y"}}  # only the first '=' splits
    assert parse_override("a.b=true") == {"a": {"b": True}}
    with pytest.raises(ConfigError):
        parse_override("a.b")
    with pytest.raises(ConfigError):
        parse_override("a.b=[1, 2")  # not valid YAML


def test_overrides_apply():
    cfg = load_config(None, ["train.epochs=3", "data.crop_scale=[0.3,1.0]", "optim.betas=[0.9, 1]",
                             "data.root=/data/in1k", "optim.lr=0.5", "ds.extra={a: {b: 1}}", "mask.strategy=block"])
    assert cfg.train.epochs == 3
    assert cfg.data.crop_scale == (0.3, 1.0) and isinstance(cfg.data.crop_scale, tuple)
    assert cfg.optim.betas == (0.9, 1.0) and type(cfg.optim.betas[1]) is float
    assert cfg.data.root == "/data/in1k" and cfg.optim.lr == 0.5
    assert cfg.ds.extra == {"a": {"b": 1}} and cfg.mask.strategy == "block"
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_null_for_optional():
    cfg = load_config(None, ["data.root=/x", "optim.lr=0.1", "data.root=null", "optim.lr=null"])
    assert cfg.data.root is None and cfg.optim.lr is None
    assert error_of(["train.seed=null"]).startswith("train.seed:")  # not Optional


def test_later_override_wins(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  epochs: 7\n  seed: 3\n")
    cfg = load_config(path, ["train.epochs=9", "train.epochs=11"])
    assert cfg.train.epochs == 11 and cfg.train.seed == 3


# ---------------------------------------------------------------- YAML files


def test_yaml_file_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "model:\n  size: small\n  img_size: 96\n  patch_size: 8\n"
        "mask:\n  strategy: random\n  ratio: 0.6\n"
        "data:\n  crop_scale: [0.5, 1.0]\n  root: null\n"
    )
    cfg = load_config(path)
    assert (cfg.model.size, cfg.model.img_size, cfg.model.patch_size) == ("small", 96, 8)
    assert cfg.mask.strategy == "random" and cfg.mask.ratio == 0.6
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.data.root is None
    assert cfg.model.decoder_dim == 512 and cfg.train == Config().train  # defaults elsewhere


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_yaml_file_errors(tmp_path):
    assert "does not exist" in error_of([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    error_of([], bad)
    bad.write_text("- a\n- b\n")  # not a mapping
    error_of([], bad)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, [
        "model.size=micro", "model.img_size=64", "model.patch_size=8", "mask.phase=1", "mask.ratio=0.6",
        "data.crop_scale=[0.35, 0.9]", "data.root=/data", "optim.lr=0.001", "optim.min_lr=1.0e-6",
        "ds.extra={zero_optimization: {overlap_comm: true}}", "ds.zero_stage=3", "kernels.attention=sdpa",
        "loss.con_weight=0", "train.precision=fp32",
    ])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["data"]["crop_scale"] == [0.35, 0.9]  # plain YAML lists
    back = load_config(path)
    assert back == cfg
    assert back.data.crop_scale == (0.35, 0.9) and back.optim.min_lr == 1e-6


def test_default_round_trip(tmp_path):
    save_config(Config(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == Config()


def test_there_are_presets():
    assert PRESETS, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_tiny_cpu_preset():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    assert cfg.model.size == "micro" and cfg.train.precision == "fp32"
    grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    # the preset's comment: both checkerboard scales mask exactly half the patches
    for cell in (cfg.mask.cell, cfg.mask.coarse_cell):
        assert checkerboard_masked_counts(grid, cell) == (32, 32)


def test_mae_preset_differs_from_symmim_only_in_mask_and_loss():
    mae, sym = REPO / "configs" / "vit_b16_mae.yaml", REPO / "configs" / "vit_b16_symmim.yaml"
    if not (mae.is_file() and sym.is_file()):
        pytest.skip("the ViT-B/16 presets are not there")
    a, b = load_config(mae).to_dict(), load_config(sym).to_dict()
    assert {k for k in a if a[k] != b[k]} == {"mask", "loss"}
    assert a["mask"]["strategy"] == "random" and a["loss"]["con_weight"] == 0.0


# ---------------------------------------------------------------- preset inheritance (base:)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_preset_inheritance(tmp_path):
    write(tmp_path / "root.yaml", "model:\n  size: small\n  patch_size: 8\ntrain:\n  epochs: 5\n  seed: 1\n")
    write(tmp_path / "mid.yaml", "base: root.yaml\ntrain:\n  epochs: 7\n")
    child = write(tmp_path / "child.yaml", "base: mid.yaml\nmodel:\n  size: tiny\n")
    cfg = load_config(child, ["train.seed=4"])
    assert cfg.model.size == "tiny"  # the child wins over its bases
    assert cfg.model.patch_size == 8  # inherited from two levels up
    assert cfg.train.epochs == 7  # the nearer base wins over the farther one
    assert cfg.train.seed == 4  # overrides win over every file


def test_base_path_is_relative_to_the_preset(tmp_path, monkeypatch):
    write(tmp_path / "presets" / "root.yaml", "train:\n  epochs: 9\n")
    child = write(tmp_path / "presets" / "child.yaml", "base: root.yaml\n")
    monkeypatch.chdir(tmp_path)  # root.yaml is not in the working directory
    assert load_config(child).train.epochs == 9


def test_base_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "cycle" in error_of([], tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    assert "cycle" in error_of([], tmp_path / "self.yaml")
    write(tmp_path / "orphan.yaml", "base: nowhere.yaml\n")
    assert "nowhere.yaml" in error_of([], tmp_path / "orphan.yaml")
    write(tmp_path / "badkey.yaml", "base: orphan_ok.yaml\n")
    write(tmp_path / "orphan_ok.yaml", "model:\n  sise: tiny\n")
    assert error_of([], tmp_path / "badkey.yaml").startswith("model.sise:")


def test_base_must_be_a_file_name(tmp_path):
    write(tmp_path / "p.yaml", "base: 3\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "p.yaml")


def test_saved_config_has_no_base(tmp_path):
    write(tmp_path / "root.yaml", "train:\n  epochs: 9\n")
    cfg = load_config(write(tmp_path / "child.yaml", "base: root.yaml\n"))
    (tmp_path / "out").mkdir()
    save_config(cfg, tmp_path / "out" / "c.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "out" / "c.yaml").read_text())
    assert load_config(tmp_path / "out" / "c.yaml") == cfg


# ---------------------------------------------------------------- validate()


@pytest.mark.parametrize("overrides,key", [
    (["model.img_size=100", "model.patch_size=16"], "model.img_size"),
    (["mask.cell=15"], "mask.cell"),  # 224 / 16 = 14 patches
    (["mask.cell=0"], "mask.cell"),
    (["mask.coarse_cell=15"], "mask.coarse_cell"),
    (["model.img_size=32", "model.patch_size=16", "mask.coarse_cell=3"], "mask.coarse_cell"),
    (["mask.ratio=1.0"], "mask.ratio"),
    (["mask.ratio=0.0"], "mask.ratio"),
    (["mask.ratio=-0.5"], "mask.ratio"),
    (["mask.ratio=1.5"], "mask.ratio"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.epochs=0"], "train.epochs"),
    (["train.dist_timeout_min=0"], "train.dist_timeout_min"),
    (["train.convert_timeout_min=-1"], "train.convert_timeout_min"),
    (["loss.temperature=0"], "loss.temperature"),
    (["loss.con_weight=-1"], "loss.con_weight"),
    (["loss.momentum=1.0", "loss.momentum_end=0.99"], "loss.momentum"),
    (["loss.momentum_end=1.5"], "loss.momentum"),
    (["loss.momentum=-0.1"], "loss.momentum"),
])
def test_validate_errors(overrides, key):
    assert key in error_of(overrides)


def test_validate_accepts_edges():
    cfg = load_config(None, ["mask.cell=14", "mask.coarse_cell=14", "loss.con_weight=0", "loss.momentum=1.0"])
    validate(cfg)
    cfg.mask.ratio = 1.0
    with pytest.raises(ConfigError):
        validate(cfg)


# ---------------------------------------------------------------- CLI


def test_cli_rejects_unknown_key():
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config", "configs/tiny_cpu.yaml", "--set", "train.epoch=3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.epoch" in proc.stderr


def test_contrastive_needs_two_images_per_process():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=1"])
    assert load_config(None, ["train.batch_size=1", "loss.con_weight=0"]).train.batch_size == 1


@pytest.mark.parametrize("overrides,warned", [
    (["train.grad_accum=8"], False),  # the fast step sums in fp32
    (["train.grad_accum=8", "train.fast_step=false"], True),  # DeepSpeed's bf16 engine sums in bf16
    (["train.fast_step=false"], False),  # one micro-batch: nothing is summed
    (["train.grad_accum=8", "train.fast_step=false", "train.precision=fp32"], False),
])
def test_a_bf16_sum_of_micro_batches_is_named_where_it_happens(overrides, warned):
    from symmim.core.engine import bf16_sums_warning, fast_step

    cfg = load_config(None, overrides)
    warning = bf16_sums_warning(cfg, fast_step(cfg))
    assert (warning is not None) == warned
    if warned:
        assert "train.grad_accum=8" in warning and "bf16" in warning
