"""Driving an engine directly, one call at a time (engine tests; servers go through the scheduler)."""

from __future__ import annotations

import math

import numpy as np

from jaxinfer.engine.types import SamplingParams, ScoreOutput


class PageAllocator:
    """The fewest pages a test needs, handed out in a shuffled order so that no
    sequence's pages are contiguous or ascending."""

    def __init__(self, num_pages: int, seed: int = 0):
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(num_pages)]

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"test page allocator: {n} pages wanted, {len(self.free)} free")
        out, self.free = self.free[:n], self.free[n:]
        return out

    def give(self, pages) -> None:
        self.free.extend(pages)


def drive(engine, prompts, params=None, *, max_tokens: int = 8, steps: int = 1, pages: PageAllocator | None = None,
          rows=None) -> list[dict]:
    """Generate for every prompt at once: each prompt prefilled in pieces of at
    most ``engine.prefill_chunk`` into its own row (``rows``, default 0..), then
    all decoded together (``steps`` per call) for ``max_tokens`` tokens
    (no stop tokens). Returns per prompt ``token_ids``, ``logprobs`` and the
    ``SlotToken``s. The pages are given back at the end."""
    params = params if params is not None else [SamplingParams()] * len(prompts)
    if not isinstance(params, (list, tuple)):
        params = [params] * len(prompts)
    rows = list(rows) if rows is not None else list(range(len(prompts)))
    pages = pages or PageAllocator(engine.num_pages)
    ps, total = engine.page_size, [len(p) + max_tokens for p in prompts]
    tables = {r: pages.take(math.ceil(n / ps)) for r, n in zip(rows, total)}
    out = [{"token_ids": [], "logprobs": [], "tokens": []} for _ in prompts]

    def accept(i, tok):
        if len(out[i]["token_ids"]) < max_tokens:
            out[i]["token_ids"].append(tok.token)
            out[i]["logprobs"].append(tok.logprob)
            out[i]["tokens"].append(tok)

    for i, (r, prompt, sp) in enumerate(zip(rows, prompts, params)):
        C = engine.prefill_chunk
        for off in range(0, len(prompt), C):
            piece = prompt[off : off + C]
            tok = engine.prefill(r, piece, sp, pages=tables[r], start=off, last=off + len(piece) == len(prompt))
        accept(i, tok)
    while any(len(o["token_ids"]) < max_tokens for o in out):
        left = max_tokens - min(len(o["token_ids"]) for o in out)
        k = steps if steps > 1 and left >= steps else 1
        handle = engine.decode(rows, tables, k)
        for step in handle.results():
            for i, r in enumerate(rows):
                accept(i, step[r])
    for r in rows:
        engine.release(r)
        pages.give(tables[r])
    return out


def score_direct(engine, context, continuation, *, pages: PageAllocator | None = None) -> ScoreOutput:
    """log p(continuation | context) by direct ``engine.score`` calls over fresh pages, in pieces of
    at most ``engine.prefill_chunk`` (no scheduler, no prefix cache). Only while nothing else
    drives the engine."""
    full = list(context) + list(continuation)
    tokens, targets = full[:-1], full[1:]
    pages = pages or PageAllocator(engine.num_pages)
    table = pages.take(math.ceil(len(tokens) / engine.page_size))
    lps, tops, top_lps = [], [], []
    for off in range(0, len(tokens), engine.prefill_chunk):
        out = engine.score(tokens[off : off + engine.prefill_chunk], targets[off : off + engine.prefill_chunk],
                           pages=table, start=off)
        lps += out.token_logprobs
        tops += out.top_ids
        top_lps += out.top_logprobs
    pages.give(table)
    k = len(context) - 1
    return ScoreOutput(float(sum(lps[k:])), tuple(lps[k:]), tuple(tops[k:]) == tuple(continuation), tuple(context),
                       tuple(continuation), tuple(tops[k:]), tuple(top_lps[k:]))


def first_and_decodes(engine, row, pieces, pages, n_decode=5, params=SamplingParams(logprobs=3)):
    """Prefill ``pieces`` ((start, tokens) each, the last one sampled) into ``row``, decode
    ``n_decode`` more, release the row; returns the SlotTokens."""
    for k, (start, toks) in enumerate(pieces):
        tok = engine.prefill(row, toks, params, pages=pages, start=start, last=k == len(pieces) - 1)
    out = [tok] + [engine.decode([row], {row: pages}).result()[row] for _ in range(n_decode)]
    engine.release(row)
    return out


def assert_same_tokens(a, b, atol=2e-5):
    """Two runs' SlotTokens: the same tokens and top ids, log-probs within ``atol``."""
    assert [t.token for t in a] == [t.token for t in b]
    assert [t.top_ids for t in a] == [t.top_ids for t in b]
    np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b], atol=atol)
