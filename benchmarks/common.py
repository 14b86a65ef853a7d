"""Shared pieces of the benchmark scripts: timing, environment record, table, JSON, bar plot.

Every benchmark prints what it compared, on which device, with which versions and commit,
and the ratios; ``--json PATH`` writes the same record, and a PNG bar chart beside it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    """This tree's git commit (+dirty when changed); ``SYMMIM_COMMIT`` overrides it, for copies
    whose git metadata is stale, as on the device tool's machine."""
    if commit := os.environ.get("SYMMIM_COMMIT"):
        return commit
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """Device, library versions and git commit of this run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "triton", "deepspeed", "nvidia-dali-cuda120", "nvidia-dali-cuda130",
                                                     "xformers")},
    }


def print_table(title: str, env: dict, rows: list[dict], columns: list[str]) -> None:
    print(f"\n== {title} ==")
    print(f"device: {env['device']} | commit {env['commit']} | {env['date']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}  # rows may be empty
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def write_results(path: str | None, record: dict, bars: list[tuple[str, float]] | None = None, ylabel: str = "") -> None:
    """Write ``record`` as JSON to ``path`` and, given bars, a PNG chart beside it."""
    if not path:
        return
    path = Path(path)
    _write_json(path, record)
    if bars:
        plot_bars(path.with_suffix(".png"), record["benchmark"], record["env"]["device"], bars, ylabel)
    print(f"wrote {path}")


def save_partial(path: str | None, record: dict) -> None:
    """The record so far, marked partial: what a run stopped by a time limit leaves behind."""
    if path:
        _write_json(Path(path), {**record, "partial": True})


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for a table or a JSON record."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def plot_bars(path: Path, title: str, device: str, bars: list[tuple[str, float]], ylabel: str) -> None:
    """Bar chart; each bar labelled with its ratio to the first one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = zip(*bars)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars)), 4))
    ax.bar(range(len(values)), values, color="#4878a8")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v / values[0]:.2f}x" if values[0] else "", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="also write the results as JSON (and a PNG chart beside it)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda when available")
    return p

