#!/bin/bash
# The llama.cpp peer (issue 19), on the GPU host: synthetic GGUFs written by llamacpp_gguf.py (next to
# this script), timed by llama-bench and llama-batched-bench from the pack build_llamacpp.sh makes.
#   llamacpp_peer.sh small                 llama-2-7b and llama-3-8b Q4_0, every layer on the GPU
#   llamacpp_peer.sh TYPE "NGL..." [D]     llama-3-70b TYPE (q4_0 | q4_k_m): the peak GPU memory at each
#                                          -ngl (a short run), then batch-1 decode (tg32, 3 repetitions)
#                                          at the largest -ngl whose short run stayed within 24 GiB; with D,
#                                          also 16 sequences of 128 prompt + 32 new tokens at -ngl minus D
#                                          (their K/V needs room)
# PACK (default .devpack/llamacpp.tar.xz) is unpacked once into /tmp/lp. The GGUF lives in /dev/shm (the
# host's 64 GB disk is too small for two) as /dev/shm/m.gguf.TYPE; delete it after. Peak GPU memory is
# nvidia-smi's used memory sampled every 0.1 s, less the idle figure: the process's whole footprint,
# CUDA context included. The short runs pick a first -ngl; the timed run holds ~160 MiB more than its
# short run (run44: -ngl 51, 24423 MiB short, 24587 timed), so a timed run over 24 GiB is repeated one
# layer lower until one fits.
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -x /tmp/lp/bin/llama-bench ]; then mkdir -p /tmp/lp && tar xJf "${PACK:-.devpack/llamacpp.tar.xz}" -C /tmp/lp; fi
export LD_LIBRARY_PATH=/tmp/lp/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
B=/tmp/lp/bin/llama-bench; BB=/tmp/lp/bin/llama-batched-bench
date; hostname; lscpu | grep -E "Model name|^CPU\(s\)|Thread" | tr -s ' ' | tr '\n' ';'; echo; free -g | sed -n 2p
T=$(lscpu -p=core | grep -v '#' | sort -u | wc -l); echo "physical cores $T"
BASE=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits); echo "idle GPU MiB $BASE"
peak() {  # runs "$@"; prints the peak GPU memory it used (MiB over the idle baseline)
  ( while sleep 0.1; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done ) > /tmp/mem.txt 2>/dev/null &
  local p=$!; "$@"; kill $p; wait $p 2>/dev/null
  echo "peak_gpu_mib $(( $(sort -n /tmp/mem.txt | tail -1) - BASE ))"
}
M=/dev/shm/m.gguf
if [ "$1" = small ]; then
  for pre in llama-2-7b llama-3-8b; do
    python3 "$here/llamacpp_gguf.py" --preset $pre --type q4_0 --out $M
    peak $B -m $M -ngl 99 -fa 1 -p 512 -n 128 -r 3 -t $T -o md 2>&1 | grep -E "^\||peak|rror"
  done
  rm -f $M; exit 0
fi
ty=$1
[ -f $M.$ty ] || /usr/bin/time -f "gguf written in %e s" python3 "$here/llamacpp_gguf.py" --preset llama-3-70b --type $ty --out $M.$ty
best=0
for ngl in $2; do
  r=$(peak timeout 120 $B -m $M.$ty -ngl $ngl -fa 1 -p 0 -n 2 -r 1 -t $T -o csv 2>&1 | grep -E "peak|rror")
  echo "$ty ngl $ngl $r"
  m=$(echo "$r" | awk '/peak/{print $2}')
  [ -n "$m" ] && [ "$m" -le 24576 ] && best=$ngl
done
echo "$ty best ngl $best"; date
while [ "$best" -gt 0 ]; do
  r=$(peak timeout 200 $B -m $M.$ty -ngl $best -fa 1 -p 0 -n 32 -r 3 -t $T -o md 2>&1 | grep -E "^\||peak|rror")
  echo "$r"
  m=$(echo "$r" | awk '/peak/{print $2}')
  [ -n "$m" ] && [ "$m" -le 24576 ] && break
  best=$(( best - 1 )); echo "$ty timed run over 24 GiB: again at -ngl $best"
done
date
[ -n "$3" ] && peak timeout 200 $BB -m $M.$ty -ngl $(( best - $3 )) -fa on -c 4096 -npp 128 -ntg 32 -npl 16 -t $T 2>&1 | grep -E "^\||peak|rror"
date
