"""Pieces every entry point shares: command line, logging, process group, run folder, exit codes."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import secrets
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch.distributed
import yaml

from symmim.core.checkpoint import CheckpointError, needs_conversion, read_manifest, resumable_tag, universal_copy
from symmim.core.config import Config, ConfigError, load_config, save_config
from symmim.core.distributed import DistInfo, all_gather, decided_by_rank0, init_distributed, lost_peer
from symmim.core.loop import TrainingError
from symmim.core.pretrained import WeightsError
from symmim.core.schedules import Schedule
from symmim.data.folder import DataError
from symmim.kernels.dispatch import BackendError

log = logging.getLogger("symmim")


class RunFolderError(ValueError):
    """A run folder that cannot take this launch (it holds another run)."""


BAD_INPUT = (ConfigError, DataError, BackendError, CheckpointError, WeightsError, RunFolderError)
CONFIG_HELP = """configuration: one schema (core/config.py) with sections model, mask, loss, data, optim,
train, ds, kernels, eval, finetune, log. --config takes a YAML preset (a file, or the name of a
shipped one: tiny_cpu, vit_b16_symmim, ...); --set section.key=value overrides any key (values
are YAML); --print-config prints every key of the resolved config and exits."""


def run_parser(description: str, example_config: str) -> argparse.ArgumentParser:
    """``--config``, ``--output-dir``, ``--set``, ``--resume``, ``--print-config`` (and the DeepSpeed
    launcher's ``--local_rank``)."""
    p = argparse.ArgumentParser(description=description, epilog=CONFIG_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML preset or its name, e.g. {example_config}")
    p.add_argument("--output-dir", help="run folder (default runs/<config name>); one run per folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (every key) and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


class RunFolder:
    """A run's folder: one run per folder, one folder that every rank sees, and nothing written into
    it before the launch is accepted.

    A new run into a folder that holds one is refused (``--resume`` continues it, a fresh
    ``--output-dir`` starts another); the launcher checks everything else it can (data, the
    checkpoint to resume) before :meth:`accept` writes ``config.yaml``.
    """

    MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume
        held = [m for m in self.MARKERS if (path / m).exists()]
        if held and not resume:
            raise RunFolderError(f"{path} holds a run already ({', '.join(held)}): continue it with --resume, "
                                 "or start this one in a new --output-dir")
        self.previous = load_config(path / "config.yaml") if resume and (path / "config.yaml").is_file() else None

    def check_shared(self, dist_info: DistInfo) -> None:
        """Refuse a job whose ranks do not all see the folder rank 0 sees: rank 0 leaves a token file
        in it, every rank looks for it, and rank 0 removes it again, with the folders it made for it
        while they are empty (another job may have started a run inside one meanwhile)."""
        if dist_info.world == 1:
            return

        def leave_token() -> tuple[str, list[Path]]:
            made = [p for p in [*reversed(self.path.parents), self.path] if not p.exists()]  # outermost first
            token = f".rank0-token-{secrets.token_hex(8)}"
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                (self.path / token).touch()
            except OSError as err:
                raise RunFolderError(f"cannot write into the run folder {self.path}: {err}") from None
            return token, made

        token, made = decided_by_rank0(leave_token)  # every rank returns after rank 0 wrote the token
        sees = torch.tensor([float((self.path / token).is_file())], device=dist_info.device)
        seen = all_gather(sees)  # [world]
        torch.distributed.barrier()
        if dist_info.is_main:
            (self.path / token).unlink()
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:  # not empty: another job writes there
                    break
        blind = [r for r, s in enumerate(seen.tolist()) if not s]
        if blind:
            raise RunFolderError(
                f"rank(s) {', '.join(map(str, blind))} do not see the run folder {self.path} that rank 0 writes: every "
                "node must see one run folder, at the same path on a filesystem they share (NFS, Lustre, ...)")

    def resumable(self, arch: dict, cfg: Config, world: int) -> Path | None:
        """The checkpoint tag to continue from (None: start from scratch), decided by rank 0 for every
        rank, checked against ``arch``, the ZeRO stage and the world size before any engine is built,
        and converted for another ZeRO layout where needed (``checkpoints/universal/<tag>``). On another
        number of processes ``train.grad_accum`` adapts so that the global batch stays what it was."""
        if not self.resume:
            return None

        def decide() -> tuple[Path | None, dict | None]:
            tag = resumable_tag(self.path / "checkpoints", arch, world, cfg.ds.zero_stage)
            return tag, (read_manifest(tag) if tag else None)

        tag, manifest = decided_by_rank0(decide)
        if tag is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.path / "checkpoints")
            return None
        if manifest["world_size"] != world:
            keep_global_batch(cfg, manifest["layout"], manifest["world_size"], world)
        if not needs_conversion(manifest, world, cfg.ds.zero_stage):
            return tag
        return universal_copy(tag, timedelta(minutes=cfg.train.convert_timeout_min))

    def accept(self, cfg: Config, dist_info: DistInfo) -> None:
        """The launch is valid: create the folder and write the resolved ``config.yaml`` (rank 0)."""
        if dist_info.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.path / "config.yaml")


def keep_global_batch(cfg: Config, layout: dict, saved_world: int, world: int) -> None:
    """Set ``train.grad_accum`` so that ``world`` processes keep the global batch a checkpoint of
    ``saved_world`` processes trained with; ConfigError saying what to set when no integer does.
    A micro batch or accumulation the user changed on purpose is left as it is (a new global batch)."""
    t, saved = cfg.train, (layout["batch_size"], layout["grad_accum"])
    global_batch = saved[0] * saved[1] * saved_world
    if (t.batch_size, t.grad_accum) != saved:
        log.warning("resume on %d processes (was %d) with train.batch_size %d x train.grad_accum %d: the global batch "
                    "goes from %d to %d", world, saved_world, t.batch_size, t.grad_accum, global_batch,
                    t.batch_size * t.grad_accum * world)
        return
    if global_batch % (t.batch_size * world):
        raise ConfigError(f"train.grad_accum: no accumulation keeps the global batch of {global_batch} ({saved_world} "
                          f"processes x {saved[0]} x {saved[1]}) on {world} processes of {t.batch_size} images; set "
                          f"train.batch_size to a divisor of {global_batch // world}, or resume on {saved_world} processes")
    t.grad_accum = global_batch // (t.batch_size * world)
    log.info("resume on %d processes (was %d): train.grad_accum %d -> %d keeps the global batch of %d", world,
             saved_world, saved[1], t.grad_accum, global_batch)


def config_changes(previous: Config, cfg: Config) -> dict[str, tuple]:
    """``dotted.key -> (before, now)`` for every key that differs."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "extra" else {f"{prefix}{k}": v})
        return out

    old, new = flat(previous.to_dict()), flat(cfg.to_dict())
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


SCHEDULE_KEYS = ("train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "optim.", "loss.momentum",
                 "finetune.epochs", "finetune.max_steps", "finetune.lr", "finetune.base_lr", "finetune.min_lr",
                 "finetune.warmup_epochs")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings and errors only elsewhere; every line names its rank."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True,
    )


def explain_resume(previous: Config | None, cfg: Config, plan: Callable[[Config], Schedule], step: int) -> None:
    """Say what a resume changes; for keys the schedules depend on, what the schedules now do.
    ``plan`` gives a config's schedule (the lr and momentum curves over this run's steps)."""
    changes = config_changes(previous, cfg) if previous else {}
    if not changes:
        return
    log.warning("resume changes %s", "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if any(k.startswith(SCHEDULE_KEYS) for k in changes):
        old, new = plan(previous), plan(cfg)
        log.warning("the lr and EMA-momentum schedules are re-planned: %d steps (were %d), peak lr %.3g (was %.3g); "
                    "at step %d the lr goes from %.3g to %.3g and the momentum from %.5f to %.5f", new.total_steps,
                    old.total_steps, new.peak_lr, old.peak_lr, step, old.lr(step), new.lr(step), old.momentum(step + 1),
                    new.momentum(step + 1))


def launch(args: argparse.Namespace, train: Callable[[Config, RunFolder, DistInfo], None],
           adjust: Callable[[Config], None] | None = None) -> int:
    """Load the config, check the run folder, join the process group, train (which accepts the
    folder once its own checks pass).

    Returns the process exit code: 0 done (or stopped on request), 2 bad input (config, data,
    weights, checkpoint, backend, run folder), 3 training could not go on (the loss diverged, or
    another process of the job died: its log names the cause), 1 anything else (logged with its
    traceback). A process of a multi-process job does not return: it ends with that code at once
    (:func:`end_process`).
    """
    faulthandler.enable()  # a crash in native code (DALI, NCCL) still leaves a Python traceback
    setup_logging(0)
    world = 1
    try:
        cfg = load_config(args.config, args.set)
        if adjust:
            adjust(cfg)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        folder = RunFolder(Path(args.output_dir or Path("runs") / Path(args.config).stem), args.resume)
        dist_info = init_distributed(cfg.train.device, cfg.train.dist_timeout_min)
        world = dist_info.world
        setup_logging(dist_info.rank)
        train(cfg, folder, dist_info)
        torch.distributed.destroy_process_group()  # a clean exit: no communication thread torn down mid-flight
        code = 0
    except BAD_INPUT as err:
        log.error("%s%s", "config error: " if isinstance(err, ConfigError) else "", err)
        code = 2
    except TrainingError as err:
        log.error("%s", err)
        code = 3
    except Exception as err:
        if lost_peer(err):
            log.error("another process of this job failed, so this one stops (%s); that process's log says why",
                      str(err).splitlines()[0][:300])
            code = 3
        else:
            log.exception("failed")
            code = 1
    if world > 1:
        end_process(code)
    return code


def end_process(code: int) -> NoReturn:
    """Flush the logs and end the process with ``code``, skipping the interpreter's teardown.

    After a multi-process run, gloo's process groups (DeepSpeed keeps references to them past
    ``destroy_process_group``) and the TCP store are torn down at interpreter exit in no fixed
    order; a finished ZeRO-3 run in CI once aborted there ("terminate called without an active
    exception", exit -6) and the launcher reported the job failed. By now every file is written and
    closed, so nothing is lost by not tearing down.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
