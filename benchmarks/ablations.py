"""SymMIM ablations at small scale: every variant pre-trained at equal training time and at equal
epochs, over several seeds; kNN top-1 (mean and spread), epochs done and seconds per epoch.

    python benchmarks/ablations.py --minutes 4 --epochs 20 --seeds 0 1 2 \
        --json benchmarks/results/cpu_ablations.json
    python benchmarks/ablations.py --variants symmim random75 --modes time --dry-run

Each run is a normal pre-training run (``benchmarks/time_to_accuracy.py``'s: kNN at every epoch
end, k = 20, cosine, the kNN passes outside the budget) of ``--config`` (the embedded set with
``configs/tiny_cpu.yaml`` by default; ``--set data.root=...`` for another ImageFolder set).
``time`` mode stops each run after ``--minutes`` of training on the preset's schedule (so a cheaper
variant gets further along it); ``epochs`` mode runs ``--epochs`` epochs whatever they cost, the
schedule spanning them. Variants change only what they name: the mask, the contrastive weight,
temperature and EMA schedule. The best kNN top-1 of a run is what the table compares.
"""
from __future__ import annotations

import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from symmim.benchmarks.common import ROOT, base_parser, environment, print_table, write_results
from symmim.benchmarks.time_to_accuracy import knn_curve, pretrain_command
from symmim.core.distributed import pick_device

RANDOM = ["mask.strategy=random", "loss.con_weight=0"]
VARIANTS = {
    "random75": [*RANDOM, "mask.ratio=0.75"],
    "random50": [*RANDOM, "mask.ratio=0.5"],
    "symmetric, no contrastive": ["loss.con_weight=0"],
    "symmim": [],
    "scales swapped (fine 2, coarse 1)": ["mask.cell=2", "mask.coarse_cell=1"],
    "scales equal (1, 1)": ["mask.coarse_cell=1"],
    "fixed phase": ["mask.phase=0"],
    "con_weight 0.1": ["loss.con_weight=0.1"],
    "con_weight 0.3": ["loss.con_weight=0.3"],
    "temperature 0.1": ["loss.temperature=0.1"],
    "EMA 0.996 -> 1": ["loss.momentum=0.996"],
}
MODES = ("time", "epochs")


def run_sets(mode: str, variant: str, seed: int, args) -> list[str]:
    """The overrides of one run: the variant's, the budget of the mode, the seed, the user's."""
    budget = [f"train.time_limit_min={args.minutes}"] if mode == "time" else [f"train.epochs={args.epochs}"]
    return [*VARIANTS[variant], *budget, f"train.seed={seed}", *args.set]


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (sample standard deviation; 0 for one seed) of a variant's runs."""
    best = [r["best_top1"] for r in runs]
    return {"top1_mean": statistics.mean(best), "top1_std": statistics.stdev(best) if len(best) > 1 else 0.0,
            "top1_min": min(best), "top1_max": max(best), "epochs_mean": statistics.mean(r["epochs"] for r in runs),
            "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in runs), "seeds": len(runs)}


def one_run(curve: list[dict]) -> dict:
    last = curve[-1]
    return {"best_top1": max(p["knn_top1"] for p in curve), "final_top1": last["knn_top1"], "epochs": last["epoch"],
            "wall_s": last["wall_s"], "s_per_epoch": last["wall_s"] / last["epoch"], "curve": curve}


def plot(path: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(record["summary"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = record["summary"][mode]
        names = list(rows)
        ax.barh(range(len(names)), [rows[n]["top1_mean"] for n in names], xerr=[rows[n]["top1_std"] for n in names],
                color=["#c44e52" if n.startswith("random") else "#4878a8" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("best kNN top-1 (%), mean and std over seeds")
        ax.set_title(f"equal {mode}", fontsize=10)
    fig.suptitle(f"SymMIM ablations ({record['env']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"), help="pre-training preset of every run")
    p.add_argument("--minutes", type=float, default=4.0, help="time mode: training minutes of each run")
    p.add_argument("--epochs", type=int, default=20, help="epochs mode: epochs of each run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                   help=f"default all: {', '.join(VARIANTS)}")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "ablations"), help="one folder per run (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    plan = [(mode, v, seed) for mode in args.modes for v in args.variants for seed in args.seeds]
    commands = {key: pretrain_command(args.config, Path(args.runs_dir) / f"{key[0]}-{key[1]}-{key[2]}".replace(" ", "_"),
                                      run_sets(*key, args), args.device) for key in plan}
    if args.dry_run:
        for cmd in commands.values():
            print(shlex.join(cmd))
        return 0

    runs: dict[str, dict[str, list[dict]]] = {mode: {v: [] for v in args.variants} for mode in args.modes}
    for i, ((mode, variant, seed), cmd) in enumerate(commands.items(), 1):
        run_dir = Path(cmd[cmd.index("--output-dir") + 1])
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"== [{i}/{len(plan)}] {mode}: {variant}, seed {seed}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        curve = knn_curve(run_dir) if proc.returncode == 0 else []
        if not curve:
            print(f"{variant} (seed {seed}) failed or logged no kNN: exit {proc.returncode}\n{proc.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
        runs[mode][variant].append({"seed": seed, **one_run(curve)})
        print(f"   best top-1 {runs[mode][variant][-1]['best_top1']:.1f}% after {curve[-1]['epoch']:.1f} epochs",
              flush=True)

    env = environment(pick_device(args.device))
    summary = {mode: {v: summarise(rs) for v, rs in by_variant.items()} for mode, by_variant in runs.items()}
    for mode, rows in summary.items():
        budget = f"{args.minutes} min" if mode == "time" else f"{args.epochs} epochs"
        table = [{"variant": v, **{k: round(x, 2) if isinstance(x, float) else x for k, x in r.items()}}
                 for v, r in rows.items()]
        print_table(f"equal {mode} ({budget} per run, seeds {args.seeds}, {Path(args.config).name})", env, table,
                    list(table[0]))
    record = {"benchmark": "ablations", "env": env, "command": shlex.join(["python", *sys.argv]), "config": args.config,
              "overrides": args.set, "minutes": args.minutes, "epochs": args.epochs, "seeds": args.seeds,
              "variants": {v: VARIANTS[v] for v in args.variants}, "summary": summary, "runs": runs}
    write_results(args.json, record)
    if args.json:
        plot(Path(args.json).with_suffix(".png"), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
