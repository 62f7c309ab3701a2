"""RadixCache driven by Hypothesis through random operation sequences, checked against a flat reference.

The KV stored for position i of a sequence is a fingerprint of tokens[:i+1] (as real KV depends on the whole
prefix), so any KV the tree hands back can be checked against the tokens it claims to cover.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from minillm.radix_cache import RadixCache

LAYERS, KV_HEADS, HEAD_DIM = 2, 1, 2


def fake_kv(tokens):
    """keys/values [LAYERS, KV_HEADS, len, HEAD_DIM]; position i encodes a hash of tokens[:i+1]."""
    keys = torch.empty(LAYERS, KV_HEADS, len(tokens), HEAD_DIM)
    h = 0
    for i, t in enumerate(tokens):
        h = (h * 31 + t + 1) % 1_000_003
        keys[:, :, i, 0] = float(h)
        keys[:, :, i, 1] = float(i)
    return keys, -keys


def reference_match(entries, tokens):
    """The flat reference: linear scan of every (tokens, kv) entry for the longest common prefix, leaving
    the last token to compute."""
    best = 0
    for entry_tokens, _ in entries:
        n = 0
        while n < min(len(entry_tokens), len(tokens) - 1) and entry_tokens[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best


token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=12)


class RadixMachine(RuleBasedStateMachine):
    locks = Bundle("locks")

    def __init__(self):
        super().__init__()
        self.cache = RadixCache(max_tokens=30, poison_evicted=True)
        self.entries = []  # the reference: (tokens, keys) for everything inserted and not evicted
        self.locked = []  # (tokens, matched length) of every held lock

    def _sync_reference_after_eviction(self, before):
        """Eviction happened (or may have): each entry keeps its longest prefix the tree still holds.
        Checks that nothing locked was dropped and that the tree only ever shrank."""
        held = {tuple(t) for t, _, _ in self.cache.sequences()}
        prefixes = {s[:i] for s in held for i in range(1, len(s) + 1)}
        assert prefixes <= before, "eviction added tokens"
        for tokens, length in self.locked:
            assert length == 0 or tuple(tokens[:length]) in prefixes, "a locked prefix was evicted"
        new_entries = []
        for tokens, keys in self.entries:
            n = len(tokens)
            while n and tuple(tokens[:n]) not in prefixes:
                n -= 1
            if n:
                new_entries.append((tokens[:n], keys[:, :, :n]))
        self.entries = new_entries

    def _prefixes(self):
        return {tuple(t[:i]) for t, _ in self.entries for i in range(1, len(t) + 1)}

    @rule(tokens=token_lists)
    def insert(self, tokens):
        before = self._prefixes() | {tuple(tokens[:i]) for i in range(1, len(tokens) + 1)}
        keys, values = fake_kv(tokens)
        already = reference_match(self.entries, tokens + [None])  # cached length of the full sequence
        new = self.cache.insert(tokens, keys, values)
        assert new == len(tokens) - already
        self.entries.append((tokens, keys))
        self._sync_reference_after_eviction(before)
        if self.cache.total_tokens > self.cache.max_tokens:  # over budget only if the rest is locked
            assert all(n.lock_ref > 0 or n.children for n in self.cache._nodes())

    @rule(tokens=token_lists)
    def match(self, tokens):
        result = self.cache.match_prefix(tokens)
        assert result.length == reference_match(self.entries, tokens)
        assert result.length <= len(tokens) - 1
        keys = torch.zeros(LAYERS, KV_HEADS, len(tokens), HEAD_DIM)
        values = torch.zeros_like(keys)
        result.copy_into(keys, values)
        expected, _ = fake_kv(tokens[: result.length])
        assert torch.equal(keys[:, :, : result.length], expected)
        assert torch.equal(values[:, :, : result.length], -expected)

    @rule(target=locks, tokens=token_lists)
    def lock(self, tokens):
        result = self.cache.match_prefix(tokens)
        self.cache.lock(result.node)
        self.locked.append((tokens, result.length))
        return (tokens, result.length, result.node)

    @rule(handle=consumes(locks))
    def unlock(self, handle):
        tokens, length, node = handle
        self.cache.unlock(node)
        self.locked.remove((tokens, length))

    @rule(num_tokens=st.integers(1, 40))
    def evict(self, num_tokens):
        before = self._prefixes()
        total = self.cache.total_tokens
        freed = self.cache.evict(num_tokens)
        assert self.cache.total_tokens == total - freed
        self._sync_reference_after_eviction(before)
        if freed < num_tokens:  # stopped early only because everything left is locked
            assert all(n.lock_ref > 0 or n.children for n in self.cache._nodes())

    @invariant()
    def structure_holds(self):
        self.cache.check_invariants()
        assert self.cache.total_tokens == len(self._prefixes())  # no duplicate KV: one slot per prefix
        for tokens, keys, values in self.cache.sequences():
            expected, _ = fake_kv(list(tokens))
            assert torch.equal(keys, expected) and torch.equal(values, -expected)


TestRadixCacheStateful = RadixMachine.TestCase
TestRadixCacheStateful.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])


def test_split_and_shared_prefix():
    cache = RadixCache(max_tokens=100)
    cache.insert([1, 2, 3, 4], *fake_kv([1, 2, 3, 4]))
    cache.insert([1, 2, 5], *fake_kv([1, 2, 5]))
    cache.check_invariants()
    (child,) = cache.root.children.values()
    assert child.tokens == (1, 2) and set(child.children) == {3, 5}
    assert cache.total_tokens == 5
    assert cache.match_prefix([1, 2, 3, 4]).length == 3  # the last token is always left to compute
    assert cache.match_prefix([1, 2, 3, 4, 9]).length == 4
    assert cache.match_prefix([7, 1]).length == 0


def test_lru_evicts_least_recently_used_unlocked_leaf_first():
    cache = RadixCache(max_tokens=100)
    for seq in ([1, 1, 1], [2, 2, 2], [3, 3, 3]):
        cache.insert(seq, *fake_kv(seq))
    cache.match_prefix([1, 1, 1, 1])  # touch 1s: now 2s are the oldest
    locked = cache.match_prefix([2, 2, 2, 2])  # touch and lock 2s: 3s are now the oldest unlocked
    cache.lock(locked.node)
    assert cache.evict(1) == 3
    assert {s[0][0] for s in cache.sequences()} == {1, 2}
    assert cache.evict(100) == 3  # only the 1s could go
    assert [s[0] for s in cache.sequences()] == [(2, 2, 2)]
    cache.unlock(locked.node)
    cache.check_invariants()


def test_eviction_frees_memory():
    cache = RadixCache(max_tokens=10)
    keys, values = fake_kv(list(range(8)))
    cache.insert(list(range(8)), keys, values)
    assert cache.total_bytes == keys.nbytes + values.nbytes
    cache.insert([9] * 8, *fake_kv([9] * 8))  # over budget: the older sequence goes
    assert cache.total_tokens == 8 and cache.stats.evicted_tokens == 8
    assert cache.total_bytes == keys.nbytes + values.nbytes
    cache.check_invariants()


@settings(max_examples=30, deadline=None)
@given(st.lists(token_lists, min_size=1, max_size=8), token_lists)
def test_match_equals_flat_reference_without_eviction(sequences, query):
    cache = RadixCache(max_tokens=10_000)
    for seq in sequences:
        cache.insert(seq, *fake_kv(seq))
    entries = [(s, None) for s in sequences]
    assert cache.match_prefix(query).length == reference_match(entries, query)
    cache.check_invariants()
