"""Linear probe of a pre-trained encoder (MAE conventions): frozen encoder, BatchNorm without
affine + linear head, LARS, warm-up then cosine; the loop, checkpoints and outputs of
``symmim-finetune``.

    symmim-linprobe --config configs/linprobe_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_lin
    deepspeed --num_gpus 8 --module symmim.launch.linprobe --config configs/vit_b16_linprobe.yaml --weights exports/b16.safetensors
"""
from __future__ import annotations

import sys

from symmim.launch import finetune


def main(argv: list[str] | None = None) -> int:
    return finetune.main(argv, linear_probe=True)


if __name__ == "__main__":
    sys.exit(main())
