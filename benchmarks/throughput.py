"""Training-step throughput: SymMIM vs random-75% masking, optimized vs reference system.

    python benchmarks/throughput.py --config configs/vit_b16_symmim.yaml --batch 64 --json out.json
    python benchmarks/throughput.py --quick            # tiny shapes on CPU: checks the script

Runs side by side (``--runs``, default all four), each the real training step
(``core/pretrain_step.py``, DeepSpeed engine): ``symmim`` and ``random75`` (MAE: random 75% mask, no
contrastive branch), each in the ``optimized`` system (the config's kernels, ``auto`` as
``kernels/dispatch.py`` resolves it, and its step: the fast step in the presets; DALI or
device-resident input) and the ``reference`` one (torch backend for every op, eager attention,
PyTorch loader, DeepSpeed's own bf16 engine). An optimized run that fails is recorded and run again
on torch's ops and SDPA (``fallback`` in its row), so one broken kernel does not lose the figure.
Reports img/s, the time split (data, momentum forward, forward, backward, optimizer, EMA),
analytic FLOPs per image and MFU, peak memory, the projected epoch time, and a profile of each
run: its top ops by device time, how busy the device was and how many kernels it launched per
step (what to fix when a target is missed).
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path


import torch

from symmim.benchmarks.common import base_parser, environment, error_line, print_table, save_partial, write_results
from symmim.core.config import load_config
from symmim.core.distributed import init_distributed, pick_device
from symmim.core.flops import peak_flops, train_flops_per_image
from symmim.core.pretrain_step import PhaseTimer, build_training
from symmim.data.views import Views

VARIANTS = {"symmim": [], "random75": ["mask.strategy=random", "mask.ratio=0.75", "loss.con_weight=0"]}
SYSTEMS = {
    "optimized": [],  # the config's kernels (auto in the presets); --set kernels.attention=... picks another
    # eager ops, the PyTorch loader and DeepSpeed's own bf16 engine: the step without our optimizations
    "reference": ["kernels.backend=torch", "kernels.attention=torch", "data.loader=torch",
                  "train.fast_step=false"],
}
FALLBACK = ["kernels.backend=torch", "kernels.attention=sdpa"]  # a failed optimized run, again without our kernels
RUNS = [f"{variant}/{system}" for system in SYSTEMS for variant in VARIANTS]
PHASES = ("data", "momentum_forward", "forward", "backward", "optimizer", "ema")
IMAGENET_TRAIN = 1_281_167


def _batches(cfg, dist, synthetic: bool):
    """Endless training batches: one device-resident random batch, or the configured loader."""
    if synthetic:
        images = torch.randn(cfg.train.batch_size, 3, cfg.model.img_size, cfg.model.img_size, device=dist.device)
        if cfg.data.key_view != "same":  # the momentum branch's view of its own
            images = Views(images, torch.randn_like(images))
        while True:
            yield images
    from symmim.data.loader import build_train_loader

    loader = build_train_loader(cfg.data, cfg.model.img_size, cfg.train.batch_size, cfg.train.seed, dist.rank, dist.world,
                                dist.device)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def top_ops(tr, batches, device: torch.device, steps: int, step_ms: float, top: int = 10) -> dict:
    """Where the time goes over ``steps`` profiled steps: the ops with most host time and, on a
    GPU, the kernels with most device time, how many the device ran per step (kernels, copies,
    memsets: the launches) and how busy it was against an unprofiled step's wall time (below 1:
    the host, launching and syncing, is the limit)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            tr.step(next(batches), 1e-4, 0.99)
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()

    def table(kind: DeviceType, attr: str) -> tuple[list[dict], float]:
        events = sorted((e for e in averages if e.device_type == kind), key=lambda e: getattr(e, attr), reverse=True)
        total_ms = sum(getattr(e, attr) for e in events) / 1e3 / steps
        return [{"name": e.key[:90], "ms_per_step": getattr(e, attr) / 1e3 / steps, "calls_per_step": e.count / steps,
                 "share": getattr(e, attr) / 1e3 / steps / total_ms} for e in events[:top]], total_ms

    host_ops, _ = table(DeviceType.CPU, "self_cpu_time_total")
    if not cuda:
        return {"ops": host_ops, "host_ops": host_ops, "busy_ms_per_step": None, "device_busy_frac": None,
                "launches_per_step": None}
    kernels, busy_ms = table(DeviceType.CUDA, "self_device_time_total")  # kernels only: their ops would count twice
    launches = sum(e.count for e in averages if e.device_type == DeviceType.CUDA) / steps
    return {"ops": kernels, "host_ops": host_ops, "busy_ms_per_step": busy_ms, "device_busy_frac": busy_ms / step_ms,
            "launches_per_step": launches}


def measure(cfg, dist, steps: int, warmup: int, synthetic: bool, profile_steps: int) -> dict:
    """Throughput of the real step, then a separately timed pass for the phase split and,
    with ``profile_steps``, a profiled pass."""
    tr = build_training(cfg, dist)
    batches = _batches(cfg, dist, synthetic)
    device = dist.device
    for _ in range(warmup):
        tr.step(next(batches), 1e-4, 0.99)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = tr.step(next(batches), 1e-4, 0.99)
    float(out["loss"].detach())  # wait for the device
    step_s = (time.perf_counter() - t0) / steps
    timer = PhaseTimer(device)
    split_steps = max(1, steps // 2)
    for _ in range(split_steps):
        timer.start()
        images = next(batches)
        timer.mark("data")
        tr.step(images, 1e-4, 0.99, timer)
    total = sum(timer.totals.values())
    batch = cfg.train.batch_size
    row = {
        "img_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "gflop_per_img": train_flops_per_image(cfg) / 1e9,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "backends": tr.backends.describe(),
        "step": tr.describe(),
        "split": {p: timer.totals.get(p, 0.0) / total for p in PHASES},
    }
    if profile_steps:
        row["profile"] = top_ops(tr, batches, device, profile_steps, row["step_ms"])
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="vit_b16_symmim", help="preset of the symmim run (random75 derives from it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run (the reference system keeps the torch backends)")
    p.add_argument("--batch", type=int, help="micro batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--input", choices=["synthetic", "data", "photos"], default="synthetic",
                   help="device-resident batches, the config's data loader, or that loader on --photos generated "
                        "photo-like JPEGs (benchmarks/dataloader.py's, ImageNet-sized)")
    p.add_argument("--photos", type=int, default=4096, help="with --input photos: how many (generated once, cached)")
    p.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN, help="images per epoch for the projection")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated VARIANT/SYSTEM runs, in order, of: " + ", ".join(RUNS))
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler for the top-ops table (0: none)")
    p.add_argument("--quick", action="store_true", help="tiny_cpu shapes, 2 steps, 16 photos: checks the script on CPU")
    args = p.parse_args()
    runs = args.runs.split(",")
    if not set(runs) <= set(RUNS):
        p.error(f"--runs {args.runs}: choose from {', '.join(RUNS)}")
    device = pick_device(args.device)
    overrides = [f"train.device={device.type}", *args.set]
    if args.quick:
        args.config, args.steps, args.warmup, args.batch, args.photos = "tiny_cpu", 2, 1, args.batch or 8, 16
        overrides += ["train.precision=fp32"]
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.input == "photos":
        from symmim.benchmarks.dataloader import ensure_photos

        overrides.append(f"data.root={ensure_photos(load_config(args.config, overrides).data.cache_dir, args.photos)}")
    dist = init_distributed(device.type)
    env = environment(dist.device)
    peak = peak_flops(env["device"])
    rows, failed = [], []
    for run in runs:
        variant, system = run.split("/")
        for fallback in (False, True):  # the second pass only after a failure of our kernels
            save_partial(args.json, {"benchmark": "throughput", "env": env, "rows": rows, "failed": failed})
            cfg = load_config(args.config, overrides + VARIANTS[variant] + SYSTEMS[system] + (FALLBACK if fallback else []))
            label = f"{variant} / {system}" + (" on torch ops and SDPA (fallback)" if fallback else "")
            print(f"[{label}] {cfg.model.size} {cfg.model.img_size}px batch {cfg.train.batch_size} "
                  f"{cfg.train.precision}, {args.input} input ...", flush=True)
            try:
                row = measure(cfg, dist, args.steps, args.warmup, args.input == "synthetic", args.profile_steps)
            except Exception as err:  # noqa: BLE001 - recorded; the other runs still go, exit code 1
                error = error_line(err)
                print(f"FAILED {label}: {error}", file=sys.stderr)
                failed.append({"variant": variant, "system": system, "fallback": fallback, "error": error})
                gc.collect()
                if system == "optimized" and not fallback and (cfg.kernels.backend, cfg.kernels.attention) != ("torch", "sdpa"):
                    continue  # the same run again, without our kernels
                break
            row = {"variant": variant, "system": system, "fallback": fallback, **row}
            row["tflops"] = row["gflop_per_img"] * row["img_per_s"] / 1e3
            row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
            row["epoch_h"] = args.dataset_size / row["img_per_s"] / 3600
            rows.append(row)
            for op in row.get("profile", {}).get("ops", [])[:6]:
                print(f"    {op['ms_per_step']:8.2f} ms/step {100 * op['share']:5.1f}%  x{op['calls_per_step']:g}  {op['name']}")
            break
    by = {(r["variant"], r["system"]): r for r in rows}

    def ratio(num: tuple[str, str], den: tuple[str, str], key: str) -> float | None:
        return by[num][key] / by[den][key] if num in by and den in by else None  # None: a run failed

    ratios = {
        "symmim_opt_vs_random75_ref_epoch": ratio(("random75", "reference"), ("symmim", "optimized"), "epoch_h"),
        "symmim_opt_vs_ref_speedup": ratio(("symmim", "optimized"), ("symmim", "reference"), "img_per_s"),
        "random75_opt_vs_ref_speedup": ratio(("random75", "optimized"), ("random75", "reference"), "img_per_s"),
        "symmim_vs_random75_flops": ratio(("symmim", "optimized"), ("random75", "optimized"), "gflop_per_img"),
    }
    epoch_ratio, mfu = ratios["symmim_opt_vs_random75_ref_epoch"], by.get(("symmim", "optimized"), {}).get("mfu")
    targets = {
        "symmim_epoch_not_slower_than_reference_mae75": None if epoch_ratio is None else epoch_ratio >= 1.0,
        "symmim_mfu_at_least_45pct": None if mfu is None else mfu >= 0.45,
    }
    table = [{**r, **{f"{k}%": round(100 * v, 1) for k, v in r["split"].items()},
              "busy%": round(100 * r["profile"]["device_busy_frac"], 1) if r.get("profile", {}).get("device_busy_frac") else None,
              "launches": r.get("profile", {}).get("launches_per_step")}
             for r in rows]
    print_table(f"training-step throughput ({args.input} input, {Path(args.config).name})", env, table,
                ["variant", "system", "img_per_s", "step_ms", "gflop_per_img", "tflops", "mfu", "epoch_h", "peak_mem_gib"]
                + [f"{p}%" for p in PHASES] + ["busy%", "launches", "fallback"])
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else f'{v:.2f}x'}")
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else ('n/a' if v is None else 'MISSED')}")
    record = {"benchmark": "throughput", "env": env, "config": args.config, "overrides": overrides, "input": args.input,
              "steps": args.steps, "rows": rows, "failed": failed, "ratios": ratios, "targets": targets}
    write_results(args.json, record, [(f"{r['variant']}/{r['system']}" + (" (torch ops)" if r["fallback"] else ""),
                                       r["img_per_s"]) for r in rows], "images / s")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
