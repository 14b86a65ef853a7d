"""What the Triton kernels here share: the interpreter flag, ``tl.dot`` operand dtypes, autotune
tables, reading patch tiles out of an image, and the registration that lets ``torch.compile``
trace through a kernel's op."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU: kernels run in Triton's interpreter


def tensor_core_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the input's, except fp32 for bf16 under the interpreter (wrong there)."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not INTERPRET:
        return tl.bfloat16
    return tl.float32


def autotune_configs(gpu: list[tuple[int, ...]], names: tuple[str, ...] = ("BLOCK_M", "BLOCK_N"),
                     interpret: tuple[int, ...] | None = None) -> list:
    """Autotune candidates from rows ``(*meta-parameters named by names, warps, stages)`` aimed at
    Hopper; under the interpreter the single row ``interpret`` (default: every block 16) so tests stay fast."""
    table = [(*(interpret or (16,) * len(names)), 1, 1)] if INTERPRET else gpu
    return [triton.Config(dict(zip(names, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1])
            for row in table]


@triton.jit
def load_patches(Img, b, i, j, valid, k, KDIM, s_b, s_c, s_h, s_w, P: tl.constexpr):
    """Elements ``k`` ``[BK]`` (channel-major ``(c, ph, pw)``) of the ``P x P`` patches at ``(i, j)``
    ``[BM]`` of images ``b`` (a scalar or ``[BM]``): ``[BM, BK]``, 0 where ``valid`` is false."""
    corner = b * s_b + i * P * s_h + j * P * s_w  # [BM] top-left pixel
    elem = (k // (P * P)) * s_c + ((k // P) % P) * s_h + (k % P) * s_w  # [BK]
    return tl.load(Img + corner[:, None] + elem[None, :], mask=valid[:, None] & (k < KDIM)[None, :], other=0.0)


def launch(kernel, grid, *args, **constexprs) -> None:
    """Run a Triton ``kernel`` on ``grid`` (a tuple, or a function of the chosen meta-parameters).

    Inside a :func:`kernel_op` called with fake tensors (``torch.compile`` propagating shapes)
    there is nothing to run, and the launch is skipped.
    """
    if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    kernel[grid](*args, **constexprs)


def kernel_op(name: str) -> Callable[[Callable], Callable]:
    """Register a function that allocates outputs and :func:`launch`-es kernels as the op ``symmim::name``.

    ``torch.compile`` keeps the op in its graph as one opaque call (no graph break) and learns its
    output shapes from the same body with the launches skipped. Opaque on purpose: the same path
    runs under the CPU interpreter, where the tests run, and on a GPU; ``triton_op``'s alternative,
    letting Inductor see the kernels, cannot run on the interpreter and breaks on kernels that take
    a dtype as a constexpr (triton-lang/triton#4072). Attach the backward with ``op.register_autograd``.
    """
    def register(fn: Callable) -> Callable:
        op = custom_op(f"symmim::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register
