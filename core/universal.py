"""DeepSpeed's universal checkpoint layout: per parameter, by name, its fp32 weights, Adam moments and
step, which any ZeRO stage (0, 1, 2) and number of processes can load.

A ZeRO-1/2 tag is converted by DeepSpeed's ``ds_to_universal`` (:func:`convert_partitioned`); a
ZeRO-0 tag, whose fused AdamW state sits whole in one file, by :func:`write_from_zero0`, from the
parameter names the save recorded (:func:`optimizer_param_names`). A ZeRO-1/2 engine loads the copy
with DeepSpeed's universal loader; a ZeRO-0 engine loads the weights from it and
:func:`load_into_optimizer` fills its optimizer. When to convert, where the copy goes and whether
it still matches its source is ``core/checkpoint.py``'s business.
"""
from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
NAMES = "param_names"  # client-state key of a ZeRO-0 tag: the optimizer's parameters by group, by name
ZERO0_STATES = "mp_rank_00_model_states.pt"  # a ZeRO-0 tag's one file of module and optimizer state


def optimizer_param_names(engine) -> list[list[str]] | None:
    """Per optimizer group, the names of its parameters (ZeRO-0's fused AdamW; None otherwise)."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 0 or not hasattr(optimizer, "model_params"):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    flat = iter(names[id(p)] for p in optimizer.model_params)
    return [[next(flat) for _ in group["params"]] for group in optimizer.param_groups]


def convert_partitioned(tag_dir: Path, out: Path) -> None:
    """A ZeRO-1/2 tag into the universal layout at ``out`` (DeepSpeed's own converter)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def write_from_zero0(tag_dir: Path, states: dict, out: Path) -> None:
    """A ZeRO-0 tag (``states``: its model-states file, holding :data:`NAMES`) in the universal layout
    at ``out``: per parameter its fp32 master (or fp32 weight), moments and step; the optimizer's
    group settings; the model-states file as it is."""
    optimizer = states["optimizer"]
    flat = [n for group in states[NAMES] for n in group]
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
    shutil.copy2(tag_dir / ZERO0_STATES, out / ZERO0_STATES)


@torch.no_grad()
def load_into_optimizer(optimizer: torch.optim.Optimizer, names: list[list[str]], folder: Path) -> None:
    """Fill a ZeRO-0 fused AdamW, whose parameters are ``names`` by group, from the universal copy
    ``folder``: moments, step and fp32 masters (DeepSpeed loaded the weights from its model states)."""
    zero = folder / "zero"

    def tensor(name: str, key: str) -> torch.Tensor:
        return torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)["param"]

    flat = [n for group in names for n in group]
    state = optimizer.state_dict()
    state["state"] = {i: {"step": torch.load(zero / name / "step.pt", map_location="cpu", weights_only=False).float(),
                          **{key: tensor(name, key) for key in MOMENTS}} for i, name in enumerate(flat)}
    if "masters" in state:
        state["masters"] = [tensor(name, "fp32") for name in flat]
    optimizer.load_state_dict(state)
