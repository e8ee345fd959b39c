"""The hand-computable fake engine the scheduler, server, replica and multi-host tests run on.

The fake engine's next token is ``(last token + 1) % V`` with a fixed logprob, so every
stream's expected output is known in advance (``expected``); it checks the engine contract
(chunks in order, no decode of a released or unprefilled slot, nothing written past max_len,
every call from one thread). The fake tokenizer maps ids 0..94 to the printable ASCII characters.
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


def slot_token(t: int, n_top: int) -> SlotToken:
    return SlotToken(
        t, LOGPROB, tuple((t + i) % V for i in range(n_top)), tuple(LOGPROB - i for i in range(n_top))
    )


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
    """EngineProtocol with hand-computable output. Decode work happens at dispatch (device order);
    ``step_delay`` is how long a step's result takes to become ready."""

    def __init__(
        self,
        num_slots: int = 4,
        max_len: int = 64,
        prefill_chunk: int = 8,
        step_delay: float = 0.0,
        fail_prefill_token: int | None = None,
    ) -> None:
        self.num_slots, self.max_len, self.prefill_chunk = num_slots, max_len, prefill_chunk
        self.step_delay = step_delay
        self.fail_prefill_token = fail_prefill_token
        self.fail_next_decode = False
        self.gate: threading.Event | None = None
        self.state: list[dict | None] = [None] * num_slots
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self._thread: int | None = None

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)
            raise AssertionError(what)

    def _on_thread(self) -> None:
        me = threading.get_ident()
        self._thread = self._thread or me
        self._check(self._thread == me, "engine called from two threads")

    def prefill(self, slot, tokens, params: SamplingParams, *, start=0, last=True):
        self._on_thread()
        tokens = list(tokens)
        self.calls.append(("prefill", slot, start, len(tokens), last, time.monotonic()))
        self._check(0 <= slot < self.num_slots, f"prefill: slot {slot} out of range")
        self._check(1 <= len(tokens) <= self.prefill_chunk, f"prefill: chunk of {len(tokens)} tokens")
        st = self.state[slot]
        if start == 0:
            self._check(st is None, f"prefill: slot {slot} not released")
            st = self.state[slot] = {"length": 0, "last": None, "ready": False, "params": params}
        else:
            self._check(st is not None and st["length"] == start and not st["ready"], "prefill: chunk out of order")
        self._check(start + len(tokens) <= self.max_len, "prefill: past max_len")
        if self.fail_prefill_token is not None and self.fail_prefill_token in tokens:
            raise RuntimeError("injected prefill failure")
        st["length"] += len(tokens)
        if not last:
            return None
        st["ready"], st["last"] = True, next_token(tokens[-1])
        return slot_token(st["last"], params.logprobs)

    def decode(self, active):
        self._on_thread()
        active = list(active)
        self.calls.append(("decode", tuple(active), time.monotonic()))
        results = {}
        for slot in active:
            st = self.state[slot]
            self._check(st is not None and st["ready"], f"decode: slot {slot} not prefilled")
            self._check(st["length"] < self.max_len, f"decode: slot {slot} past max_len")
            st["length"] += 1  # writes the previous token's K/V
            st["last"] = next_token(st["last"])
            results[slot] = slot_token(st["last"], st["params"].logprobs)
        fail, self.fail_next_decode = self.fail_next_decode, False
        return FakeHandle(results, time.monotonic() + self.step_delay, self.gate, fail)

    def release(self, slot):
        self._on_thread()
        self.calls.append(("release", slot, time.monotonic()))
        self.state[slot] = None

    def score(self, context, continuation) -> ScoreOutput:
        self._on_thread()
        self.calls.append(("score", len(context), len(continuation), time.monotonic()))
        prev = list(context)[-1]
        lps = []
        for t in continuation:
            lps.append(-1.0 if t == next_token(prev) else -5.0)
            prev = t
        return ScoreOutput(sum(lps), tuple(lps), all(x == -1.0 for x in lps), tuple(context), tuple(continuation))

    def active_slots(self) -> int:
        return sum(s is not None for s in self.state)


class GroupingFakeEngine(FakeEngine):
    """A FakeEngine that also prefills up to 3 whole prompts of <= 4 tokens in one call."""

    prefill_rows, prefill_many_limit = 3, 4
    hold: threading.Event | None = None  # a one-prompt prefill waits for it (once)

    def prefill(self, slot, tokens, params, *, start=0, last=True):
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.wait(10)
        return super().prefill(slot, tokens, params, start=start, last=last)

    def prefill_many(self, items):
        self._on_thread()
        items = [(slot, list(tokens), params) for slot, tokens, params in items]
        self.calls.append(("prefill_many", tuple(slot for slot, _, _ in items), time.monotonic()))
        self._check(1 <= len(items) <= self.prefill_rows, f"prefill_many: {len(items)} prompts")
        self._check(all(len(t) <= self.prefill_many_limit for _, t, _ in items), "prefill_many: prompt too long")
        if any(self.fail_prefill_token in t for _, t, _ in items):
            raise RuntimeError("injected prefill failure")
        return [FakeEngine.prefill(self, slot, t, params) for slot, t, params in items]


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

    def decode(self, active, steps=1):
        if steps == 1:
            self.calls.append(("decode_1", tuple(active), time.monotonic()))
            return super().decode(active)
        self._check(steps == self.decode_steps, f"decode: {steps} steps per call")
        self.calls.append(("decode_k", tuple(active), time.monotonic()))
        return MultiStepHandle([super(MultiStepFakeEngine, self).decode(active) for _ in range(steps)])


def expected(prompt_ids: Sequence[int], max_tokens: int, eos: bool = True) -> list[int]:
    out, t = [], prompt_ids[-1]
    for _ in range(max_tokens):
        t = next_token(t)
        out.append(t)
        if eos and t == EOS:
            break
    return out
