"""SymMIM ablations at small scale: every variant pre-trained at equal training time and at equal
epochs over several seeds, each encoder judged by kNN, a linear probe and fine-tuning: top-1 of
each (mean and spread), epochs done and seconds per epoch.

    python benchmarks/ablations.py --json benchmarks/results/cpu_ablations.json
    python benchmarks/ablations.py --dataset digits --minutes 0.3 --json benchmarks/results/cpu_ablations_digits.json
    python benchmarks/ablations.py --variants "fixed phase" --extend --json benchmarks/results/cpu_ablations.json
    python benchmarks/ablations.py --variants symmim random75 --modes time --dry-run

A run is a normal pre-training run (``symmim.launch.pretrain``) of ``--config``
(``configs/tiny_cpu.yaml`` by default) on ``--dataset``: ``embedded`` (the generated default set),
``digits`` (scikit-learn's 1,797 scanned handwritten digits, 10 classes, shipped inside the package;
written once as a 64 px ImageFolder, a fifth of each class held out) or the path of an ImageFolder
tree with train/ and val/. Its final encoder is then judged three ways, each on val/:

- ``knn``: the run's kNN pass at its end (k = 20, cosine, train/ as the bank), outside the budget;
- ``linprobe``: ``symmim.launch.linprobe`` with ``--linprobe-config`` (configs/linprobe_ablation.yaml);
- ``finetune``: ``symmim.launch.finetune`` with ``--finetune-config`` (configs/finetune_ablation.yaml);

the two evaluations are short fixed schedules, in folders inside the run's, top-1 at their end.
A variant and a budget change pre-training only, so every encoder is judged by the same recipe;
the seed and ``--set`` (the model, the data, ...) apply to pre-training and evaluations alike.

``time`` mode stops each pre-training after ``--minutes`` of training on the preset's schedule (so
a cheaper variant gets further along it); ``epochs`` mode runs each of ``--epochs`` epochs whatever
they cost, the schedule spanning them. Variants change only what they name: the mask, the
contrastive weight, temperature and EMA schedule, the heads' BatchNorm and the token they read,
the momentum branch's view (``data.key_view``); ``untrained (lr 0)`` judges the seed's initial
encoder, the floor every evaluation starts from. ``symmim`` and the variants of it pin lambda 1 (the
ViT presets'; ``tiny_cpu`` trains with 0.1) and the key view ``same`` unless they name another,
and take the rest from the preset: tau 0.2, EMA 0.99 -> 1, BatchNorm heads, CLS, the shift of
``shifted``. ``--variants table`` (the default) is the README's table, ``all`` every variant.
``--extend`` adds variants to an existing ``--json`` of the same plan instead of starting a new
table; the JSON is rewritten after every run, so an interruption loses only the run in progress.
What a table costs on 2 CPU cores: README, "SymMIM at small scale", "What a table costs".
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from symmim.benchmarks.common import ROOT, base_parser, environment, print_table, save_partial, write_results
from symmim.benchmarks.time_to_accuracy import knn_curve, launch_command
from symmim.core.config import load_config
from symmim.core.distributed import pick_device

RANDOM = ["mask.strategy=random", "loss.con_weight=0"]
LAMBDA_1 = "loss.con_weight=1.0"  # pinned: the ViT presets' lambda, whatever the run's preset says
SYMMIM = [LAMBDA_1, "data.key_view=same"]  # and the momentum branch on the online branch's crop
VARIANTS = {
    "random75": [*RANDOM, "mask.ratio=0.75"],
    "random50": [*RANDOM, "mask.ratio=0.5"],
    "symmetric, no contrastive": ["loss.con_weight=0"],
    "symmim": SYMMIM,
    "symmim, key view independent": [LAMBDA_1, "data.key_view=independent"],
    "symmim, key view shifted": [LAMBDA_1, "data.key_view=shifted"],
    "scales swapped (fine 2, coarse 1)": [*SYMMIM, "mask.cell=2", "mask.coarse_cell=1"],
    "scales equal (1, 1)": [*SYMMIM, "mask.coarse_cell=1"],
    "fixed phase": [*SYMMIM, "mask.phase=0"],
    "con_weight 0.1": ["loss.con_weight=0.1"],
    "con_weight 0.3": ["loss.con_weight=0.3"],
    "temperature 0.1": [*SYMMIM, "loss.temperature=0.1"],
    "EMA 0.996 -> 1": [*SYMMIM, "loss.momentum=0.996"],
    "heads without BatchNorm": [*SYMMIM, "model.head_bn=false"],
    "mean token to the heads": [*SYMMIM, "model.con_token=mean"],
    # the floor: the seed's initial encoder (at lr 0 AdamW moves no weight, its decay scales with lr)
    "untrained (lr 0)": ["optim.lr=0", *RANDOM, "mask.ratio=0.75"],
}
GROUPS = {
    "table": ["symmim", "symmim, key view independent", "symmim, key view shifted", "random75", "random50",
              "symmetric, no contrastive", "untrained (lr 0)"],
    "all": list(VARIANTS),
}
MODES = ("time", "epochs")
EVALUATIONS = ("linprobe", "finetune")  # launchers run on every pre-trained encoder
METRICS = ("knn", *EVALUATIONS)
SAME_PLAN = ("config", "linprobe_config", "finetune_config", "dataset", "overrides", "minutes", "epochs", "seeds")


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


def data_root(args) -> str:
    """``data.root`` of ``--dataset``: null (the embedded set), the digits folder, or the path."""
    if args.dataset == "embedded":
        return "null"
    return str(Path(args.runs_dir) / "data-digits") if args.dataset == "digits" else args.dataset


def budgets(args) -> dict[str, list[str]]:
    """The pre-training overrides of each budget the table compares, by label (``1.2 min``,
    ``8 epochs``). kNN runs once, at the end: its interval is the schedule's length."""
    out = {}
    if "time" in args.modes:
        schedule = load_config(args.config, args.set).train.epochs
        out[f"{args.minutes:g} min"] = [f"train.time_limit_min={args.minutes}", f"eval.knn_every_epochs={schedule}"]
    if "epochs" in args.modes:
        out.update({f"{e} epochs": [f"train.epochs={e}", f"eval.knn_every_epochs={e}"] for e in args.epochs})
    return out


def run_commands(budget: list[str], name: str, variant: str, seed: int, args) -> dict[str, list[str]]:
    """The command lines of one run, in order: its pre-training, then each evaluation of its encoder."""
    run_dir = Path(args.runs_dir) / Path(args.dataset).name / re.sub(r"[^\w.-]+", "_", f"{name}-{variant}-{seed}")
    shared = [*args.set, f"train.seed={seed}"]
    pretrain = launch_command("pretrain", args.config, run_dir, [*VARIANTS[variant], *budget, *shared], args.device)
    evaluations = {e: launch_command(e, getattr(args, f"{e}_config"), run_dir / e, shared, args.device, weights=run_dir)
                   for e in EVALUATIONS}
    return {"pretrain": pretrain, **evaluations}


def execute(commands: dict[str, list[str]]) -> dict:
    """Run one run's commands in order (its folder replaced); its record: final kNN, each
    evaluation's top-1, epochs, training seconds, and the seconds each command took."""
    run_dir = Path(commands["pretrain"][commands["pretrain"].index("--output-dir") + 1])
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = {}
    for name, cmd in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
        if proc.returncode:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    curve = knn_curve(run_dir)
    if not curve:
        raise RuntimeError(f"pretrain logged no kNN in {run_dir / 'metrics.jsonl'}")
    last = curve[-1]
    evaluated = {e: json.loads((run_dir / e / "results.json").read_text())["top1"] for e in EVALUATIONS}
    return {"knn_top1": last["knn_top1"], **{f"{e}_top1": top1 for e, top1 in evaluated.items()},
            "epochs": last["epoch"], "wall_s": last["wall_s"], "s_per_epoch": last["wall_s"] / last["epoch"],
            "seconds": seconds}


def summarise(runs: list[dict]) -> dict:
    """Each evaluation's top-1 over a variant's runs: mean, spread (sample standard deviation; 0 for
    one seed), min and max; epochs done, seconds per training epoch, seconds per run (all commands)."""
    out = {}
    for metric in METRICS:
        top1 = [r[f"{metric}_top1"] for r in runs]
        out.update({f"{metric}_mean": statistics.mean(top1),
                    f"{metric}_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    f"{metric}_min": min(top1), f"{metric}_max": max(top1)})
    return {**out, "epochs_mean": statistics.mean(r["epochs"] for r in runs),
            "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in runs),
            "s_per_run": statistics.mean(sum(r["seconds"].values()) for r in runs), "seeds": len(runs)}


def plot(path: Path, record: dict) -> None:
    """One panel per budget (rows) and evaluation (columns): each variant's mean top-1 and spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(record["summary"])
    row_height = 1.2 + 0.3 * len(record["variants"])
    fig, axes = plt.subplots(len(labels), len(METRICS), figsize=(4.5 * len(METRICS), row_height * len(labels)),
                             squeeze=False)
    for row, label in zip(axes, labels):
        rows = record["summary"][label]
        names = list(rows)
        for ax, metric in zip(row, METRICS):
            ax.barh(range(len(names)), [rows[n][f"{metric}_mean"] for n in names],
                    xerr=[rows[n][f"{metric}_std"] for n in names],
                    color=["#c44e52" if n.startswith("random") else "#4878a8" for n in names])
            ax.set_yticks(range(len(names)), names if ax is row[0] else [], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"{metric} top-1 (%), mean and std", fontsize=8)
            ax.set_title(f"{metric}, {label} of pre-training", fontsize=9)
    fig.suptitle(f"SymMIM ablations, {Path(record['dataset']).name} set, {len(record['seeds'])} seeds "
                 f"({record['env']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def same_plan(args) -> dict:
    """What ``--extend`` requires unchanged, as a table records it."""
    return {k: getattr(args, "set" if k == "overrides" else k) for k in SAME_PLAN}


def extended(args, labels: list[str]) -> dict:
    """The record ``--extend`` adds to (empty without it), checked to hold runs of the same plan."""
    if not args.extend:
        return {}
    if not args.json or not Path(args.json).is_file():
        sys.exit("--extend adds to an existing --json table; none given or found")
    previous = json.loads(Path(args.json).read_text())
    ours = same_plan(args)
    differ = [f"{k} {previous.get(k)!r} there, {ours[k]!r} here" for k in SAME_PLAN if previous.get(k) != ours[k]]
    if differ or sorted(previous["runs"]) != sorted(labels):
        sys.exit(f"--extend: {args.json} was run with another plan ({'; '.join(differ) or 'other budgets'})")
    return previous


def parser():
    p = base_parser(__doc__.split("\n\n")[0])
    configs = ROOT / "configs"
    p.add_argument("--config", default=str(configs / "tiny_cpu.yaml"), help="pre-training preset of every run")
    p.add_argument("--linprobe-config", default=str(configs / "linprobe_ablation.yaml"),
                   help="linear-probe preset of every encoder")
    p.add_argument("--finetune-config", default=str(configs / "finetune_ablation.yaml"),
                   help="fine-tuning preset of every encoder")
    p.add_argument("--dataset", default="embedded", help="embedded, digits, or an ImageFolder root (train/, val/)")
    p.add_argument("--minutes", type=float, default=0.4, help="time mode: training minutes of each pre-training")
    p.add_argument("--epochs", nargs="+", type=int, default=[3], help="epochs mode: epochs of each pre-training, "
                   "one budget per value")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    others = [v for v in VARIANTS if v not in GROUPS["table"]]
    p.add_argument("--variants", nargs="+", choices=[*GROUPS, *VARIANTS], default=["table"], metavar="VARIANT",
                   help=f"variants or groups of them ({' | '.join(GROUPS)}); default table: "
                        f"{' | '.join(GROUPS['table'])}; the others: {' | '.join(others)}")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "ablations"), help="one folder per run (replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, pre-training and evaluations")
    p.add_argument("--extend", action="store_true", help="add these variants to the table in --json")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.set = [f"data.root={data_root(args)}", *args.set]
    variants = list(dict.fromkeys(v for name in args.variants for v in GROUPS.get(name, [name])))
    plan_budgets = budgets(args)
    previous = extended(args, list(plan_budgets))
    if args.dataset == "digits" and not args.dry_run:
        write_digits(Path(data_root(args)))
    done = {(label, v, r["seed"]) for label, by_variant in previous.get("runs", {}).items()
            for v, rs in by_variant.items() for r in rs}
    plan = {(label, v, seed): run_commands(overrides, label, v, seed, args)
            for label, overrides in plan_budgets.items() for v in variants for seed in args.seeds
            if (label, v, seed) not in done}
    if args.dry_run:
        for commands in plan.values():
            for cmd in commands.values():
                print(shlex.join(cmd))
        return 0

    runs = {label: {v: list(rs) for v, rs in previous.get("runs", {}).get(label, {}).items()} for label in plan_budgets}
    for i, ((label, variant, seed), commands) in enumerate(plan.items(), 1):
        print(f"== [{i}/{len(plan)}] {label}: {variant}, seed {seed}", flush=True)
        try:
            run = execute(commands)
        except RuntimeError as err:
            print(f"{variant} (seed {seed}, {label}) failed: {err}", file=sys.stderr)
            return 1
        runs[label].setdefault(variant, []).append({"seed": seed, **run})
        print("   " + ", ".join(f"{m} {run[f'{m}_top1']:.1f}%" for m in METRICS) +
              f" after {run['epochs']:.1f} epochs; {sum(run['seconds'].values()):.0f} s", flush=True)
        save_partial(args.json, record(args, previous, plan_budgets, runs))  # interrupted: go on with --extend

    rec = record(args, previous, plan_budgets, runs)
    for label, rows in rec["summary"].items():
        table = [{"variant": v, **{k: round(x, 2) if isinstance(x, float) else x for k, x in r.items()
                                   if not k.endswith(("_min", "_max"))}} for v, r in rows.items()]
        print_table(f"equal {label} of pre-training (seeds {args.seeds}, {args.dataset}, {Path(args.config).name})",
                    rec["env"], table, list(table[0]))
    write_results(args.json, rec)
    if args.json:
        plot(Path(args.json).with_suffix(".png"), rec)
    return 0


def record(args, previous: dict, plan_budgets: dict[str, list[str]], runs: dict[str, dict[str, list[dict]]]) -> dict:
    """The table's JSON record: plan, environment, every run and each variant's summary."""
    return {"benchmark": "ablations", "env": environment(pick_device(args.device)),
            "commands": [*previous.get("commands", []), shlex.join(["python", *sys.argv])],
            **same_plan(args), "budgets": plan_budgets,
            "variants": {v: VARIANTS[v] for rs in runs.values() for v in rs},
            "summary": {label: {v: summarise(rs) for v, rs in by_variant.items()}
                        for label, by_variant in runs.items()},
            "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
