"""A radix tree over token ids that remembers KV already computed, shared by every request.

Requests often begin alike: the same system prompt, the same document with a new question, a chat's whole
history. The keys and values of a token depend only on the tokens up to it, so once computed for a prefix
they serve every later request with that prefix. The flow for a request:

    match_prefix(prompt)  longest cached prefix -> copy its KV into the request's KV cache
    lock(node)            while the request runs, that path cannot be evicted
    prefill the rest      only the uncached suffix goes through the model
    insert(tokens, kv)    store what was computed (prompt and output), for the next request
    unlock(node)

The tree (compressed edges): each node holds a run of tokens and the KV for exactly those tokens; its
children are keyed by their first token, so a lookup walks one child per edge: O(prompt length). When a
match ends inside an edge, the node is split in two so that the matched part becomes a node of its own.

    root -- [The cat sat] --+-- [on the mat]          "The cat sat on the mat"
                            +-- [down]                "The cat sat down"

KV storage: every node owns its own tensors, keys and values of [layers, kv_heads, n, head_dim]. A hit
copies the path's tensors into the request's contiguous KV buffers (one memcpy per node: linear in the
prefix, no quadratic concatenation), and insert copies only the new suffix out. Owning tensors, rather than
views into a shared pool, means eviction really returns memory, and that nothing a request computes with
can be freed under it. (SGLang instead keeps one token pool and stores indices in the tree, which avoids
the copies at the price of custom attention kernels that read scattered slots.)

Eviction: when the tree holds more than `max_tokens`, unlocked leaves are dropped, least recently used
first; a parent that becomes an unlocked leaf joins the candidates.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterator

import torch


def _common_length(edge: tuple[int, ...], tokens: tuple[int, ...]) -> int:
    """How many leading tokens edge and tokens share."""
    n = min(len(edge), len(tokens))
    if edge[:n] == tokens[:n]:  # the usual case, compared in C
        return n
    i = 0
    while edge[i] == tokens[i]:
        i += 1
    return i


def _poison(*tensors: torch.Tensor) -> None:
    """Debug mode: overwrite freed KV with NaN, so a use after free cannot go unnoticed."""
    with torch.inference_mode():  # the engine's KV may be inference tensors
        for t in tensors:
            t.fill_(float("nan"))


class Node:
    def __init__(self, tokens: tuple[int, ...], keys, values, parent: "Node | None"):
        self.tokens = tokens  # the edge: tokens this node adds to its parent's prefix
        self.keys = keys  # [layers, kv_heads, len(tokens), head_dim] (None at the root)
        self.values = values  # same shape as keys
        self.parent = parent
        self.children: dict[int, Node] = {}  # first token of the child's edge -> child
        self.lock_ref = 0  # running requests whose matched path goes through this node
        self.last_access = 0  # logical clock of the last match or insert that touched it
        self.evicted = False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def __repr__(self) -> str:
        return f"Node({list(self.tokens)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass
class PrefixMatch:
    length: int  # tokens matched
    node: Node  # the node where the matched path ends (the root when nothing matched); lock this one
    path: list[Node] = field(default_factory=list)  # root's children down to node (may reach past length)

    def copy_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy the matched tokens' KV into request buffers [layers, kv_heads, capacity, head_dim], at
        positions 0..length-1."""
        length, at = self.length, 0
        for node in self.path:
            n = min(len(node.tokens), length - at)
            if n <= 0:
                break
            keys[:, :, at : at + n] = node.keys[:, :, :n]
            values[:, :, at : at + n] = node.values[:, :, :n]
            at += n


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
    def __init__(self, max_tokens: int, poison_evicted: bool = False):
        """max_tokens: how many tokens' KV the tree may hold (unlocked leaves are evicted beyond it).
        poison_evicted: debug mode that fills freed KV with NaN, so any use after free shows in the output."""
        self.root = Node((), None, None, None)
        self.max_tokens = max_tokens
        self.poison_evicted = poison_evicted
        self.total_tokens = 0
        self.total_bytes = 0
        self.stats = CacheStats()
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- lookup ---------------------------------------------------------------------------------------

    def match_prefix(self, tokens: list[int], align: int = 1) -> PrefixMatch:
        """The longest cached prefix of tokens, leaving at least the last token to compute: the request needs
        that token's logits, which the cache does not keep. Splits a node if the match ends inside its edge.
        align: report only a multiple of this many tokens as matched (exact mode reuses whole chunks)."""
        tokens = tuple(tokens)
        limit = len(tokens) - 1
        node, matched, path = self.root, 0, []
        now = self._tick()
        while matched < limit and tokens[matched] in node.children:
            child = node.children[tokens[matched]]
            edge = child.tokens
            common = _common_length(edge, tokens[matched:limit])
            if common < len(edge):
                child = self._split(child, common)
            child.last_access = now
            path.append(child)
            node, matched = child, matched + common
            if common < len(edge):
                break
        matched = matched // align * align
        self.stats.lookups += 1
        self.stats.hit_tokens += matched
        self.stats.computed_tokens += len(tokens) - matched
        return PrefixMatch(matched, node, path)

    def _split(self, node: Node, at: int) -> Node:
        """Cut node's edge after `at` tokens: a new node holds the first part and becomes node's parent.
        Both halves get tensors of their own (clones), so each can be evicted and freed independently."""
        head = Node(node.tokens[:at], node.keys[:, :, :at].clone(), node.values[:, :, :at].clone(), node.parent)
        head.lock_ref = node.lock_ref  # every request using node also uses its first part
        head.last_access = node.last_access
        head.children[node.tokens[at]] = node
        node.parent.children[node.tokens[0]] = head
        old_keys, old_values = node.keys, node.values
        node.tokens, node.parent = node.tokens[at:], head
        node.keys, node.values = old_keys[:, :, at:].clone(), old_values[:, :, at:].clone()
        if self.poison_evicted:
            _poison(old_keys, old_values)
        return head

    # -- insertion ------------------------------------------------------------------------------------

    def insert(self, tokens: list[int], keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store the KV of tokens (keys/values: [layers, kv_heads, >= len(tokens), head_dim], position i
        holding token i). Only the part not cached yet is copied in. Returns the number of new tokens."""
        tokens = tuple(tokens)
        node, at = self.root, 0
        now = self._tick()
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None:
                leaf = Node(tokens[at:], keys[:, :, at : len(tokens)].clone(), values[:, :, at : len(tokens)].clone(), node)
                leaf.last_access = now
                node.children[tokens[at]] = leaf
                self.total_tokens += len(leaf.tokens)
                self.total_bytes += leaf.nbytes
                self.stats.inserted_tokens += len(leaf.tokens)
                break
            common = _common_length(child.tokens, tokens[at:])
            if common < len(child.tokens):
                child = self._split(child, common)
            child.last_access = now
            node, at = child, at + common
        new_tokens = len(tokens) - at if at < len(tokens) else 0
        if self.total_tokens > self.max_tokens:
            self.evict(self.total_tokens - self.max_tokens)
        return new_tokens

    # -- locking --------------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect node and its ancestors (a running request's prefix) from eviction."""
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            node = node.parent

    # -- eviction -------------------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Drop least recently used unlocked leaves until num_tokens are freed (or nothing is evictable).
        Collecting the candidates walks the whole tree once per call: simple, and cheap next to a forward."""
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            freed += len(leaf.tokens)
            self._free(leaf)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self.stats.evicted_tokens += freed
        return freed

    def _free(self, node: Node) -> None:
        assert node.lock_ref == 0, "evicting a locked node"
        self.total_tokens -= len(node.tokens)
        self.total_bytes -= node.nbytes
        if self.poison_evicted:
            _poison(node.keys, node.values)
        node.keys = node.values = None
        node.parent = None
        node.evicted = True

    def clear(self) -> None:
        """Forget everything unlocked."""
        self.evict(self.total_tokens)

    # -- inspection -----------------------------------------------------------------------------------

    def _nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def sequences(self) -> Iterator[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
        """(tokens, keys, values) for every root-to-leaf path: everything the tree holds, as a flat list."""

        def walk(node: Node, tokens: tuple, keys: list, values: list):
            if node is not self.root:
                tokens, keys, values = tokens + node.tokens, keys + [node.keys], values + [node.values]
            if not node.children and node is not self.root:
                yield tokens, torch.cat(keys, dim=2), torch.cat(values, dim=2)
            for child in node.children.values():
                yield from walk(child, tokens, keys, values)

        yield from walk(self.root, (), [], [])

    def check_invariants(self) -> None:
        """Verify the structure; raises AssertionError with what is wrong. Tests run it after every step."""
        assert self.root.parent is None and self.root.tokens == () and self.root.keys is None
        tokens = nbytes = 0
        for node in self._nodes():
            assert not node.evicted, f"evicted {node} is still in the tree"
            assert len(node.tokens) > 0, "a non-root node with an empty edge"
            assert node.parent.children.get(node.tokens[0]) is node, f"{node} is not keyed by its first token"
            assert node.keys.shape[2] == len(node.tokens) and node.values.shape == node.keys.shape, f"{node}: KV size"
            assert node.lock_ref >= 0
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), f"{node}: lock below parent's"
            for first, child in node.children.items():
                assert child.parent is node and child.tokens[0] == first
            tokens += len(node.tokens)
            nbytes += node.nbytes
        for first, child in self.root.children.items():
            assert child.parent is self.root and child.tokens[0] == first
        assert tokens == self.total_tokens, f"token count {self.total_tokens} != {tokens}"
        assert nbytes == self.total_bytes, f"byte count {self.total_bytes} != {nbytes}"
