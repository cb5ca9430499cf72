"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing.

Leaf hash ``SHA-256(0x00 || leaf)``, node hash ``SHA-256(0x01 || left || right)``; the tree over
n leaves splits at the largest power of two below n. ``Accumulator`` keeps only the roots of the
perfect subtrees along the right edge (at most log2 n hashes), so appending is O(log n) and the
root of every prefix is available as the log grows: that is how checkpoints are checked in one
pass over a log.
"""

from __future__ import annotations

import hashlib

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_of(leaves: list[bytes]) -> bytes:
    """Reference (recursive) tree head over raw leaves, exactly as RFC 9162 section 2.1.1 defines it."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


class Accumulator:
    """Incremental tree head: ``append`` leaf hashes, read ``root()`` of everything so far."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, hash), sizes strictly decreasing
        self.size = 0

    def append_leaf(self, data: bytes) -> None:
        self.append_hash(leaf_hash(data))

    def append_hash(self, h: bytes) -> None:
        size = 1
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            h = node_hash(left, h)
            size += left_size
        self._stack.append((size, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h
