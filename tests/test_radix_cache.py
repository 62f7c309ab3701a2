"""RadixCache driven by Hypothesis through random operation sequences, checked against a flat reference.

The reference maps every cached prefix (a tuple of tokens) to the slot holding its last token's KV; real KV
depends on the whole prefix, so a slot handed back for the wrong prefix is a wrong answer. Locks are checked
against the live holders: a node's lock count must equal the number of holders whose path runs through it,
also after that path was split by later inserts and matches.
"""

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from minillm.cache.radix_cache import CacheStats, RadixCache, common_length

token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=12)


def prefixes(tokens):
    return [tuple(tokens[: i + 1]) for i in range(len(tokens))]


class RadixMachine(RuleBasedStateMachine):
    holders = Bundle("holders")

    def __init__(self):
        super().__init__()
        self.cache = RadixCache()
        self.slot_of: dict[tuple, int] = {}  # the reference: cached prefix -> slot of its last token
        self.next_slot = 1
        self.live: list[tuple] = []  # (tokens, matched length, node) of every held lock
        self.stats = CacheStats()  # what the tree's counters must read

    def fresh(self, n):
        slots = torch.arange(self.next_slot, self.next_slot + n)
        self.next_slot += n
        return slots

    def reference_match(self, tokens, limit):
        n = 0
        while n < limit and tuple(tokens[: n + 1]) in self.slot_of:
            n += 1
        return n

    @rule(tokens=token_lists, reuse=st.booleans())
    def insert(self, tokens, reuse):
        """A request hands over its KV: its own fresh slots, or (reuse) the tree's slots for the prefix it
        matched first and fresh ones for the rest, as the engine does."""
        matched = (
            self.cache.match_prefix(tokens, limit=len(tokens)).slots if reuse else torch.empty(0, dtype=torch.int64)
        )
        slots = torch.cat((matched, self.fresh(len(tokens) - len(matched))))
        expected_duplicates = [
            int(s) for p, s in zip(prefixes(tokens), slots) if p in self.slot_of and self.slot_of[p] != s
        ]
        duplicates = self.cache.insert(tokens, slots)
        assert sorted(duplicates.tolist()) == sorted(expected_duplicates)
        self.stats.inserted_tokens += sum(p not in self.slot_of for p in prefixes(tokens))
        for p, s in zip(prefixes(tokens), slots.tolist()):
            self.slot_of.setdefault(p, s)
        if reuse:
            self.stats.lookups += 1
            self.stats.hit_tokens += len(matched)
            self.stats.computed_tokens += len(tokens) - len(matched)

    @rule(tokens=token_lists, align=st.sampled_from([1, 2, 3]), limit=st.none() | st.integers(0, 12))
    def match(self, tokens, align, limit):
        limit = None if limit is None else min(limit, len(tokens))
        result = self.cache.match_prefix(tokens, align=align, limit=limit)
        expected = self.reference_match(tokens, len(tokens) - 1 if limit is None else limit) // align * align
        assert result.length == expected
        assert result.slots.tolist() == [self.slot_of[p] for p in prefixes(tokens[: result.length])]
        self.stats.lookups += 1
        self.stats.hit_tokens += expected
        self.stats.computed_tokens += len(tokens) - expected

    @rule(tokens=token_lists)
    def match_length(self, tokens):
        before = [(t, s.tolist()) for t, s in self.cache.sequences()]
        assert self.cache.match_length(tokens) == self.reference_match(tokens, len(tokens) - 1)
        assert [(t, s.tolist()) for t, s in self.cache.sequences()] == before

    @rule(target=holders, tokens=token_lists)
    def lock(self, tokens):
        result = self.cache.match_prefix(tokens, count=False)
        path_tokens, path_slots = self.cache.path(result.node)
        assert path_tokens == tuple(tokens[: result.length]) and torch.equal(path_slots, result.slots)
        self.cache.lock(result.node)
        holder = (tuple(tokens), result.length, result.node)
        self.live.append(holder)
        return holder

    @rule(holder=consumes(holders))
    def unlock(self, holder):
        self.cache.unlock(holder[2])
        self.live.remove(holder)

    @rule(num_tokens=st.integers(1, 40))
    def evict(self, num_tokens):
        evictable = self.cache.evictable_tokens
        spilled = []  # what the disk tier would be handed: each evicted leaf's whole prefix, before it goes
        freed = self.cache.evict(num_tokens, spill=lambda leaf: spilled.append(self.cache.path(leaf))).tolist()
        assert len(freed) >= min(num_tokens, evictable) and len(freed) <= evictable
        self.stats.evicted_tokens += len(freed)
        held = {p for tokens, _ in self.cache.sequences() for p in prefixes(tokens)}
        gone = {p: s for p, s in self.slot_of.items() if p not in held}
        assert sorted(freed) == sorted(gone.values()), "freed slots are not those of the dropped prefixes"
        for path_tokens, path_slots in spilled:
            assert path_tokens in gone and path_slots.tolist() == [self.slot_of[p] for p in prefixes(path_tokens)]
        assert set(gone) <= {p for path_tokens, _ in spilled for p in prefixes(path_tokens)}
        for tokens, length, _ in self.live:
            assert all(p in held for p in prefixes(tokens[:length])), "a locked prefix was evicted"
        for p in gone:
            del self.slot_of[p]

    @invariant()
    def structure_holds(self):
        self.cache.check_invariants()
        assert self.cache.stats == self.stats
        assert self.cache.total_tokens == len(self.slot_of)  # one slot per prefix: nothing held twice
        for tokens, slots in self.cache.sequences():
            assert slots.tolist() == [self.slot_of[p] for p in prefixes(tokens)]
        for node in self.cache.nodes():  # lock counts = live holders whose path runs through the node
            holders = 0
            for _, _, locked in self.live:
                while locked is not self.cache.root and locked is not node:
                    locked = locked.parent
                holders += locked is node
            assert node.lock_ref == holders, f"{node}: lock_ref {node.lock_ref}, {holders} holders"


TestRadixCacheStateful = RadixMachine.TestCase
TestRadixCacheStateful.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def slots_for(tokens, start):
    return torch.arange(start, start + len(tokens))


def test_split_and_shared_prefix():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], slots_for([1, 2, 3, 4], 10))
    duplicates = cache.insert([1, 2, 5], slots_for([1, 2, 5], 20))
    assert duplicates.tolist() == [20, 21]  # tokens 1, 2 were already held (in slots 10, 11)
    cache.check_invariants()
    (child,) = cache.root.children.values()
    assert child.tokens == (1, 2) and set(child.children) == {3, 5}
    assert cache.total_tokens == 5
    assert cache.match_prefix([1, 2, 3, 4]).length == 3  # the last token is always left to compute
    assert cache.match_prefix([1, 2, 3, 4, 9]).slots.tolist() == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 5, 9]).slots.tolist() == [10, 11, 22]
    assert cache.match_prefix([7, 1]).length == 0


def test_lru_evicts_least_recently_used_unlocked_leaf_first():
    cache = RadixCache()
    for start, seq in enumerate(([1, 1, 1], [2, 2, 2], [3, 3, 3])):
        cache.insert(seq, slots_for(seq, 10 * (start + 1)))
    cache.match_prefix([1, 1, 1, 1])  # touch 1s: now 2s are the oldest
    locked = cache.match_prefix([2, 2, 2, 2])  # touch and lock 2s: 3s are now the oldest unlocked
    cache.lock(locked.node)
    assert cache.evictable_tokens == 6
    assert cache.evict(1).tolist() == [30, 31, 32]
    assert cache.evict(100).tolist() == [10, 11, 12]  # only the 1s could go
    assert [s[0] for s in cache.sequences()] == [(2, 2, 2)]
    cache.unlock(locked.node)
    assert cache.evictable_tokens == 3
    cache.check_invariants()


def test_locked_path_split_then_evicted_around():
    """A lock taken on a long edge survives its split by a later insert; eviction takes only the other branch,
    and unlocking the holder makes both halves evictable."""
    cache = RadixCache()
    cache.insert([1, 2, 3, 4, 5], slots_for(range(5), 1))
    held = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(held.node)
    cache.insert([1, 2, 9, 9], slots_for(range(4), 20))  # splits the locked edge after [1, 2]
    head = cache.root.children[1]
    assert head.tokens == (1, 2) and head.lock_ref == 1 and held.node.lock_ref == 1
    assert cache.protected_tokens == 5 and cache.evictable_tokens == 2
    assert sorted(cache.evict(100).tolist()) == [22, 23]
    cache.unlock(held.node)
    assert head.lock_ref == 0 and cache.evictable_tokens == 5
    assert sorted(cache.evict(100).tolist()) == [1, 2, 3, 4, 5]
    cache.check_invariants()


def test_match_length_does_not_change_the_tree():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], slots_for(range(4), 1))
    assert cache.match_length([1, 2, 7]) == 2 and cache.match_length([1, 2, 3, 4, 5]) == 4
    assert len(cache.root.children[1].tokens) == 4  # no split
    assert cache.stats.lookups == 0


def test_common_length():
    assert common_length((1, 2, 3), (1, 2, 4)) == 2
    assert common_length((5, 6), (7, 6)) == 0
    assert common_length((1, 2), (1, 2, 3)) == 2 and common_length((1, 2, 3), (1,)) == 1


def test_eviction_follows_last_use_not_insertion_order():
    """Four leaves touched in an order unlike their insertion order (or its reverse) leave one by one in
    least-recently-used order."""
    cache = RadixCache()
    for i in range(4):
        cache.insert([i, i], slots_for([i, i], 10 * (i + 1)))
    for i in (1, 3, 0, 2):
        cache.match_prefix([i, i, 9])
    assert [cache.evict(1).tolist() for _ in range(4)] == [[20, 21], [40, 41], [10, 11], [30, 31]]


def test_evict_stops_as_soon_as_enough_is_freed():
    cache = RadixCache()
    for i in range(4):
        cache.insert([i, i], slots_for([i, i], 10 * (i + 1)))
    assert len(cache.evict(2)) == 2  # exactly one leaf
    assert len(cache.evict(3)) == 4  # two whole leaves; a third would be one too many
    assert cache.stats.evicted_tokens == 6 and cache.total_tokens == 2


def test_unlock_without_lock_is_refused():
    cache = RadixCache()
    cache.insert([1, 2, 3], slots_for([1, 2, 3], 1))
    with pytest.raises(AssertionError, match="unlock without lock"):
        cache.unlock(cache.match_prefix([1, 2, 3, 4]).node)


def corrupt(how):
    cache = RadixCache()
    cache.insert([1, 2, 3], slots_for([1, 2, 3], 1))
    cache.insert([1, 2, 5], slots_for([1, 2, 5], 4))
    cache.lock(cache.match_prefix([1, 2, 3, 4]).node)
    head = cache.root.children[1]
    leaf3, leaf5 = head.children[3], head.children[5]
    if how == "root edge":
        cache.root.tokens = (7,)
    elif how == "root parent":
        cache.root.parent = head
    elif how == "empty edge":
        head.children[3] = leaf3
        leaf3.tokens, leaf3.slots = (), slots_for([], 0)
    elif how == "wrong key":
        head.children[4] = head.children.pop(5)
    elif how == "wrong key under root":
        cache.root.children[9] = cache.root.children.pop(1)
    elif how == "slot count":
        leaf5.slots = slots_for([0, 0], 7)
    elif how == "parent pointer":
        leaf5.parent = leaf3
    elif how == "root child's parent":
        head.parent = leaf3
    elif how == "lock below child":
        head.lock_ref = 0
    elif how == "negative lock":
        leaf5.lock_ref = -1
    elif how == "token count":
        cache.total_tokens += 1
    elif how == "protected count":
        cache.protected_tokens -= 1
    return cache


@pytest.mark.parametrize(
    "how",
    [
        "root edge",
        "root parent",
        "empty edge",
        "wrong key",
        "wrong key under root",
        "slot count",
        "parent pointer",
        "root child's parent",
        "lock below child",
        "negative lock",
        "token count",
        "protected count",
    ],
)
def test_check_invariants_catches_each_corruption(how):
    """The stateful test leans on check_invariants, so each of its checks is shown to fire."""
    corrupt(None).check_invariants()
    with pytest.raises(AssertionError):
        corrupt(how).check_invariants()
