#!/usr/bin/env bash
# Launch -> "SERVING on" of `jaxinfer serve` on the converted SmolLM2 (its defaults), first with an
# empty XLA compilation cache, then warm; prints both times and the start-up log lines.
#   bash scripts/bench_serve_start.sh
cache=/tmp/xla-start-cache; rm -rf "$cache"
for run in cold warm; do
  log=/tmp/serve_$run.log
  t0=$(date +%s.%N)
  JAXINFER_XLA_CACHE=$cache python -m jaxinfer serve --model smollm2-135m-instruct --port 0 --http-port 0 >"$log" 2>&1 &
  pid=$!
  for i in $(seq 1 1200); do grep -q "SERVING on" "$log" && break; sleep 0.1; done
  t1=$(date +%s.%N)
  echo "$run: launch to SERVING $(echo "$t1 - $t0" | bc) s"; grep -E "start-up:|KV pool" "$log" | cut -c1-260
  kill -TERM $pid; wait $pid
done
