"""A hand-computable engine, tokenizer and detokenizer for the HTTP front end's tests.

Tokens are printable characters (id = ord(c) - 32), so a test can read a completion's text off
its token ids; the engine's next token is the previous one plus one.
"""

from __future__ import annotations

import threading
import time

from jaxinfer.engine.types import ScoreOutput, SlotToken


class HttpFakeTokenizer:
    """ids 0..94 <-> chr(32 + id); 95 = BOS (added to text prompts), 96 = EOS; both decode to ""
    unless asked for the special pieces. A chat template of "[role]content" turns."""

    vocab_size, eos_ids, bos_id = 97, (96,), 95
    bos_token, eos_token, add_bos = "<s>", "</s>", True
    chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if text in ("<s>", "</s>"):
            return [95 if text == "<s>" else 96]
        ids = []
        for c in text:
            if not 32 <= ord(c) < 127:
                raise ValueError(f"character {c!r} is not in the fake vocabulary")
            ids.append(ord(c) - 32)
        return ([95] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        special = {95: "" if skip_special else "<s>", 96: "" if skip_special else "</s>"}
        return "".join(special[i] if i in special else chr(32 + i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {m['role']!r} (known: system, user, assistant)")
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"


class HttpFakeDetokenizer:
    def __init__(self, tok) -> None:
        self.tok = tok

    def add(self, ids) -> str:
        return self.tok.decode(ids)

    def flush(self) -> str:
        return ""


class HttpFakeEngine:
    """EngineProtocol (pages are accepted and ignored: the HTTP tests check the front end, and
    tests.helpers.fakes checks page tables): the next token is (last + 1) % 97 with log-prob -0.25
    (its top alternatives are the next ids, at -0.25 - i) when temperature is 0; with a
    temperature, (last + 1 + r) % 97 where r in [0, 10) comes from the request's seed and the
    position, so seeded sampling is reproducible and different seeds differ. ``score``: -1 for a
    target that follows its input token, else -5; the top-1 is always that successor.
    ``step_delay`` slows each step."""

    def __init__(self, max_seqs: int = 4, max_len: int = 64, prefill_chunk: int = 16, step_delay: float = 0.0,
                 page_size: int = 4, num_pages: int = 256):
        self.max_seqs, self.max_len, self.prefill_chunk, self.step_delay = max_seqs, max_len, prefill_chunk, step_delay
        self.page_size, self.num_pages = page_size, num_pages
        self.state: list[dict | None] = [None] * max_seqs
        self.gate = threading.Event()
        self.gate.set()
        self.decode_calls = 0
        self.released: list[int] = []

    def _next(self, st: dict) -> int:
        p = st["params"]
        r = 0 if p.temperature == 0 else (hash((p.seed, st["length"])) % 10)
        st["last"] = (st["last"] + 1 + r) % 97
        return st["last"]

    def _token(self, t: int, n_top: int) -> SlotToken:
        return SlotToken(t, -0.25, tuple((t + i) % 97 for i in range(n_top)), tuple(-0.25 - i for i in range(n_top)))

    def prefill(self, row, tokens, params, *, pages, start=0, last=True):
        if self.state[row] is None or start == 0:
            self.state[row] = {"length": start, "last": None, "params": params}
        st = self.state[row]
        st["length"] = start + len(tokens)
        if not last:
            return None
        st["last"], st["params"] = tokens[-1], params
        return self._token(self._next(st), params.logprobs)

    def decode(self, rows, pages, steps=1):
        self.gate.wait(30)
        self.decode_calls += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        out = {}
        for row in rows:
            st = self.state[row]
            st["length"] += 1
            out[row] = self._token(self._next(st), st["params"].logprobs)

        class Handle:
            def result(self_inner):
                return out

        return Handle()

    def release(self, row):
        self.state[row] = None
        self.released.append(row)

    def score(self, tokens, targets, *, pages, start=0):
        lps = [-1.0 if t == (x + 1) % 97 else -5.0 for x, t in zip(tokens, targets)]
        tops = [(x + 1) % 97 for x in tokens]
        return ScoreOutput(sum(lps), tuple(lps), all(x == -1.0 for x in lps), top_ids=tuple(tops),
                           top_logprobs=tuple(-1.0 for _ in tops))

    def active_rows(self) -> int:
        return sum(s is not None for s in self.state)
