#!/usr/bin/env bash
# Prepare .whl/ for benchmarks/gpu_check.sh: what the GPU machine (Python 3.12, torch 2.11,
# triton 3.6, no network) lacks for this project. DeepSpeed is built here as a wheel (its
# CUDA ops compile just in time there, none are needed); pydantic and hjson are its small
# dependencies missing there. DALI (about 1 GB) is not carried: the GPU check uses
# synthetic, device-resident input. Run once, here, in the repo root:
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl "deepspeed==$(python3 -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
# the versions installed here, so that pydantic and its exactly pinned pydantic-core agree
pins=$(python3 -c 'import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls -la .whl
