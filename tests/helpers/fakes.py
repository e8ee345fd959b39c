"""A hand-computable fake engine, tokenizer and detokenizer for scheduler and server tests.

The fake engine keeps a paged pool: it writes every token through the page table it is given
and computes its next token, ``(last token + 1) % V``, and its logprob, a checksum of the whole
sequence, from what it reads back through that table. So every stream's expected output is
known in advance and a wrong page table (a bad prefix-cache hit, a page freed too early)
changes it; it checks the engine contract (chunks in order, positions before ``start`` written,
no decode of a released or unprefilled row, no write into a page another row holds, nothing
past max_len, every call from one thread). The fake tokenizer maps ids 0..94 to the printable
ASCII characters.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from jaxinfer.engine.types import SamplingParams, ScoreOutput, SlotToken

V = 97
BOS, EOS = 95, 96
LOGPROB = -0.25


class FakeTokenizer:
    """ids 0..94 <-> chr(32 + id); 95 = BOS, 96 = EOS (both decode to "")."""

    vocab_size = V
    eos_ids = (EOS,)
    bos_id = BOS

    def __init__(self, add_bos: bool = True, poison: Sequence[int] = ()) -> None:
        self.add_bos = add_bos
        self.poison = frozenset(poison)  # ids whose decoding raises

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = []
        for c in text:
            if not 32 <= ord(c) < 127:
                raise ValueError(f"character {c!r} is not in the fake vocabulary")
            ids.append(ord(c) - 32)
        return ([BOS] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        bad = [i for i in ids if i in self.poison]
        if bad:
            raise ValueError(f"cannot decode token {bad[0]}")
        return "".join(chr(32 + i) for i in ids if 0 <= i < 95)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        out = []
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r} (known: system, user, assistant)")
            out.append(f"[{role}]{content}")
        return "".join(out) + ("[assistant]" if add_generation_prompt else "")


class FakeDetokenizer:
    def __init__(self, tok: FakeTokenizer) -> None:
        self.tok = tok

    def add(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def flush(self) -> str:
        return ""


def next_token(t: int) -> int:
    return (t + 1) % V


def logprob_of(seq: Sequence[int]) -> float:
    """The fake's logprob of the token after ``seq``: a checksum of everything the engine read
    through the page table, so a wrong page table shows in the logprobs even when the token
    (which depends only on the last position) comes out right."""
    return -(sum((i + 1) * t for i, t in enumerate(seq)) % 997) / 64


def slot_token(t: int, n_top: int, lp: float = LOGPROB) -> SlotToken:
    return SlotToken(t, lp, tuple((t + i) % V for i in range(n_top)), tuple(lp - i for i in range(n_top)))


class FakeHandle:
    def __init__(self, results: dict[int, SlotToken], ready_at: float, gate: threading.Event | None, fail: bool):
        self._results, self._ready_at, self._gate, self._fail = results, ready_at, gate, fail

    def result(self) -> dict[int, SlotToken]:
        if self._gate is not None:
            self._gate.wait(30)
        delay = self._ready_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if self._fail:
            raise RuntimeError("injected decode failure")
        return dict(self._results)


class FakeEngine:
    """EngineProtocol over a fake paged pool: every token written goes into ``pool[page][offset]``
    through the page table it is given, and every output is computed from what it reads back
    through the page table (next token = last token + 1, logprob = a checksum of the whole
    sequence), so a wrong page table gives wrong tokens or logprobs. Decode work happens at
    dispatch (device order); ``step_delay`` is how long a step's result takes to become ready.
    It checks the contract: chunks in order, positions before ``start`` already written, pages
    cover what is written, nothing past max_len, no write into a page another live row holds
    (cached pages are read-only), every call from one thread."""

    def __init__(
        self,
        max_seqs: int = 4,
        max_len: int = 64,
        prefill_chunk: int = 8,
        step_delay: float = 0.0,
        fail_prefill_token: int | None = None,
        page_size: int = 4,
        num_pages: int | None = None,
    ) -> None:
        self.max_seqs, self.max_len, self.prefill_chunk = max_seqs, max_len, prefill_chunk
        self.page_size = page_size
        self.num_pages = num_pages if num_pages is not None else max_seqs * -(-max_len // page_size)
        self.pool: list[list[int | None]] = [[None] * page_size for _ in range(self.num_pages)]
        self.step_delay = step_delay
        self.fail_prefill_token = fail_prefill_token
        self.fail_next_decode = False
        self.gate: threading.Event | None = None
        self.state: list[dict | None] = [None] * max_seqs
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self.score_reads: list[tuple[int, ...]] = []  # the whole sequence each score piece read
        self._thread: int | None = None

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)
            raise AssertionError(what)

    def _on_thread(self) -> None:
        me = threading.get_ident()
        self._thread = self._thread or me
        self._check(self._thread == me, "engine called from two threads")

    def _table(self, pages, n: int, what: str) -> list[int]:
        pages = list(pages)
        self._check(len(set(pages)) == len(pages), f"{what}: page table {pages} repeats a page")
        self._check(all(0 <= p < self.num_pages for p in pages), f"{what}: page out of range in {pages}")
        self._check(len(pages) * self.page_size >= n, f"{what}: {len(pages)} pages do not cover {n} positions")
        return pages

    def _write(self, row: int | None, pages: list[int], pos: int, token: int, what: str) -> None:
        page = pages[pos // self.page_size]
        for other, st in enumerate(self.state):
            if other != row and st is not None:
                self._check(page not in st["pages"], f"{what}: writes page {page} that row {other} holds")
        self.pool[page][pos % self.page_size] = token

    def _read(self, pages: list[int], n: int, what: str) -> list[int]:
        seq = [self.pool[pages[p // self.page_size]][p % self.page_size] for p in range(n)]
        self._check(None not in seq, f"{what}: reads a position never written")
        return seq

    def prefill(self, row, tokens, params: SamplingParams, *, pages, start=0, last=True):
        self._on_thread()
        tokens = list(tokens)
        first_piece = 0 <= row < self.max_seqs and self.state[row] is None
        self.calls.append(("prefill", row, start, len(tokens), last, time.monotonic(), first_piece))
        self._check(0 <= row < self.max_seqs, f"prefill: row {row} out of range")
        self._check(1 <= len(tokens) <= self.prefill_chunk, f"prefill: chunk of {len(tokens)} tokens")
        self._check(start + len(tokens) <= self.max_len, "prefill: past max_len")
        pages = self._table(pages, start + len(tokens), "prefill")
        st = self.state[row]
        if st is None:  # a new sequence: positions before start are its cached prefix
            self._read(pages, start, "prefill of a cached prefix")
            st = self.state[row] = {"length": start, "last": None, "ready": False, "params": params, "pages": pages}
        else:
            self._check(st["length"] == start and not st["ready"], "prefill: chunk out of order or row not released")
            st["pages"] = pages
        if self.fail_prefill_token is not None and self.fail_prefill_token in tokens:
            raise RuntimeError("injected prefill failure")
        for i, t in enumerate(tokens):
            self._write(row, pages, start + i, t, "prefill")
        st["length"] += len(tokens)
        if not last:
            return None
        seq = self._read(pages, st["length"], "prefill")
        st["ready"], st["last"] = True, next_token(seq[-1])
        return slot_token(st["last"], params.logprobs, logprob_of(seq))

    def _decode_one(self, rows, pages) -> dict[int, SlotToken]:
        results = {}
        for row in rows:
            st = self.state[row]
            self._check(st is not None and st["ready"], f"decode: row {row} not prefilled")
            self._check(st["length"] < self.max_len, f"decode: row {row} past max_len")
            table = self._table(pages[row], st["length"] + 1, f"decode row {row}")
            st["pages"] = table
            self._write(row, table, st["length"], st["last"], "decode")  # the previous token's K/V
            st["length"] += 1
            seq = self._read(table, st["length"], "decode")
            st["last"] = next_token(seq[-1])
            results[row] = slot_token(st["last"], st["params"].logprobs, logprob_of(seq))
        return results

    def decode(self, rows, pages, steps=1):
        self._on_thread()
        self._check(steps == 1, f"decode: {steps} steps per call on a one-step engine")
        rows = list(rows)
        self.calls.append(("decode", tuple(rows), time.monotonic()))
        self._check(set(pages) == set(rows), f"decode: page tables for {sorted(pages)}, rows {rows}")
        results = self._decode_one(rows, pages)
        fail, self.fail_next_decode = self.fail_next_decode, False
        return FakeHandle(results, time.monotonic() + self.step_delay, self.gate, fail)

    def release(self, row):
        self._on_thread()
        self.calls.append(("release", row, time.monotonic()))
        self.state[row] = None

    def score(self, tokens, targets, *, pages, start=0) -> ScoreOutput:
        self._on_thread()
        tokens, targets = list(tokens), list(targets)
        self.calls.append(("score", start, len(tokens), time.monotonic()))
        self._check(len(tokens) == len(targets) and 1 <= len(tokens) <= self.prefill_chunk, "score: piece size")
        pages = self._table(pages, start + len(tokens), "score")
        self._read(pages, start, "score of a cached prefix")
        for i, t in enumerate(tokens):
            self._write(None, pages, start + i, t, "score")
        seq = self._read(pages, start + len(tokens), "score")
        self.score_reads.append(tuple(seq))
        tops = [next_token(seq[start + i]) for i in range(len(tokens))]
        lps = [-1.0 if tgt == top else -5.0 for tgt, top in zip(targets, tops)]
        return ScoreOutput(sum(lps), tuple(lps), tops == targets, tuple(tokens), tuple(targets), tuple(tops),
                           tuple(-1.0 for _ in tops))

    def active_rows(self) -> int:
        return sum(s is not None for s in self.state)


class GroupingFakeEngine(FakeEngine):
    """A FakeEngine that also prefills up to 3 prompt remainders of <= 4 tokens in one call."""

    prefill_rows, prefill_many_limit = 3, 4
    hold: threading.Event | None = None  # a one-prompt prefill waits for it (once)

    def prefill(self, row, tokens, params, *, pages, start=0, last=True):
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.wait(10)
        return super().prefill(row, tokens, params, pages=pages, start=start, last=last)

    def prefill_many(self, items):
        self._on_thread()
        items = [(row, list(tokens), params, start, pages) for row, tokens, params, start, pages in items]
        self.calls.append(("prefill_many", tuple(it[0] for it in items), time.monotonic()))
        self._check(1 <= len(items) <= self.prefill_rows, f"prefill_many: {len(items)} prompts")
        self._check(all(len(it[1]) <= self.prefill_many_limit for it in items), "prefill_many: prompt too long")
        if any(self.fail_prefill_token in it[1] for it in items):
            raise RuntimeError("injected prefill failure")
        return [FakeEngine.prefill(self, row, t, params, pages=pages, start=start) for row, t, params, start, pages in items]


class MultiStepHandle:
    def __init__(self, handles: list[FakeHandle]):
        self._handles = handles

    def result(self):
        raise AssertionError("a multi-step call's handle is read with results()")

    def results(self) -> list[dict[int, SlotToken]]:
        return [h.result() for h in self._handles]


class MultiStepFakeEngine(FakeEngine):
    """A FakeEngine that also runs ``decode_steps`` steps in one call."""

    decode_steps = 3

    def decode(self, rows, pages, steps=1):
        if steps == 1:
            self.calls.append(("decode_1", tuple(rows), time.monotonic()))
            return super().decode(rows, pages)
        self._check(steps == self.decode_steps, f"decode: {steps} steps per call")
        for row in rows:
            self._table(pages[row], self.state[row]["length"] + steps, f"decode_k row {row}")
        self.calls.append(("decode_k", tuple(rows), time.monotonic()))
        return MultiStepHandle([super(MultiStepFakeEngine, self).decode(rows, pages) for _ in range(steps)])


def expected(prompt_ids: Sequence[int], max_tokens: int, eos: bool = True) -> list[int]:
    out, t = [], prompt_ids[-1]
    for _ in range(max_tokens):
        t = next_token(t)
        out.append(t)
        if eos and t == EOS:
            break
    return out
