#!/usr/bin/env bash
# The one prepared script for a GPU machine session (one H100/H200, minutes of time):
#   1. installs the carried wheels in .whl/ (make them here first: bash benchmarks/gpu_wheels.sh),
#   2. gpu-tests: the whole kernel test suite, compiled for the GPU: every kernel against its
#      reference at the small awkward shapes (odd token counts, 1 token, batch 1, head dims 80
#      and 128) in fp32 and fp16, and the GPU-marked tests: each kernel in bf16 at ViT-B and
#      ViT-L shapes, the whole ViT-B SymMIM model in bf16 (Triton vs torch, both against fp32),
#      the model compiled with the kernels as torch ops,
#   3. timm-export: an exported encoder loads into timm (installed there, not here),
#   4. kernels-bench: benchmarks/kernels.py, each kernel vs its eager reference, attention vs SDPA
#      (its own choice, cuDNN, flash) at 50, 99, 197, 257 tokens; writes $OUT/measured.json, the
#      per-shape winners that kernels.*=auto reads: copy it over kernels/measured.json and commit,
#   5. throughput: benchmarks/throughput.py, ViT-B/16 224 px bf16, batch 128, synthetic input,
#      SymMIM vs random-75%, optimized (the preset's fast step, ZeRO-0) vs reference system (eager
#      ops, DeepSpeed's bf16 engine), with a profile of each run (kernels per step, GPU busy),
#   6. throughput-h200: the optimized system at the H200 preset's batch of 512,
#      throughput-compiled: the same with train.compile=true (torch.compile of the encoders,
#      decoder and heads; the first steps compile),
#   7. throughput-zero2: the optimized system under ZeRO-2 (fp32 weights under autocast),
#   8. throughput-triton-all: the optimized system with every op on our Triton kernels
#      (auto runs what kernels/measured.json says; this shows the all-Triton step beside it),
#   9. with DALI staged (bash benchmarks/gpu_wheels.sh --dali, then ../shared/tools/stage-for-device
#      .dali_whl; skipped without it): dataloader-gpu, benchmarks/dataloader.py on 4096 photo-like
#      500x375 q90 JPEGs, DALI's mixed decoder against PIL + DataLoader with 16 workers, batch 128;
#      dataloader-cpu16, the same with DALI decoding on the 16 CPU cores; throughput-data, the H200
#      preset's step fed by DALI mixed from those JPEGs (compare throughput-h200, synthetic input).
# Everything lands in $OUT (the device tool's output folder; ./gpu_check_out elsewhere):
# gpu_check.log, gpu_tests.xml, gpu_timm.xml, gpu_kernels.*, measured.json, gpu_throughput*.json/.png,
# gpu_dataloader*.json/.png. The data-path steps and the new kernels have not run on a GPU yet.
# Each step has its own time limit and a failing step does not stop the next; the benchmarks
# keep a partial JSON if their limit stops them. All steps took about 7 minutes on an H200
# (gpu-tests 61 s with the first compiles and autotuning, timm 13, kernels 20, throughput
# 129, zero0 117, the optimized-only run 70) when gpu-tests ran the GPU-marked tests only; the
# whole kernel suite compiles and autotunes every small shape too, not yet timed on a GPU, hence
# its 240 s limit. The limits sum to 24.5 minutes, more than a session's device time: name the
# steps that matter (e.g. gpu-tests throughput throughput-h200 throughput-compiled) and leave
# room for a rerun. No CUDA-graph capture of the step exists yet.
#
# Through the device tool, name the commit (the copy's git metadata there can be stale):
#   SYMMIM_COMMIT=<git rev-parse --short HEAD, run here> bash benchmarks/gpu_check.sh
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine: every step
#   bash benchmarks/gpu_check.sh throughput kernels-bench  # some steps
#   bash benchmarks/gpu_check.sh --dry-run             # here, on CPU: the same steps at tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1 && shift
STEPS=("$@")
[ ${#STEPS[@]} = 0 ] && STEPS=(gpu-tests timm-export kernels-bench throughput throughput-h200 throughput-compiled
  throughput-zero2 throughput-triton-all dataloader-gpu dataloader-cpu16 throughput-data)
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if ls .whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ls /tmp/staged/.dali_whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then  # DALI, staged in chunks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/staged/.dali_whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# `symmim` is this tree (no pip install there): a link named symmim on PYTHONPATH
mkdir -p /tmp/symmim_src && ln -sfn "$PWD" /tmp/symmim_src/symmim && export PYTHONPATH=/tmp/symmim_src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L 2>/dev/null
python3 - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY

status=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name ($*)"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc = 0 ] || status=1
}

dali() {  # dali STEP LIMIT_S COMMAND...: a data-path step, skipped (and said so) without DALI
  if python3 -c 'import nvidia.dali' 2>/dev/null; then step "$@"; else echo "== $1: skipped, DALI is not installed (not staged)"; fi
}

if [ $DRY = 1 ]; then  # tiny shapes on CPU, fp32
  tests=(tests/kernels/test_attention.py) kernels=(--quick) throughput=(--quick) h200=(--quick)
  photos=16 loader=(--quick) gpu=cpu
  # Triton attention would take minutes in the interpreter; batch 2 keeps the other kernels' run near 30 s
  triton_all=(--set kernels.backend=triton --profile-steps 0 --batch 2)
  export TRITON_INTERPRET=1  # Triton on CPU runs only in its interpreter
else
  tests=(tests/kernels --junitxml "$OUT/gpu_tests.xml") kernels=()
  throughput=(--config vit_b16_symmim --batch 128 --steps 15 --warmup 5)
  h200=(--config vit_b16_symmim_h200 --steps 10 --warmup 3)
  photos=4096 loader=(--workers 16 --batch 128 --photos 4096 --batches 20 --warmup 3 --repeats 3) gpu=cuda
  triton_all=(--set kernels.attention=triton --set kernels.backend=triton)
fi
for name in "${STEPS[@]}"; do
  case $name in
    gpu-tests) step "$name" 240 python3 -m pytest -q -rs "${tests[@]}" ;;
    timm-export) step "$name" 40 python3 -m pytest -q -rs tests/test_eval.py -k timm --junitxml "$OUT/gpu_timm.xml" ;;
    kernels-bench) cp kernels/measured.json "$OUT/measured.json"
      step "$name" 130 python3 benchmarks/kernels.py "${kernels[@]}" --json "$OUT/gpu_kernels.json" \
        --choices "$OUT/measured.json" ;;
    throughput) step "$name" 170 python3 benchmarks/throughput.py "${throughput[@]}" --json "$OUT/gpu_throughput.json" ;;
    throughput-h200) step "$name" 120 python3 benchmarks/throughput.py "${h200[@]}" --systems optimized \
      --json "$OUT/gpu_throughput_h200.json" ;;
    throughput-compiled) step "$name" 150 python3 benchmarks/throughput.py "${h200[@]}" --systems optimized \
      --set train.compile=true --json "$OUT/gpu_throughput_compiled.json" ;;
    throughput-zero2) step "$name" 100 python3 benchmarks/throughput.py "${throughput[@]}" --systems optimized \
      --set ds.zero_stage=2 --json "$OUT/gpu_throughput_zero2.json" ;;
    throughput-triton-all) step "$name" 100 python3 benchmarks/throughput.py "${throughput[@]}" --systems optimized \
      "${triton_all[@]}" --json "$OUT/gpu_throughput_triton_all.json" ;;
    dataloader-gpu) dali "$name" 150 python3 benchmarks/dataloader.py "${loader[@]}" --device "$gpu" \
      --json "$OUT/gpu_dataloader.json" ;;
    dataloader-cpu16) dali "$name" 120 python3 benchmarks/dataloader.py "${loader[@]}" --device cpu --stages \
      --json "$OUT/gpu_dataloader_cpu16.json" ;;
    throughput-data) dali "$name" 150 python3 benchmarks/throughput.py "${h200[@]}" --systems optimized --input data \
      --set "data.root=$HOME/.cache/symmim/photos-v1-seed0-$photos" --set data.workers=16 \
      --json "$OUT/gpu_throughput_data.json" ;;
    *) echo "unknown step $name"; status=1 ;;
  esac
done
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo some steps FAILED)"
exit $status
