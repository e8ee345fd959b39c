#!/usr/bin/env bash
# `jaxinfer bench serve` at 32 streams against `jaxinfer serve` on SmolLM2, float32 weights and
# then each --quantize mode given (default: int8), one after the other on the same machine; each
# run's JSON goes to OUT_DIR (default /tmp/serve_quant) and a one-line summary is printed.
#   bash scripts/bench_serve_quant.sh            # float32 and int8
#   MODES="none int8 int4" REQUESTS=64 bash scripts/bench_serve_quant.sh
set -euo pipefail
modes=${MODES:-none int8}; requests=${REQUESTS:-64}; out=${OUT_DIR:-/tmp/serve_quant}; mkdir -p "$out"
for mode in $modes; do
  log=$out/serve_$mode.log; port=$((50600 + RANDOM % 300))
  flag=(); [ "$mode" != none ] && flag=(--quantize "$mode")
  python -m jaxinfer serve --model smollm2-135m-instruct --port $port --max-seqs 32 --max-len 512 "${flag[@]}" >"$log" 2>&1 &
  pid=$!
  for i in $(seq 1 3000); do grep -q "SERVING on" "$log" && break; kill -0 $pid || { cat "$log"; exit 1; }; sleep 0.2; done
  python -m jaxinfer bench serve --server 127.0.0.1:$port --concurrency 32 --num-requests "$requests" --warmup 4 \
    --input-len 128 --output-len 64 --no-progress --output "$out/serve_$mode.json" >/dev/null
  python -c "import json,sys; r=json.load(open('$out/serve_$mode.json'))['runs'][0]; print('$mode', {k: round(v, 2) for k, v in r.items() if isinstance(v, (int, float)) and ('throughput' in k or 'tokens_per_s' in k)})"
  kill -TERM $pid; wait $pid || true
done
