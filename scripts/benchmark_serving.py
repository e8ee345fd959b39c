#!/usr/bin/env python3
"""Benchmark a running server: ``scripts/benchmark_serving.py --server HOST:PORT ...`` (= ``jaxinfer bench serve``).

    scripts/benchmark_serving.py --server 127.0.0.1:50051 --concurrency 1,4,16,32 --num-requests 64 \\
        --input-len 128 --output-len 64 --slo-ttft-ms 500 --slo-tpot-ms 100 -o bench.json --plot bench.png
    scripts/benchmark_serving.py --request-rate 2,4,8 --burstiness 0.5 --dataset prompts.jsonl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
