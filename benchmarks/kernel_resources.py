"""Registers, spills and shared memory of every Triton kernel's autotune configs, compiled here for
a GPU architecture (default sm_90, Hopper) without a GPU.

A config that spills registers to local memory, or asks for more shared memory than the chip
has, is one the autotuner can only lose with (or cannot launch); a kernel whose every config
spills at a training shape is slow by construction. This is the part of a kernel profile a
machine without a GPU can take; achieved bandwidth and FLOP/s need ``benchmarks/kernels.py`` on
one. Shapes: ViT-B/16 and ViT-L/16 at 224 px (attention at 50, 99, 197 and 256 tokens, head
dims 64 and 128), batch 64, bf16.

    python benchmarks/kernel_resources.py --json benchmarks/results/sm90_kernel_resources.json
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from symmim.benchmarks.common import base_parser, environment, print_table, write_results
from symmim.kernels import attention, norm_pix_loss, patch_embed
from symmim.kernels.triton_helpers import INTERPRET

POINTER = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32",
           torch.bool: "*i1"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}  # bytes per block the chip allows
B, IMG, PATCH = 64, 224, 16


@dataclass
class Case:
    """One kernel at one shape: runtime arguments (a tensor is its dtype) and the constexprs that
    do not come from the autotune config."""

    kernel: str
    shape: str
    fn: object  # the autotuned kernel
    args: dict
    constexprs: dict


def compile_config(fn, args: dict, constexprs: dict, config, arch: int) -> dict:
    """Compile one config the way a launch would specialise it; its registers, stack and shared memory."""
    jit = fn
    while not isinstance(jit, triton.runtime.jit.JITFunction):
        jit = jit.fn
    consts = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        value = args.get(name)
        if name in consts:
            signature[name] = "constexpr"
        elif isinstance(value, torch.dtype):
            signature[name], attrs[(i,)] = POINTER[value], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton specialises an integer argument of 1 to a constant
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(jit, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", dump))
    return {"regs": int(usage["REG"]), "spill_bytes": int(usage["STACK"]), "shared": compiled.metadata.shared}


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def attention_cases() -> list[Case]:
    cases = []
    for d, heads in ((64, 12), (128, 6)):
        for n in (50, 99, 197, 256) if d == 64 else (99, 197):
            qkv = dict(Q=torch.bfloat16, K=torch.bfloat16, V=torch.bfloat16, s_b=n * 3 * heads * d, s_h=d,
                       s_n=3 * heads * d, s_d=1, H=heads, BH=B * heads, N=n, qk_scale=0.18)
            out = dict(Out=torch.bfloat16, LSE=torch.float32, so_b=n * heads * d, so_h=d, so_n=heads * d, so_d=1)
            grads = dict(DO=torch.bfloat16, sd_b=n * heads * d, sd_h=d, sd_n=heads * d, sd_d=1, sg_b=heads * n * d,
                         sg_h=n * d, sg_n=d, sg_d=1, sm_scale=0.125, DQ=torch.bfloat16, DK=torch.bfloat16,
                         DV=torch.bfloat16)
            shape = dict(HEAD_DIM=d, BLOCK_D=d, DOT=tl.bfloat16)
            tile = dict(shape, BLOCK_N=triton.next_power_of_2(n))
            cases += [Case("attention fwd", f"d={d} N={n}", attention._attn_fwd, {**qkv, **out}, tile),
                      Case("attention bwd dK dV", f"d={d} N={n}", attention._attn_bwd_dkdv, {**qkv, **out, **grads},
                           shape),
                      Case("attention bwd dQ", f"d={d} N={n}", attention._attn_bwd_dq, {**qkv, **out, **grads}, tile)]
    return cases


def patch_embed_cases() -> list[Case]:
    grid = IMG // PATCH
    image = dict(Img=torch.bfloat16, s_b=3 * IMG * IMG, s_c=IMG * IMG, s_h=IMG, s_w=1)
    cases = []
    for width in (768, 1024):
        for name, nv, arithmetic in (("checkerboard", grid * grid // 2, True), ("random 75%", grid * grid // 4, False)):
            visible = dict(Ids=torch.int64, Phase=torch.int64, W_GRID=grid, cell=2, s_ib=nv, s_iv=1)
            dout = dict(DOut=torch.bfloat16, s_ob=nv * width, s_ov=width, s_od=1)
            consts = dict(P=PATCH, ARITHMETIC=arithmetic, DOT=tl.bfloat16)
            shape = f"D={width} {name} ({nv} vis)"
            cases += [
                Case("patch-embed fwd", shape, patch_embed._patch_embed_fwd,
                     dict(**image, **visible, W=torch.bfloat16, Bias=torch.bfloat16, Pos=torch.bfloat16,
                          Out=torch.bfloat16, NV=nv, D=width, KDIM=3 * PATCH * PATCH), consts),
                Case("patch-embed bwd dW db", shape, patch_embed._patch_embed_bwd_params,
                     dict(**image, **visible, **dout, DW=torch.bfloat16, DBias=torch.bfloat16, NV=nv, M=B * nv,
                          D=width, KDIM=3 * PATCH * PATCH), dict(consts, WEIGHT_GRAD=True, BIAS_GRAD=True)),
                Case("patch-embed bwd dpos", shape, patch_embed._patch_embed_bwd_pos,
                     dict(**dout, Shown=torch.int64 if arithmetic else torch.int32, DPos=torch.bfloat16, B=B,
                          N=grid * grid, D=width, W_GRID=grid, cell=2), dict(ARITHMETIC=arithmetic))]
    return cases


def loss_cases() -> list[Case]:
    n, k = (IMG // PATCH) ** 2, 3 * PATCH * PATCH
    block_t, block_k, warps = norm_pix_loss._blocks(k)
    args = dict(Pred=torch.bfloat16, Img=torch.float32, Mask=torch.bool, Count=torch.float32, Partial=torch.float32,
                DPred=torch.bfloat16, N=n, W_GRID=IMG // PATCH, K=k, s_pb=n * k, s_pn=k, s_pk=1, s_b=3 * IMG * IMG,
                s_c=IMG * IMG, s_h=IMG, s_w=1, s_mb=n, s_mn=1, eps=1e-6)
    consts = dict(P=PATCH, NORM_PIX=True, WITH_GRAD=True, BLOCK_T=block_t, BLOCK_K=block_k)
    return [Case("norm-pix loss fwd+grad", f"pred [{B}, {n}, {k}]", _fixed(norm_pix_loss._norm_pix_fwd, warps),
                 args, consts)]


def _fixed(jit, warps: int):
    """A plain ``@triton.jit`` kernel launched with ``warps`` warps, as an autotuner of one config."""
    return triton.runtime.Autotuner(jit, jit.arg_names, [triton.Config({}, num_warps=warps, num_stages=1)], key=[],
                                    reset_to_zero=None, restore_value=None)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT), help="compute capability x10")
    p.add_argument("--kernels", help="comma-separated substrings of kernel names to compile (default: all)")
    args = p.parse_args(argv)
    if INTERPRET:
        p.error("TRITON_INTERPRET=1 swaps the kernels for the interpreter's: run without it")
    if not Path(_cuobjdump()).exists():
        p.error(f"{_cuobjdump()} is missing: this Triton wheel carries no CUDA tools")
    cases = attention_cases() + patch_embed_cases() + loss_cases()
    if args.kernels:
        cases = [c for c in cases if any(k in c.kernel for k in args.kernels.split(","))]
    rows, summary = [], []
    for case in cases:
        found = []
        for config in case.fn.configs:
            usage = compile_config(case.fn, case.args, case.constexprs, config, args.arch)
            fits = usage["spill_bytes"] == 0 and usage["shared"] <= SHARED_LIMIT[args.arch]
            found.append(fits)
            rows.append({"kernel": case.kernel, "shape": case.shape, "config": _describe(config), **usage,
                         "clean": fits})
        summary.append({"kernel": case.kernel, "shape": case.shape, "configs": len(found), "clean": sum(found)})
    env = environment(torch.device("cpu")) | {"target": f"sm_{args.arch}"}
    print_table(f"Triton kernels compiled for sm_{args.arch}", env, rows,
                ["kernel", "shape", "config", "regs", "spill_bytes", "shared", "clean"])
    print_table("configs without spills that fit shared memory", env, summary, ["kernel", "shape", "configs", "clean"])
    bare = [f"{s['kernel']} {s['shape']}" for s in summary if s["clean"] == 0]
    for name in bare:
        print(f"every config spills or overflows shared memory: {name}")
    write_results(args.json, {"benchmark": "kernel_resources", "env": env, "rows": rows, "summary": summary,
                              "no_clean_config": bare})
    return 1 if bare else 0


def _describe(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"


if __name__ == "__main__":
    sys.exit(main())
