#!/usr/bin/env python3
"""Evaluation throughput, side by side: jaxinfer's engine and Hugging Face transformers (PyTorch,
float32, the same GGUF) on the same text, in the same run, with the same definition.

Two workloads:

* ``perplexity``: sliding windows (``--window``, ``--stride``) over a text (``--file``; default: the
  docstrings of Python's standard library, a few hundred KB of English prose, cut to ``--chars``).
  transformers runs one window per forward (batch 1), as an evaluation script does.
* ``choice``: many short (context, continuation) pairs (tests/data/choice.jsonl, repeated), where
  jaxinfer packs same-bucket sequences into its slots; transformers scores one pair per forward.

Each side runs once to warm up (jaxinfer compiles; torch allocates), then once timed. Prints a
table of scored tokens/s and the perplexities (which must agree), and writes JSON with ``--output``.

    python scripts/bench_eval.py --model smollm2-135m-instruct --max-len 512 --chars 60000
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stdlib_text(chars: int) -> str:
    """Module docstrings of the standard library, in a fixed order, up to ``chars`` characters."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 200:
            parts.append(doc)
            total += len(doc)
            if total >= chars:
                break
    return "\n\n".join(parts)[:chars]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--file", help="text to score (default: standard-library docstrings)")
    ap.add_argument("--chars", type=int, default=60000, help="characters of text to score")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-seqs", type=int, default=8, help="decode rows")
    ap.add_argument("--window", type=int, help="default: --max-len")
    ap.add_argument("--stride", type=int, help="default: window / 2")
    ap.add_argument("--choice-repeat", type=int, default=8, help="copies of tests/data/choice.jsonl to score")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure transformers with (one row each)")
    ap.add_argument("--output", "-o", help="write the results as JSON")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.evaluation.backend import EngineBackend
    from jaxinfer.evaluation.choice import read_items
    from jaxinfer.loading import build_engine, resolve
    from jaxinfer.tokenizer import tokenize_pair
    from jaxinfer.evaluation.perplexity import aggregate, evaluate_perplexity, rolling_windows
    from jaxinfer.evaluation.results import format_table

    threads = [int(t) for t in args.threads.split(",")]
    text = Path(args.file).read_text(encoding="utf-8")[: args.chars] if args.file else stdlib_text(args.chars)
    source = resolve(args.model)
    path = source.path
    engine = build_engine(source, EngineConfig(max_seqs=args.max_seqs, max_len=args.max_len, lazy_compile=True))
    jx = EngineBackend(engine, model=args.model, checkpoint=path)
    window = args.window or args.max_len
    stride = args.stride or window // 2
    source = Path(json.loads((Path(path) / "jaxinfer.json").read_text())["source"])
    hf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()

    # --- perplexity -------------------------------------------------------------------------------
    docs = [("text", text)]
    ids = jx.tokenize(text)
    wins = rolling_windows(len(ids), window, stride)

    def hf_ppl():
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in wins:
                logits = hf(torch.tensor([ids[w.begin : w.end]])).logits[0]
                lp = torch.log_softmax(logits.float(), -1)
                tgt = torch.tensor(ids[w.score_from : w.end])
                rows = torch.arange(w.score_from - w.begin - 1, w.end - w.begin - 1)
                nll -= float(lp[rows, tgt].double().sum())
                n += len(tgt)
        return nll, n

    evaluate_perplexity(jx, docs, window=window, stride=stride)  # warm-up: compiles the score variants
    res, t_jx = timed(lambda: aggregate(evaluate_perplexity(jx, docs, window=window, stride=stride)))
    t_hf: dict[int, float] = {}
    for th in threads:
        torch.set_num_threads(th)
        hf_ppl()  # warm-up
        (hf_nll, hf_n), t_hf[th] = timed(hf_ppl)
    ppl_jx, ppl_hf = res.perplexity, math.exp(hf_nll / hf_n)

    # --- short pairs (multiple choice) -------------------------------------------------------------
    items = read_items(ROOT / "tests" / "data" / "choice.jsonl") * args.choice_repeat
    pairs = [(it.context, c) for it in items for c in it.choices]
    tok_pairs = [tokenize_pair(jx.tokenizer, c, x) for c, x in pairs]
    n_cont = sum(len(x) for _, x in tok_pairs)
    n_all = sum(len(c) + len(x) - 1 for c, x in tok_pairs)

    def hf_pairs():
        out = []
        with torch.no_grad():
            for c, x in tok_pairs:
                lp = torch.log_softmax(hf(torch.tensor([c + x])).logits[0].float(), -1)
                out.append(sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(x)))
        return out

    jx.score_texts(pairs)  # warm-up
    jx_lps, t_jx_c = timed(lambda: [s.logprob for s in jx.score_texts(pairs)])
    t_hf_c: dict[int, float] = {}
    for th in threads:
        torch.set_num_threads(th)
        hf_pairs()
        hf_lps, t_hf_c[th] = timed(hf_pairs)
    max_diff = max(abs(a - b) for a, b in zip(jx_lps, hf_lps))

    rows = [("perplexity", f"jaxinfer ({engine.max_seqs} rows)", res.tokens, len(wins), t_jx, res.tokens / t_jx, ppl_jx)]
    rows += [("perplexity", f"transformers (batch 1, {th} threads)", hf_n, len(wins), t, hf_n / t, ppl_hf)
             for th, t in t_hf.items()]
    rows += [("choice pairs", f"jaxinfer ({engine.max_seqs} rows)", n_all, len(pairs), t_jx_c, n_all / t_jx_c, "-")]
    rows += [("choice pairs", f"transformers (batch 1, {th} threads)", n_all, len(pairs), t, n_all / t, "-")
             for th, t in t_hf_c.items()]
    print(format_table(["workload", "implementation", "tokens", "sequences", "seconds", "tokens/s", "perplexity"], rows))
    print(f"\n{args.model}, float32, window {window}, stride {stride}, {len(text)} characters. Perplexity relative difference {abs(ppl_jx / ppl_hf - 1):.2e}; "
          f"choice log-likelihoods max |difference| {max_diff:.2e} over {len(pairs)} pairs ({n_cont} continuation "
          "tokens). tokens = positions run through the model (perplexity: scored tokens).")
    if args.output:
        Path(args.output).write_text(json.dumps({
            "model": args.model, "checkpoint": str(path), "window": window, "stride": stride, "chars": len(text),
            "slots": engine.max_seqs, "max_len": engine.max_len,
            "perplexity": {"tokens": res.tokens, "windows": len(wins), "jaxinfer_s": t_jx, "transformers_s_by_threads": t_hf,
                           "jaxinfer_ppl": ppl_jx, "transformers_ppl": ppl_hf},
            "choice": {"pairs": len(pairs), "tokens": n_all, "jaxinfer_s": t_jx_c, "transformers_s_by_threads": t_hf_c,
                       "max_abs_logprob_diff": max_diff},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
