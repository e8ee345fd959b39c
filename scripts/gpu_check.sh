#!/usr/bin/env bash
# Everything GPU-specific in one command: the engine benchmark on a
# Llama-3-8B-shaped model with random bfloat16 weights (decode tokens/s at batch
# 1, 64, 256; model-bandwidth utilisation; prefill TFLOP/s at 2048 tokens; one
# decode step per call against 4; power-of-two attended spans against half
# steps; the batch-1 matmul floor, the step's weight matmuls alone), the host
# time per decode call and the runtime's host cost per buffer passed, then the
# engine and parity tests on the GPU.
# On a machine without a GPU it runs the same steps end to end on a tiny shape,
# so the script cannot rot.
#
#   bash scripts/gpu_check.sh            # results and logs in ${OUT:-/tmp/gpu_check}
#
# The benchmark runs first: on a short lease its figures are what must come
# back. Each phase can be held to a time limit (seconds; 0, the default, means
# none): GPU_CHECK_BENCH_LIMIT, GPU_CHECK_DISPATCH_LIMIT, GPU_CHECK_BUFFERS_LIMIT,
# GPU_CHECK_TEST_LIMIT.
# The benchmark writes its JSON after every case, so a phase cut short still
# reports what it measured.
# Compiling the 8B model's programs takes most of the benchmark phase, so a
# short lease needs limits, e.g. for 15 minutes
# GPU_CHECK_BENCH_LIMIT=350 GPU_CHECK_DISPATCH_LIMIT=120 GPU_CHECK_TEST_LIMIT=190.
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
  bench=(--preset llama3-8b-shape --dtype bfloat16 --no-hf --batches 1,64,256 --contexts 1024 --prefill 2048 --steps 16
         --span-steps 2 --floor-batches 1)
  dispatch=(--preset llama3-8b-shape --dtype bfloat16 --context 256)
  # weights (16 GB) + a 256-slot x 2048-position bfloat16 cache (69 GB) + headroom
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
else
  tests=(tests/test_engine.py -k "prefill_then_decode or donated")
  bench=(--preset smollm2-135m --dtype float32 --no-hf --batches 1,4 --contexts 64 --prefill 64 --steps 2 --repeat 1)
  dispatch=(--preset smollm2-135m --dtype float32 --context 64 --steps 8)
fi

echo "== engine benchmark (log: $OUT/bench_engine.log)"
t0=$SECONDS
limit "${GPU_CHECK_BENCH_LIMIT:-0}" python3 scripts/bench_engine.py "${bench[@]}" --decode-steps 4 \
  --json "$OUT/bench_engine.json" >"$OUT/bench_engine.out" 2>"$OUT/bench_engine.log"
bench_status=$?
echo "benchmark exit status $bench_status after $((SECONDS - t0)) s"
cat "$OUT/bench_engine.out"
grep -E "^(prefill|grouped|decode|steps):|Error|error" "$OUT/bench_engine.log" | tail -20
python3 - "$OUT/bench_engine.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
bw = r["bandwidth_gbs"] * 1e9
for d in r["decode"]:
    mbu = d.get("mbu", d["bytes_per_step"] / bw / (d["step_ms"] / 1e3))
    print(f"decode batch {d['batch']:>3} context {d['context']}: {d['step_ms']:.2f} ms/step, "
          f"{d['tok_s']:.0f} tokens/s, MBU {mbu * 100:.0f}% (bandwidth {bw / 1e9:.0f} GB/s)")
b1 = [d for d in r["decode"] if d["batch"] == 1]
if b1:
    d = b1[0]
    mbu = d.get("mbu", d["bytes_per_step"] / bw / (d["step_ms"] / 1e3))
    print(f"batch-1 MBU (bytes read per step / step time / measured bandwidth): {mbu * 100:.0f}%  (target >= 80% on H200)")
    if "matmul_floor_ms" in d:
        print(f"batch-1 matmul floor (the step's weight matmuls alone, one call): {d['matmul_floor_ms']:.2f} ms "
              f"against the {d['step_ms']:.2f} ms step; at the floor MBU would be "
              f"{mbu * d['step_ms'] / d['matmul_floor_ms'] * 100:.0f}%")
if r["decode"]:
    top = max(r["decode"], key=lambda d: d["batch"])
    print(f"batch-{top['batch']} throughput: {top['tok_s']:.0f} tokens/s  (target >= 6000 on H200 at batch 256)")
if r["prefill"]:
    p = r["prefill"][-1]
    print(f"prefill {p['tokens']} tokens: {p['jaxinfer_s'] * 1e3:.1f} ms, {p['tflops']:.1f} TFLOP/s "
          f"(matmul peak measured {r['matmul_gflops'] / 1e3:.1f} TFLOP/s)")
for f in r.get("finer_spans", []):
    print(f"decode batch {f['batch']} context {f['context']}: {f['default_step_ms']:.2f} ms per step over power-of-two "
          f"spans, {f['step_ms']:.2f} ms with {f['span_steps']} per doubling (span {f['span']})")
for m in r.get("multi_step", []):
    print(f"decode batch {m['batch']}: ms/token one step per call {m['pipelined_ms_1']:.2f} pipelined / "
          f"{m['awaited_ms_1']:.2f} awaited; {m['k']} steps per call {m['pipelined_ms_' + str(m['k'])]:.2f} / "
          f"{m['awaited_ms_' + str(m['k'])]:.2f}")
PY

# Host time per decode call against step time at batch 1, with XLA's command
# buffers (CUDA graphs) on and off; the two compile side by side and time in turn.
echo "== dispatch (log: $OUT/dispatch.log)"
rm -f "$OUT/dispatch.json"
for flags in "" "--xla_gpu_enable_command_buffer="; do
  [ "$backend" = "gpu" ] || [ -z "$flags" ] || continue
  XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 limit "${GPU_CHECK_DISPATCH_LIMIT:-0}" \
    python3 -m scripts.experiments.bench_dispatch "${dispatch[@]}" --lock "$OUT/dispatch.lock" --json "$OUT/dispatch.json" \
    2>>"$OUT/dispatch.log" &
done
wait

# The runtime's host cost per buffer passed (read-only and donated), and how much
# of a decode call's host time the engine's buffers account for.
echo "== host cost per buffer (log: $OUT/buffers.log)"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 limit "${GPU_CHECK_BUFFERS_LIMIT:-0}" python3 -m scripts.experiments.bench_buffers \
  --json "$OUT/buffers.json" 2>"$OUT/buffers.log"
python3 - "$OUT/buffers.json" "$OUT/dispatch.json" <<'PY' || true
import json, sys
b = json.load(open(sys.argv[1]))
for line in open(sys.argv[2]):
    d = json.loads(line)
    if "read_only_buffers" not in d:
        continue
    ro, don = d["read_only_buffers"], d["donated_buffers"]
    est = (ro * b["read_only_host_us_per_buffer"] + don * b["donated_host_us_per_buffer"]) / 1e3
    print(f"{d['label']}: a decode call passes {ro} read-only and {don} donated buffers; at the measured cost "
          f"per buffer that is ~{est:.2f} ms of the {d['pipelined_host_ms']:.2f} ms host time per call")
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
