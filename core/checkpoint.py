"""Training checkpoints: DeepSpeed's engine state plus our own per-rank state, written so that no
crash, copy or network filesystem can lose the last good one.

Layout under ``run_dir/checkpoints``: one folder per tag (``step00001234``) holding the DeepSpeed
files, ``rank{r}_state.pt`` (data position, mask and torch RNG of rank r) and, written last,
``manifest.json``: every file with its size, the save's sequence number in the run (``seq``), the
world size, the ZeRO layout and the model architecture. ``latest`` names the newest tag and is
replaced atomically only after the manifest exists.

- Order is the manifests' ``seq``, never file times: a folder copied without its times, or a
  resume from an earlier tag, keeps the order the run wrote.
- A step is saved once: a save of a step whose complete tag exists keeps that tag, so no save
  ever deletes the good checkpoint ``latest`` names; an interrupted tag of that step is replaced.
- Rank 0 decides what to resume and every rank loads that tag.
- A tag resumed under another ZeRO layout is converted once into ``checkpoints/universal/<tag>``
  (``core/universal.py``), beside the untouched original. The copy records its source manifest's
  hash and is converted anew when the source changed; it is deleted with its source.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from symmim.core.distributed import decided_by_rank0
from symmim.core.universal import (NAMES, ZERO0_STATES, convert_partitioned, load_into_optimizer,
                                   optimizer_param_names, write_from_zero0)

log = logging.getLogger("symmim.checkpoint")
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>
CONVERTED = "converted.json"  # written last into a universal copy: its source and that source's manifest hash


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here (foreign model, other world size, damaged)."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag_dir: Path) -> int:
    """The optimizer step a tag folder was saved at."""
    return int(tag_dir.name[len("step"):])


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


def _manifest_or_none(tag_dir: Path) -> dict | None:
    try:
        return read_manifest(tag_dir)
    except (OSError, ValueError):
        return None


def _tags(ckpt_dir: Path) -> list[Path]:
    """Tag folders in the order the run wrote them, oldest first, by their manifests' sequence
    numbers (manifests from before they existed: by step, before every numbered one). A tag
    without a readable manifest, an interrupted save, counts as older than every complete one."""
    if not ckpt_dir.is_dir():
        return []

    def written(tag: Path) -> tuple[int, int, int]:
        manifest = _manifest_or_none(tag)
        return (0, 0, step_of(tag)) if manifest is None else (1, manifest.get("seq", 0), step_of(tag))

    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)), key=written)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text``, or what it held before if the process or its node dies while writing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the storage it lives on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a filesystem that cannot sync one: its entries go with the next commit
        if path.is_file():
            raise
    finally:
        os.close(fd)


def _damage(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint, or None if it is."""
    manifest = _manifest_or_none(tag_dir)
    if manifest is None:
        return "incomplete (no readable manifest.json: the save was interrupted)"
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return f"damaged: {name} is missing or truncated"
    return None


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, arch: dict, keep: int,
                    layout: dict | None = None) -> Path:
    """Save on every rank (collective); the tag becomes ``latest`` once complete and the oldest tags
    beyond ``keep`` go. ``layout`` (ZeRO stage, micro batch, accumulation) is recorded beside the
    world size: what a resume on another number of processes needs to know. A step whose complete
    tag exists is not saved again (the same step holds the same state): that tag is returned."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag_dir = ckpt_dir / step_tag(step)

    def prepare() -> bool:  # rank 0: keep a complete tag of this step, or clear the way for a new one
        if tag_dir.exists() and _damage(tag_dir) is None:
            return False
        shutil.rmtree(tag_dir, ignore_errors=True)  # an interrupted or damaged save of the same step
        shutil.rmtree(ckpt_dir / UNIVERSAL / tag_dir.name, ignore_errors=True)  # a copy of an earlier tag of this name
        return True

    if not decided_by_rank0(prepare):
        log.info("step %d is saved already: %s", step, tag_dir)
        return tag_dir
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tag_dir / f"rank{rank}_state.pt")
    names = optimizer_param_names(engine)  # what a later conversion to another ZeRO layout needs
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name,
                           client_state={**client_state, **({NAMES: names} if names else {})}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        history = _tags(ckpt_dir)
        seq = 1 + max((m.get("seq", 0) for m in map(_manifest_or_none, history) if m), default=0)
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        for name in files:  # on the storage before the manifest names them: a node crash keeps the older tag
            _fsync(tag_dir / name)
        manifest = {"step": step, "seq": seq, "world_size": world, "layout": layout or {}, "arch": arch, "files": files}
        write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        write_atomic(ckpt_dir / "latest", tag_dir.name)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete the oldest tags beyond the newest ``keep`` (none when ``keep`` is 0), each with its
    universal copy, and universal copies whose source is gone."""
    tags = _tags(ckpt_dir)
    for old in tags[:max(len(tags) - keep, 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    universal = ckpt_dir / UNIVERSAL
    for copy in universal.iterdir() if universal.is_dir() else []:
        if not (ckpt_dir / copy.name).is_dir():
            shutil.rmtree(copy, ignore_errors=True)


# Architecture keys added after checkpoints were first written, with the value those checkpoints had.
ARCH_ADDED = {"head_bn": True, "con_token": "cls"}


def _refusal(tag_dir: Path, manifest: dict, world: int, arch: dict, zero_stage: int) -> None:
    """Raise :class:`CheckpointError` when this run (``arch``, ``world`` processes, ZeRO stage) must
    not resume the complete tag ``tag_dir``."""
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


def resumable_tag(ckpt_dir: Path, arch: dict, world: int, zero_stage: int) -> Path | None:
    """The newest complete tag the run wrote that this run (``arch``, ``world`` processes, ZeRO stage)
    can resume, or None if there is none; needs no engine, so it is checked before one is built.

    A damaged or incomplete tag is skipped with a warning naming it; a checkpoint of another
    model or another world size raises :class:`CheckpointError`.
    """
    tags = _tags(ckpt_dir)
    for tag_dir in [t for t in tags if _manifest_or_none(t) is None]:  # ordered first, as oldest: say so now
        log.warning("skipping checkpoint %s: %s", tag_dir, _damage(tag_dir))
    for tag_dir in reversed([t for t in tags if _manifest_or_none(t) is not None]):
        problem = _damage(tag_dir)
        if problem:
            log.warning("skipping checkpoint %s: %s", tag_dir, problem)
            continue
        _refusal(tag_dir, read_manifest(tag_dir), world, arch, zero_stage)
        return tag_dir
    return None


def needs_conversion(manifest: dict, world: int, zero_stage: int) -> bool:
    """Whether a tag with ``manifest`` lays out its optimizer state otherwise than this run does
    (ZeRO-0 state is whole, so another number of processes alone does not count)."""
    saved = manifest.get("layout", {}).get("zero_stage")
    if saved not in (0, 1, 2) or zero_stage not in (0, 1, 2):
        return False
    return saved != zero_stage or (saved > 0 and manifest["world_size"] != world)


def _manifest_hash(tag_dir: Path) -> str:
    return hashlib.sha256((tag_dir / MANIFEST).read_bytes()).hexdigest()


def universal_copy(tag_dir: Path, wait: timedelta | None = None) -> Path:
    """``tag_dir`` in the universal layout at ``checkpoints/universal/<tag>``: converted by rank 0
    unless a copy of this very tag (its manifest's hash) is there, while the others wait (up to
    ``wait``; None: the process group's timeout). A ZeRO-0 tag from before the parameter names
    were saved is refused before anything is written."""
    out = tag_dir.parent / UNIVERSAL / tag_dir.name
    source = {"source": tag_dir.name, "manifest_sha256": _manifest_hash(tag_dir)}

    def convert() -> None:
        try:
            recorded = json.loads((out / CONVERTED).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded is not None and all(recorded.get(k) == v for k, v in source.items()):
            return
        zero0 = read_manifest(tag_dir)["layout"].get("zero_stage") == 0
        states = torch.load(tag_dir / ZERO0_STATES, map_location="cpu", weights_only=False) if zero0 else None
        if zero0 and NAMES not in states:
            raise CheckpointError(f"{tag_dir} predates the parameter names a conversion to ZeRO 1-2 needs: resume it "
                                  "with ds.zero_stage=0, then save again")
        log.info("converting %s for another ZeRO layout into %s (DeepSpeed universal checkpoint)%s ...", tag_dir, out,
                 "; the copy there was of an earlier tag of that name" if recorded else "")
        start = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)
        if zero0:
            write_from_zero0(tag_dir, states, out)
        else:
            convert_partitioned(tag_dir, out)
        for own in [*tag_dir.glob("rank*_state.pt"), tag_dir / MANIFEST]:
            shutil.copy2(own, out / own.name)
        write_atomic(out / CONVERTED, json.dumps({**source, "seconds": time.perf_counter() - start}))

    decided_by_rank0(convert, wait)
    return out


def load_checkpoint(engine, tag_dir: Path) -> tuple[dict, dict | None]:
    """Restore the tag ``tag_dir`` (see :func:`resumable_tag`): ``(client_state, rank_state)``; the
    rank state is None when the tag was written by another number of processes (it is per rank)."""
    universal, zero = tag_dir.parent.name == UNIVERSAL, engine.zero_optimization_stage()
    names = optimizer_param_names(engine)
    if universal and zero == 0 and names is None:
        raise CheckpointError(f"{tag_dir}: only the fast step's optimizer (train.fast_step=true) loads a checkpoint "
                              "converted from ZeRO 1-2 into ZeRO-0")
    # DeepSpeed reads load_universal_checkpoint when loading only; ZeRO-0 has no universal loader: ours fills it
    engine._config.load_universal_checkpoint = universal and zero > 0
    path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                load_optimizer_states=not (universal and zero == 0))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    if universal and zero == 0:
        load_into_optimizer(engine.optimizer, names, tag_dir)
    saved_world = read_manifest(tag_dir)["world_size"]
    rank_state = None
    if saved_world == dist.get_world_size():
        rank_state = torch.load(tag_dir / f"rank{dist.get_rank()}_state.pt", map_location="cpu", weights_only=False)
    log.info("resumed from %s%s", tag_dir, "" if rank_state else f" (written by {saved_world} processes)")
    return client_state, rank_state
