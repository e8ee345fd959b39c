#!/usr/bin/env bash
# Everything GPU-specific in one command: the engine and parity tests on the GPU,
# then the engine benchmark on a Llama-3-8B-shaped model with random bfloat16
# weights (decode tokens/s at batch 1, 64, 256; model-bandwidth utilisation;
# prefill TFLOP/s at 2048 tokens). On a machine without a GPU it runs the same
# steps end to end on a tiny shape, so the script cannot rot.
#
#   bash scripts/gpu_check.sh            # results in ${OUT:-/tmp/gpu_check}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
backend=$(python3 -c 'import jax; print(jax.default_backend())')
echo "== backend: $backend"
python3 -c 'import jax; print(jax.__version__, jax.devices())'

# Parity needs true float32 matmuls (GPUs default to TF32 for float32).
export JAX_DEFAULT_MATMUL_PRECISION=highest
if [ "$backend" = "gpu" ]; then
  tests=(tests/test_engine.py tests/test_parity.py)
  bench=(--preset llama3-8b-shape --dtype bfloat16 --no-hf --batches 1,64,256 --contexts 1024 --prefill 2048 --steps 16)
else
  tests=(tests/test_engine.py -k "prefill_then_decode or donated")
  bench=(--preset smollm2-135m --dtype float32 --no-hf --batches 1,4 --contexts 64 --prefill 64 --steps 2 --repeat 1)
fi
echo "== tests on $backend"
python3 -m pytest -q -x -p no:cacheprovider "${tests[@]}" 2>&1 | tail -5
unset JAX_DEFAULT_MATMUL_PRECISION

echo "== engine benchmark"
python3 scripts/bench_engine.py "${bench[@]}" --decode-steps 4 --json "$OUT/bench_engine.json" 2>"$OUT/bench_engine.log"
python3 - "$OUT/bench_engine.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b1 = [d for d in r["decode"] if d["batch"] == 1]
top = max(r["decode"], key=lambda d: d["batch"])
print(f"batch-1 MBU (bytes read per step / step time / measured bandwidth): {b1[0]['mbu'] * 100:.0f}%  (target >= 80% on H200)")
print(f"batch-{top['batch']} throughput: {top['tok_s']:.0f} tokens/s  (target >= 6000 on H200 at batch 256)")
print(f"prefill {r['prefill'][-1]['tokens']} tokens: {r['prefill'][-1]['tflops']:.1f} TFLOP/s")
PY
echo "== results in $OUT"
