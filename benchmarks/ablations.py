"""SymMIM ablations at small scale: every variant pre-trained at equal training time and at equal
epochs, over several seeds; kNN top-1 (mean and spread), epochs done and seconds per epoch.

    python benchmarks/ablations.py --minutes 4 --epochs 20 --seeds 0 1 2 \
        --json benchmarks/results/cpu_ablations.json
    python benchmarks/ablations.py --variants "fixed phase" --extend --json benchmarks/results/cpu_ablations.json
    python benchmarks/ablations.py --dataset digits --json benchmarks/results/cpu_ablations_digits.json
    python benchmarks/ablations.py --variants symmim random75 --modes time --dry-run

Each run is a normal pre-training run (``benchmarks/time_to_accuracy.py``'s: kNN at every epoch
end, k = 20, cosine, the kNN passes outside the budget) of ``--config`` (``configs/tiny_cpu.yaml``
by default) on ``--dataset``: ``embedded`` (the generated default set) or ``digits``
(scikit-learn's 1,797 scanned handwritten digits, 10 classes, shipped inside the package; written
once as a 64 px ImageFolder, a fifth of each class held out for kNN). ``--set data.root=...``
takes any other ImageFolder set.

``time`` mode stops each run after ``--minutes`` of training on the preset's schedule (so a cheaper
variant gets further along it); ``epochs`` mode runs ``--epochs`` epochs whatever they cost, the
schedule spanning them. Variants change only what they name: the mask, the contrastive weight,
temperature and EMA schedule, the heads' BatchNorm and the token they read. ``symmim`` and the
variants of it pin lambda 1 (the ViT presets'; ``tiny_cpu`` trains with 0.1) and take the rest
from the preset: tau 0.2, EMA 0.99 -> 1, BatchNorm heads, CLS. The best kNN top-1 of a run is what
the table compares. ``--extend`` adds variants to an existing ``--json`` of the
same budgets, seeds and data instead of starting a new table.
"""
from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from symmim.benchmarks.common import ROOT, base_parser, environment, print_table, save_partial, write_results
from symmim.benchmarks.time_to_accuracy import knn_curve, pretrain_command
from symmim.core.distributed import pick_device

RANDOM = ["mask.strategy=random", "loss.con_weight=0"]
SYMMIM = ["loss.con_weight=1.0"]  # pinned: the ViT presets' lambda, whatever the run's preset says
VARIANTS = {
    "random75": [*RANDOM, "mask.ratio=0.75"],
    "random50": [*RANDOM, "mask.ratio=0.5"],
    "symmetric, no contrastive": ["loss.con_weight=0"],
    "symmim": SYMMIM,
    "scales swapped (fine 2, coarse 1)": [*SYMMIM, "mask.cell=2", "mask.coarse_cell=1"],
    "scales equal (1, 1)": [*SYMMIM, "mask.coarse_cell=1"],
    "fixed phase": [*SYMMIM, "mask.phase=0"],
    "con_weight 0.1": ["loss.con_weight=0.1"],
    "con_weight 0.3": ["loss.con_weight=0.3"],
    "temperature 0.1": [*SYMMIM, "loss.temperature=0.1"],
    "EMA 0.996 -> 1": [*SYMMIM, "loss.momentum=0.996"],
    "heads without BatchNorm": [*SYMMIM, "model.head_bn=false"],
    "mean token to the heads": [*SYMMIM, "model.con_token=mean"],
}
MODES = ("time", "epochs")
SAME_PLAN = ("config", "dataset", "overrides", "minutes", "epochs", "seeds")  # what --extend requires unchanged


def write_digits(root: Path, size: int = 64) -> Path:
    """scikit-learn's handwritten digits (8x8, 17 grey levels) as an ImageFolder of ``size`` px RGB
    JPEGs under ``root``: every fifth image of a class in ``val/``, the rest in ``train/``."""
    if (root / "val").is_dir():
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("--dataset digits needs scikit-learn (pip install scikit-learn)")
    from PIL import Image

    digits = load_digits()
    seen = [0] * 10
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for image, label in zip(digits.images, digits.target):  # [8, 8] in 0..16
        split = "val" if seen[label] % 5 == 4 else "train"
        seen[label] += 1
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((image * (255 / 16)).round().astype("uint8")).resize((size, size), Image.BICUBIC)
        grey.convert("RGB").save(folder / f"{seen[label]:03d}.jpg", quality=95)
    tmp.rename(root)
    return root


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
    fig.suptitle(f"SymMIM ablations, {record['dataset']} set, {len(record['seeds'])} seeds ({record['env']['device']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def extended(args) -> dict:
    """The record ``--extend`` adds to (empty without it), checked to hold runs of the same plan."""
    if not args.extend:
        return {}
    if not args.json or not Path(args.json).is_file():
        sys.exit("--extend adds to an existing --json table; none given or found")
    previous = json.loads(Path(args.json).read_text())
    previous.setdefault("dataset", "embedded")  # tables written before --dataset
    ours = {"config": args.config, "dataset": args.dataset, "overrides": args.set, "minutes": args.minutes,
            "epochs": args.epochs, "seeds": args.seeds}
    differ = [f"{k} {previous.get(k)!r} there, {ours[k]!r} here" for k in SAME_PLAN if previous.get(k) != ours[k]]
    if differ or sorted(previous["runs"]) != sorted(args.modes):
        sys.exit(f"--extend: {args.json} was run with another plan ({'; '.join(differ) or 'other modes'})")
    return previous


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"), help="pre-training preset of every run")
    p.add_argument("--dataset", choices=("embedded", "digits"), default="embedded",
                   help="the ImageFolder set of every run")
    p.add_argument("--minutes", type=float, default=4.0, help="time mode: training minutes of each run")
    p.add_argument("--epochs", type=int, default=20, help="epochs mode: epochs of each run")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                   help=f"default all: {', '.join(VARIANTS)}")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "ablations"), help="one folder per run (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--extend", action="store_true", help="add these variants to the table in --json")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    data_root = Path(args.runs_dir) / f"data-{args.dataset}"
    if args.dataset != "embedded":
        args.set = [f"data.root={data_root}", *args.set]
    previous = extended(args)
    if args.dataset == "digits" and not args.dry_run:
        write_digits(data_root)
    done = {(mode, v, r["seed"]) for mode, by_variant in previous.get("runs", {}).items()
            for v, rs in by_variant.items() for r in rs}
    plan = [(mode, v, seed) for mode in args.modes for v in args.variants for seed in args.seeds
            if (mode, v, seed) not in done]
    run_dir = Path(args.runs_dir) / args.dataset
    commands = {key: pretrain_command(args.config, run_dir / f"{key[0]}-{key[1]}-{key[2]}".replace(" ", "_"),
                                      run_sets(*key, args), args.device) for key in plan}
    if args.dry_run:
        for cmd in commands.values():
            print(shlex.join(cmd))
        return 0

    runs = {mode: {v: list(rs) for v, rs in previous.get("runs", {}).get(mode, {}).items()} for mode in args.modes}
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
        runs[mode].setdefault(variant, []).append({"seed": seed, **one_run(curve)})
        print(f"   best top-1 {runs[mode][variant][-1]['best_top1']:.1f}% after {curve[-1]['epoch']:.1f} epochs",
              flush=True)
        save_partial(args.json, record(args, previous, runs))  # what an interruption leaves: go on with --extend

    rec = record(args, previous, runs)
    for mode, rows in rec["summary"].items():
        budget = f"{args.minutes} min" if mode == "time" else f"{args.epochs} epochs"
        table = [{"variant": v, **{k: round(x, 2) if isinstance(x, float) else x for k, x in r.items()}}
                 for v, r in rows.items()]
        print_table(f"equal {mode} ({budget} per run, seeds {args.seeds}, {args.dataset}, {Path(args.config).name})",
                    rec["env"], table, list(table[0]))
    write_results(args.json, rec)
    if args.json:
        plot(Path(args.json).with_suffix(".png"), rec)
    return 0


def record(args, previous: dict, runs: dict[str, dict[str, list[dict]]]) -> dict:
    """The table's JSON record: plan, environment, every run and each variant's summary."""
    earlier = previous.get("commands") or ([previous["command"]] if "command" in previous else [])
    return {"benchmark": "ablations", "env": environment(pick_device(args.device)),
            "commands": [*earlier, shlex.join(["python", *sys.argv])], "config": args.config,
            "dataset": args.dataset, "overrides": args.set, "minutes": args.minutes, "epochs": args.epochs,
            "seeds": args.seeds, "variants": {v: VARIANTS[v] for rs in runs.values() for v in rs},
            "summary": {mode: {v: summarise(rs) for v, rs in by_variant.items()} for mode, by_variant in runs.items()},
            "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
