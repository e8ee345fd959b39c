"""The block manager: allocation, sharing, reference counts, LRU eviction, chained keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from jaxinfer.blocks import BlockManager, OutOfPagesError, page_key


def check(bm: BlockManager) -> None:
    s = bm.stats()
    assert s.used + s.free + s.cached == bm.num_pages


def test_allocation_grows_and_frees_by_hand():
    bm = BlockManager(num_pages=6, page_size=4)
    assert bm.allocate("a", 5) == [0, 1]  # 5 positions: 2 pages
    assert bm.append("a", 8) == [0, 1]  # still 2 pages
    assert bm.append("a", 9) == [0, 1, 2]
    assert bm.allocate("b", 1) == [3]
    s = bm.stats()
    assert (s.used, s.free, s.cached) == (4, 2, 0)
    with pytest.raises(OutOfPagesError, match="3 pages needed, 2 available"):
        bm.allocate("c", 12)
    assert "c" not in bm and bm.stats().free == 2  # a failed allocation changes nothing
    with pytest.raises(OutOfPagesError):
        bm.append("b", 13)
    assert bm.table("b") == [3]
    bm.free("a")
    s = bm.stats()
    assert (s.used, s.free, s.cached) == (1, 5, 0)  # nothing committed: all back to free
    bm.free("b")
    with pytest.raises(KeyError):
        bm.free("b")
    check(bm)


def test_prefix_hit_shares_pages_and_never_covers_the_last_token():
    bm = BlockManager(num_pages=8, page_size=2)
    prompt = [1, 2, 3, 4, 5, 6]
    assert bm.match(prompt) == ([], 0)
    table = bm.allocate("a", 7, prompt_ids=prompt)
    assert bm.commit_full_pages("a", prompt) == 3
    # the same prompt: pages 0 and 1 hit; page 2 would cover the last token, so it is prefilled
    assert bm.match(prompt) == (table[:2], 4)
    assert bm.match(prompt + [7]) == (table[:3], 6)
    assert bm.match([1, 2, 3, 9, 5, 6]) == (table[:1], 2)
    cached, n = bm.match(prompt + [7, 8])
    tb = bm.allocate("b", 9, cached, prompt_ids=prompt + [7, 8])
    assert tb[:3] == table[:3] and len(set(tb[3:]) & set(table)) == 0
    assert bm.stats().used == len(set(table) | set(tb))
    bm.free("a")
    s = bm.stats()
    assert s.cached == 0 and s.used == 5  # the shared pages are still referenced by b
    bm.free("b")
    s = bm.stats()
    assert s.cached == 3 and s.used == 0  # registered pages stay cached, the rest is free
    assert (s.query_tokens, s.hit_tokens) == (14, 6) and s.hit_rate == pytest.approx(6 / 14)
    check(bm)


def test_chained_keys_same_page_after_different_prefix_does_not_match():
    bm = BlockManager(num_pages=8, page_size=2)
    bm.allocate("a", 4)
    bm.commit_full_pages("a", [1, 2, 3, 4])
    assert bm.match([9, 9, 3, 4, 5])[1] == 0  # page [3, 4] after [9, 9] is another key
    assert bm.match([1, 2, 3, 4, 5])[1] == 4
    assert page_key(page_key(b"x", [1, 2]), [3, 4]) != page_key(page_key(b"x", [9, 9]), [3, 4])


def test_cached_pages_evicted_lru_only_under_pressure():
    bm = BlockManager(num_pages=4, page_size=2)
    for name, toks in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        bm.allocate(name, 2)
        bm.commit_full_pages(name, toks)
    bm.free("b")
    bm.free("a")
    bm.free("c")  # LRU order: b, a, c
    assert bm.stats().cached == 3 and bm.stats().free == 1
    assert bm.allocate("d", 2) == [3]  # the free page first: nothing evicted
    assert bm.stats().evictions == 0 and bm.match([2, 2, 0])[1] == 2
    pb = bm.match([2, 2, 0])[0][0]
    bm.allocate("e", 2)  # evicts b, the least recently used
    assert bm.table("e") == [pb]
    assert bm.match([2, 2, 0])[1] == 0 and bm.match([1, 1, 0])[1] == 2 and bm.match([3, 3, 0])[1] == 2
    # a hit takes a cached page out of the evictable set: a is now in use, c is evicted next
    hit, _ = bm.match([1, 1, 0])
    bm.allocate("f", 3, hit)
    assert bm.stats().evictions == 2 and bm.match([3, 3, 0])[1] == 0
    with pytest.raises(OutOfPagesError):
        bm.allocate("g", 2)
    check(bm)


def test_needed_counts_unreferenced_cached_pages_it_would_take():
    bm = BlockManager(num_pages=3, page_size=2)
    bm.allocate("a", 4)
    bm.commit_full_pages("a", [1, 2, 3, 4])
    bm.free("a")
    hit, n = bm.match([1, 2, 3, 4, 5])
    assert n == 4 and bm.needed(5, hit) == 3  # the two cached pages leave the evictable set, plus one
    bm.allocate("b", 5, hit)
    with pytest.raises(OutOfPagesError):
        bm.allocate("c", 1)


def test_duplicate_pages_computed_concurrently_stay_unregistered():
    bm = BlockManager(num_pages=4, page_size=2)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm.commit_full_pages("a", [5, 5])
    bm.commit_full_pages("b", [5, 5])  # same tokens, own page: a's page keeps the key
    bm.free("b")
    bm.free("a")
    s = bm.stats()
    assert (s.cached, s.free) == (1, 3)


def test_prefix_cache_off_never_matches():
    bm = BlockManager(num_pages=4, page_size=2, enable_prefix_cache=False)
    bm.allocate("a", 4)
    bm.commit_full_pages("a", [1, 2, 3, 4])
    bm.free("a")
    assert bm.match([1, 2, 3, 4, 5]) == ([], 0) and bm.stats().free == 4


@settings(max_examples=150, deadline=None)
@given(
    hs.lists(
        hs.tuples(hs.sampled_from(["alloc", "append", "commit", "free"]), hs.integers(0, 5), hs.integers(1, 14)),
        max_size=60,
    ),
    hs.booleans(),
)
def test_random_operations_never_leak_or_double_free(ops, prefix):
    bm = BlockManager(num_pages=10, page_size=3, enable_prefix_cache=prefix)
    tokens: dict[int, list[int]] = {}
    lengths: dict[int, int] = {}
    for op, seq, n in ops:
        try:
            if op == "alloc" and seq not in bm:
                prompt = [(seq * 7 + i) % 3 for i in range(n)]  # few distinct prompts: prefixes repeat
                hit, cached = bm.match(prompt)
                assert cached < n and cached % 3 == 0
                table = bm.allocate(seq, n, hit, prompt_ids=prompt)
                assert table[: len(hit)] == hit
                tokens[seq], lengths[seq] = prompt, n
            elif op == "append" and seq in bm:
                new = lengths[seq] + n
                bm.append(seq, new)
                tokens[seq] += [(seq + i) % 3 for i in range(n)]
                lengths[seq] = new
            elif op == "commit" and seq in bm:
                bm.commit_full_pages(seq, tokens[seq])
            elif op == "free" and seq in bm:
                bm.free(seq)
                del tokens[seq], lengths[seq]
        except OutOfPagesError:
            pass
        check(bm)
        live = [p for s in lengths for p in bm.table(s)]
        assert all(bm.capacity(s) >= lengths[s] for s in lengths)
        # a page is shared only as a registered (cached-key) page; otherwise it has one owner
        for p in set(live):
            if live.count(p) > 1:
                assert p in bm._key_of
        assert bm.stats().used == len(set(live))
    for s in list(lengths):
        bm.free(s)
    s = bm.stats()
    assert s.used == 0 and s.free + s.cached == bm.num_pages
