#!/usr/bin/env bash
# Prepare .whl/ for benchmarks/gpu_check.sh: what the GPU machine (Python 3.12, torch 2.11,
# triton 3.6, no network) lacks for this project. DeepSpeed is built here as a wheel (its
# CUDA ops compile just in time there, none are needed); pydantic and hjson are its small
# dependencies missing there. Run once, here, in the repo root:
#   bash benchmarks/gpu_wheels.sh            # .whl/ (about 2 MB), carried with every call
#   bash benchmarks/gpu_wheels.sh --dali     # also .dali_whl/: DALI for CUDA 13 (251 MiB)
# .dali_whl/ is more than one device call carries: stage it in chunks, then name it in the run,
#   ../shared/tools/stage-for-device .dali_whl
# and make the device calls it prints; the last one runs gpu_check.sh, which installs DALI from
# /tmp/staged/.dali_whl and runs the data-path steps (without it they say they are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl "deepspeed==$(python3 -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
# the versions installed here, so that pydantic and its exactly pinned pydantic-core agree
pins=$(python3 -c 'import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl $pins
ls -la .whl
if [ "${1:-}" = --dali ]; then  # DALI 2.4 for CUDA 13, its codecs and its small dependencies (numpy is there)
  grep -qx '/.dali_whl/' .git/info/exclude || echo '/.dali_whl/' >> .git/info/exclude
  rm -rf .dali_whl && mkdir -p .dali_whl
  python3 -m pip download -q --no-deps "${platform[@]}" -d .dali_whl nvidia-dali-cuda130==2.4.0 \
    nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg astunparse gast libcst makefun nvtx optree
  du -sh .dali_whl
fi
