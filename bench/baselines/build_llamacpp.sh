#!/bin/bash
# Builds the llama.cpp peer (issue 19) on the development machine and packs it for the GPU host.
#   bench/baselines/build_llamacpp.sh [WORKDIR] [OUT.tar.xz]
# llama.cpp cannot be fetched on the GPU host, and GitHub is not reachable here; PyPI is, and the
# llama-cpp-python sdist vendors llama.cpp's source (0.3.36: llama.cpp 0c1e570, ggml 0.25.3).
# CUDA for sm_90 (H100/H200) only, and the CPU backend for the host's Xeon (AVX-512 VBMI/VNNI/BF16,
# AMX) rather than -march=native for this machine's Zen 5. About 25 minutes on 2 cores.
set -euo pipefail
work=${1:-/tmp/llamacpp}; out=${2:-$PWD/.devpack/llamacpp.tar.xz}
here=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$work" && cd "$work"
[ -f llama_cpp_python-0.3.36.tar.gz ] || pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36
[ -d llama_cpp_python-0.3.36 ] || tar xzf llama_cpp_python-0.3.36.tar.gz
src=$work/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -f "$src/.git"  # a gitdir link into the sdist's absent parent repository: ninja would re-run cmake forever
cmake -S "$src" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_NCCL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON -DGGML_AMX_BF16=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
ninja -C build llama-bench llama-batched-bench
# Without a driver libcuda.so.1 is missing; the toolkit's stub lets ldd (and devpack) resolve the rest.
stub=$(mktemp -d); ln -s /usr/local/cuda/lib64/stubs/libcuda.so "$stub/libcuda.so.1"
mkdir -p "$(dirname "$out")"
LD_LIBRARY_PATH=$stub "${FERRY_SHARED:-$here/../shared}/tools/devpack.sh" "$out" build/bin/llama-bench build/bin/llama-batched-bench
rm -rf "$stub"
