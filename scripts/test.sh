#!/usr/bin/env bash
# Builds ferry and runs the whole test suite. CPU tests always run; tests labelled `gpu` run where a
# GPU exists and skip (pass with a message) where none does.
#   FERRY_BUILD_DIR   build folder (default: build)
#   FERRY_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer build (default folder build-asan)
#   FERRY_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default: 90a;89;86;120 when nvcc is present)
#   FERRY_CUDA=OFF    build without the CUDA backend
#   FERRY_SHARED      the reference data folder (default: ../shared beside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
build=${FERRY_BUILD_DIR:-build}
if [[ ${FERRY_SANITIZE:-0} == 1 ]]; then
  build=${FERRY_BUILD_DIR:-build-asan}
  args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFERRY_SANITIZE=ON)
  # oneDNN, TBB and OpenMP keep their thread pools until exit: not leaks of ferry's.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
fi
if [[ -n ${FERRY_CUDA:-} ]]; then args+=("-DFERRY_CUDA=${FERRY_CUDA}"); fi
if [[ -n ${FERRY_CUDA_ARCHS:-} ]]; then args+=("-DCMAKE_CUDA_ARCHITECTURES=${FERRY_CUDA_ARCHS}"); fi
shared=${FERRY_SHARED:-../shared}
if [[ ! -d $shared/golden ]]; then
  echo "test.sh: reference data not found at $shared (set FERRY_SHARED)" >&2
  exit 1
fi
cmake -S . -B "$build" "${args[@]}"
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j 2
