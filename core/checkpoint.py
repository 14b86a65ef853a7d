"""Training checkpoints: DeepSpeed's engine state plus our own per-rank state, written safely.

Layout under ``run_dir/checkpoints``: one folder per tag (``step00001234``) holding the
DeepSpeed files, ``rank{r}_state.pt`` (data position, mask and torch RNG of rank r) and,
written last, ``manifest.json`` (every file with its size, the world size, the model
architecture). ``latest`` names the newest tag and is replaced atomically only after the
manifest exists, so a crash mid-save never leaves a ``latest`` pointing at a partial tag.
Loading verifies the manifest and falls back to the newest intact tag.

A tag resumed under another ZeRO layout is first converted (``core/universal.py``) into
``checkpoints/universal/<tag>``, beside the original, and loaded from there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("symmim.checkpoint")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here (foreign model, other world size, damaged)."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag_dir: Path) -> int:
    """The optimizer step a tag folder was saved at."""
    return int(tag_dir.name[len("step"):])


def _tags(ckpt_dir: Path) -> list[Path]:
    """Tag folders in the order the run wrote them, oldest first: by the time their manifest was
    written (a tag without one, an interrupted save, counts as older than every complete tag)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")]

    def written(tag: Path) -> tuple[int, float, str]:
        manifest = tag / MANIFEST
        return (1, manifest.stat().st_mtime, tag.name) if manifest.is_file() else (0, 0.0, tag.name)

    return sorted(tags, key=written)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, arch: dict, keep: int,
                    layout: dict | None = None) -> Path:
    """Save on every rank (collective); the tag becomes ``latest`` once complete. ``layout`` (ZeRO
    stage, micro batch, accumulation) is recorded beside the world size: what a resume on another
    number of processes needs to know."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = step_tag(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # an earlier, interrupted save of the same step
    dist.barrier()
    tag_dir.mkdir(parents=True, exist_ok=True)
    from symmim.core.universal import NAMES, optimizer_param_names

    torch.save(rank_state, tag_dir / f"rank{rank}_state.pt")
    names = optimizer_param_names(engine)  # what a later conversion to another ZeRO layout needs
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, **({NAMES: names} if names else {})},
                           save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        manifest = {"step": step, "world_size": world, "layout": layout or {}, "arch": arch, "files": files}
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(ckpt_dir / "latest", tag)
        older = [t for t in _tags(ckpt_dir) if t != tag_dir]  # the run's history, oldest first
        for old in older[:max(len(older) - (keep - 1), 0)] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


# Architecture keys added after checkpoints were first written, with the value those checkpoints had.
ARCH_ADDED = {"head_bn": True, "con_token": "cls"}


def _problem(tag_dir: Path, world: int, arch: dict, zero_stage: int) -> str | None:
    """Why ``tag_dir`` cannot be resumed by this run, or None if it can."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "incomplete (no readable manifest.json: the save was interrupted)"
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return f"damaged: {name} is missing or truncated"
    saved = {**ARCH_ADDED, **manifest["arch"]}
    if saved != arch:
        diff = {k: (saved.get(k), v) for k, v in arch.items() if saved.get(k) != v}
        detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{tag_dir} holds another model ({detail}); use the run's own config or a new --output-dir")
    saved_stage = manifest.get("layout", {}).get("zero_stage")
    if saved_stage is not None and saved_stage != zero_stage and 3 in (saved_stage, zero_stage):
        raise CheckpointError(f"{tag_dir} was written under ZeRO-{saved_stage}, this run uses ZeRO-{zero_stage}: "
                              "ZeRO-3 checkpoints convert to no other stage, nor others to ZeRO-3; "
                              f"resume with ds.zero_stage={saved_stage}")
    if manifest["world_size"] != world and saved_stage not in (0, 1, 2):
        raise CheckpointError(
            f"{tag_dir} was written by {manifest['world_size']} processes under ZeRO-{saved_stage}, this run has "
            f"{world}. ZeRO-0, 1 and 2 checkpoints resume on another number of processes, ZeRO-3 ones do not: "
            "resume with the same number, or export the weights (symmim-export) and start a new run"
        )
    return None


def resumable_tag(ckpt_dir: Path, arch: dict, world: int, zero_stage: int) -> Path | None:
    """The newest intact tag the run wrote that this run (``arch``, ``world`` processes, ZeRO stage)
    can resume, or None if there is none; needs no engine, so it is checked before one is built.

    A damaged or incomplete tag is skipped with a warning naming it; a checkpoint of another
    model or another world size raises :class:`CheckpointError`.
    """
    tags = _tags(ckpt_dir)
    for tag_dir in [t for t in tags if not (t / MANIFEST).is_file()]:  # oldest by history: say so now
        log.warning("skipping checkpoint %s: incomplete (no manifest.json: the save was interrupted)", tag_dir)
    for tag_dir in reversed([t for t in tags if (t / MANIFEST).is_file()]):
        problem = _problem(tag_dir, world, arch, zero_stage)
        if problem:
            log.warning("skipping checkpoint %s: %s", tag_dir, problem)
            continue
        return tag_dir
    return None


def load_checkpoint(engine, tag_dir: Path) -> tuple[dict, dict | None]:
    """Restore the tag ``tag_dir`` (see :func:`resumable_tag`): ``(client_state, rank_state)``; the
    rank state is None when the tag was written by another number of processes (it is per rank)."""
    from symmim.core.universal import UNIVERSAL, load_into_optimizer

    universal, zero = tag_dir.parent.name == UNIVERSAL, engine.zero_optimization_stage()
    # DeepSpeed reads load_universal_checkpoint when loading only; ZeRO-0 has no universal loader: ours fills it
    engine._config.load_universal_checkpoint = universal and zero > 0
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=not (universal and zero == 0))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    if universal and zero == 0:
        load_into_optimizer(engine, tag_dir)
    saved_world = read_manifest(tag_dir)["world_size"]
    rank_state = None
    if saved_world == dist.get_world_size():
        rank_state = torch.load(tag_dir / f"rank{dist.get_rank()}_state.pt", weights_only=False)
    log.info("resumed from %s%s", tag_dir, "" if rank_state else f" (written by {saved_world} processes)")
    return client_state, rank_state
