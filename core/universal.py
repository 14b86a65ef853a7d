"""Moving a checkpoint between ZeRO layouts (0, 1, 2) and numbers of processes, through DeepSpeed's
universal checkpoint format: per parameter, by name, its fp32 weights and Adam moments.

A ZeRO-1/2 tag is converted by DeepSpeed's ``ds_to_universal``; a ZeRO-0 tag (our fused AdamW's
state whole in one file) by :func:`_write_from_zero0`, from the parameter names it was saved
with (:func:`optimizer_param_names`). The copy goes to ``checkpoints/universal/<tag>``, beside
the untouched original, with our per-rank states and manifest. A ZeRO-1/2 engine loads it with
DeepSpeed's universal loader; a ZeRO-0 engine loads the weights from it and
:func:`load_into_optimizer` fills the optimizer.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

from symmim.core.checkpoint import MANIFEST, CheckpointError, _write_atomic, read_manifest

log = logging.getLogger("symmim.checkpoint")
UNIVERSAL = "universal"  # checkpoints/universal/<tag>
CONVERTED = "converted.json"  # written last into a universal copy: the conversion finished
MOMENTS = ("exp_avg", "exp_avg_sq")
NAMES = "param_names"  # client-state key of a ZeRO-0 tag: the optimizer's parameters by group, by name


def needs_conversion(tag_dir: Path, world: int, zero_stage: int) -> bool:
    """Whether ``tag_dir``'s optimizer state is laid out otherwise than this run lays it out
    (ZeRO-0 state is whole, so another number of processes alone does not count)."""
    manifest = read_manifest(tag_dir)
    saved = manifest.get("layout", {}).get("zero_stage")
    if saved not in (0, 1, 2) or zero_stage not in (0, 1, 2):
        return False
    return saved != zero_stage or (saved > 0 and manifest["world_size"] != world)


def optimizer_param_names(engine) -> list[list[str]] | None:
    """Per optimizer group, the names of its parameters (ZeRO-0's fused AdamW; None otherwise)."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 0 or not hasattr(optimizer, "model_params"):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    flat = iter(names[id(p)] for p in optimizer.model_params)
    return [[next(flat) for _ in group["params"]] for group in optimizer.param_groups]


def universal_copy(tag_dir: Path) -> Path:
    """``tag_dir`` in the universal layout at ``checkpoints/universal/<tag>``; converted once, by
    rank 0, while the others wait."""
    out = tag_dir.parent / UNIVERSAL / tag_dir.name
    if dist.get_rank() == 0 and not (out / CONVERTED).is_file():
        log.info("converting %s for another ZeRO layout into %s (DeepSpeed universal checkpoint) ...", tag_dir, out)
        start = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)
        if read_manifest(tag_dir)["layout"].get("zero_stage") == 0:
            _write_from_zero0(tag_dir, out)
        else:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        for own in [*tag_dir.glob("rank*_state.pt"), tag_dir / MANIFEST]:
            shutil.copy2(own, out / own.name)
        _write_atomic(out / CONVERTED, json.dumps({"from": str(tag_dir), "seconds": time.perf_counter() - start}))
    dist.barrier()
    return out


def _write_from_zero0(tag_dir: Path, out: Path) -> None:
    """The universal layout of a ZeRO-0 tag: per parameter its fp32 master (or fp32 weight), moments
    and step; the optimizer's group settings; the model states file as it is."""
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    names = states.get(NAMES)
    if names is None:
        raise CheckpointError(f"{tag_dir} predates the parameter names a conversion to ZeRO 1-2 needs: resume it "
                              "with ds.zero_stage=0, then save again")
    optimizer = states["optimizer"]
    flat = [n for group in names for n in group]
    masters = optimizer.get("masters")
    for i, name in enumerate(flat):
        folder = out / "zero" / name
        folder.mkdir(parents=True)
        weights = masters[i] if masters is not None else states["module"][name]
        torch.save({"param": weights.float(), "cat_dim": 0}, folder / "fp32.pt")
        state = optimizer["state"][i]
        for key in MOMENTS:
            torch.save({"param": state[key], "cat_dim": 0}, folder / f"{key}.pt")
        torch.save(state["step"], folder / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
    torch.save({"ds_version": states["ds_version"], "param_groups": groups}, out / "zero" / "optimizer_state.pt")
    shutil.copy2(tag_dir / "mp_rank_00_model_states.pt", out / "mp_rank_00_model_states.pt")


@torch.no_grad()
def load_into_optimizer(engine, folder: Path) -> None:
    """Fill a ZeRO-0 engine's fused AdamW from a universal copy: moments, step and fp32 masters
    (the weights themselves DeepSpeed loaded from the copy's model states)."""
    optimizer = engine.optimizer
    names = optimizer_param_names(engine)
    if names is None:
        raise CheckpointError(f"{folder}: only the fast step's optimizer (train.fast_step=true) loads a checkpoint "
                              "converted from ZeRO 1-2 into ZeRO-0")
    zero = folder / "zero"

    def tensor(name: str, key: str) -> torch.Tensor:
        return torch.load(zero / name / f"{key}.pt", weights_only=False)["param"]

    flat = [n for group in names for n in group]
    state = optimizer.state_dict()
    state["state"] = {i: {"step": torch.load(zero / name / "step.pt", weights_only=False).float(),
                          **{key: tensor(name, key) for key in MOMENTS}} for i, name in enumerate(flat)}
    if "masters" in state:
        state["masters"] = [tensor(name, "fp32") for name in flat]
    optimizer.load_state_dict(state)
