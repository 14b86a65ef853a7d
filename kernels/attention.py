"""Non-causal multi-head attention over ``[B, H, N, d]`` queries, keys and values."""
from __future__ import annotations

import math

from torch import Tensor


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Eager reference: ``softmax(q k^T / sqrt(d)) v``, computed in fp32, cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, N, N]
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # [B, H, N, d]
