"""Hashing and near-duplicate clustering (MinHash + LSH over word shingles, vectorised in numpy)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from .text import UnionFind, jaccard, words


class Vocab:
    """Normalised word -> small int id, so texts become int arrays that numpy can hash in bulk."""

    def __init__(self) -> None:
        self.ids: defaultdict[str, int] = defaultdict(itertools.count().__next__)
        self._words: list[str] = []

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter(map(self.ids.__getitem__, words(text)), dtype=np.int32)

    def decode(self, ids: np.ndarray) -> list[str]:
        if len(self._words) != len(self.ids):
            self._words = [""] * len(self.ids)
            for w, i in self.ids.items():
                self._words[i] = w
        return [self._words[i] for i in ids.tolist()]

    def __len__(self) -> int:
        return len(self.ids)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _chunks(sizes: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, end) ranges whose sizes sum to about `budget` (at least one item each)."""
    cum = np.cumsum(sizes)
    start, n = 0, len(sizes)
    while start < n:
        base = int(cum[start - 1]) if start else 0
        end = max(int(np.searchsorted(cum, base + budget, side="right")), start + 1)
        yield start, min(end, n)
        start = end


class WindowHasher:
    """64-bit hashes of k-word windows of word-id arrays: a random value per word id, position-weighted sum,
    murmur3 finalizer. Hashes are comparable only between calls on the same hasher."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rand = rng.integers(0, 2**64 - 1, size=vocab_size + 1, dtype=np.uint64, endpoint=True)
        self.sentinel = vocab_size  # pads short documents when `pad`
        self.seed = seed

    def windows(self, docs: list[np.ndarray], k: int, *, pad: bool) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of every k-word window of each doc, concatenated, and the offsets (len(docs) + 1) of each
        doc's hashes. With `pad`, a doc shorter than k (but not empty) has one window: the whole doc."""
        n = len(docs)
        mult = (np.random.default_rng(self.seed + 1).integers(0, 2**63, size=k, dtype=np.uint64) * np.uint64(2)
                + np.uint64(1))
        lens = np.fromiter((d.size for d in docs), dtype=np.int64, count=n)
        counts = np.maximum(lens - k + 1, 0)
        if pad:
            counts = np.where((lens > 0) & (lens < k), 1, counts)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        out = np.empty(int(offsets[-1]), dtype=np.uint64)
        fill = np.full(k - 1, self.sentinel, dtype=np.int32)
        plens = lens + (k - 1 if pad else 0)
        for s, e in _chunks(plens, 1 << 22):
            c = counts[s:e]
            total = int(c.sum())
            if total == 0:
                continue
            part = docs[s:e]
            w = np.concatenate([x for d in part for x in (d, fill)] if pad else part)
            r = self.rand[w]
            m = w.size - k + 1
            h = r[:m] * mult[0]
            for t in range(1, k):
                h += r[t : t + m] * mult[t]
            pstart = np.zeros(e - s, dtype=np.int64)
            np.cumsum(plens[s : e - 1], out=pstart[1:])
            idx = np.repeat(pstart, c) + (np.arange(total) - np.repeat(np.cumsum(c) - c, c))
            out[offsets[s] : offsets[e]] = _fmix64(h[idx])
        return out, offsets


def lsh_params(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """Bands b and rows r (b*r <= num_perm): the largest r whose candidate probability at `threshold`
    is at least `recall` (fewest false candidates at that recall)."""
    best = (num_perm // 2, 2)
    for r in range(2, num_perm // 2 + 1):
        b = num_perm // r
        if b < 2:
            break
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int = 1) -> np.ndarray:
    """MinHash signatures (n, num_perm) of the sets hashes[offsets[i]:offsets[i+1]] (uint32, none empty).

    The same permutations as `datasketch.MinHash(num_perm, seed)` (affine32 scheme: a*h + b mod 2^32)
    applied to the already well-mixed shingle hashes, computed for all sets at once in numpy instead of
    one `update_batch` per set (which spends most of its time in per-call overhead).
    """
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    a, b = a.astype(np.uint32), b.astype(np.uint32)
    n = offsets.size - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    for s, e in _chunks(np.diff(offsets), 1 << 17):
        seg = hashes[offsets[s] : offsets[e]]
        ph = a[:, None] * seg[None, :] + b[:, None]  # (num_perm, m), wraps mod 2^32
        sig[s:e] = np.minimum.reduceat(ph, offsets[s:e] - offsets[s], axis=1).T
    return sig


def near_duplicate_clusters(
    hashes: np.ndarray, offsets: np.ndarray, threshold: float, *, num_perm: int = 64, seed: int = 1,
    max_tries: int = 5,
) -> tuple[list[list[int]], dict[int, float]]:
    """Cluster the shingle sets hashes[offsets[i]:offsets[i+1]] (none empty) at Jaccard >= threshold.

    Candidates come from a datasketch `MinHashLSH` index of the sets' MinHash signatures (bands chosen by
    `lsh_params` for 95% recall at the threshold); each candidate pair is confirmed with the exact Jaccard
    of the two sets, and confirmed pairs are joined by union-find (single linkage). Returns the clusters
    (sorted index lists of size >= 2, ordered by first member) and each cluster's smallest confirmed
    similarity, keyed by its first member.
    """
    from datasketch import LeanMinHash, MinHashLSH

    n = offsets.size - 1
    if n < 2:
        return [], {}
    sig = minhash_signatures(hashes, offsets, num_perm, seed)
    b, r = lsh_params(threshold, num_perm)
    lsh = MinHashLSH(num_perm=num_perm, params=(b, r))
    with lsh.insertion_session(buffer_size=100_000) as session:
        for i in range(n):
            session.insert(i, LeanMinHash(seed=seed, hashvalues=sig[i], scheme="affine32"), check_duplication=False)
    sets: dict[int, np.ndarray] = {}

    def exact(i: int) -> np.ndarray:
        if i not in sets:
            sets[i] = np.unique(hashes[offsets[i] : offsets[i + 1]])
        return sets[i]

    uf = UnionFind(n)
    checked: set[tuple[int, int]] = set()
    min_sim: dict[int, float] = {}  # root -> smallest confirmed edge similarity
    for table in lsh.hashtables:
        for key in table.keys():
            bucket = table.get(key)
            if len(bucket) < 2:
                continue
            groups: dict[int, list[int]] = {}  # current root -> this bucket's members in that component
            for m in sorted(bucket):
                cur = uf.find(m)
                mine = groups.pop(cur, [])
                for root in list(groups):
                    if root not in groups:
                        continue
                    if uf.find(root) != cur:
                        for p in groups[root][:max_tries]:
                            if (p, m) in checked:
                                continue
                            checked.add((p, m))
                            sim = jaccard(exact(p), exact(m))
                            if sim >= threshold:
                                ra, rm = uf.find(p), cur
                                cur = uf.union(p, m)
                                min_sim[cur] = min(sim, min_sim.pop(ra, 1.0), min_sim.pop(rm, 1.0))
                                break
                        else:
                            continue
                    other = groups.pop(root)
                    if len(other) > len(mine):
                        other, mine = mine, other
                    mine.extend(other)
                mine.append(m)
                groups[cur] = mine
    by_root: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        by_root[uf.find(i)].append(i)
    clusters = sorted((ms for ms in by_root.values() if len(ms) > 1), key=lambda ms: ms[0])
    sims = {ms[0]: round(min_sim.get(uf.find(ms[0]), 1.0), 3) for ms in clusters}
    return clusters, sims


def shingle_sets(docs: list[np.ndarray], k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the k-word shingles of each doc (the whole doc when shorter than k)."""
    h, off = WindowHasher(vocab_size).windows(docs, k, pad=True)
    return (h >> np.uint64(32)).astype(np.uint32), off
