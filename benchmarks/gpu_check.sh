#!/usr/bin/env bash
# The prepared GPU check, as device calls of a written plan. The GPU machine (one H200) is lent for
# 15 minutes in all, its start (1-2 minutes) included; a command runs at most 10 minutes and carries
# at most 64 MiB (tree and carried paths); the machine goes back after 30 s idle; at most 8 files
# come back from $OUT, at most two folders down. So: four calls, one right after another, in order
# of value, each leaving at most 8 files (past 8, all but the log and the JSONs are packed into
# rest.tar.gz). Prepare here: bash benchmarks/gpu_wheels.sh --dali, then
# ../shared/tools/stage-for-device .dali_whl (4 chunks); `bash benchmarks/gpu_check.sh` prints the
# four calls with this tree's commit and each call's MiB.
#
# call  carry            steps (limit, s)                     expect      returns in $OUT
# call1 .whl .stage/p01  headline (240)                       1.5 start   gpu_check.log, headline.json/.png
#                                                             + 2.5 min
# call2 .whl .stage/p02  kernels-bench (150)                  2 min       gpu_check.log, kernels-bench.json/.png,
#                                                                         measured.json (copy over kernels/)
# call3 .whl .stage/p03  gpu-tests (120), timm-export (30)    1.5 min     gpu_check.log, gpu-tests.xml, timm-export.xml
# call4 .whl .stage/p04  DALI checked, unpacked, installed,   3 min       gpu_check.log, dataloader-gpu.json/.png,
#                        imported; dataloader-gpu (90),                   throughput-data.json/.png
#                        throughput-data (100)
# Expected: 10.5 minutes with the start, which leaves 4.5 for a rerun of one call. The limits stop a
# hang: at every limit the plan would take about 15 minutes, and the end of call4 would be lost.
# Each call carries 62 MiB (the tree 1.5, .whl 4.5, a chunk 56); the device tool's timeout_s is
# what `bash benchmarks/gpu_check.sh` prints (the call's limits and a margin for its setup).
#   headline: benchmarks/throughput.py at the H200 preset's batch (512), bf16, synthetic input:
#     SymMIM and random-75% on the fast step (optimized) and the reference MAE system (eager ops,
#     DeepSpeed's bf16 engine) in the same run; img/s, MFU, GPU busy, launches per step, peak memory.
#     An optimized run that fails with our kernels is recorded and run again on torch ops and SDPA.
#   kernels-bench: benchmarks/kernels.py, every Triton kernel against eager and attention against
#     SDPA's backends at ViT-B/L shapes; measured.json holds this GPU's per-shape winners for auto.
#   gpu-tests: the -m gpu tests (each kernel in bf16 at ViT-B/L shapes, the whole ViT-B model in
#     bf16 against fp32); timm-export: an exported encoder loads into timm (installed there only).
#   dataloader-gpu: benchmarks/dataloader.py on 4096 generated 500x375 q90 JPEGs, DALI's mixed
#     decoder against PIL + DataLoader with 16 workers, batch 128; throughput-data: the headline's
#     SymMIM run fed by DALI mixed from those JPEGs (generated there if absent).
# Opt-in steps, in a call of their own: kernel-suite (300; the whole kernel test suite, every small
# shape in fp32 and fp16: hundreds of compiles), throughput-compiled (240; the headline's optimized
# runs with train.compile=true).
# Each call first installs .whl (DeepSpeed and its small dependencies) into /tmp/site and imports
# DeepSpeed, and DALI in call4, and stops with the real error if an import fails. A failing step
# does not stop the next; the benchmarks keep a partial JSON if their limit stops them.
#
#   bash benchmarks/gpu_check.sh                  # here: the device calls to make, with sizes
#   SYMMIM_COMMIT=<commit> bash benchmarks/gpu_check.sh call1   # there (its git metadata can be stale)
#   bash benchmarks/gpu_check.sh kernel-suite     # there: named steps or calls, in one command
#   bash benchmarks/gpu_check.sh --dry-run        # here, on CPU: the whole plan at tiny shapes, each
#                                                 # call as its own command in $OUT/callN (under
#                                                 # triton 3.6, its CPU interpreter needs numpy < 2.4)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
DRY=0
[ "${1:-}" = --dry-run ] && DRY=1 && shift
declare -A CALLS=([call1]="headline" [call2]="kernels-bench" [call3]="gpu-tests timm-export"
  [call4]="dataloader-gpu throughput-data")
declare -A TIMEOUT=([call1]=300 [call2]=200 [call3]=200 [call4]=300)  # timeout_s of each device call
PLAN=(call1 call2 call3 call4)
DATA_STEPS=" dataloader-gpu throughput-data "
MAX_FILES=8

if [ $# = 0 ] && [ $DRY = 0 ]; then  # the plan, as device calls
  mib() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  commit=$(git rev-parse --short HEAD)$([ -z "$(git status --porcelain)" ] || echo +dirty)
  [ -d .whl ] || echo "no .whl/: run bash benchmarks/gpu_wheels.sh --dali first"
  chunks=$(ls -d .stage/p* 2>/dev/null | wc -l)
  [ "$chunks" = ${#PLAN[@]} ] || echo "DALI is staged in $chunks chunks, not ${#PLAN[@]}: call4 will stop at its DALI" \
    "check (bash benchmarks/gpu_wheels.sh --dali && ../shared/tools/stage-for-device .dali_whl)"
  echo "Device calls, one right after another (each within 30 s of the last):"
  for i in "${!PLAN[@]}"; do
    call=${PLAN[$i]} chunk=$(printf .stage/p%02d $((i + 1)))
    carry=(.whl) && [ -d "$chunk" ] && carry+=("$chunk")
    bytes=$((tree + $(mib "${carry[@]}")))
    printf '  %s. run carry=[%s] timeout_s=%s command: SYMMIM_COMMIT=%s bash benchmarks/gpu_check.sh %s   (%s MiB%s)\n' \
      $((i + 1)) "$(printf '"%s", ' "${carry[@]}" | sed 's/, $//')" "${TIMEOUT[$call]}" "$commit" "$call" \
      "$(awk "BEGIN {printf \"%.1f\", $bytes / 1048576}")" "$( ((bytes > 64 << 20)) && echo ', OVER 64 MiB')"
  done
  exit 0
fi

if [ $DRY = 1 ] && [ $# = 0 ]; then  # the whole plan on CPU, each call as the device would run it
  status=0
  for call in "${PLAN[@]}"; do
    t0=$SECONDS
    rm -rf "${OUT:?}/$call" && mkdir -p "$OUT/$call"
    OUT=$OUT/$call bash "$0" --dry-run "$call" >/dev/null 2>&1; rc=$?
    files=$(find "$OUT/$call" -type f | wc -l)
    echo "dry run $call (${CALLS[$call]}): exit $rc after $((SECONDS - t0)) s, $files files in \$OUT" \
      "(at most $MAX_FILES), log $OUT/$call/gpu_check.log"
    grep '^== .*: exit' "$OUT/$call/gpu_check.log" | sed 's/^/    /'
    [ $rc = 0 ] && [ "$files" -le $MAX_FILES ] || { status=1; tail -40 "$OUT/$call/gpu_check.log"; }
  done
  echo "gpu_check dry run: $([ $status = 0 ] && echo every call passed || echo some calls FAILED)"
  exit $status
fi

STEPS=()
for name in "$@"; do read -ra add <<< "${CALLS[$name]:-$name}"; STEPS+=("${add[@]}"); done
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait $tee_pid' EXIT  # the log complete when the command returns
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
data=0
for name in "${STEPS[@]}"; do [[ $DATA_STEPS == *" $name "* ]] && data=1; done

install() {  # install WHEEL...: into /tmp/site, first on PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" || exit 2
}
if [ $DRY = 1 ]; then
  echo "dry run: nothing carried is installed"
else
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if ls .whl/*.whl >/dev/null 2>&1; then
    [ "$(ls .whl)" = "$(cat /tmp/site/.whl 2>/dev/null)" ] || { install .whl/*.whl && ls .whl > /tmp/site/.whl; }
  else
    echo "no .whl/ carried: DeepSpeed must be installed there already"
  fi
  if [ $data = 1 ] && [ -d .stage ]; then  # DALI: its chunks, carried one per call, checked and unpacked
    last=$(ls -d .stage/p* | tail -1)
    (cd .stage && sha256sum -c --quiet "${last#.stage/}/SHA256SUMS") || {
      echo "gpu_check: a DALI chunk is missing or damaged (above): the machine went back between calls;" \
        "carry .stage/p01... again, one per call"; exit 2; }
    rm -rf /tmp/staged && mkdir -p /tmp/staged && cat .stage/p*/chunk.* | tar -x -C /tmp/staged && install /tmp/staged/.dali_whl/*.whl
  fi
fi
# `symmim` is this tree (no pip install there): a link named symmim on PYTHONPATH
mkdir -p /tmp/symmim_src && ln -sfn "$PWD" /tmp/symmim_src/symmim && export PYTHONPATH=/tmp/symmim_src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L 2>/dev/null
python3 - deepspeed $([ $data = 1 ] && echo nvidia.dali) <<'PY' || exit 2
import importlib, sys, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in sys.argv[1:]:  # what the steps need, imported now: its real error, before any step runs
    try:
        module = importlib.import_module(name)
    except Exception as err:
        sys.exit(f"gpu_check: import {name} failed, so the steps would: {type(err).__name__}: {err}")
    print(name, getattr(module, "__version__", "?"), "from", module.__file__)
PY

status=0
step() {  # step NAME LIMIT_S COMMAND... (the dry run's CPU gets 3x the GPU's limit)
  local name=$1 limit=$(($2 * (DRY ? 3 : 1))); shift 2
  echo "== $name ($*)"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc = 0 ] || status=1
}

if [ $DRY = 1 ]; then  # tiny shapes on CPU, fp32
  h200=(--quick --profile-steps 2) kernels=(--quick) loader=(--quick --device cpu) photos=()
else
  h200=(--config vit_b16_symmim_h200 --steps 10 --warmup 3 --profile-steps 2)
  kernels=() loader=(--device cuda --workers 16 --batch 128 --photos 4096 --batches 20 --warmup 3 --repeats 3)
  photos=(--photos 4096 --set data.workers=16)
fi
for name in "${STEPS[@]}"; do
  case $name in
    headline) step "$name" 240 python3 benchmarks/throughput.py "${h200[@]}" \
      --runs symmim/optimized,random75/optimized,random75/reference --json "$OUT/$name.json" ;;
    kernels-bench) cp kernels/measured.json "$OUT/measured.json"
      step "$name" 150 python3 benchmarks/kernels.py "${kernels[@]}" --json "$OUT/$name.json" --choices "$OUT/measured.json" ;;
    gpu-tests) step "$name" 120 python3 -m pytest -q -rs -m gpu tests/kernels --junitxml "$OUT/$name.xml" ;;
    timm-export) step "$name" 30 python3 -m pytest -q -rs tests/test_eval.py -k timm --junitxml "$OUT/$name.xml" ;;
    dataloader-gpu) step "$name" 90 python3 benchmarks/dataloader.py "${loader[@]}" --json "$OUT/$name.json" ;;
    throughput-data) step "$name" 100 python3 benchmarks/throughput.py "${h200[@]}" --runs symmim/optimized \
      --input photos "${photos[@]}" --set data.loader=dali --json "$OUT/$name.json" ;;
    kernel-suite) step "$name" 300 python3 -m pytest -q -rs tests/kernels --junitxml "$OUT/$name.xml" ;;
    throughput-compiled) step "$name" 240 python3 benchmarks/throughput.py "${h200[@]}" \
      --runs symmim/optimized,random75/optimized --set train.compile=true --json "$OUT/$name.json" ;;
    *) echo "unknown step $name"; status=1 ;;
  esac
done
if [ "$(find "$OUT" -type f | wc -l)" -gt $MAX_FILES ]; then  # what would not come back, in one archive
  (cd "$OUT" && find . -type f ! -name gpu_check.log ! -name '*.json' ! -name rest.tar.gz -print0 |
    tar -czf rest.tar.gz --null -T - --remove-files)
fi
echo "gpu_check: $(find "$OUT" -type f | wc -l) files in $OUT;" \
  "$([ $status = 0 ] && echo all steps passed || echo some steps FAILED)"
exit $status
