"""What every Triton kernel here shares: the interpreter flag, ``tl.dot`` operand dtypes, autotune tables."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU: kernels run in Triton's interpreter


def tensor_core_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the input's, except fp32 for bf16 under the interpreter (wrong there)."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not INTERPRET:
        return tl.bfloat16
    return tl.float32


def autotune_configs(gpu: list[tuple[int, ...]], names: tuple[str, ...] = ("BLOCK_M", "BLOCK_N")) -> list:
    """Autotune candidates from rows ``(*block sizes named by names, warps, stages)`` aimed at Hopper;
    under the interpreter a single tiny config (blocks of 16) so tests stay fast."""
    table = [(16,) * len(names) + (1, 1)] if INTERPRET else gpu
    return [triton.Config(dict(zip(names, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1])
            for row in table]
