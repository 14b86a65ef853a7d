"""Export a pre-training run's encoder: fp32 safetensors with timm's ViT names, plus its architecture.

    symmim-export runs/b16 --out exports/b16.safetensors            # latest checkpoint
    symmim-export runs/b16 --tag step00012345 --out exports/b16_12345.safetensors

Writes FILE.safetensors (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``,
``norm.*``; consolidated fp32 from any ZeRO stage) and FILE.json (size, width, depth, heads,
patch and image size, MLP ratio, pooling, timm keyword arguments, source run and tag). The
file loads into ``symmim-knn``, ``symmim-linprobe`` and ``symmim-finetune`` (``--weights``)
and into ``timm.models.vision_transformer.VisionTransformer(**json["timm_kwargs"])``.
"""
from __future__ import annotations

import argparse
import logging
import sys


from symmim.core.config import ConfigError
from symmim.core.pretrained import WeightsError, read_run, write_export

log = logging.getLogger("symmim")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="export a run's encoder to safetensors (timm names)")
    p.add_argument("run_dir", help="pre-training run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag, e.g. step00001234 (default: checkpoints/latest)")
    p.add_argument("--out", required=True, help="FILE.safetensors; FILE.json is written beside it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # consolidating ZeRO shards imports it: no chatter
    try:
        state, arch = read_run(args.run_dir, args.tag)
        out, meta = write_export(state, arch, args.out)
    except (WeightsError, ConfigError) as err:
        log.error("%s", err)
        return 2
    log.info("exported %d tensors (%.1fM parameters, %s) from %s %s -> %s and %s", len(state),
             sum(v.numel() for v in state.values()) / 1e6, arch["source"]["weights"], args.run_dir,
             arch["source"]["tag"], out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
