#!/usr/bin/env python3
"""Evaluate a checkpoint: ``scripts/evaluate.py perplexity|choice|generate ...`` (= ``jaxinfer eval``).

    scripts/evaluate.py perplexity corpus.txt --model smollm2-135m-instruct --max-len 1024 -o ppl.json
    scripts/evaluate.py choice questions.jsonl --model run/ --model-config config.json --tokenizer tok/
    scripts/evaluate.py generate prompts.jsonl --server 127.0.0.1:50051 -g generations.jsonl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
