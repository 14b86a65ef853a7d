"""Host work of one steady-state training step, counted on CPU: the ATen ops that do work and the host syncs.

    python benchmarks/step_ops.py --json benchmarks/results/cpu_step_ops.json
    python benchmarks/step_ops.py --config configs/tiny_cpu.yaml --batch 4     # any preset

A GPU step launches about one kernel per ATen op that computes (the H200 profiler counted 5,347
launches for a step whose CPU count was 6,175), and every host sync (``aten._local_scalar_dense``:
``.item()``, ``bool(tensor)``, ``.tolist()``) stalls the host until the device catches up, so both
counts track how host-bound the step is, without a GPU. Views, allocations and metadata ops are
not counted (they launch nothing); collectives are counted apart.

The preset's real step (``build_training``, DeepSpeed engine, one CPU process) runs for SymMIM
and random-75% masking on three paths: ``fast`` (the preset as given: the fast step, ZeRO-0),
``fast-zero2`` (the fast step under ZeRO-2: fp32 weights under autocast, DeepSpeed's partitions)
and ``legacy-zero2`` (the step before: DeepSpeed's bf16 engine, bf16 weights and fp32 masters
walked tensor by tensor, a host sync deciding every non-finite skip, ZeRO-2 as the preset had
it); each warms up, then one step that logs nothing is counted.
"""
from __future__ import annotations

import gc
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from symmim.benchmarks.common import base_parser, environment, print_table, write_results
from symmim.core.config import load_config
from symmim.core.distributed import init_distributed
from symmim.core.pretrain_step import build_training

VARIANTS = {"symmim": [], "random75": ["mask.strategy=random", "mask.ratio=0.75", "loss.con_weight=0"]}
PATHS = {  # the preset as it is (the fast step, ZeRO-0), the fast step under ZeRO-2, and the step before it
    "fast": [],
    "fast-zero2": ["ds.zero_stage=2"],
    "legacy-zero2": ["train.fast_step=false", "ds.zero_stage=2"],
}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
        "_unsafe_view", "resize_", "set_", "record_stream", "size", "stride", "is_same_size", "_has_compatible_shallow_copy_type"}
SYNC = "_local_scalar_dense"


def launches_nothing(func) -> bool:
    """Views (outputs alias an input, not written), allocations and metadata: no kernel on a GPU."""
    name = func._overloadpacket.__name__
    if name in FREE:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class StepOps(TorchDispatchMode):
    """Counts the ops dispatched while active: ``ops`` (work, by name), ``syncs``, ``collectives``,
    and ``host_reads``: ``Tensor.tolist()`` calls, which copy to the host without dispatching an
    op (a sync on a GPU tensor; on this CPU run it cannot tell a host tensor from a device one)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0
        self.collectives = 0
        self.host_reads = 0
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        counter = self

        def tolist(tensor):
            counter.host_reads += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.namespace
        name = func._overloadpacket.__name__
        if namespace == "c10d":
            self.collectives += 1
        elif name == SYNC:
            self.syncs += 1
        elif not launches_nothing(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_step(tr, images: torch.Tensor, warmup: int = 2) -> StepOps:
    """Ops of one step of ``tr`` (a ``Training``) on ``images`` after ``warmup`` steps."""
    for _ in range(warmup):
        tr.step(images, 1e-4, 0.99)
    counter = StepOps()
    with counter:
        tr.step(images, 1e-4, 0.99)
    return counter


def measure(config: str, overrides: list[str], dist) -> dict:
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    tr = build_training(cfg, dist)
    images = torch.randn(cfg.train.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    counter = count_step(tr, images)
    del tr
    gc.collect()
    return {"ops": counter.total, "syncs": counter.syncs, "host_reads": counter.host_reads,
            "collectives": counter.collectives, "top_ops": dict(counter.ops.most_common(12))}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="vit_b16_symmim", help="preset of the symmim run (random75 derives from it)")
    p.add_argument("--batch", type=int, default=2, help="micro batch (the count does not depend on it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of: " + ", ".join(PATHS))
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if not set(paths) <= set(PATHS):
        p.error(f"--paths {args.paths}: choose from {', '.join(PATHS)}")
    dist = init_distributed("cpu")
    env = environment(torch.device("cpu"))
    rows = []
    for path in paths:
        for variant, var_sets in VARIANTS.items():
            sets = ["train.device=cpu", f"train.batch_size={args.batch}", *args.set, *var_sets, *PATHS[path]]
            print(f"[{variant} / {path}] counting ...", flush=True)
            rows.append({"variant": variant, "path": path, **measure(args.config, sets, dist)})
    by = {(r["variant"], r["path"]): r for r in rows}
    for r in rows:
        legacy = by.get((r["variant"], "legacy-zero2"))
        r["legacy_over_this"] = legacy["ops"] / r["ops"] if legacy else None
    print_table(f"ops per steady-state step ({os.path.basename(args.config)}, batch {args.batch}, one CPU process)", env,
                rows, ["variant", "path", "ops", "syncs", "host_reads", "collectives", "legacy_over_this"])
    for r in rows:
        print(f"  {r['variant']}/{r['path']}: " + ", ".join(f"{k} {v}" for k, v in r["top_ops"].items()))
    fast = by.get(("symmim", "fast"))
    targets = {"symmim_fast_at_most_1200_ops": fast and fast["ops"] <= 1200,
               "symmim_fast_no_host_sync": fast and fast["syncs"] == 0}
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else ('n/a' if v is None else 'MISSED')}")
    record = {"benchmark": "step_ops", "env": env, "config": args.config, "batch": args.batch, "overrides": args.set,
              "rows": rows, "targets": targets}
    write_results(args.json, record, [(f"{r['variant']}/{r['path']}", r["ops"]) for r in rows], "ATen ops per step")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
