"""Engine: paged prefill + decode against one full-sequence forward, chunks at
offsets, prefix hits, page order, scoring, donation, buckets, no recompilation,
batched sampling statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.engine import Engine
from jaxinfer.engine.sampling import SlotSampling, sample
from jaxinfer.engine.types import SamplingParams
from jaxinfer.model.transformer import Transformer
from jaxinfer.model.weights import nest, random_weights
from tests.helpers.drive import PageAllocator, drive, assert_same_tokens, first_and_decodes
from tests.helpers.tiny import GEMMA_TINY, LLAMA_TINY, PAGE, engine_config, make_model, prompt_of

@pytest.fixture(scope="module", params=[LLAMA_TINY, GEMMA_TINY], ids=["llama", "gemma3"])
def engine(request) -> Engine:
    eng = Engine(make_model(request.param), engine_config(request.param))
    eng.compile(progress=False)
    return eng


def full_forward_logprobs(model: Transformer, seq: list[int]) -> np.ndarray:
    """log-softmax at every position of one forward over the whole sequence (no cache)."""
    pos = jnp.arange(len(seq), dtype=jnp.int32)[None]
    h, _ = model(jnp.asarray([seq], jnp.int32), pos)
    return np.asarray(jax.nn.log_softmax(model.logits(h[0]), axis=-1))


def model_of(engine: Engine) -> Transformer:
    from flax import nnx

    return nnx.merge(engine.graphdef, engine.params)


@pytest.mark.parametrize("n_prompt", [5, 40])  # 40 crosses Gemma's 16-token window and the 32 bucket (chunked)
def test_prefill_then_decode_matches_full_forward(engine: Engine, n_prompt: int):
    """Greedy tokens through the pool are the argmax chain of the full forward,
    and their log-probs match it."""
    prompt = prompt_of(n_prompt, seed=n_prompt)
    got = drive(engine, [prompt], max_tokens=12)[0]
    seq = prompt + got["token_ids"]
    lp = full_forward_logprobs(model_of(engine), seq)
    want = [int(np.argmax(lp[i])) for i in range(n_prompt - 1, len(seq) - 1)]
    assert got["token_ids"] == want
    np.testing.assert_allclose(got["logprobs"], [lp[i, t] for i, t in zip(range(n_prompt - 1, len(seq)), want)],
                               atol=2e-5)




def test_chunked_prefill_at_offsets_equals_one_shot(engine: Engine):
    prompt = prompt_of(30, seed=7)
    pages = PageAllocator(engine.num_pages, seed=1).take(6)
    one = first_and_decodes(engine, 0, [(0, prompt)], pages)
    chunked = first_and_decodes(engine, 1, [(0, prompt[:11]), (11, prompt[11:23]), (23, prompt[23:])], pages)
    assert_same_tokens(one, chunked)


def test_prefill_over_a_cached_prefix_equals_from_zero(engine: Engine):
    """A prefill that starts at start > 0 over pages another sequence filled (a
    prefix-cache hit) gives the tokens of a prefill from 0."""
    alloc = PageAllocator(engine.num_pages, seed=2)
    shared = prompt_of(24, seed=3)  # three full pages
    a_pages = alloc.take(5)
    first_and_decodes(engine, 0, [(0, shared + prompt_of(7, seed=4))], a_pages)
    b_prompt = shared + prompt_of(6, seed=5)
    fresh_pages = alloc.take(5)
    want = first_and_decodes(engine, 1, [(0, b_prompt)], fresh_pages)
    hit_pages = a_pages[:3] + alloc.take(2)
    got = first_and_decodes(engine, 2, [(24, b_prompt[24:])], hit_pages)
    assert_same_tokens(want, got)
    # and through prefill_many, beside a fresh prompt
    other = prompt_of(9, seed=6)
    firsts = engine.prefill_many([(1, b_prompt[24:], SamplingParams(logprobs=3), 24, hit_pages),
                                  (3, other, SamplingParams(logprobs=3), 0, alloc.take(2))])
    assert firsts[0] == want[0] or (firsts[0].token == want[0].token
                                    and abs(firsts[0].logprob - want[0].logprob) < 2e-5)
    engine.release(1)
    engine.release(3)


def test_page_order_does_not_matter(engine: Engine):
    prompt = prompt_of(37, seed=8)
    a = drive(engine, [prompt], SamplingParams(temperature=0.9, seed=5, logprobs=2), max_tokens=8,
              pages=PageAllocator(engine.num_pages, seed=10))[0]
    ordered = PageAllocator(engine.num_pages)
    ordered.free = list(range(engine.num_pages))
    b = drive(engine, [prompt], SamplingParams(temperature=0.9, seed=5, logprobs=2), max_tokens=8, pages=ordered)[0]
    assert a["token_ids"] == b["token_ids"]
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=2e-5)


def test_score_equals_full_forward_log_softmax(engine: Engine):
    seq = prompt_of(45, seed=11)
    lp = full_forward_logprobs(model_of(engine), seq)
    alloc = PageAllocator(engine.num_pages, seed=3)
    pages = alloc.take(6)
    first = engine.score(seq[:20], seq[1:21], pages=pages)  # positions 0..19
    rest = engine.score(seq[20:-1], seq[21:], pages=pages, start=20)  # over the pages the first piece wrote
    got = np.array(first.token_logprobs + rest.token_logprobs)
    want = np.array([lp[i, seq[i + 1]] for i in range(len(seq) - 1)])
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_array_equal(first.top_ids + rest.top_ids, np.argmax(lp[:-1], axis=-1))
    np.testing.assert_allclose(first.top_logprobs + rest.top_logprobs, np.max(lp[:-1], axis=-1), atol=2e-5)
    assert abs(first.logprob - want[:20].sum()) < 1e-3
    assert engine.score(seq[:20], list(first.top_ids), pages=pages).is_greedy
    assert not first.is_greedy


def test_multi_step_decode_equals_single_steps(engine: Engine):
    """decode(rows, pages, 3) -- three steps in one device loop -- gives the same
    tokens, logprobs and top alternatives as one-step calls, for a seeded
    sampled row and a greedy one, across a page-table bucket boundary."""
    eng = Engine(make_model(engine.cfg), engine_config(engine.cfg, decode_steps=3, lazy_compile=True))
    prompts = [prompt_of(120, 31)[:28], prompt_of(9, 32)]
    params = [SamplingParams(temperature=0.9, seed=4, logprobs=5), SamplingParams(logprobs=2)]
    single = drive(eng, prompts, params, max_tokens=10)
    multi = drive(eng, prompts, params, max_tokens=10, steps=3)
    for a, b in zip(single, multi):
        assert_same_tokens(a["tokens"], b["tokens"])
    assert any(k[0] == "decode_k" for k in eng._compiled)
    assert len(set(single[0]["token_ids"])) > 1  # not a constant stream
    with pytest.raises(ValueError, match="decode_steps=3"):
        eng.decode([0], {0: [0]}, steps=2)


def test_prefill_many_equals_one_at_a_time(engine: Engine):
    """Three prompts prefilled in one call (a fourth, padding piece writes
    nothing) give the same first tokens, logprobs and following decode steps as
    three separate prefills, and leave another row's sequence alone."""
    prompts = [prompt_of(5, 41), prompt_of(16, 42), prompt_of(9, 43)]
    params = [SamplingParams(logprobs=3), SamplingParams(temperature=0.8, seed=9, logprobs=2),
              SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2, seed=21)]
    assert engine.prefill_many_limit == 16 and engine.prefill_rows == 4

    def run(together: bool):
        alloc = PageAllocator(engine.num_pages, seed=int(together))
        tables = {r: alloc.take(4) for r in range(4)}
        bystander = engine.prefill(1, prompt_of(20, 44), SamplingParams(logprobs=1), pages=tables[1])
        items = [(r, p, sp, 0, tables[r]) for r, p, sp in zip((0, 2, 3), prompts, params)]
        firsts = (engine.prefill_many(items) if together else
                  [engine.prefill(r, p, sp, pages=pg) for r, p, sp, _, pg in items])
        steps = [engine.decode([0, 1, 2, 3], tables).result() for _ in range(4)]
        for r in range(4):
            engine.release(r)
        return [bystander, *firsts] + [t for step in steps for t in step.values()]

    assert_same_tokens(run(True), run(False))
    pg = list(range(4))
    with pytest.raises(ValueError, match="at most 16 tokens"):
        engine.prefill_many([(0, prompt_of(17), SamplingParams(), 0, pg), (1, prompt_of(3), SamplingParams(), 0, pg)])
    with pytest.raises(ValueError, match="distinct"):
        engine.prefill_many([(0, prompt_of(3), SamplingParams(), 0, pg), (0, prompt_of(3), SamplingParams(), 0, pg)])
    with pytest.raises(ValueError, match="prefill_rows=4"):
        engine.prefill_many([(i, prompt_of(3), SamplingParams(), 0, pg) for i in range(5)])


def test_batch_equals_alone(engine: Engine):
    """Greedy and seeded requests give the same tokens alone and beside others."""
    reqs = [
        (prompt_of(7, 1), SamplingParams()),
        (prompt_of(20, 2), SamplingParams(temperature=0.8, top_k=50, seed=7)),
        (prompt_of(3, 3), SamplingParams(temperature=1.0, top_p=0.9, seed=11, repetition_penalty=1.3)),
        (prompt_of(33, 4), SamplingParams(temperature=0.7, min_p=0.05, seed=5, presence_penalty=0.5,
                                          frequency_penalty=0.3)),
    ]
    together = drive(engine, [p for p, _ in reqs], [s for _, s in reqs], max_tokens=10)
    for i, ((p, s), res) in enumerate(zip(reqs, together)):
        alone = drive(engine, [p], [s], max_tokens=10, rows=[3 - i])[0]
        assert alone["token_ids"] == res["token_ids"]
        np.testing.assert_allclose(alone["logprobs"], res["logprobs"], atol=2e-5)


def test_unseeded_sampled_requests_draw_their_own_seeds(engine: Engine):
    prompt, sp = prompt_of(6, 50), SamplingParams(temperature=1.5)
    runs = {tuple(drive(engine, [prompt], sp, max_tokens=12)[0]["token_ids"]) for _ in range(3)}
    assert len(runs) > 1


def test_pool_is_donated(engine: Engine):
    """Every call consumes the donated pool and decode state (updated in place,
    no second copy of the pool)."""
    pages = list(range(4))
    for call in (lambda: engine.prefill(1, prompt_of(4), SamplingParams(), pages=pages),
                 lambda: engine.decode([1], {1: pages}).result(),
                 lambda: engine.score(prompt_of(4), prompt_of(4, 1), pages=pages)):
        before = jax.tree.leaves(engine.pool) + ([engine.state.counts])
        call()
        assert all(b.is_deleted() for b in before)
    engine.release(1)


def test_no_recompilation_while_serving(engine: Engine):
    """After compile(), prefill (fresh, chunked, over a prefix), decode of any
    rows and width, and score compile nothing."""
    events: list[str] = []

    def listener(name, *args, **kwargs):
        if "compile" in name:
            events.append(name)

    assert not engine.config.lazy_compile
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        prompts = [prompt_of(int(n), seed=i) for i, n in enumerate(rng.integers(1, 100, 4))]
        params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7])), top_k=int(rng.choice([0, 5])),
                                 seed=i, logprobs=int(rng.integers(0, 4))) for i in range(4)]
        out = drive(engine, prompts, params, max_tokens=20)
        assert all(len(r["token_ids"]) == 20 for r in out)
        drive(engine, prompts[:1], max_tokens=3, rows=[2])
        pages = list(range(12))
        engine.score(prompt_of(50), prompt_of(50, 1)[:50], pages=pages) if engine.prefill_chunk >= 50 else None
        engine.score(prompt_of(30), prompt_of(30, 1), pages=pages)
        engine.score(prompt_of(9), prompt_of(9, 1), pages=pages, start=30)
        engine.prefill_many([(0, prompt_of(9), SamplingParams(), 16, pages), (1, prompt_of(3), SamplingParams(), 0,
                                                                              pages[6:])])
        engine.release(0)
        engine.release(1)
    finally:
        jax.monitoring.clear_event_listeners()
    backend = [e for e in events if "backend_compile" in e]
    assert backend == [], f"compiled while serving: {events}"


def test_covering_programs_serve_everything():
    """With only the covering programs compiled, every call runs (on a wider
    program) and gives the same tokens as the exact ones."""
    cfg = engine_config(LLAMA_TINY)
    full = Engine(make_model(LLAMA_TINY), cfg)
    full.compile(progress=False)
    few = Engine(make_model(LLAMA_TINY), cfg)
    few.compile(few.covering_variants(), progress=False)
    assert few.programs_compiled == len(few.covering_variants()) < full.programs_compiled
    prompts = [prompt_of(n, seed=n) for n in (3, 20, 45)]
    a = drive(full, prompts, max_tokens=6)
    b = drive(few, prompts, max_tokens=6)
    thread = few.compile_in_background()  # the rest, while it serves
    c = drive(few, prompts, max_tokens=6)
    thread.join()
    assert few.programs_compiled == full.programs_compiled
    d = drive(few, prompts, max_tokens=6)
    for x, *others in zip(a, b, c, d):
        for y in others:
            assert x["token_ids"] == y["token_ids"]
            np.testing.assert_allclose(x["logprobs"], y["logprobs"], atol=2e-5)


def test_pool_sizing_and_describe():
    cfg = engine_config(LLAMA_TINY, num_pages=10, max_len=None)
    eng = Engine(make_model(LLAMA_TINY), cfg)
    assert eng.num_pages == 10 and eng.max_len == 80  # clipped to the pool
    assert eng.pool.k.shape == (2, 11, PAGE, 3, 8)  # one trash page
    assert "10 pages x 8 tokens" in eng.describe()
    s = eng.stats()
    assert s.pool_bytes == 2 * 2 * 11 * 8 * 3 * 8 * 4 and s.bytes_per_token == 384
    with pytest.raises(ValueError, match="holds no page"):
        Engine(make_model(LLAMA_TINY), dataclasses.replace(cfg, kv_cache_bytes=100))
    with pytest.raises(ValueError, match="max_seqs"):
        Engine(make_model(LLAMA_TINY), dataclasses.replace(cfg, max_seqs=0))


def test_bad_calls_are_rejected(engine: Engine):
    with pytest.raises(ValueError, match="max_len=128"):
        engine.prefill(0, prompt_of(20), SamplingParams(), pages=list(range(20)), start=110)
    with pytest.raises(ValueError, match="need 20"):
        engine.prefill(0, prompt_of(20), SamplingParams(), pages=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        engine.prefill(0, prompt_of(3), SamplingParams(), pages=[engine.num_pages])
    with pytest.raises(ValueError, match="max_seqs=4"):
        engine.prefill(4, prompt_of(3), SamplingParams(), pages=[0])
    with pytest.raises(ValueError, match="prefill_chunk=32"):
        engine.prefill(0, prompt_of(33), SamplingParams(), pages=list(range(5)))


def test_bfloat16_weights_are_held_as_float32_on_cpu():
    """XLA CPU has no bfloat16 matmul: a CPU engine holds bfloat16 weights as
    float32, and gives the tokens of an engine given the same values as float32."""
    cfg = engine_config(LLAMA_TINY, lazy_compile=True)
    w = {k: jnp.asarray(v).astype(jnp.bfloat16) for k, v in random_weights(LLAMA_TINY, seed=3, scale=0.15).items()}
    e16 = Engine(Transformer(LLAMA_TINY, params=nest(w)), cfg)
    forced = Engine(Transformer(LLAMA_TINY, params=nest(w)), dataclasses.replace(cfg, weight_dtype="bfloat16"))
    assert e16.checkpoint_dtype == jnp.bfloat16 and forced.dtype == jnp.bfloat16
    assert forced.pool.k.dtype == jnp.bfloat16
    if jax.default_backend() == "cpu":
        e32 = Engine(Transformer(LLAMA_TINY, params=nest({k: v.astype(jnp.float32) for k, v in w.items()})), cfg)
        assert e16.dtype == jnp.float32 and e16.pool.k.dtype == jnp.float32
        assert "weights float32 (checkpoint bfloat16)" in e16.describe()
        prompt, params = prompt_of(20, seed=9), SamplingParams(logprobs=5)
        got, want = (drive(e, [prompt], params, max_tokens=6)[0] for e in (e16, e32))
        assert got["token_ids"] == want["token_ids"] and got["logprobs"] == want["logprobs"]


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


def test_seeded_request_same_beside_31_others():
    """A seeded sampled request yields the same tokens alone (row 0) and as row
    15 of 32 concurrent requests with their own parameters."""
    eng = Engine(make_model(LLAMA_TINY, seed=3),
                 engine_config(LLAMA_TINY, max_seqs=32, max_len=64, prefill_buckets=(16,), decode_batches=(1,),
                               num_pages=256))
    eng.compile(progress=False)
    prompt, params = prompt_of(9, 99), SamplingParams(temperature=1.0, top_p=0.95, seed=1234, logprobs=3)
    alone = drive(eng, [prompt], params, max_tokens=12)[0]
    others = [(prompt_of(n % 15 + 1, seed=n), SamplingParams(temperature=0.5 + n / 40, top_k=n % 7, seed=n))
              for n in range(31)]
    batch = others[:15] + [(prompt, params)] + others[15:]
    res = drive(eng, [p for p, _ in batch], [s for _, s in batch], max_tokens=12)
    assert res[15]["token_ids"] == alone["token_ids"]
    np.testing.assert_allclose(res[15]["logprobs"], alone["logprobs"], atol=1e-5)
    assert len({tuple(r["token_ids"]) for r in res}) > 20  # the others really sampled their own tokens
