"""The smallest test of the paper's claim that one GPU-day allows: SymMIM against random-75% masking
(MAE) after 100 and after 200 epochs of pre-training, ViT-S/16 on ImageNet-100, each encoder then
fine-tuned and linearly probed; one table.

    python benchmarks/paper_claim.py --imagenet /data/imagenet --json benchmarks/results/h200_paper_claim.json
    python benchmarks/paper_claim.py --estimate     # expected GPU-hours, scaled from measured throughput
    python benchmarks/paper_claim.py --cpu-check    # the same plan, micro model, embedded set, 2 steps a run

ImageNet-100 is the 100 classes of CMC (Tian et al. 2019), listed in ``configs/imagenet100.txt``.
``--imagenet`` names an ImageNet-1K tree with ``train/<wnid>/`` and ``val/<wnid>/`` (val/ sorted into
class folders, as for torchvision's ImageFolder); the subset is built once under ``--data-root`` as
symlinks to those 200 class folders. The runs are ``benchmarks/ablations.py``'s, with this plan:
pre-training ``configs/vit_s16_in100_symmim.yaml``, evaluations ``finetune_vit_s16_in100.yaml`` and
``linprobe_vit_s16_in100.yaml``, variants ``symmim`` and ``random75``, 100 and 200 epochs (each its
own schedule), seed 0, kNN at the end of each pre-training. Every other argument goes to
ablations.py and wins over the plan (``--seeds 0 1``, ``--set KEY=VALUE``, ``--dry-run``,
``--extend``, ``--json``, ...). ``--cpu-check`` runs the whole plan on CPU with a micro model on the
embedded set, two optimizer steps per run: a check of the pipeline before GPU time is spent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from symmim.benchmarks import ablations
from symmim.benchmarks.common import ROOT, print_table
from symmim.core.config import load_config
from symmim.core.flops import encoder_flops, train_flops_per_image

CONFIGS = ROOT / "configs"
PRETRAIN, FINETUNE, LINPROBE = (CONFIGS / f"{name}.yaml" for name in
                                ("vit_s16_in100_symmim", "finetune_vit_s16_in100", "linprobe_vit_s16_in100"))
VARIANTS = ("symmim", "random75")
EPOCHS = (100, 200)
PLAN = ["--config", str(PRETRAIN), "--finetune-config", str(FINETUNE), "--linprobe-config", str(LINPROBE),
        "--modes", "epochs", "--epochs", *map(str, EPOCHS), "--variants", *VARIANTS, "--seeds", "0"]
CPU_CHECK = ["model.size=micro", "model.img_size=32", "model.patch_size=8", "model.decoder_dim=64",
             "model.decoder_depth=1", "model.decoder_heads=4", "model.proj_hidden=64", "model.proj_dim=32",
             "data.loader=torch", "data.workers=0", "train.batch_size=16", "train.precision=fp32",
             "train.max_steps=2", "finetune.max_steps=2", "eval.batch_size=250", "log.tensorboard=false"]
TRAIN_IMAGES = 130_000  # ImageNet-100's train/: at most 1,300 images in each of its 100 classes
MEASURED = ROOT / "benchmarks" / "results" / "h200_throughput.json"


def imagenet100() -> list[str]:
    """The 100 WordNet ids of CMC's ImageNet-100."""
    lines = (line.strip() for line in (CONFIGS / "imagenet100.txt").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_subset(imagenet: Path, out: Path) -> Path:
    """``out/{train,val}/<wnid>``: symlinks to the ImageNet-100 class folders of ``imagenet`` (made once)."""
    missing = [str(imagenet / split / w) for split in ("train", "val") for w in imagenet100()
               if not (imagenet / split / w).is_dir()]
    if missing:
        sys.exit(f"--imagenet {imagenet}: {len(missing)} of the 200 class folders are missing, e.g. {missing[0]} "
                 "(val/ must be sorted into class folders)")
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for w in imagenet100():
            link = out / split / w
            if not link.is_symlink():
                link.symlink_to((imagenet / split / w).resolve(), target_is_directory=True)
    return out


def estimate() -> tuple[dict, list[dict]]:
    """Expected H200 hours of the plan, and the measurement they are scaled from.

    Pre-training: each variant's img/s measured for ViT-B/16 (``h200_throughput.json``: the old
    step, batch 128, bf16) times ViT-B's FLOPs per image over ViT-S's (``core/flops.py``); and, as a
    pessimistic bound (that step was host-bound, and ViT-S has ViT-B's depth, so as many ops per
    step), at ViT-B's img/s. Fine-tuning (3x a full-token forward) and linear probe (1x, frozen encoder): FLOPs
    at the lower FLOP rate of the two measured steps. Evaluation passes (val, kNN) are left out.
    """
    measured = json.loads(MEASURED.read_text())
    rows = {r["variant"]: r for r in measured["rows"] if r["system"] == "optimized"}
    out = []
    for variant in VARIANTS:
        gflop = train_flops_per_image(load_config(PRETRAIN, ablations.VARIANTS[variant])) / 1e9
        vit_b = rows[variant]
        img_s = vit_b["img_per_s"] * vit_b["gflop_per_img"] / gflop
        images = TRAIN_IMAGES * sum(EPOCHS)
        out.append({"run": f"pre-train {variant}, {' + '.join(map(str, EPOCHS))} epochs", "gflop_per_img": gflop,
                    "img_per_s": img_s, "hours": images / img_s / 3600,
                    "hours_at_vit_b_img_s": images / vit_b["img_per_s"] / 3600})
    gflop_s = min(r["img_per_s"] * r["gflop_per_img"] for r in rows.values())
    for name, preset, passes in (("fine-tune", FINETUNE, 3), ("linear probe", LINPROBE, 1)):
        cfg = load_config(preset)
        gflop = passes * encoder_flops(cfg, (cfg.model.img_size // cfg.model.patch_size) ** 2) / 1e9
        runs = len(VARIANTS) * len(EPOCHS)
        out.append({"run": f"{name}, {runs} x {cfg.finetune.epochs} epochs", "gflop_per_img": gflop,
                    "img_per_s": gflop_s / gflop,
                    "hours": runs * TRAIN_IMAGES * cfg.finetune.epochs * gflop / gflop_s / 3600})
    total = {"run": "total", "hours": sum(r["hours"] for r in out),
             "hours_at_vit_b_img_s": sum(r.get("hours_at_vit_b_img_s", r["hours"]) for r in out)}
    return measured, [*out, total]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other arguments go to benchmarks/ablations.py (see its --help).")
    p.add_argument("--imagenet", type=Path,
                   help="ImageNet-1K tree (train/<wnid>/, val/<wnid>/) to build the subset from")
    p.add_argument("--data-root", type=Path, default=ROOT / "runs" / "imagenet100",
                   help="the ImageNet-100 ImageFolder the runs read (built here by --imagenet)")
    p.add_argument("--estimate", action="store_true", help="print the expected GPU-hours and exit")
    p.add_argument("--cpu-check", action="store_true", help="the plan on CPU: micro model, embedded set, 2 steps a run")
    args, rest = p.parse_known_args(argv)
    if args.estimate:
        measured, rows = estimate()
        print_table(f"expected hours on one H200 (an estimate: ViT-S scaled by FLOPs from the ViT-B step of "
                    f"{MEASURED.name}; at_vit_b_img_s: no faster per image than ViT-B)", measured["env"], rows,
                    ["run", "gflop_per_img", "img_per_s", "hours", "hours_at_vit_b_img_s"])
        return 0
    if args.cpu_check:
        data = ["--dataset", "embedded", "--device", "cpu", "--runs-dir", str(ROOT / "runs" / "paper_claim_cpu_check"),
                *(a for s in CPU_CHECK for a in ("--set", s))]
    else:
        if args.imagenet:
            build_subset(args.imagenet, args.data_root)
        data = ["--dataset", str(args.data_root), "--runs-dir", str(ROOT / "runs" / "paper_claim")]
    return ablations.main([*PLAN, *data, *rest])


if __name__ == "__main__":
    sys.exit(main())
