"""The training loop every launcher shares: epochs of micro-batches, the logging window, the
stop policy and checkpoints.

A :class:`Trainer` is what the loop trains (the SymMIM pre-training step, the classifier of
fine-tuning and the linear probe): it runs one micro-batch and owns its state. The loop owns
the :class:`Position` in the run, takes the lr and EMA momentum of each step from the
:class:`~symmim.core.schedules.Schedule`, writes ``metrics.jsonl`` and the progress bar, runs
the periodic :class:`Evaluation`, and saves and restores ``checkpoints/`` with the trainer's
and the loader's state. It stops, with a checkpoint, at the end of the schedule, on SIGTERM or
SIGINT, after ``train.time_limit_min``, and (raising :class:`TrainingError`) after
``train.max_nonfinite`` updates in a row skipped for a non-finite loss.

A step reads nothing back from the device: losses and skipped updates are summed there and
read, with the ranks' stop flags, only when a logging window closes (``log.every_steps``), so a
signal or a time limit is acted on at the next logging step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from symmim.core.checkpoint import load_checkpoint, save_checkpoint, step_tag
from symmim.core.config import LogConfig, TrainConfig
from symmim.core.distributed import DistInfo, mean_across_ranks
from symmim.core.flops import peak_flops
from symmim.core.metrics import MetricsLog, truncate_metrics
from symmim.core.schedules import Schedule

log = logging.getLogger("symmim")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


@dataclass
class Position:
    """Where training stands; saved with every checkpoint."""

    epoch: int = 0
    micro: int = 0  # micro-batches consumed in this epoch (this rank)
    step: int = 0  # optimizer steps
    wall_s: float = 0.0  # training seconds, summed over resumed sessions, evaluation excluded
    images: int = 0  # images consumed in this epoch by all ranks together (set when saved)
    evaluated_step: int = -1  # the step of the last evaluation (-1: none yet)


class Trainer(Protocol):
    """What the loop trains."""

    engine: Any  # the DeepSpeed engine: its state goes into every checkpoint
    loss_names: tuple[str, ...]  # the loss tensors ``train_step`` returns, in logging order

    def train_step(self, batch: Any, lr: float, momentum: float, pos: Position) -> dict:
        """One micro-batch: the loss tensors, ``stepped`` (it ended an accumulation round: the update
        was made or skipped, and the position advances a step either way) and, at a round's end,
        0-dim device tensors (None mid-round): ``skipped``, 1 when the round's update was skipped
        for a non-finite loss or gradient on some rank (then on every rank), and ``grad_norm``,
        the round's global gradient norm before clipping (None where the engine keeps none)."""

    def state_dict(self) -> dict:
        """State every rank shares (saved once, beside the engine's)."""

    def rank_state_dict(self) -> dict:
        """This rank's own state (e.g. its random streams)."""

    def load_state_dict(self, state: dict, rank_state: dict | None) -> None:
        """``rank_state`` is None when the checkpoint was written by another number of processes."""


class Loader(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0, stop_step: int | None = None) -> Iterator: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict | None) -> None:
        """None: the position was written by another number of processes; the next ``epoch`` call
        starts at its ``start_step`` without replaying the batches before it."""


@dataclass
class Evaluation:
    """Metrics computed every ``every_epochs`` epochs, at the end of the run and before a time-limit
    stop; every rank calls ``run``. Its time does not count toward ``wall_s``."""

    run: Callable[[], dict[str, float]]
    every_epochs: int


class StopSignals:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and returns at its next logging step. A
    second signal exits at once, without a checkpoint."""

    def __init__(self):
        self.name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.name is not None:
            log.warning("second %s: exiting now, without a checkpoint (the last one stays)", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.name = name
        log.warning("%s: stopping at the next logging step with a checkpoint; again to exit at once", name)


class _Window:
    """Loss sums, data wait, skipped updates and gradient norms over one logging interval; the sums,
    counts and the run of skipped updates (which outlives a window) stay on the device until logged."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        # loss sums, finite micro-batches, skipped updates, sum of finite gradient norms, their count
        self.stats = torch.zeros(len(names) + 4, device=device)
        self.streak = torch.zeros((), device=device)  # updates skipped in a row
        self.reset()

    def reset(self) -> None:
        self.stats.zero_()
        self.start, self.wait, self.micro = time.perf_counter(), 0.0, 0

    def add(self, out: dict) -> None:
        k = len(self.names)
        losses = torch.stack([out[n] for n in self.names]).detach().float()  # [K]
        finite = torch.isfinite(losses[0])
        self.stats[:k] += torch.where(finite, losses, 0.0)
        self.stats[k] += finite
        if out["skipped"] is not None:
            self.stats[k + 1] += out["skipped"]
            self.streak = (self.streak + out["skipped"]) * out["skipped"]
        if out.get("grad_norm") is not None:
            norm = out["grad_norm"]
            finite_norm = torch.isfinite(norm)
            self.stats[k + 2] += torch.where(finite_norm, norm, 0.0)
            self.stats[k + 3] += finite_norm
        self.micro += 1


class TrainLoop:
    """Trains ``trainer`` on ``loader`` along ``schedule``; run-folder outputs under ``run_dir``."""

    def __init__(self, trainer: Trainer, loader: Loader, schedule: Schedule, run_dir: Path, dist: DistInfo,
                 train: TrainConfig, log_cfg: LogConfig, arch: dict, evaluation: Evaluation | None = None,
                 epoch_end: Callable[[Position], None] | None = None, flops_per_image: float | None = None):
        self.trainer, self.loader, self.schedule, self.dist = trainer, loader, schedule, dist
        self.run_dir, self.train, self.log_cfg, self.arch = run_dir, train, log_cfg, arch
        self.evaluation, self.epoch_end = evaluation, epoch_end
        cuda = dist.device.type == "cuda"
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops(torch.cuda.get_device_name(dist.device)) if cuda else None  # for the MFU field
        self.pos = Position()
        self.saved_step: int | None = None  # the step of this run's newest checkpoint
        self.last_eval: dict[str, float] | None = None
        self.stop = StopSignals()

    # ---- the run ----

    def run(self, resume_from: Path | None = None) -> dict[str, float] | None:
        """Train, continuing from the checkpoint tag ``resume_from`` if given, to the end of the
        schedule or a stop; returns the last evaluation's metrics."""
        if resume_from is not None:
            self._restore(resume_from)
        main = self.dist.is_main
        self.metrics = MetricsLog(self.run_dir, enabled=main, tensorboard=self.log_cfg.tensorboard)
        # A bar on a terminal (log lines go above it); a plain line per logging window otherwise.
        self.interactive = main and self.log_cfg.progress and sys.stderr.isatty()
        self.bar = tqdm(total=self.schedule.total_steps, initial=self.pos.step, unit="step", dynamic_ncols=True,
                        disable=not self.interactive)
        self.window = _Window(self.trainer.loss_names, self.dist.device)
        self.lr, self.last_means = 0.0, None
        self.session_start, self.wall_at_start, self.step_at_start = time.perf_counter(), self.pos.wall_s, self.pos.step
        self.last_ckpt_time = time.perf_counter()
        try:
            with logging_redirect_tqdm():
                while self.pos.step < self.schedule.total_steps and self.pos.epoch < self.schedule.epochs:
                    if self._run_epoch():
                        return self.last_eval
                    self._end_epoch()
                self._summary()
        finally:
            self.bar.close()
            self.metrics.close()
        return self.last_eval

    def _summary(self) -> None:
        """The closing line: what was trained, how fast, where everything is."""
        seconds = self.pos.wall_s - self.wall_at_start
        images = (self.pos.step - self.step_at_start) * self.schedule.accum * self.train.batch_size * self.dist.world
        losses = ", ".join(f"{k} {v:.4f}" for k, v in zip(self.trainer.loss_names, self.last_means or []))
        log.info("done: step %d of %d, %.0f s of training this session (%.0f img/s); final %s; run folder %s "
                 "(checkpoints/latest, metrics.jsonl%s)", self.pos.step, self.schedule.total_steps, seconds,
                 images / max(seconds, 1e-9), losses or "loss not logged", self.run_dir,
                 ", tb/" if self.log_cfg.tensorboard else "")

    def _run_epoch(self) -> bool:
        """Micro-batches to the end of this epoch or of the run; True when a stop request ended the run."""
        pos, schedule, window = self.pos, self.schedule, self.window
        self.trainer.engine.train()
        batches = self.loader.epoch(pos.epoch, pos.micro, schedule.micro_per_epoch)
        while pos.micro < schedule.micro_per_epoch:
            t0 = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - t0
            self.lr = schedule.lr(pos.step)
            out = self.trainer.train_step(batch, self.lr, schedule.momentum(pos.step + 1), pos)
            pos.micro += 1
            window.add(out)
            if not out["stepped"]:
                continue
            pos.step += 1
            pos.wall_s = self.wall_at_start + time.perf_counter() - self.session_start
            self.bar.update(1)
            last = pos.step >= schedule.total_steps
            # the end of the epoch or run saves right after this step: a periodic save here would
            # record the epoch as unfinished, and a resume from it would evaluate the epoch again
            saved_next = last or pos.micro >= schedule.micro_per_epoch
            if pos.step % self.log_cfg.every_steps == 0 or last:
                self._log_window()
                if self._stop(saved_next):
                    return True
            if self.train.ckpt_every_steps and pos.step % self.train.ckpt_every_steps == 0 and not saved_next:
                self._checkpoint()
            if last:
                break
        return False

    def _end_epoch(self) -> None:
        """A finished epoch (or the run's last, partial one): evaluation when due, the epoch hook, a checkpoint."""
        pos = self.pos
        completed = pos.micro >= self.schedule.micro_per_epoch
        if completed:
            pos.epoch, pos.micro = pos.epoch + 1, 0
        ev = self.evaluation
        due = ev and ev.every_epochs and ((completed and pos.epoch % ev.every_epochs == 0)
                                          or pos.step >= self.schedule.total_steps)
        if due and pos.evaluated_step != pos.step:  # not when a time-limit stop evaluated this step before a resume
            self.session_start += self._evaluate()  # wall_s counts training, not evaluation
        if self.epoch_end:
            self.epoch_end(pos)
        self._checkpoint()

    # ---- logging, evaluation ----

    def _epoch_float(self) -> float:
        return self.pos.epoch + self.pos.micro / self.schedule.micro_per_epoch

    def _read_window(self) -> tuple[list[float], int, float | None]:
        """The window's mean losses, skipped updates and mean gradient norm of its finite rounds (None
        without one), averaged over ranks (one host sync); raises TrainingError, after a debug
        checkpoint, once ``train.max_nonfinite`` updates in a row were skipped."""
        w, k = self.window, len(self.window.names)
        stats = mean_across_ranks(torch.cat([w.stats, w.streak[None]])).tolist()  # [K sums, finite, skipped, norms, n, streak]
        finite, skipped, norm_sum, norms, streak = stats[k:]
        means = [s / max(finite, 1.0) for s in stats[:k]]
        if streak >= self.train.max_nonfinite:
            path = self._checkpoint(self.run_dir / "debug")
            raise TrainingError(f"loss non-finite for {int(streak)} updates in a row, last at step {self.pos.step}; "
                                f"debug checkpoint: {path}")
        if skipped:
            log.warning("non-finite loss: %d update(s) skipped in the %d micro-batches up to step %d", skipped,
                        w.micro, self.pos.step)
        return means, int(skipped), norm_sum / norms if norms else None

    def _log_window(self) -> None:
        w, world = self.window, self.dist.world
        means, skipped, grad_norm = self._read_window()
        elapsed = time.perf_counter() - w.start
        img_per_s = w.micro * self.train.batch_size * world / elapsed
        record = {"step": self.pos.step, "epoch": self._epoch_float(), **dict(zip(w.names, means)), "lr": self.lr,
                  **({"grad_norm": grad_norm} if grad_norm is not None else {}), "img_per_s": img_per_s,
                  "data_wait_frac": w.wait / elapsed, "nonfinite_skipped": skipped, "wall_s": self.pos.wall_s}
        if self.flops_per_image and self.peak_flops:
            record["mfu"] = self.flops_per_image * img_per_s / world / self.peak_flops
        self.metrics.log(record)
        self.last_means = means
        if self.interactive:
            self.bar.set_postfix(loss=f"{means[0]:.4f}", img_s=f"{img_per_s:.0f}")
        else:
            log.info("step %d/%d  epoch %.2f  %s  lr %.3g  %.0f img/s", self.pos.step, self.schedule.total_steps,
                     record["epoch"], "  ".join(f"{k} {v:.4f}" for k, v in zip(w.names, means)), self.lr, img_per_s)
        w.reset()

    def _evaluate(self) -> float:
        """Run and log the evaluation; returns the seconds it took."""
        t0 = time.perf_counter()
        self.last_eval = self.evaluation.run()
        self.pos.evaluated_step = self.pos.step
        self.metrics.log({"step": self.pos.step, "epoch": self._epoch_float(), "wall_s": self.pos.wall_s,
                          **self.last_eval})
        log.info("step %d: %s", self.pos.step, ", ".join(f"{k} {v:.2f}" for k, v in self.last_eval.items()))
        return time.perf_counter() - t0

    # ---- stop policy ----

    def _stop(self, saved_next: bool) -> bool:
        """At a logging step: stop (True) on a signal or the time limit, or checkpoint when
        ``train.ckpt_every_min`` is due and the loop does not save right after this step anyway
        (``saved_next``). Every rank must agree: rank 0's clocks decide, a signal on any rank counts."""
        t, now = self.train, time.perf_counter()
        flags = torch.tensor([
            self.stop.name is not None,
            t.time_limit_min > 0 and self.pos.wall_s - self.wall_at_start >= t.time_limit_min * 60,
            t.ckpt_every_min > 0 and now - self.last_ckpt_time >= t.ckpt_every_min * 60,
        ], dtype=torch.float32, device=self.dist.device)
        if self.dist.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, out_of_time, ckpt_due = flags.bool().tolist()
        if signalled or out_of_time:
            if out_of_time and self.evaluation and self.evaluation.every_epochs:
                self._evaluate()  # a budgeted run ends with an evaluation
            path = self._checkpoint()
            reason = (f"received {self.stop.name or 'a stop signal on another rank'}" if signalled
                      else f"time limit of {t.time_limit_min} min reached")
            log.info("%s: stopped at step %d, checkpoint %s; continue with --resume", reason, self.pos.step, path)
            return True
        if ckpt_due and not saved_next:
            self._checkpoint()
        return False

    # ---- checkpoints ----

    def _checkpoint(self, directory: Path | None = None) -> Path:
        """Save the engine, the trainer's and loader's state and the position (every rank) into the
        run's checkpoints, once per step (an epoch's end on a periodic step, a stop right after a
        save or at the step just resumed keep the tag they have), or into ``directory``."""
        if directory is None:
            self.last_ckpt_time = time.perf_counter()
            if self.saved_step == self.pos.step:
                return self.run_dir / "checkpoints" / step_tag(self.pos.step)
            self.saved_step = self.pos.step
        self.pos.images = self.pos.micro * self.train.batch_size * self.dist.world
        shared = {"position": vars(self.pos).copy(), **self.trainer.state_dict()}
        own = {**self.trainer.rank_state_dict(), "loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state()}
        layout = {"zero_stage": self.trainer.engine.zero_optimization_stage(), "batch_size": self.train.batch_size,
                  "grad_accum": self.train.grad_accum}
        path = save_checkpoint(self.trainer.engine, directory or self.run_dir / "checkpoints", self.pos.step, shared, own,
                               self.arch, self.train.keep_checkpoints, layout)
        log.info("checkpoint saved: %s", path)
        return path

    def _restore(self, tag_dir: Path) -> None:
        """Continue from ``tag_dir``; metrics a crashed session logged after it are dropped. The
        optimizer's settings other than the lr (weight decay, betas, ...) are this run's config's.

        Written by another number of processes (ZeRO-0 only), the position carries over in
        images: this run continues the epoch at the same image count, its random streams (torch,
        masks) derived anew from the step and rank, its data order as the loader can resume it.
        """
        optimizer = self.trainer.engine.optimizer
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
        shared, own = load_checkpoint(self.trainer.engine, tag_dir)
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)  # this run's config (weight decay, betas, ...), not the checkpoint's
        self.pos = Position(**shared["position"])
        self.saved_step = self.pos.step
        if self.dist.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.pos.step)
        self.trainer.load_state_dict(shared, own)
        if own is None:
            per_micro = self.train.batch_size * self.dist.world
            self.pos.micro = self.pos.images // per_micro
            torch.manual_seed(1_000_003 * self.pos.step + self.dist.rank)
            self.loader.load_state_dict(None)
            log.info("position carried over in images: epoch %d, %d images in (micro-batch %d on each of %d processes)",
                     self.pos.epoch, self.pos.images, self.pos.micro, self.dist.world)
            return
        torch.set_rng_state(own["torch_rng"])
        self.loader.load_state_dict(own.get("loader", {}))
