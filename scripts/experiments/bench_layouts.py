#!/usr/bin/env python3
"""Why the engine stores what it stores: weight and KV-cache layouts side by side.

Times, in one run on one machine, the two choices the engine's decode layout
rests on (SmolLM2-135M shapes, float32, random values):

  * a stack of 30 MLP blocks (gate/up, down) at 1 and 32 tokens, with the
    activations tokens-first and the weights [in, out] (the checkpoint layout)
    against activations features-first and the weights [out, in] (the engine's,
    see jaxinfer.model.transformer.linear_t);
  * q.k^T of one decode step for 32 slots over one 128-position cache block,
    with keys stored [block, head_dim] against transposed, [head_dim, block];
    and with the keys as the left operand (k^T.q) against the right (q.k^T);
  * probs.v of one decode step, values stored [head_dim, block] against
    [block, head_dim] (the cache's).

Prints a table (min of several runs; the ratio is what carries across machines).

    python -m scripts.experiments.bench_layouts
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def best_ms(f, *args, repeat: int) -> float:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def rms(x, axis):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=axis, keepdims=True) + 1e-5)


def mlp_tokens_first(x, w_gate_up, w_down):  # x [N, D]; w_gate_up [D, 2, F]; w_down [F, D]
    for a, b in zip(w_gate_up, w_down):
        gu = jnp.einsum("nd,dcf->ncf", rms(x, -1), a)
        x = x + (jax.nn.silu(gu[:, 0]) * gu[:, 1]) @ b
    return x


def mlp_features_first(xt, w_gate_up_t, w_down_t):  # xt [D, N]; w_gate_up_t [F, 2, D]; w_down_t [D, F]
    from jaxinfer.model.transformer import linear_t

    for a, b in zip(w_gate_up_t, w_down_t):
        gu = linear_t(a, rms(xt, 0))
        xt = xt + linear_t(b, jax.nn.silu(gu[:, 0]) * gu[:, 1])
    return xt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="MLP blocks in the stack (SmolLM2: 30)")
    ap.add_argument("--repeat", type=int, default=15, help="timed runs per case (the minimum is reported)")
    args = ap.parse_args()
    D, F, L = 576, 1536, args.layers
    keys = jax.random.split(jax.random.key(0), 2 * L + 3)
    w_gate_up = [0.02 * jax.random.normal(keys[i], (D, 2, F)) for i in range(L)]
    w_down = [0.02 * jax.random.normal(keys[L + i], (F, D)) for i in range(L)]
    w_gate_up_t = [w.transpose(2, 1, 0).copy() for w in w_gate_up]
    w_down_t = [w.T.copy() for w in w_down]

    rows = []
    for n in (1, 32):
        x = jax.random.normal(keys[-1], (n, D))
        a = best_ms(mlp_tokens_first, x, w_gate_up, w_down, repeat=args.repeat)
        b = best_ms(mlp_features_first, x.T, w_gate_up_t, w_down_t, repeat=args.repeat)
        diff = float(jnp.abs(jax.jit(mlp_tokens_first)(x, w_gate_up, w_down)
                             - jax.jit(mlp_features_first)(x.T, w_gate_up_t, w_down_t).T).max())
        rows.append((f"{L} MLP blocks, {n} token(s)", "x[N,D] @ W[in,out]", a, "W[out,in] @ x[D,N]", b, diff))

    S, G, R, Hd, blk, reps = 32, 3, 3, 64, 128, 8  # 8 blocks per call so that the call overhead is small
    q = jax.random.normal(keys[-2], (S, 1, G, R, Hd))
    k_rows = [jax.random.normal(jax.random.key(100 + i), (S, G, blk, Hd)) for i in range(reps)]
    k_cols = [k.transpose(0, 1, 3, 2).copy() for k in k_rows]
    a = best_ms(lambda q, ks: [jnp.einsum("btgrk,bgsk->bgtrs", q, k) for k in ks], q, k_rows, repeat=args.repeat)
    b = best_ms(lambda q, ks: [jnp.einsum("btgrk,bgks->bgtrs", q, k) for k in ks], q, k_cols, repeat=args.repeat)
    diff = float(jnp.abs(jnp.einsum("btgrk,bgsk->bgtrs", q, k_rows[0])
                         - jnp.einsum("btgrk,bgks->bgtrs", q, k_cols[0])).max())
    rows.append((f"q.k^T, {S} slots x {reps} blocks of {blk}", "keys [block, Hd]", a, "keys [Hd, block]", b, diff))
    a = best_ms(lambda q, ks: [jnp.einsum("bgks,btgrk->bgtsr", k, q) for k in ks], q, k_cols, repeat=args.repeat)
    diff = float(jnp.abs(jnp.einsum("bgks,btgrk->bgtsr", k_cols[0], q).swapaxes(-1, -2)
                         - jnp.einsum("btgrk,bgks->bgtrs", q, k_cols[0])).max())
    rows.append((f"q.k^T, {S} slots x {reps} blocks of {blk}", "k^T.q (keys as lhs)", a, "q.k^T", b, diff))
    p = jax.nn.softmax(jax.random.normal(keys[-3], (S, G, 1, R, blk)), axis=-1)
    v_rows, v_cols = k_rows, k_cols  # values [block, Hd] (the cache's) or [Hd, block]
    b = best_ms(lambda p, vs: [jnp.einsum("bgtrs,bgsk->bgtrk", p, v) for v in vs], p, v_rows, repeat=args.repeat)
    a = best_ms(lambda p, vs: [jnp.einsum("bgtrs,bgks->bgtrk", p, v) for v in vs], p, v_cols, repeat=args.repeat)
    diff = float(jnp.abs(jnp.einsum("bgtrs,bgsk->bgtrk", p, v_rows[0])
                         - jnp.einsum("bgtrs,bgks->bgtrk", p, v_cols[0])).max())
    rows.append((f"probs.v, {S} slots x {reps} blocks of {blk}", "values [Hd, block]", a, "values [block, Hd]", b,
                 diff))

    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
    print("| case | layout A | ms | layout B | ms | A / B | max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, la, ta, lb, tb, d in rows:
        print(f"| {case} | {la} | {ta:.2f} | {lb} | {tb:.2f} | {ta / tb:.2f}x | {d:.1e} |")


if __name__ == "__main__":
    main()
