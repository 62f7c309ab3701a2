"""A radix tree over token ids that remembers which KV-pool slots hold the KV of prefixes already computed.

Requests often begin alike: the same system prompt, the same document with a new question, a chat's whole
history. The keys and values of a token depend only on the tokens up to it, so once computed for a prefix
they serve every later request with that prefix. The flow for a request:

    match_prefix(prompt)  longest cached prefix -> the slots holding its KV (nothing is copied)
    lock(node)            while the request runs, that path cannot be evicted
    prefill the rest      only the uncached suffix goes through the model, into slots of its own
    insert(tokens, slots) hand the computed slots to the tree, for the next request
    unlock(node)

The tree (compressed edges): each node holds a run of tokens and the pool slots of exactly those tokens;
its children are keyed by their first token, so a lookup walks one child per edge: O(prompt length). When
a match ends inside an edge, the node is split in two so that the matched part becomes a node of its own.

    root -- [The cat sat] --+-- [on the mat]          "The cat sat on the mat"
                            +-- [down]                "The cat sat down"

The tree stores slot numbers (kv_pool.py), never tensors of KV: a hit hands the request the slots, and
requests sharing a prefix read the same memory. A token sits in the tree once; insert returns the slots of
tokens that were already there under other slots (computed twice by two requests at once), for the caller
to free.

Eviction: when the pool runs short, unlocked leaves are dropped, least recently used first, and their slots
returned to the caller to free; a parent that becomes an unlocked leaf joins the candidates.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

NO_SLOTS = torch.empty(0, dtype=torch.int64)


def common_length(edge: tuple[int, ...], tokens: tuple[int, ...]) -> int:
    """How many leading tokens edge and tokens share."""
    n = min(len(edge), len(tokens))
    if edge[:n] == tokens[:n]:  # the usual case, compared in C
        return n
    i = 0
    while edge[i] == tokens[i]:
        i += 1
    return i


class Node:
    def __init__(self, tokens: tuple[int, ...], slots: torch.Tensor, parent: Node | None):
        self.tokens = tokens  # the edge: tokens this node adds to its parent's prefix
        self.slots = slots  # [len(tokens)] int64: the pool slot holding each token's KV
        self.parent = parent
        self.children: dict[int, Node] = {}  # first token of the child's edge -> child
        self.lock_ref = 0  # running requests whose matched path goes through this node
        self.last_access = 0  # logical clock of the last match or insert that touched it

    def __repr__(self) -> str:
        return f"Node({list(self.tokens)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass
class PrefixMatch:
    length: int  # tokens matched
    node: Node  # the node where the matched path ends (the root when nothing matched); lock this one
    slots: torch.Tensor  # [length] int64: the pool slots of the matched tokens, in position order


@dataclass
class CacheStats:
    lookups: int = 0
    hit_tokens: int = 0  # prompt tokens served from the cache
    computed_tokens: int = 0  # prompt tokens that had to be computed
    inserted_tokens: int = 0
    evicted_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.computed_tokens
        return self.hit_tokens / total if total else 0.0


class RadixCache:
    def __init__(self):
        self.root = Node((), NO_SLOTS, None)
        self.total_tokens = 0  # tokens (= slots) the tree holds
        self.protected_tokens = 0  # of those, in nodes some running request has locked
        self.stats = CacheStats()
        self._clock = 0
        # told of each new leaf: (the whole inserted sequence, where the leaf's tokens begin in it, the leaf);
        # speculation's tree lookup indexes the tree's n-grams through it (engine/drafters.py)
        self.on_new_leaf: Callable[[tuple[int, ...], int, Node], None] | None = None

    @property
    def evictable_tokens(self) -> int:
        """Tokens eviction could free: every unlocked node (its children are unlocked too, so each becomes a
        leaf in turn)."""
        return self.total_tokens - self.protected_tokens

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- lookup ---------------------------------------------------------------------------------------

    def match_prefix(
        self, tokens: list[int], align: int = 1, limit: int | None = None, count: bool = True
    ) -> PrefixMatch:
        """The longest cached prefix of tokens[:limit]; limit defaults to all but the last token, which a
        request must compute (it needs that token's logits, which the cache does not keep). Splits a node
        if the match ends inside its edge. align: report only a multiple of this many tokens as matched
        (exact mode reuses whole chunks). count: add the lookup to the hit statistics."""
        tokens = tuple(tokens)
        limit = len(tokens) - 1 if limit is None else limit
        node, matched, parts = self.root, 0, []
        now = self._tick()
        while matched < limit and tokens[matched] in node.children:
            child = node.children[tokens[matched]]
            common = common_length(child.tokens, tokens[matched:limit])
            if common < len(child.tokens):
                child = self._split(child, common)
            child.last_access = now
            parts.append(child.slots)
            node, matched = child, matched + common
        aligned = matched // align * align
        if count:
            self.stats.lookups += 1
            self.stats.hit_tokens += aligned
            self.stats.computed_tokens += len(tokens) - aligned
        slots = torch.cat(parts)[:aligned] if parts else NO_SLOTS
        return PrefixMatch(aligned, node, slots)

    def match_length(self, tokens: list[int]) -> int:
        """How many leading tokens (all but the last) are cached, without splitting or touching anything:
        for ordering the waiting queue."""
        tokens, node, matched = tuple(tokens), self.root, 0
        limit = len(tokens) - 1
        while matched < limit and tokens[matched] in node.children:
            node = node.children[tokens[matched]]
            common = common_length(node.tokens, tokens[matched:limit])
            matched += common
            if common < len(node.tokens):
                break
        return matched

    def _split(self, node: Node, at: int) -> Node:
        """Cut node's edge after `at` tokens: a new node holds the first part and becomes node's parent. (The
        caller is walking through the head, so it sets the head's last_access.)"""
        head = Node(node.tokens[:at], node.slots[:at], node.parent)
        head.lock_ref = node.lock_ref  # every request using node also uses its first part
        head.children[node.tokens[at]] = node
        node.parent.children[node.tokens[0]] = head
        node.tokens, node.slots, node.parent = node.tokens[at:], node.slots[at:], head
        return head

    # -- insertion ------------------------------------------------------------------------------------

    def insert(self, tokens: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Hand the tree the slots [len(tokens)] holding the KV of tokens (slot i for token i). Tokens not
        cached yet become a new leaf that owns their slots. Returns the slots the tree did not take: those
        of tokens it already holds under other slots, which the caller must free."""
        tokens = tuple(tokens)
        node, at, duplicates = self.root, 0, []
        now = self._tick()
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None:
                leaf = Node(tokens[at:], slots[at : len(tokens)].clone(), node)
                leaf.last_access = now
                node.children[tokens[at]] = leaf
                self.total_tokens += len(leaf.tokens)
                self.stats.inserted_tokens += len(leaf.tokens)
                if self.on_new_leaf is not None:
                    self.on_new_leaf(tokens, at, leaf)
                break
            common = common_length(child.tokens, tokens[at:])
            if common < len(child.tokens):
                child = self._split(child, common)
            mine = slots[at : at + common]
            duplicates.append(mine[mine != child.slots])  # the same slot is the request's own matched prefix
            child.last_access = now
            node, at = child, at + common
        return torch.cat(duplicates) if duplicates else NO_SLOTS

    # -- locking --------------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect node and its ancestors (a running request's prefix) from eviction."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.protected_tokens += len(node.tokens)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.protected_tokens -= len(node.tokens)
            node = node.parent

    # -- eviction -------------------------------------------------------------------------------------

    def evict(self, num_tokens: int, spill: Callable[[Node], None] | None = None) -> torch.Tensor:
        """Drop least recently used unlocked leaves until num_tokens are freed (or nothing is evictable);
        returns the freed slots, for the caller to give back to the pool. spill(leaf) is called before each
        leaf goes, while its KV is still in the pool (the disk tier writes it down). Collecting the
        candidates walks the whole tree once per call: simple, and cheap next to a forward."""
        # id() keeps heapq from comparing two nodes; it never decides the order, since one operation touches
        # one path and so no two leaves share a last_access.
        leaves = [(n.last_access, id(n), n) for n in self.nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            if spill is not None:
                spill(leaf)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            count += len(leaf.tokens)
            freed.append(leaf.slots)
            self.total_tokens -= len(leaf.tokens)
            leaf.parent, leaf.slots = None, NO_SLOTS
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self.stats.evicted_tokens += count
        return torch.cat(freed) if freed else NO_SLOTS

    # -- inspection -----------------------------------------------------------------------------------

    def nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def path(self, node: Node) -> tuple[tuple[int, ...], torch.Tensor]:
        """The tokens and slots of the whole prefix that ends at node."""
        tokens, slots = [], []
        while node is not self.root:
            tokens.append(node.tokens)
            slots.append(node.slots)
            node = node.parent
        return sum(reversed(tokens), ()), torch.cat(slots[::-1]) if slots else NO_SLOTS

    def all_slots(self) -> list[int]:
        return [s for node in self.nodes() for s in node.slots.tolist()]

    def sequences(self) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """(tokens, slots) for every root-to-leaf path: everything the tree holds, as a flat list."""

        def walk(node: Node, tokens: tuple, slots: list):
            if node is not self.root:
                tokens, slots = tokens + node.tokens, slots + [node.slots]
                if not node.children:
                    yield tokens, torch.cat(slots)
            for child in node.children.values():
                yield from walk(child, tokens, slots)

        yield from walk(self.root, (), [])

    def check_invariants(self) -> None:
        """Verify the structure; raises AssertionError with what is wrong. Tests run it after every step."""
        assert self.root.parent is None and self.root.tokens == ()
        tokens = protected = 0
        for node in self.nodes():
            assert len(node.tokens) > 0, "a non-root node with an empty edge"
            # parent pointer and key agree
            assert node.parent.children.get(node.tokens[0]) is node, (
                f"{node} is not its parent's child by its first token"
            )
            assert node.slots.shape == (len(node.tokens),), f"{node}: {node.slots.shape[0]} slots"
            assert node.lock_ref >= 0
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), f"{node}: lock below parent's"
            tokens += len(node.tokens)
            protected += len(node.tokens) if node.lock_ref else 0
        assert tokens == self.total_tokens, f"token count {self.total_tokens} != {tokens}"
        assert protected == self.protected_tokens, f"protected count {self.protected_tokens} != {protected}"
