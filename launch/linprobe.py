"""Linear probe of a pre-trained encoder (MAE conventions): frozen encoder, BatchNorm without
affine + linear head, LARS, warm-up then cosine; the loop, checkpoints and outputs of
``launch/finetune.py``.

    python launch/linprobe.py --config configs/linprobe_tiny_cpu.yaml --weights runs/tiny_cpu --output-dir runs/tiny_lin
    deepspeed --num_gpus 8 launch/linprobe.py --config configs/vit_b16_linprobe.yaml --weights exports/b16.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from launch.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(linear_probe=True))
