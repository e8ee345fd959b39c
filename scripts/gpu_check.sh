#!/usr/bin/env bash
# Everything GPU-specific in one command: the engine benchmark on a
# Llama-3-8B-shaped model with random bfloat16 weights (decode tokens/s and
# model-bandwidth utilisation at batch 1, 64, 256; prefill at 2048 tokens), then
# the engine and parity tests on the GPU.
# On a machine without a GPU it runs the same steps end to end on a tiny shape,
# so the script cannot rot.
#
#   bash scripts/gpu_check.sh            # results and logs in ${OUT:-/tmp/gpu_check}
#
# The benchmark runs first: on a short lease its figures are what must come
# back. Each phase can be held to a time limit (seconds; 0, the default, means
# none): GPU_CHECK_BENCH_LIMIT, GPU_CHECK_TEST_LIMIT. The engine v2 (paged KV
# pool) has not run on a GPU yet: no device was lent to the session that wrote it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

limit() {  # limit SECONDS CMD...: run CMD, stopped after SECONDS when SECONDS > 0
  local t=$1; shift
  if [ "${t:-0}" -gt 0 ]; then timeout --kill-after=15 "$t" "$@"; else "$@"; fi
}

backend=$(python3 -c 'import jax; print(jax.default_backend())')
echo "== backend: $backend"
python3 -c 'import jax; print(jax.__version__, jax.devices())'
if [ "$backend" = "gpu" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  tests=(tests/test_engine.py tests/test_parity.py)
  bench=(--preset llama3-8b-shape --dtype bfloat16 --batches 1,64,256 --contexts 1024 --prefill 2048 --steps 16)
  # weights (16 GB) + a pool for 256 rows x ~1100 positions in bfloat16 (37 GB) + headroom
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
else
  tests=(tests/test_engine.py -k "prefill_then_decode or donated")
  bench=(--preset smollm2-135m --dtype float32 --batches 1,4 --contexts 64 --prefill 64 --steps 2 --repeat 1)
fi

echo "== engine benchmark (log: $OUT/bench_engine.log)"
t0=$SECONDS
limit "${GPU_CHECK_BENCH_LIMIT:-0}" python3 scripts/bench_engine.py "${bench[@]}" \
  --json "$OUT/bench_engine.json" >"$OUT/bench_engine.out" 2>"$OUT/bench_engine.log"
bench_status=$?
echo "benchmark exit status $bench_status after $((SECONDS - t0)) s"
cat "$OUT/bench_engine.out"
grep -E "^(prefill|decode)|Error|error" "$OUT/bench_engine.log" | tail -20
python3 - "$OUT/bench_engine.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
for d in r["decode"]:
    print(f"decode batch {d['batch']:>3} context {d['context']}: {d['step_ms']:.2f} ms/step, {d['tok_s']:.0f} tokens/s, "
          f"MBU {d['mbu'] * 100:.0f}% (bandwidth {r['bandwidth_gbs']:.0f} GB/s)")
for p in r["prefill"]:
    print(f"prefill {p['tokens']} tokens: {p['jaxinfer_s'] * 1e3:.1f} ms")
PY

# Parity needs true float32 matmuls (GPUs default to TF32 for float32).
echo "== tests on $backend (log: $OUT/tests.log)"
t0=$SECONDS
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 limit "${GPU_CHECK_TEST_LIMIT:-0}" \
  python3 -m pytest -v -rfEs -p no:cacheprovider "${tests[@]}" >"$OUT/tests.log" 2>&1
status=$?
echo "tests exit status $status after $((SECONDS - t0)) s"
tail -25 "$OUT/tests.log"
echo "== results in $OUT"
exit $((bench_status || status))
