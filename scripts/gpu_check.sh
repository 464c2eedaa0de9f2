#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a borrowed CUDA machine that has no network; see docs/distributed.md,
# "Running the GPU check", and the shared machine notes (shared/gpu/README.md).
#
#   scripts/gpu_check.sh bundle    here, with the package index: writes .gpu/bundle312.tar.xz (the shared bundle:
#                                  trl, datasets, bitsandbytes, deepspeed, liger-kernel, ...) and .gpu/extra312.tar.xz
#                                  (what this project imports that the machine lacks, and transformers at the
#                                  version the tests ran with: the machine has 5.17, pyproject asks for >= 5.20)
#   scripts/gpu_check.sh [ARGS]    there, from the repository root with .gpu/ carried along: unpacks both, runs
#                                  benchmarks/gpu_check.py [ARGS] and writes gpu_check.{json,md,log} to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

# Imported by recipes/run.py (evaluation, report, plots) or pinned by pyproject, and not on the machine
EXTRA=(transformers math-verify latex2sympy2_extended antlr4-python3-runtime rich markdown-it-py mdurl pygments
       matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing)

if [[ "${1:-}" == "bundle" ]]; then
  maker=${GPU_BUNDLE_MAKER:-}
  for candidate in ../shared/gpu/make_bundle.sh ../../shared/gpu/make_bundle.sh; do
    [[ -z "$maker" && -x "$candidate" ]] && maker=$candidate
  done
  [[ -n "$maker" ]] || { echo "set GPU_BUNDLE_MAKER to shared/gpu/make_bundle.sh" >&2; exit 2; }
  mkdir -p .gpu
  [[ -f .gpu/bundle312.tar.xz ]] || bash "$maker" "$PWD/.gpu"   # an absolute path: the maker changes folder
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # the versions installed here, which the tests ran with
  pins=$(python3 -c 'import importlib.metadata as m, sys; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' \
         "${EXTRA[@]}")
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/w" $pins
  mkdir -p "$work/site-packages"
  for w in "$work"/w/*.whl; do python3 -m zipfile -e "$w" "$work/site-packages/"; done
  find "$work/site-packages" -name __pycache__ -type d -prune -exec rm -rf {} +
  tar -cJf .gpu/extra312.tar.xz -C "$work" site-packages
  ls -la .gpu
  exit 0
fi

out=${OUT:-outputs/gpu_check}
tmp=${GPU_CHECK_TMP:-/tmp}
mkdir -p "$tmp/b" "$tmp/bx" "$out"
tar -xJf .gpu/bundle312.tar.xz -C "$tmp/b"
tar -xJf .gpu/extra312.tar.xz -C "$tmp/bx"
# the extra folder first: its transformers replaces the machine's; both keep the name site-packages (datasets)
export PYTHONPATH=$tmp/bx/site-packages:$tmp/b/site-packages:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" --work "$tmp/gpu_check" "$@" 2>&1 | tee "$out/gpu_check.log"
