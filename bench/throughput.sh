#!/bin/bash
# Throughput mode against keeping K/V on the GPU, at one budget (notes/kv.md's table).
# Usage: bench/throughput.sh FERRY MODEL GPU_MEM HOST_BATCH GPU_BATCH [N_REQUESTS]
#   e.g. bench/throughput.sh build/apps/ferry synthetic:llama-3-8b 8G 64 32
# Requests: 512-token prompts of random ids (seed 1), 128 new tokens each, greedy, EOS ignored.
set -eu
FERRY=$1 MODEL=$2 MEM=$3 HB=$4 GB=$5 N=${6:-$4}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
python3 - "$DIR/req.jsonl" "$N" <<'PY'
import json, random, sys
random.seed(1)
with open(sys.argv[1], 'w') as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"id": i, "ids": [1] + [random.randrange(2, 32000) for _ in range(511)], "max_tokens": 128}) + "\n")
PY
for mode in "host $HB" "gpu $GB"; do
  set -- $mode
  echo "== --kv $1 --batch $2 ($N requests, $MODEL, --gpu-mem $MEM)"
  "$FERRY" run -m "$MODEL" --prompts "$DIR/req.jsonl" --out "$DIR/out.jsonl" --batch "$2" --gpu-mem "$MEM" --kv "$1" \
    --temp 0 --ignore-eos --no-progress 2>&1 | grep -E "^ferry: (plan|floor|served|time to first|error)" || true
done
