"""Host-side block manager of the paged KV cache (pure Python, no jax).

The engine holds one pool of ``num_pages`` pages of ``page_size`` token positions per layer;
this module decides which pages hold which sequence. A sequence's *page table* lists the pages
holding its positions 0.. in order.

Prefix cache: once a page is FULL of known tokens it can be registered under a key chained over
every token before it, ``key_i = blake2b(key_{i-1} || tokens of page i)``, so equal page contents
after different prefixes never match. A later sequence whose prompt starts with the same pages
gets those pages in its table (its reference counts go up) and prefills only the rest.

Every page is in exactly one of three states:

- *used*: referenced by at least one sequence (a cached page may be shared by several);
- *free*: unreferenced and holding nothing reusable;
- *cached*: unreferenced but registered under a key, kept in least-recently-used order and
  evicted (its key dropped) only when a page is needed and no free one is left.

so ``used + free + cached == num_pages`` at all times. A cached page is never written again:
a sequence only writes positions past its cached prefix, and only full pages are registered.
A match never covers a whole prompt: the last prompt token is always prefilled, since its
logits give the first generated token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Sequence

_ROOT = b"jaxinfer-prefix-v1"


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full page holding ``tokens`` after the page keyed ``parent``."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


def pages_for(n_tokens: int, page_size: int) -> int:
    return -(-n_tokens // page_size)


@dataclass(frozen=True)
class BlockStats:
    num_pages: int
    used: int  # referenced by a sequence
    free: int  # unreferenced, nothing cached
    cached: int  # unreferenced, registered in the prefix cache (evictable)
    query_tokens: int  # prompt tokens looked up in the prefix cache
    hit_tokens: int  # of those, served from cached pages
    evictions: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class OutOfPagesError(RuntimeError):
    """Raised by allocate/append when the pool cannot provide the pages (nothing is changed)."""


class BlockManager:
    """Page allocation, reference counts and the prefix cache for one engine's pool.

    Sequences are identified by any hashable handle the caller picks. Single-threaded: the
    scheduler's loop thread owns it.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_cache: bool = True) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: oldest first
        self._key_of: dict[int, bytes] = {}  # page -> its key (registered pages only)
        self._page_of: dict[bytes, int] = {}  # key -> page
        self._tables: dict[Hashable, list[int]] = {}
        self._keys: dict[Hashable, list[bytes]] = {}  # chained keys of each sequence's full pages so far
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0

    # -- queries ---------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Pages an allocation can take now (free + evictable cached)."""
        return len(self._free) + len(self._lru)

    def table(self, seq: Hashable) -> list[int]:
        return self._tables[seq]

    def capacity(self, seq: Hashable) -> int:
        """Token positions the sequence's pages cover."""
        return len(self._tables[seq]) * self.page_size

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._tables

    def stats(self) -> BlockStats:
        used = sum(1 for r in self._ref if r > 0)
        return BlockStats(
            self.num_pages, used, len(self._free), len(self._lru), self._query_tokens, self._hit_tokens,
            self._evictions,
        )

    def match(self, prompt_ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest run of cached full pages the prompt starts with, never covering its last
        token: (pages, tokens they hold). Changes nothing."""
        if not self.enable_prefix_cache:
            return [], 0
        ps, pages, key = self.page_size, [], _ROOT
        for i in range((len(prompt_ids) - 1) // ps):
            key = page_key(key, prompt_ids[i * ps : (i + 1) * ps])
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages, len(pages) * ps

    def needed(self, n_tokens: int, cached_pages: Sequence[int] = ()) -> int:
        """Pages an ``allocate(seq, n_tokens, cached_pages)`` would take from the available ones."""
        fresh = max(0, pages_for(n_tokens, self.page_size) - len(cached_pages))
        return fresh + sum(1 for p in cached_pages if self._ref[p] == 0)

    # -- changes ---------------------------------------------------------------------------------

    def allocate(
        self, seq: Hashable, n_tokens: int, cached_pages: Sequence[int] = (), *, prompt_ids: Sequence[int] = ()
    ) -> list[int]:
        """A new sequence's page table covering ``n_tokens`` positions, starting with
        ``cached_pages`` (from :meth:`match`, shared). ``prompt_ids``, when given, are counted in
        the hit-rate statistics. OutOfPagesError (nothing changed) when the pool is short."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already has pages")
        need = self.needed(n_tokens, cached_pages)
        if need > self.available:
            raise OutOfPagesError(f"{need} pages needed, {self.available} available")
        table = []
        for p in cached_pages:
            self._take_ref(p)
            table.append(p)
        while len(table) * self.page_size < n_tokens:
            table.append(self._pop_page())
        self._tables[seq] = table
        # the chain of keys over the cached pages, so commit_full_pages continues it
        self._keys[seq] = [self._key_of[p] for p in cached_pages]
        if prompt_ids:
            self._query_tokens += len(prompt_ids)
            self._hit_tokens += len(cached_pages) * self.page_size
        return table

    def append(self, seq: Hashable, new_len: int) -> list[int]:
        """Grow the sequence's table to cover ``new_len`` positions; returns the table.
        OutOfPagesError (nothing changed) when the pool is short."""
        table = self._tables[seq]
        extra = pages_for(new_len, self.page_size) - len(table)
        if extra > self.available:
            raise OutOfPagesError(f"{extra} pages needed, {self.available} available")
        for _ in range(extra):
            table.append(self._pop_page())
        return table

    def commit_full_pages(self, seq: Hashable, token_ids: Sequence[int]) -> int:
        """Register the sequence's pages that ``token_ids`` (its tokens at positions 0.., all
        already written to the cache) fill completely. Returns how many pages are now keyed."""
        keys = self._keys[seq]
        if not self.enable_prefix_cache:
            return len(keys)
        table, ps = self._tables[seq], self.page_size
        full = min(len(token_ids) // ps, len(table))
        parent = keys[-1] if keys else _ROOT
        for i in range(len(keys), full):
            key = page_key(parent, token_ids[i * ps : (i + 1) * ps])
            page = table[i]
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key] = page
                self._key_of[page] = key
            # else: another page already holds these tokens (computed concurrently); this page
            # stays unregistered and returns to the free list when released
            keys.append(key)
            parent = key
        return len(keys)

    def free(self, seq: Hashable) -> None:
        """Release the sequence's pages. Its tail pages go first, so under pressure the cache
        evicts a sequence's last pages before the prefix others are likelier to share."""
        table = self._tables.pop(seq)
        del self._keys[seq]
        for p in reversed(table):
            self._ref[p] -= 1
            if self._ref[p] < 0:
                raise AssertionError(f"page {p} freed twice")
            if self._ref[p] == 0:
                if p in self._key_of:
                    self._lru[p] = None
                else:
                    self._free.append(p)

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (pages in use keep their contents, unregistered)."""
        for p in list(self._lru):
            del self._lru[p]
            self._free.append(p)
        self._key_of.clear()
        self._page_of.clear()

    # -- internals -------------------------------------------------------------------------------

    def _take_ref(self, page: int) -> None:
        if self._ref[page] == 0:
            del self._lru[page]  # a cached page in use again leaves the evictable set
        self._ref[page] += 1

    def _pop_page(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._lru.popitem(last=False)  # least recently used
            del self._page_of[self._key_of.pop(page)]
            self._evictions += 1
        self._ref[page] = 1
        return page
