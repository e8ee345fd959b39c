"""Engine: prefill + decode against one full-sequence forward, donation, buckets,
no recompilation, batched sampling statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.sampling import SlotSampling, sample
from jaxinfer.engine.types import SamplingParams
from jaxinfer.model.transformer import KVCache, Transformer
from jaxinfer.model.weights import nest, random_weights
from tests.helpers.scheduled import generate
from tests.helpers.tiny import ENGINE_CFG, GEMMA_TINY, LLAMA_TINY, make_model, prompt_of


# Gemma's engine takes minutes to compile on 2 cores: the fast lane checks the engine on Llama.
@pytest.fixture(scope="module", params=[pytest.param(LLAMA_TINY, id="llama"),
                                        pytest.param(GEMMA_TINY, id="gemma3", marks=pytest.mark.slow)])
def engine(request) -> Engine:
    eng = Engine(make_model(request.param), ENGINE_CFG)
    eng.compile(progress=False)
    return eng


def full_forward_logprobs(model: Transformer, seq: list[int]) -> np.ndarray:
    """log-softmax at every position of one plain forward over the whole sequence."""
    T = len(seq)
    cache = KVCache.zeros(model.cfg, 1, T, jnp.float32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    h, _ = model(jnp.asarray([seq], jnp.int32), pos, cache, None, T)
    return np.asarray(jax.nn.log_softmax(model.logits(h[0]), axis=-1))


@pytest.mark.parametrize("n_prompt", [5, 40])  # 40 crosses Gemma's 16-token window and the 32 bucket (chunked)
def test_prefill_then_decode_matches_full_forward(engine: Engine, n_prompt: int):
    model = engine.reference_model()  # the engine's own weights, stacked and scanned
    prompt = prompt_of(n_prompt, seed=n_prompt)
    params = SamplingParams(logprobs=20)
    first = engine.prefill(0, prompt, params)
    toks = [first]
    for _ in range(12):
        toks.append(engine.decode([0]).result()[0])
    engine.release(0)
    seq = prompt + [t.token for t in toks]
    ref = full_forward_logprobs(model, seq)
    for i, t in enumerate(toks):
        row = ref[n_prompt - 1 + i]
        assert t.token == int(np.argmax(row))
        np.testing.assert_allclose(t.logprob, row[t.token], atol=1e-4)
        np.testing.assert_allclose(t.top_logprobs, row[list(t.top_ids)], atol=1e-4)
        np.testing.assert_allclose(t.top_logprobs, np.sort(row)[::-1][:20], atol=1e-4)


def test_one_block_cache_equals_span_blocks(engine: Engine):
    """The cache layout other platforms use (one block of max_len per layer, a
    span read as a slice of it) gives the same tokens and logprobs as the CPU
    layout (blocks ending at the spans, read whole)."""
    assert len(engine.kv_blocks) > 1
    one = Engine(make_model(engine.cfg), dataclasses.replace(ENGINE_CFG, span_blocks=False, lazy_compile=True))
    assert one.kv_blocks == (one.max_len,)
    prompts = [prompt_of(5, 21), prompt_of(40, 22), prompt_of(70, 23)]  # 70: past a 64-position span
    params = [SamplingParams(logprobs=5), SamplingParams(temperature=0.9, seed=4, logprobs=5), SamplingParams()]
    a = generate(engine, prompts, params, max_tokens=12, ignore_eos=True)
    b = generate(one, prompts, params, max_tokens=12, ignore_eos=True)
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"]
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], atol=1e-5)


@pytest.mark.slow  # compiles an engine with twice the spans
def test_half_octave_spans_equal_full_forward():
    """span_steps=2 adds spans half way between the powers of two (48 and 96
    here); prefill and decode over them give the full forward's log-probs, and
    a step at 40 positions reads a span of 48, not 64."""
    eng = Engine(make_model(GEMMA_TINY), dataclasses.replace(ENGINE_CFG, span_steps=2, lazy_compile=True))
    assert eng.spans == (32, 48, 64, 96, 128) and eng.kv_blocks == (32, 16, 16, 32, 32)
    prompt = prompt_of(38, seed=7)
    toks = [eng.prefill(0, prompt, SamplingParams(logprobs=5))]
    spans = []
    for _ in range(14):  # positions 38..51: spans 48, then 64 from position 48 on
        toks.append(eng.decode([0]).result()[0])
        spans.append(eng.last_decode_variant[1])
    assert spans[:10] == [48] * 10 and spans[10:] == [64] * 4
    ref = full_forward_logprobs(eng.reference_model(), prompt + [t.token for t in toks])
    for i, t in enumerate(toks):
        row = ref[len(prompt) - 1 + i]
        assert t.token == int(np.argmax(row))
        np.testing.assert_allclose([t.logprob, *t.top_logprobs], [row[t.token], *row[list(t.top_ids)]], atol=1e-4)


@pytest.mark.slow  # compiles a second engine
def test_decode_skips_blocks_no_row_needs(engine: Engine):
    """A decode over every row runs attention block by block and skips, at run
    time, the blocks no row needs: a span of 128 in blocks of 16 read at
    positions < 80 skips the last three, and Gemma's sliding-window layers
    (window 16) skip the blocks behind every row's window. The log-probs equal
    the full forward's. A decode over a prefix of the rows keeps the one softmax."""
    eng = Engine(make_model(engine.cfg), dataclasses.replace(ENGINE_CFG, kv_block_max=16, lazy_compile=True))
    assert eng.kv_blocks == (16,) * 8
    params = SamplingParams(logprobs=4)
    prompts = [prompt_of(n, seed=20 + n) for n in (34, 40, 36, 60)]
    out = [[eng.prefill(slot, p, params)] for slot, p in enumerate(prompts)]
    spans = []
    for _ in range(13):  # the longest row goes from position 60 to 72: spans 64, then 128
        step = eng.decode([0, 1, 2, 3]).result()
        spans.append(eng.last_decode_variant)
        for slot in range(4):
            out[slot].append(step[slot])
    assert spans[0] == (4, 64) and spans[-1] == (4, 128)
    for slot, p in enumerate(prompts):
        ref = full_forward_logprobs(eng.reference_model(), p + [t.token for t in out[slot]])
        for i, t in enumerate(out[slot]):
            row = ref[len(p) - 1 + i]
            assert t.token == int(np.argmax(row))
            np.testing.assert_allclose([t.logprob, *t.top_logprobs], [row[t.token], *row[list(t.top_ids)]],
                                       atol=1e-4)
    every_row = eng._compiled[("decode", 4, 128, True)].as_text().count(" conditional(")
    for slot in (1, 2, 3):
        eng.release(slot)
    eng.decode([0]).result()  # row 0 alone: a prefix of the 4 rows, read as a slice
    assert eng.last_decode_variant == (1, 64)  # four blocks of 16
    one_row = eng._compiled[("decode", 1, 64, True)].as_text().count(" conditional(")  # sampling's own
    assert every_row - one_row == 8 * eng.cfg.num_layers  # each of the 8 blocks, every layer


@pytest.mark.slow  # compiles a second engine
def test_one_slot_engine_pads_a_cache_row(engine: Engine):
    """A one-slot engine allocates a second, unused cache row (XLA CPU copies
    every block of a one-row cache on each step); slot 1 stays out of range,
    and its tokens equal a four-slot engine's."""
    one = Engine(make_model(engine.cfg), dataclasses.replace(ENGINE_CFG, slots=1, lazy_compile=True))
    assert one.num_slots == 1 and one.cache_rows == 2 and one.state.cache.k[0][0].shape[0] == 2
    assert one.stats().cache_bytes == 2 * one.max_len * KVCache.bytes_per_token(one.cfg, jnp.float32)
    prompt, params = prompt_of(40, seed=5), SamplingParams(logprobs=3)
    got = [one.prefill(0, prompt, params)] + [one.decode([0]).result()[0] for _ in range(6)]
    want = [engine.prefill(3, prompt, params)] + [engine.decode([3]).result()[3] for _ in range(6)]
    engine.release(3)
    for a, b in zip(got, want):
        assert a.token == b.token and a.top_ids == b.top_ids
        np.testing.assert_allclose([a.logprob, *a.top_logprobs], [b.logprob, *b.top_logprobs], atol=1e-5)
    one.release(0)
    short = prompt_of(5, seed=6)
    a, b = one.prefill_many([(0, short, params)])[0], engine.prefill(3, short, params)  # 3 padding rows dropped
    assert a.token == b.token and a.top_ids == b.top_ids
    np.testing.assert_allclose([a.logprob, *a.top_logprobs], [b.logprob, *b.top_logprobs], atol=1e-5)
    engine.release(3)
    with pytest.raises(ValueError, match="out of range"):
        one.prefill(1, short, params)


@pytest.mark.slow  # compiles three more engines
def test_bfloat16_weights_are_held_as_float32_on_cpu():
    """XLA CPU has no bfloat16 matmul: it converts every bfloat16 weight to
    float32 on every call. A CPU engine holds bfloat16 weights as float32
    instead: its tokens and log-probs are those of an engine given the same
    values as float32, and its decode program converts no weight (the program
    of an engine forced to hold them in bfloat16 does)."""
    cfg = EngineConfig(slots=2, max_len=64, prefill_buckets=(16,), min_span=32, span_blocks=True, lazy_compile=True)
    w = {k: jnp.asarray(v).astype(jnp.bfloat16) for k, v in random_weights(LLAMA_TINY, seed=3, scale=0.15).items()}
    e16 = Engine(Transformer(LLAMA_TINY, params=nest(w)), cfg)
    e32 = Engine(Transformer(LLAMA_TINY, params=nest({k: v.astype(jnp.float32) for k, v in w.items()})), cfg)
    forced = Engine(Transformer(LLAMA_TINY, params=nest(w)), dataclasses.replace(cfg, weight_dtype="bfloat16"))
    on_cpu = jax.default_backend() == "cpu"
    assert e16.checkpoint_dtype == jnp.bfloat16 and forced.dtype == jnp.bfloat16
    assert forced.state.cache.dtype == jnp.bfloat16
    held = jnp.float32 if on_cpu else jnp.bfloat16
    assert e16.dtype == held and e16.state.cache.dtype == held
    assert all(a.dtype == held for a in jax.tree.leaves(e16.params) if a.size)
    if on_cpu:
        assert "weights float32 (checkpoint bfloat16)" in e16.describe()
        prompt, params = prompt_of(20, seed=9), SamplingParams(logprobs=5)
        got = generate(e16, [prompt], params, max_tokens=6, ignore_eos=True)[0]
        want = generate(e32, [prompt], params, max_tokens=6, ignore_eos=True)[0]
        assert len(got["token_ids"]) == 6 and got == want

        def decode_hlo(eng):
            exe, _ = eng._compile_variant(("decode", eng.decode_rows[0], eng.spans[0], True))
            return exe.as_text()

        gate_up = "f32[%d,%d]" % (2 * LLAMA_TINY.intermediate_size, LLAMA_TINY.hidden_size)
        converts = lambda text: [ln for ln in text.splitlines() if "convert" in ln and gate_up in ln]  # noqa: E731
        assert converts(decode_hlo(forced)), "the bfloat16 engine was expected to convert its weights per call"
        assert not converts(decode_hlo(e16))


def test_multi_step_decode_equals_single_steps(engine: Engine):
    """decode(active, steps=3) -- three steps in one device loop -- gives the same
    tokens, logprobs and top alternatives as three one-step calls, for a seeded
    sampled slot and a greedy one, across a span boundary (positions 30..35)."""
    eng = Engine(make_model(engine.cfg), dataclasses.replace(ENGINE_CFG, decode_steps=3, lazy_compile=True))
    sampled, greedy = SamplingParams(temperature=0.9, seed=4, logprobs=5), SamplingParams(logprobs=2)
    prompt = prompt_of(30, 31)
    firsts = [eng.prefill(slot, prompt, p) for slot, p in ((0, sampled), (1, sampled), (2, greedy), (3, greedy))]
    assert firsts[0] == firsts[1] and firsts[2] == firsts[3]
    single = [eng.decode([0, 3]).result() for _ in range(6)]
    multi = [r for _ in range(2) for r in eng.decode([1, 2], steps=3).results()]
    assert eng.last_decode_variant[1] == 64 and eng.slot_length(1) == 36
    for one, many in zip(single, multi):  # logprobs within float noise: the spans differ (32 then 64, or 64)
        for a, b in ((one[0], many[1]), (one[3], many[2])):
            assert a.token == b.token and a.top_ids == b.top_ids
            np.testing.assert_allclose([a.logprob, *a.top_logprobs], [b.logprob, *b.top_logprobs], atol=1e-5)
    assert len({one[0].token for one in single}) > 1  # not a constant stream
    with pytest.raises(ValueError, match="decode_steps=3"):
        eng.decode([1], steps=2)
    with pytest.raises(ValueError, match="results"):
        eng.decode([1], steps=3).result()


@pytest.mark.slow  # compiles two more engines
def test_scheduler_with_multi_step_decode_equals_single_steps():
    """The scheduler and Engine.generate over an engine with decode_steps=3
    give the same tokens and logprobs as single steps, for greedy and seeded
    sampled requests whose lengths are not multiples of 3, one of them stopped
    by a stop token inside a 3-step call."""
    from jaxinfer.scheduler import Request, Scheduler, SchedulerLimits

    class Tok:  # the scheduler's view of a tokenizer; text is not compared here
        eos_ids, vocab_size = (), LLAMA_TINY.vocab_size

    class Detok:
        def __init__(self, tok):
            pass

        def add(self, ids):
            return ""

        def flush(self):
            return ""

    one = Engine(make_model(LLAMA_TINY, seed=5), dataclasses.replace(ENGINE_CFG, lazy_compile=True))
    eng = Engine(make_model(LLAMA_TINY, seed=5), dataclasses.replace(ENGINE_CFG, decode_steps=3, lazy_compile=True))
    prompts = [prompt_of(n, seed=200 + n) for n in (3, 11, 20, 7, 30)]
    params = [SamplingParams(logprobs=1), SamplingParams(temperature=0.8, seed=3, logprobs=1),
              SamplingParams(logprobs=1), SamplingParams(temperature=1.1, top_k=20, seed=8, logprobs=1),
              SamplingParams(logprobs=1)]
    lengths = [10, 8, 13, 5, 16]
    ref = [generate(one, [p], [sp], max_tokens=n, ignore_eos=True)[0] for p, sp, n in zip(prompts, params, lengths)]
    stop = ref[2]["token_ids"][4]  # the fifth token: inside the second 3-step call
    ref[2] = generate(one, [prompts[2]], [params[2]], max_tokens=13, stop_token_ids=[stop], ignore_eos=True)[0]
    assert len(ref[2]["token_ids"]) <= 5
    for i, want in enumerate(ref):
        got = generate(eng, [prompts[i]], [params[i]], max_tokens=lengths[i], ignore_eos=True,
                           stop_token_ids=[stop] if i == 2 else None)[0]
        assert got["token_ids"] == want["token_ids"] and got["finish_reason"] == want["finish_reason"]
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
    assert any(k[0] == "decode_k" for k in eng._compiled)
    eng._compiled = {k: v for k, v in eng._compiled.items() if k[0] != "decode_k"}  # the scheduler must run them too
    sched = Scheduler(eng, Tok(), SchedulerLimits(), detokenizer=Detok).start()
    try:
        streams = [sched.submit(Request(tuple(p), max_tokens=n, sampling=sp, ignore_eos=True, return_logprobs=True,
                                        stop_token_ids=(stop,) if i == 2 else ()))
                   for i, (p, sp, n) in enumerate(zip(prompts, params, lengths))]
        for want, st in zip(ref, streams):
            events = list(st)
            got = [t for e in events for t in e.token_ids]
            assert got == want["token_ids"]
            lps = [lp.logprob for e in events for lp in e.logprobs]
            np.testing.assert_allclose(lps, want["logprobs"], atol=1e-5)
    finally:
        sched.close()
    assert any(k[0] == "decode_k" for k in eng._compiled), "the scheduler never ran 3 steps in one call"


def test_prefill_many_equals_one_at_a_time(engine: Engine):
    """Three prompts prefilled in one call (a fourth, padding row writes
    nothing) give the same first tokens, logprobs and following decode steps as
    three separate prefills, and leave another slot's sequence alone."""
    prompts = [prompt_of(5, 41), prompt_of(16, 42), prompt_of(9, 43)]
    params = [SamplingParams(logprobs=3), SamplingParams(temperature=0.8, seed=9, logprobs=2),
              SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2)]
    assert engine.prefill_many_limit == 16 and engine.config.prefill_rows == 4

    def run(together: bool):
        bystander = engine.prefill(1, prompt_of(20, 44), SamplingParams(logprobs=1))
        items = list(zip((0, 2, 3), prompts, params))
        firsts = engine.prefill_many(items) if together else [engine.prefill(*it) for it in items]
        steps = [engine.decode([0, 1, 2, 3]).result() for _ in range(4)]
        for slot in range(4):
            engine.release(slot)
        return [bystander, *firsts] + [t for step in steps for t in step.values()]

    together, alone = run(True), run(False)
    assert [t.token for t in together] == [t.token for t in alone]
    assert [t.top_ids for t in together] == [t.top_ids for t in alone]
    np.testing.assert_allclose([t.logprob for t in together], [t.logprob for t in alone], atol=1e-5)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        engine.prefill_many([(0, prompt_of(17), SamplingParams()), (1, prompt_of(3), SamplingParams())])
    with pytest.raises(ValueError, match="distinct"):
        engine.prefill_many([(0, prompt_of(3), SamplingParams()), (0, prompt_of(3), SamplingParams())])
    with pytest.raises(ValueError, match="prefill_rows=4"):
        engine.prefill_many([(i, prompt_of(3), SamplingParams()) for i in range(5)])


def test_batch_equals_alone(engine: Engine):
    """Greedy and seeded requests give the same tokens alone and beside others."""
    reqs = [
        (prompt_of(7, 1), SamplingParams()),
        (prompt_of(20, 2), SamplingParams(temperature=0.8, top_k=50, seed=7)),
        (prompt_of(3, 3), SamplingParams(temperature=1.0, top_p=0.9, seed=11, repetition_penalty=1.3)),
        (prompt_of(33, 4), SamplingParams(temperature=0.7, min_p=0.05, seed=5, presence_penalty=0.5,
                                          frequency_penalty=0.3)),
        (prompt_of(12, 5), SamplingParams(temperature=1.2, seed=3)),
    ]
    together = generate(engine, [p for p, _ in reqs], [s for _, s in reqs], max_tokens=10, ignore_eos=True)
    for (p, s), res in zip(reqs, together):
        alone = generate(engine, [p], s, max_tokens=10, ignore_eos=True)[0]
        assert alone["token_ids"] == res["token_ids"]
        assert len(res["token_ids"]) == 10 and res["finish_reason"] == "length"


def test_cache_is_donated(engine: Engine):
    """Each call donates the cache blocks its span reads and consumes them (updated
    in place, no second copy); blocks past the span are passed through untouched."""
    c = engine.state.cache
    blocks = len(c.k[0])
    assert blocks == len(engine.spans) and len(jax.tree.leaves(c)) == 2 * engine.cfg.num_layers * blocks
    first = [layer[0] for layer in c.k + c.v]
    later = [b for layer in c.k + c.v for b in layer[1:]]
    engine.prefill(1, prompt_of(4), SamplingParams())  # span 32: the first block only
    assert all(b.is_deleted() for b in first), "prefill must consume every donated cache buffer"
    new = engine.state.cache
    assert not any(b.is_deleted() for b in later)
    assert all(a is b for a, b in zip(later, [b for layer in new.k + new.v for b in layer[1:]]))
    mid = jax.tree.leaves(new)
    engine.prefill(2, prompt_of(70), SamplingParams())  # in chunks; the last one spans every block
    assert all(b.is_deleted() for b in mid), "a full-span prefill must consume every cache buffer"
    mid = jax.tree.leaves(engine.state.cache)
    engine.decode([1, 2]).result()  # slot 2 holds 70 positions: span 128, every block
    assert all(b.is_deleted() for b in mid), "decode must consume every donated cache buffer"
    engine.release(1)
    engine.release(2)


def test_no_recompilation_while_serving(engine: Engine):
    events: list[str] = []

    def listener(name, *args, **kwargs):
        if "compile" in name:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        prompts = [prompt_of(int(n), seed=i) for i, n in enumerate(rng.integers(1, 100, 50))]
        params = [
            SamplingParams(temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.choice([0, 5])),
                           top_p=float(rng.choice([1.0, 0.9])), seed=i, logprobs=int(rng.integers(0, 4)))
            for i in range(50)
        ]
        out = generate(engine, prompts, params, max_tokens=int(8), ignore_eos=True)
        assert all(len(r["token_ids"]) == 8 for r in out)
    finally:
        jax.monitoring.clear_event_listeners()
    backend = [e for e in events if "backend_compile" in e]
    assert backend == [], f"compiled while serving: {events}"


def test_decode_reads_only_what_it_needs(engine: Engine):
    """A short decode attends a short span over a prefix of the slots; the full
    span and every slot only when needed."""
    assert engine.spans[0] < engine.max_len and engine.decode_rows[0] < engine.num_slots
    engine.prefill(0, prompt_of(3), SamplingParams())
    engine.decode([0]).result()
    assert engine.last_decode_variant == (1, engine.spans[0])
    engine.prefill(3, prompt_of(100), SamplingParams())
    engine.decode([0, 3]).result()
    assert engine.last_decode_variant == (engine.num_slots, 128)
    engine.release(0)
    engine.release(3)


def test_prompt_too_long_is_rejected(engine: Engine):
    with pytest.raises(ValueError, match="max_len=128"):
        engine.prefill(0, prompt_of(128), SamplingParams())


# --- sampling statistics on hand-made logits --------------------------------

def _rows(n: int, **kw) -> SlotSampling:
    vals = SlotSampling.host_row(SamplingParams(**kw), 0)
    rows = {k: np.stack([v] * n) for k, v in vals.items()}
    rows["seed"] = np.stack([np.array([0, i], np.uint32) for i in range(n)])
    return SlotSampling(**{k: jnp.asarray(v) for k, v in rows.items()})


LOGITS = jnp.asarray(np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float32)))


def _draw(n=4000, **kw) -> np.ndarray:
    logits = jnp.broadcast_to(LOGITS, (n, LOGITS.shape[0]))
    V = LOGITS.shape[0]
    zeros = jnp.zeros((n, V), jnp.int32)
    out = jax.jit(sample)(logits, _rows(n, **kw), zeros, zeros.astype(bool), jnp.zeros((n,), jnp.int32))
    return np.asarray(out.token)


@pytest.mark.parametrize("V", [49152, 1024, 100])  # chunks of 512, of 512 at 2 chunks, none (plain form)
def test_max_argmax_is_the_first_index_of_the_max(V):
    from jaxinfer.engine.sampling import logsumexp_from_max, max_argmax

    rng = np.random.default_rng(V)
    x = rng.standard_normal((2, 6, V)).astype(np.float32)
    x[0, 1, [7, V // 2, V - 1]] = 9.0  # ties: the first wins
    x[0, 2, [V - 1, V - 2]] = 9.0  # tie in the last chunk
    x[0, 3, :] = -np.inf  # a fully masked row: index 0, max -inf
    x[0, 4, :] = 1.5  # all equal
    x[1, 0, [V // 3, V // 3 + 1]] = 7.0
    m, i = jax.jit(max_argmax)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(i), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(m), np.max(x, axis=-1))
    lse = logsumexp_from_max(jnp.asarray(x), m)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(jnp.asarray(x), axis=-1)), rtol=1e-6)


@pytest.mark.parametrize("k", [20, 64])
def test_top_candidates_equal_a_full_top_k(k):
    from jaxinfer.engine.sampling import top_candidates

    rng = np.random.default_rng(k)
    x = rng.standard_normal((3, 8192)).astype(np.float32)
    x[1, rng.choice(8192, 40, replace=False)] = 5.0  # many equal maxima across chunks
    x[2, :4096] = np.round(x[2, :4096])  # heavy ties
    vals, ids = jax.jit(top_candidates, static_argnums=1)(jnp.asarray(x), k)
    want = np.sort(x, axis=-1)[:, ::-1][:, :k]
    np.testing.assert_array_equal(np.asarray(vals), want)
    np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), axis=-1), want)
    assert all(len(set(r)) == k for r in np.asarray(ids).tolist())


def test_penalised_greedy_rows_beside_plain_ones():
    """The penalty branch picks greedy tokens from the penalised logits; rows
    without penalties, in the same batch, from the raw ones."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1024)).astype(np.float32))
    top = int(jnp.argmax(logits[0]))
    seen = jnp.zeros((2, 1024), bool).at[:, top].set(True)
    counts = jnp.zeros((2, 1024), jnp.int32).at[:, top].set(3)
    rows = SlotSampling.zeros(2)
    rows = dataclasses.replace(rows, frequency_penalty=jnp.asarray([2.0, 0.0]))
    out = jax.jit(sample)(jax.numpy.stack([logits[0], logits[0]]), rows, counts, seen, jnp.zeros((2,), jnp.int32))
    second = int(np.argsort(np.asarray(logits[0]))[-2])
    assert [int(t) for t in out.token] == [second, top]


def test_top_k_never_leaves_the_k_best():
    toks = _draw(temperature=1.5, top_k=3)
    assert set(np.unique(toks)) <= {0, 1, 2}
    assert len(set(np.unique(toks))) == 3


def test_top_p_mass():
    toks = _draw(temperature=1.0, top_p=0.7)  # nucleus {0.4, 0.25, 0.15}: first two sum to 0.65 < 0.7
    assert set(np.unique(toks)) == {0, 1, 2}
    freq = np.bincount(toks, minlength=7) / len(toks)
    np.testing.assert_allclose(freq[:3], np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.03)


def test_min_p_and_plain_temperature():
    toks = _draw(temperature=1.0, min_p=0.3)  # keeps p >= 0.12
    assert set(np.unique(toks)) == {0, 1, 2}
    toks = _draw(temperature=1.0)
    freq = np.bincount(toks, minlength=7) / len(toks)
    np.testing.assert_allclose(freq, np.exp(np.asarray(LOGITS)), atol=0.03)


# A vocabulary large enough for the chunked paths: five tokens in different
# chunks stand out of a background that holds ~30% of the mass at temperature 1.
BIG_V = 8192
SPECIAL = {5: 3.0, 700: 2.5, 3001: 2.0, 4095: 1.0, 8000: 0.5}
BIG_CASES = [
    dict(temperature=1.0),  # no filter: two-level draw over the vocabulary
    dict(temperature=0.8, top_p=0.8),  # nucleus among the candidates, mass over the vocabulary
    dict(temperature=1.0, top_k=3),  # among the candidates
    dict(temperature=1.0, min_p=0.1),  # among the candidates
    dict(temperature=1.0, top_k=100),  # top-k past the candidates: bisection
    dict(temperature=0.8, top_p=0.95),  # nucleus past the candidates: bisection
]


def _big_logits() -> np.ndarray:
    x = -6.0 + 0.01 * np.random.default_rng(0).standard_normal(BIG_V)
    for i, v in SPECIAL.items():
        x[i] = v
    return x.astype(np.float32)


def _filtered_probs(x: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The distribution the filters define, computed the plain way (numpy, float64)."""
    z = x.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = p >= min_p * p.max()
    if top_k:
        keep &= z >= np.sort(z[keep])[::-1][min(top_k, keep.sum()) - 1]
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p < 1.0:
        srt = np.sort(p)[::-1]
        n = int(np.argmax(np.cumsum(srt) >= top_p * (1 - 1e-6)))
        p = np.where(p >= srt[n], p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.slow  # compiles the sampler over a 262144-token vocabulary
def test_large_vocabulary_sampling_follows_the_filters():
    """Each path of the sampler (candidates, two-level draw over the whole
    vocabulary, bisection) on a vocabulary of 8192: every token lies in the
    filtered support, frequencies match the filtered distribution, and each
    row's token in a batch mixing all the cases is the one it draws alone."""
    n, x = 3000, _big_logits()
    logits = jnp.broadcast_to(jnp.asarray(x), (n, BIG_V))
    zeros = jnp.zeros((n, BIG_V), jnp.int32)
    run = jax.jit(sample)
    alone = []
    for kw in BIG_CASES:
        toks = np.asarray(run(logits, _rows(n, **kw), zeros, zeros.astype(bool), jnp.zeros((n,), jnp.int32)).token)
        alone.append(toks)
        p = _filtered_probs(x, **kw)
        assert np.all(p[toks] > 0), kw
        freq = np.bincount(toks, minlength=BIG_V) / n
        for i in SPECIAL:
            assert abs(freq[i] - p[i]) < 0.03, (kw, i, freq[i], p[i])
        rest = [i for i in range(BIG_V) if i not in SPECIAL]
        assert abs(freq[rest].sum() - p[rest].sum()) < 0.03, kw
    mixed = [SlotSampling.host_row(SamplingParams(**BIG_CASES[i % len(BIG_CASES)]), 0) for i in range(n)]
    rows = {k: np.stack([r[k] for r in mixed]) for k in mixed[0]}
    rows["seed"] = np.stack([np.array([0, i], np.uint32) for i in range(n)])
    out = run(logits, SlotSampling(**{k: jnp.asarray(v) for k, v in rows.items()}), zeros, zeros.astype(bool),
              jnp.zeros((n,), jnp.int32))
    want = np.array([alone[i % len(BIG_CASES)][i] for i in range(n)])
    np.testing.assert_array_equal(np.asarray(out.token), want)


def test_greedy_and_seed_reproducible():
    assert set(_draw(n=50, temperature=0.0)) == {0}
    a, b = _draw(temperature=1.0), _draw(temperature=1.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # compiles a 32-slot engine
def test_seeded_request_same_beside_31_others():
    """A seeded sampled request yields the same tokens alone (slot 0) and as slot 15
    of 32 concurrent requests with their own parameters."""
    eng = Engine(make_model(LLAMA_TINY, seed=3),
                 EngineConfig(slots=32, max_len=64, prefill_buckets=(16,), min_span=64, decode_rows=(1,)))
    eng.compile(progress=False)
    prompt, params = prompt_of(9, 99), SamplingParams(temperature=1.0, top_p=0.95, seed=1234, logprobs=3)
    alone = generate(eng, [prompt], params, max_tokens=12, ignore_eos=True)[0]
    others = [(prompt_of(n % 15 + 1, seed=n), SamplingParams(temperature=0.5 + n / 40, top_k=n % 7, seed=n))
              for n in range(31)]
    batch = others[:15] + [(prompt, params)] + others[15:]
    res = generate(eng, [p for p, _ in batch], [s for _, s in batch], max_tokens=12, ignore_eos=True)
    assert res[15]["token_ids"] == alone["token_ids"]
    np.testing.assert_allclose(res[15]["logprobs"], alone["logprobs"], atol=1e-5)
    assert len({tuple(r["token_ids"]) for r in res}) > 20  # the others really sampled their own tokens
