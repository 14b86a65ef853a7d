#!/usr/bin/env bash
# Prepare the wheels that benchmarks/gpu_check.sh carries to the GPU machine: only what its image
# (Python 3.12, torch 2.11, triton 3.6, numpy, no network) lacks. Run once, here, in the repo root:
#   bash benchmarks/gpu_wheels.sh            # .whl/ (about 3 MB), carried with every call of the plan
#   bash benchmarks/gpu_wheels.sh --dali     # also .dali_whl/: DALI 2.4 for CUDA 13 (about 220 MiB)
# .whl/: DeepSpeed, built here as a wheel (its CUDA ops compile just in time there, none are needed),
# and its small dependencies missing there: hjson, pydantic with its exactly pinned pydantic-core,
# annotated-types, typing-inspection, and typing-extensions (pydantic needs a newer one than the
# image may hold), at the versions installed here so that they agree.
# .dali_whl/: nvidia-dali-cuda130, its JPEG codecs (nvimgcodec, nvjpeg) and its small dependencies
# (six: astunparse imports it). Not nvcomp: DALI pins it, but JPEG decoding never loads it, and
# gpu_check.sh installs with --no-deps. It is more than one call carries (64 MiB): this prints how
# many chunks ../shared/tools/stage-for-device .dali_whl makes of it; gpu_check.sh's call plan
# carries one chunk with each call and unpacks the set in the last.
set -euo pipefail
cd "$(dirname "$0")/.."
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w .whl "deepspeed==$(python3 -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
pins=$(python3 -c 'import importlib.metadata as m
print(" ".join(f"{d}=={m.version(d)}" for d in ("hjson", "pydantic", "pydantic-core", "annotated-types",
                                                "typing-inspection", "typing-extensions")))')
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl $pins
ls -la .whl && du -sh .whl
if [ "${1:-}" = --dali ]; then  # the ranges are DALI 2.4's own requirements
  grep -qx '/.dali_whl/' .git/info/exclude || echo '/.dali_whl/' >> .git/info/exclude
  rm -rf .dali_whl && mkdir -p .dali_whl
  python3 -m pip download -q --no-deps "${platform[@]}" -d .dali_whl nvidia-dali-cuda130==2.4.0 \
    'nvidia-nvimgcodec-cu13>=0.9,<0.10' nvidia-nvjpeg 'astunparse>=1.6,<=1.6.3' 'gast>=0.3.3,<=0.7.0' \
    'six>=1.16,<=1.17' 'libcst~=1.8' makefun nvtx optree
  ls -la .dali_whl
  mib=${STAGE_MIB:-56}  # stage-for-device's chunk size: a tar of .dali_whl, split every $mib MiB
  bytes=$(tar -cf - .dali_whl | wc -c)
  echo "DALI set: $((bytes >> 20)) MiB as one tar: $(((bytes + (mib << 20) - 1) / (mib << 20))) chunks of $mib MiB;" \
    "next: ../shared/tools/stage-for-device .dali_whl"
fi
