"""``jaxinfer eval``: perplexity, multiple-choice accuracy and generations of a checkpoint.

In process on ``--model`` (converted directory, GGUF, Hugging Face directory, built-in name, or a
training run's Orbax directory with ``--model-config`` and ``--tokenizer``), or against a running
server with ``--server HOST:PORT``. Writes one JSON result document (``--output``) and prints a
short table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jaxinfer.client import read_token_file
from jaxinfer.commands.common import HelpFormatter, add_command, add_model_args, engine_from_args
from jaxinfer.evaluation.backend import EngineBackend, GenerationOptions, ServerBackend
from jaxinfer.evaluation.choice import evaluate_choice, read_items, summarize
from jaxinfer.evaluation.generate import output_rows, read_prompts
from jaxinfer.evaluation.perplexity import aggregate, evaluate_perplexity
from jaxinfer.evaluation.results import format_table, progress_bar, result_document, write_json

log = logging.getLogger("jaxinfer.eval")


def register(sub) -> None:
    p = add_command(
        sub, "eval",
        help="evaluate a checkpoint: perplexity, multiple choice, generations",
        description="Evaluate a model in process (--model) or a running server (--server): token-level "
        "perplexity and bits per byte of text files with sliding windows, multiple-choice accuracy from "
        "log-likelihoods, generations for prompts. Results as JSON (--output) and a table.",
        example="jaxinfer eval perplexity wiki.txt --max-len 1024 -o ppl.json",
    )
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_model_args(common)
    g = common.add_argument_group("training-run checkpoints")
    g.add_argument("--model-config", metavar="CONFIG",
                   help="config of a training run's Orbax checkpoint given as --model (a jaxinfer or Hugging Face "
                   "config.json, or a preset name)")
    g.add_argument("--step", type=int, help="training step to evaluate (unset: the latest in the run directory)")
    g.add_argument("--tokenizer", help="tokenizer directory, Hugging Face directory or GGUF file (training runs, "
                   "or to override the checkpoint's)")
    s = common.add_argument_group("server")
    s.add_argument("--server", metavar="HOST:PORT", help="evaluate a running jaxinfer server instead of --model")
    s.add_argument("--auth-token-file", help="file holding the server's bearer token")
    s.add_argument("--tls-ca", help="PEM root certificate(s): connect over TLS")
    s.add_argument("--tls", action="store_true", help="connect over TLS with the system roots")
    s.add_argument("--concurrency", type=int, default=16, help="requests in flight against a server")
    o = common.add_argument_group("output")
    o.add_argument("--output", "-o", metavar="FILE", help="write the JSON result document here ('-' = stdout)")
    o.add_argument("--limit", type=int, help="evaluate only the first N items (documents, questions, prompts)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")

    def task(name: str, example: str, **kw) -> argparse.ArgumentParser:
        return tasks.add_parser(name, parents=[common], formatter_class=HelpFormatter,
                                epilog=f"example:\n  jaxinfer eval {name} {example}\n", **kw)

    pp = task("perplexity", "wiki.txt --window 512 --stride 256", help="perplexity and bits per byte of text files",
                          description="Token-level perplexity and bits per byte of each FILE (and all together). "
                          "A .jsonl FILE holds one document per line in its \"text\" field; any other file is one "
                          "document. Every token after the first is scored once, with at least WINDOW - STRIDE "
                          "tokens of context (see docs/evaluation.md for the exact definition).")
    pp.add_argument("files", nargs="+", metavar="FILE")
    pp.add_argument("--window", type=int, help="tokens per window (unset and at most: --max-len)")
    pp.add_argument("--stride", type=int, help="tokens a window advances (unset: window / 2); 1..window-1")
    pp.add_argument("--prefix", choices=["first", "eos"], default="first",
                    help="models without BOS: 'first' = the first token is context only; 'eos' = an EOS "
                    "token in front conditions it, so every text token is scored")
    pp.set_defaults(func=run_perplexity)

    pc = task("choice", "arc.jsonl --samples samples.jsonl", help="multiple-choice accuracy from log-likelihoods",
                          description='Each line of FILE: {"context": str, "choices": [str, ...], "label": int}. '
                          "Choices are appended to the context as given (put the separating space at their start). "
                          "Reports acc (highest log-likelihood) and acc_norm (highest log-likelihood per character).")
    pc.add_argument("file", metavar="FILE.jsonl")
    pc.add_argument("--samples", metavar="FILE", help="write per-item log-likelihoods and predictions (JSONL)")
    pc.set_defaults(func=run_choice)

    pg = task("generate", "prompts.jsonl -g generations.jsonl --max-tokens 128", help="generations for prompts (JSONL in, JSONL out)",
                          description='Each line of FILE: {"prompt": str} or {"messages": [...]}, other fields '
                          "copied to the output; per-line max_tokens/stop/temperature/top_p/top_k/min_p/seed "
                          "override the options.")
    pg.add_argument("file", metavar="FILE.jsonl")
    pg.add_argument("--generations", "-g", metavar="OUT.jsonl", required=True, help="where to write the generations")
    pg.add_argument("--chat", action="store_true", help="send each prompt as a user message (chat template)")
    pg.add_argument("--max-tokens", type=int, default=256)
    pg.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    pg.add_argument("--top-k", type=int, default=0)
    pg.add_argument("--top-p", type=float, default=1.0)
    pg.add_argument("--min-p", type=float, default=0.0)
    pg.add_argument("--repetition-penalty", type=float, default=1.0)
    pg.add_argument("--presence-penalty", type=float, default=0.0)
    pg.add_argument("--frequency-penalty", type=float, default=0.0)
    pg.add_argument("--seed", type=int, help="seed of line i is SEED + i")
    pg.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    pg.add_argument("--ignore-eos", action="store_true")
    pg.set_defaults(func=run_generate)


# --- opening the backend ----------------------------------------------------------------------------


def open_backend(args: argparse.Namespace):
    if args.server:
        token = read_token_file(args.auth_token_file) if args.auth_token_file else None
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
        return ServerBackend(args.server, auth_token=token, tls_ca=ca, tls=args.tls, concurrency=args.concurrency)
    engine, source = engine_from_args(args, lazy_compile=True, model_config=args.model_config, step=args.step,
                                      tokenizer=args.tokenizer)
    return EngineBackend(engine, model=args.model, checkpoint=source.path, step=source.step)


def _emit(args, doc: dict, table: str) -> None:
    if args.output:
        write_json(doc, args.output)
    print(table, file=sys.stderr if args.output == "-" else sys.stdout)


# --- tasks ------------------------------------------------------------------------------------------


def read_documents(files: list[str]) -> list[tuple[str, str]]:
    docs = []
    for f in files:
        path = Path(f)
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append((f"{f}:{n}", str(json.loads(line)["text"])))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{f}:{n}: expected {{\"text\": str}} ({e})") from None
        else:
            docs.append((f, path.read_text(encoding="utf-8")))
    return docs


def run_perplexity(args: argparse.Namespace) -> int:
    docs = read_documents(args.files)[: args.limit]
    t0 = time.perf_counter()
    with open_backend(args) as backend:
        window = min(args.window or backend.max_len, backend.max_len)
        stride = args.stride or max(window // 2, 1)
        prefix = None
        if args.prefix == "eos" and not backend.info.add_bos:
            if not backend.info.eos_ids:
                raise ValueError("--prefix eos: the model has no end-of-sequence token")
            prefix = backend.info.eos_ids[0]
        t1 = time.perf_counter()
        with progress_bar(None, "tok", "perplexity", not args.no_progress) as update:
            per_doc = evaluate_perplexity(backend, docs, window=window, stride=stride, progress=update, prefix_id=prefix)
        t_eval = time.perf_counter() - t1
        total = aggregate(per_doc)
        doc = result_document(
            "perplexity", backend.info, settings={"files": args.files, "window": window, "stride": stride,
                                                  "prefix": args.prefix, "limit": args.limit},
            results={"total": total.to_json(), "documents": [d.to_json() for d in per_doc]},
            elapsed_s=time.perf_counter() - t0,
            throughput={"eval_s": t_eval, "scored_tokens_per_s": total.tokens / t_eval if t_eval else 0.0},
        )
    rows = [(d.name, d.tokens, d.perplexity, d.bits_per_byte) for d in per_doc]
    if len(per_doc) > 1:
        rows.append(("total", total.tokens, total.perplexity, total.bits_per_byte))
    table = format_table(["document", "tokens", "perplexity", "bits/byte"], rows)
    table += f"\n{total.tokens} tokens in {t_eval:.1f}s ({total.tokens / t_eval:.0f} tokens/s), window {window}, stride {stride}"
    if total.inexact_windows:
        table += (f"\nwarning: {total.inexact_windows} windows were re-tokenized differently by the server "
                  "(their numbers are for the server's tokenization)")
    _emit(args, doc, table)
    return 0


def run_choice(args: argparse.Namespace) -> int:
    items = read_items(args.file)[: args.limit]
    t0 = time.perf_counter()
    with open_backend(args) as backend:
        t1 = time.perf_counter()
        with progress_bar(None, "tok", "choice", not args.no_progress) as update:
            outcomes = evaluate_choice(backend, items, progress=update)
        t_eval = time.perf_counter() - t1
        summary = summarize(outcomes)
        doc = result_document(
            "choice", backend.info, settings={"file": args.file, "limit": args.limit}, results=summary,
            elapsed_s=time.perf_counter() - t0,
            throughput={"eval_s": t_eval, "scored_tokens_per_s": summary["scored_tokens"] / t_eval if t_eval else 0.0},
        )
    if args.samples:
        Path(args.samples).write_text("".join(json.dumps(o.to_json()) + "\n" for o in outcomes), encoding="utf-8")
    table = format_table(
        ["file", "items", "acc", "± stderr", "acc_norm", "± stderr"],
        [(args.file, summary["items"], summary["acc"], summary["acc_stderr"], summary["acc_norm"],
          summary["acc_norm_stderr"])],
    )
    _emit(args, doc, table + f"\n{summary['scored_tokens']} continuation tokens scored in {t_eval:.1f}s")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    defaults = GenerationOptions(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    rows, prompts, options = read_prompts(args.file, defaults, chat=args.chat)
    rows, prompts, options = rows[: args.limit], prompts[: args.limit], options[: args.limit]
    t0 = time.perf_counter()
    with open_backend(args) as backend:
        t1 = time.perf_counter()
        with progress_bar(None, "tok", "generate", not args.no_progress) as update:
            gens = backend.generate(prompts, options, progress=update)
        t_eval = time.perf_counter() - t1
        out = output_rows(rows, gens)
        n_tok = sum(len(g.token_ids) for g in gens)
        reasons = {r: sum(g.finish_reason == r for g in gens) for r in ("stop", "length")}
        settings = {k: v for k, v in vars(defaults).items()} | {"file": args.file, "chat": args.chat,
                                                                "generations": args.generations}
        settings["stop"] = list(defaults.stop)
        doc = result_document(
            "generate", backend.info, settings=settings,
            results={"prompts": len(gens), "completion_tokens": n_tok,
                     "prompt_tokens": sum(g.prompt_tokens for g in gens), "finish_reasons": reasons},
            elapsed_s=time.perf_counter() - t0,
            throughput={"eval_s": t_eval, "output_tokens_per_s": n_tok / t_eval if t_eval else 0.0},
        )
    Path(args.generations).parent.mkdir(parents=True, exist_ok=True)
    Path(args.generations).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    table = format_table(["file", "prompts", "completion tokens", "stop", "length", "tokens/s"],
                         [(args.file, len(gens), n_tok, reasons["stop"], reasons["length"], n_tok / t_eval)])
    _emit(args, doc, table + f"\ngenerations written to {args.generations}")
    return 0
