#!/usr/bin/env python3
"""Start-up phases of the engine on a converted model: import, checkpoint load,
engine placement, the covering programs (what serves any call), then with
``--all`` every other program. Pass ``--cache DIR`` for the persistent
compilation cache (an empty DIR: a cold start; run twice: warm).

    python scripts/bench_start.py --cache /tmp/xla-cold          # cold, then run again: warm
    python scripts/bench_start.py --kv-cache-mib 32,720 --pool   # decode step time against pool size
"""

from __future__ import annotations

import argparse
import time

T0 = time.perf_counter()

import jax  # noqa: E402,F401  (the import is the first phase timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache", default=None, help="persistent compilation cache directory")
    p.add_argument("--all", action="store_true", help="also compile every other program")
    p.add_argument("--pool", action="store_true", help="time a batch-1 decode step for each --kv-cache-mib")
    p.add_argument("--kv-cache-mib", default="720")
    args = p.parse_args()

    # imported here, inside the timed import phase
    from jaxinfer.checkpoint import load_checkpoint, resolve_model
    from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache
    from jaxinfer.engine.types import SamplingParams
    from jaxinfer.model.transformer import Transformer

    if args.cache:
        enable_compilation_cache(args.cache)
    t_import = time.perf_counter()
    ckpt = load_checkpoint(resolve_model(args.model))
    t_load = time.perf_counter()
    if args.pool:
        for mib in (int(x) for x in args.kv_cache_mib.split(",")):
            eng = Engine(Transformer(ckpt.config, params=ckpt.params),
                         EngineConfig(max_seqs=8, kv_cache_bytes=mib * 2**20, decode_batches=(1,), lazy_compile=True))
            pages = list(range(16))
            eng.prefill(0, list(range(10, 110)), SamplingParams(), pages=pages)
            eng.decode([0], {0: pages}).result()
            t0 = time.perf_counter()
            for _ in range(5):
                h = eng.decode([0], {0: pages})
            h.result()
            print(f"{mib} MiB pool: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms per batch-1 decode step")
        return
    eng = Engine(Transformer(ckpt.config, params=ckpt.params), EngineConfig(), tokenizer=ckpt.tokenizer)
    t_eng = time.perf_counter()
    print(eng.describe())
    covering = eng.covering_variants()
    eng.compile(covering, progress=False)
    t_cov = time.perf_counter()
    print(f"import {t_import - T0:.1f}s, load {t_load - t_import:.1f}s, engine {t_eng - t_load:.1f}s, "
          f"{len(covering)} covering programs {t_cov - t_eng:.1f}s")
    print({k: round(v, 1) for k, v in eng.compile_seconds.items()})
    if args.all:
        eng.compile(progress=False)
        print(f"all {eng.programs_compiled} programs: +{time.perf_counter() - t_cov:.1f}s")


if __name__ == "__main__":
    main()
