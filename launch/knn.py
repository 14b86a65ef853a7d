"""Weighted kNN accuracy of a pre-trained encoder's frozen features (k = 20, cosine, T = 0.07).

    symmim-knn --config runs/tiny_cpu/config.yaml --weights runs/tiny_cpu
    torchrun --nproc_per_node 8 -m symmim.launch.knn --config configs/vit_b16_symmim.yaml --weights exports/b16.safetensors

The config gives the model (the weights must match it; another image size interpolates the
position embedding), the data set (train/ is the memory bank, val/ the queries) and ``eval.*``
(``knn_k``, ``knn_temperature``, ``pool``: cls|mean, ``batch_size``). Prints top-1 / top-5 and
writes them to OUTPUT_DIR/knn.json (default: the run folder, or the folder of the exported file).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


from symmim.core.config import load_config
from symmim.core.distributed import init_distributed
from symmim.core.knn import knn_accuracy
from symmim.core.pretrained import load_encoder_weights
from symmim.core.engine import DTYPES
from symmim.core.vit import ViTEncoder
from symmim.kernels.dispatch import resolve_backends
from symmim.launch.common import BAD_INPUT, setup_logging

log = logging.getLogger("symmim")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="weighted kNN on frozen encoder features")
    p.add_argument("--config", required=True, help="YAML preset or a run's config.yaml")
    p.add_argument("--weights", required=True, help="pre-training run folder or exported .safetensors")
    p.add_argument("--output-dir", help="where knn.json goes (default: beside the weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    setup_logging(0)
    try:
        cfg = load_config(args.config, args.set)
        dist_info = init_distributed(cfg.train.device, cfg.train.dist_timeout_min, deepspeed=False)
        setup_logging(dist_info.rank)
        m = cfg.model
        encoder = ViTEncoder(m.size, m.img_size, m.patch_size, resolve_backends(cfg.kernels, dist_info.device))
        source = load_encoder_weights(encoder, args.weights, m)
        encoder.to(dist_info.device, DTYPES[cfg.train.precision])
        log.info("kNN (k=%d, T=%g, pool=%s) on %s, %s, %d process(es)", cfg.eval.knn_k, cfg.eval.knn_temperature,
                 cfg.eval.pool, source, cfg.train.precision, dist_info.world)
        start = time.perf_counter()
        result = knn_accuracy(encoder, cfg.eval, cfg.data, m.img_size, dist_info)
    except BAD_INPUT as err:
        log.error("%s", err)
        return 2
    if dist_info.is_main:
        weights = Path(args.weights)
        out = Path(args.output_dir) if args.output_dir else (weights if weights.is_dir() else weights.parent)
        out.mkdir(parents=True, exist_ok=True)
        record = {**result, "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature, "pool": cfg.eval.pool,
                  "weights": source, "seconds": time.perf_counter() - start}
        (out / "knn.json").write_text(json.dumps(record, indent=2) + "\n")
        log.info("kNN top-1 %.2f%%  top-5 %.2f%%  (%.0f s) -> %s", result["knn_top1"], result["knn_top5"],
                 record["seconds"], out / "knn.json")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
