#!/usr/bin/env bash
# The one prepared script for a GPU machine session (one H100/H200, minutes of time):
#   1. installs the carried wheels in .whl/ (make them here first: bash benchmarks/gpu_wheels.sh),
#   2. runs the GPU-marked tests: each kernel in bf16 at ViT-B shapes, and the whole ViT-B SymMIM
#      model in bf16 (Triton vs torch, both against fp32),
#   3. checks that an exported encoder loads into timm (installed there, not here),
#   4. benchmarks/kernels.py: each kernel vs its eager reference, attention vs SDPA/xformers,
#   5. benchmarks/throughput.py: ViT-B/16 224 px bf16, synthetic input, SymMIM vs random-75%,
#      optimized vs reference system, with a profile of each run.
# Everything lands in $OUT (the device tool's output folder; ./gpu_check_out elsewhere):
# gpu_check.log, gpu_tests.xml, gpu_timm.xml, gpu_kernels.json/.png, gpu_throughput.json/.png.
# Each step has its own time limit and a failing step does not stop the next; the benchmarks
# keep a partial JSON if their limit stops them. Sized for about 5 minutes on an H100/H200
# (limits sum to 7.5): the first steps compile and autotune the kernels the later ones reuse.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # here, on CPU: the same steps at tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if ls .whl/*.whl >/dev/null 2>&1 && [ $DRY = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
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

if [ $DRY = 1 ]; then
  step gpu-tests 300 python3 -m pytest -q tests/kernels/test_layernorm.py
  step timm-export 60 python3 -m pytest -q tests/test_eval.py -k timm -rs
  step kernels-bench 300 python3 benchmarks/kernels.py --quick --json "$OUT/gpu_kernels.json"
  step throughput 300 python3 benchmarks/throughput.py --quick --json "$OUT/gpu_throughput.json"
else
  step gpu-tests 110 python3 -m pytest -q -m gpu tests/kernels -rs --junitxml "$OUT/gpu_tests.xml"
  step timm-export 40 python3 -m pytest -q tests/test_eval.py -k timm -rs --junitxml "$OUT/gpu_timm.xml"
  step kernels-bench 130 python3 benchmarks/kernels.py --json "$OUT/gpu_kernels.json"
  step throughput 170 python3 benchmarks/throughput.py --config configs/vit_b16_symmim.yaml --batch 128 \
    --steps 15 --warmup 5 --json "$OUT/gpu_throughput.json"
fi
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo some steps FAILED)"
exit $status
