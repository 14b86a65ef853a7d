"""Time to accuracy on this machine: SymMIM vs random masking (75%, 50%) under one wall-clock budget.

    python benchmarks/time_to_accuracy.py --minutes 10 --json benchmarks/results/cpu_time_to_accuracy.json
    python benchmarks/time_to_accuracy.py --dry-run      # print the three commands only

Each method is a normal pre-training run (``symmim.launch.pretrain``, one after another, the embedded
data set with ``configs/tiny_cpu.yaml`` by default) with ``train.time_limit_min`` = ``--minutes``
and ``eval.knn_every_epochs=1``: the run logs kNN top-1 / top-5 (k = 20, cosine, T = 0.07) with
its training seconds at each epoch end (and when the budget runs out) to ``metrics.jsonl``; the
kNN passes themselves count neither toward ``wall_s`` nor toward the budget. Methods differ
only in the mask and the loss:

- ``symmim``: the preset's checkerboard masks with the contrastive branch;
- ``random75`` / ``random50``: MAE's random mask at 75% / 50%, no contrastive branch.

The lr schedule of every run spans ``train.epochs`` of the preset (change it with ``--set``), so a
faster method gets further along the same schedule. The script prints, for each method, the
epochs done, final and best kNN top-1, and the seconds to reach a target top-1 (``--target``;
default the lowest of the methods' best, which every method reaches); it plots top-1 against
time (PNG beside ``--json``) and writes the curves as JSON.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from symmim.benchmarks.common import ROOT, base_parser, environment, print_table, write_results
from symmim.core.distributed import pick_device

METHODS = {
    "symmim": [],
    "random75": ["mask.strategy=random", "mask.ratio=0.75", "loss.con_weight=0"],
    "random50": ["mask.strategy=random", "mask.ratio=0.5", "loss.con_weight=0"],
}


def launch_command(launcher: str, config: str, run_dir: Path, sets: list[str], device: str,
                   weights: Path | None = None) -> list[str]:
    """A run of ``symmim.launch.<launcher>`` (``pretrain``, ``finetune``, ``linprobe``) into ``run_dir``
    on ``device`` with ``sets`` applied, without progress bar or reconstruction pictures."""
    sets = [*sets, f"train.device={device}", "log.progress=false", "log.recon_images=0"]
    return [sys.executable, "-m", f"symmim.launch.{launcher}", "--config", config, "--output-dir", str(run_dir),
            *(["--weights", str(weights)] if weights else []), *(a for s in sets for a in ("--set", s))]


def command(args, name: str) -> list[str]:
    """The pre-training command line of one method: kNN at every epoch end."""
    return launch_command("pretrain", args.config, Path(args.runs_dir) / name,
                          [*METHODS[name], *args.set, "eval.knn_every_epochs=1", f"train.time_limit_min={args.minutes}"],
                          args.device)


def knn_curve(run_dir: Path) -> list[dict]:
    """The run's kNN records: ``wall_s``, ``epoch``, ``knn_top1``, ``knn_top5``, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("wall_s", "epoch", "knn_top1", "knn_top5")} for r in records if "knn_top1" in r]


def time_to(curve: list[dict], target: float) -> float | None:
    """Seconds until kNN top-1 first reaches ``target`` (None if it never does)."""
    return next((p["wall_s"] for p in curve if p["knn_top1"] >= target), None)


def plot_curves(path: Path, curves: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([p["wall_s"] / 60 for p in curve], [p["knn_top1"] for p in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("training minutes (kNN passes excluded)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"), help="pre-training preset of every method")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each run")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "time_to_accuracy"), help="one run folder per method (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every method, repeatable")
    p.add_argument("--target", type=float, help="kNN top-1 to time (default: the lowest best top-1 of the methods)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.dry_run:
        for name in args.methods:
            print(shlex.join(command(args, name)))
        return 0

    curves = {}
    for name in args.methods:
        run_dir = Path(args.runs_dir) / name
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== {name}: {args.minutes} min", flush=True)
        proc = subprocess.run(command(args, name), cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name}: pre-training exited with {proc.returncode}", file=sys.stderr)
            return proc.returncode
        curves[name] = knn_curve(run_dir)
        if not curves[name]:
            print(f"{name}: no kNN record in {run_dir / 'metrics.jsonl'}: the budget ended before the first epoch",
                  file=sys.stderr)
            return 1

    target = args.target if args.target is not None else min(max(p["knn_top1"] for p in c) for c in curves.values())
    rows = [{"method": name, "epochs": c[-1]["epoch"], "final_top1": c[-1]["knn_top1"], "final_top5": c[-1]["knn_top5"],
             "best_top1": max(p["knn_top1"] for p in c), f"s_to_{target:.1f}%": time_to(c, target)}
            for name, c in curves.items()]
    env = environment(pick_device(args.device))
    title = f"kNN top-1 vs training time, {args.minutes} min per method ({Path(args.config).name})"
    print_table(title, env, rows, list(rows[0]))
    record = {"benchmark": "time_to_accuracy", "env": env, "command": shlex.join(["python", *sys.argv]),
              "config": args.config, "overrides": args.set, "minutes": args.minutes, "target_top1": target,
              "methods": {name: {"overrides": METHODS[name], "curve": curves[name], **row}
                          for name, row in zip(curves, rows)}}
    write_results(args.json, record)
    if args.json:
        plot_curves(Path(args.json).with_suffix(".png"), curves, f"{title}\n{env['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
