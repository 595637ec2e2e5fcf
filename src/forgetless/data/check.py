"""SFT data checks: schema, duplicates, near-duplicates, contradictions, length, degenerate answers,
benchmark contamination and a diversity profile, plus `fix_data` that writes a cleaned copy.

Every record is parsed with the same code training uses (`data/examples.py`), so a record that passes
here is a record `forgetless train` accepts. Nothing stops at the first bad record: every problem is
reported with the file:line it came from. See docs/data-check.md for the definitions and the JSON layout.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..io import atomic_write_text
from .examples import encode_record, prompt_completion, text_field, to_messages, uses_chat_template
from .loading import (
    Record,
    file_problem,
    is_hf_id,
    iter_lines,
    json_array_text,
    open_text,
    read_file,
    read_hf,
)

#: Case-insensitive phrases that mark an answer as refusal / assistant boilerplate (apostrophes normalised).
REFUSAL_PHRASES: tuple[str, ...] = (
    "as an ai language model",
    "as a language model",
    "as an ai assistant, i cannot",
    "as an ai, i cannot",
    "i'm sorry, but i cannot",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm sorry, i cannot",
    "i cannot fulfill that request",
    "i cannot fulfill this request",
    "i can't assist with that",
    "i cannot assist with that",
    "i'm unable to help with that",
    "i am not able to provide",
)
#: Two answers to the same prompt are "materially different" when their normalised texts differ and the
#: Jaccard similarity of their word sets is below this.
ANSWER_JACCARD_DIFFERENT = 0.5
#: Prompts count as near-duplicates for contradictions at Jaccard >= max(threshold, this): one changed word in a
#: short prompt ("how many apples ..." / "how many pears ...") usually asks a different question.
PROMPT_MIN_JACCARD = 0.9
#: Eval items shorter than the n-gram size take part whole when they have at least this many words.
MIN_SHORT_ITEM_WORDS = 8
#: Removal reasons, in priority order (a record flagged twice is logged under the first).
REASONS = ("malformed_json", "schema", "contaminated", "empty_prompt", "empty", "whitespace",
           "repeated_token", "repeated_char", "refusal", "exact_duplicate", "near_duplicate")
DEGENERATE_REASONS = ("empty_prompt", "empty", "whitespace", "repeated_token", "repeated_char", "refusal")

_WORD = re.compile(r"\w+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


# ---------------------------------------------------------------- reading


@dataclass
class BadLine:
    """A line (or JSON array item) that is not a usable record, with the raw text when there is one."""

    where: str
    error: str
    raw: str | None = None
    kind: str = "malformed_json"  # or "schema" (valid JSON, but not an object)


def iter_json_file(path: str | Path) -> Iterator[tuple[int, Any, BadLine | None]]:
    """Yield (line, value, None) per JSON value, or (line, None, BadLine) per malformed line; never stops early.

    .jsonl/.ndjson (optionally .gz): one value per non-blank line. .json: an array, or {"data": [...]}; a
    malformed .json file is one BadLine (a single document cannot be read past its error).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if not name.endswith((".jsonl", ".ndjson", ".json")):
        raise DataError(f"{path}: unsupported data file type; use .jsonl, .json (optionally .gz), or hf:<dataset id>")
    problem = file_problem(path)
    if problem:  # empty, binary or not UTF-8: one finding for the whole file
        yield 1, None, BadLine(f"{path}:1", problem,
                               kind="schema" if problem.startswith("the file is empty") else "malformed_json")
        return
    if name.endswith((".jsonl", ".ndjson")) and json_array_text(path) is not None:
        name = name + ".json"  # one JSON array under a .jsonl name: read as a .json file is
    if name.endswith((".jsonl", ".ndjson")):
        for i, line, bad in iter_lines(path):
            if bad:
                yield i, None, BadLine(f"{path}:{i}", bad)
                continue
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as e:
                raw = line.rstrip("\n")
                yield i, None, BadLine(f"{path}:{i}", f"malformed JSON line ({e.msg} at column {e.colno})", raw)
    else:
        try:
            with open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            yield 1, None, BadLine(f"{path}:1", f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, None, BadLine(f"{path}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno}); "
                                          "the rest of this file cannot be read")
            return
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            yield 1, None, BadLine(f"{path}:1", "a .json data file holds an array of objects (or {'data': [...]})")
            return
        for i, item in enumerate(obj, start=1):
            yield i, item, None


def read_records_tolerant(specs: str | list[str], split: str = "train") -> tuple[list[Record], list[BadLine]]:
    """Like `load_records`, but malformed lines and non-object values are collected, not raised."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    records: list[Record] = []
    bad: list[BadLine] = []
    for spec in specs:
        if is_hf_id(spec):
            records.extend(read_hf(spec, split))
            continue
        source = str(Path(spec).expanduser())
        for line, value, problem in iter_json_file(spec):
            if problem is not None:
                bad.append(problem)
            elif not isinstance(value, dict):
                bad.append(BadLine(f"{source}:{line}", f"expected a JSON object, got {type(value).__name__}",
                                   json.dumps(value, ensure_ascii=False), kind="schema"))
            else:
                records.append(Record(value, source, line))
    return records, bad


# ---------------------------------------------------------------- text helpers


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped: the exact-duplicate key."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    """Normalised word tokens (lower-cased `\\w+` runs; punctuation dropped)."""
    return _WORD.findall(text.lower())


def degenerate_reason(answer: str) -> str | None:
    """Why an answer is useless as a training target, or None. See docs/data-check.md."""
    if answer == "":
        return "empty"
    if not answer.strip():
        return "whitespace"
    stripped = answer.strip()
    first = stripped.split(None, 1)[0]
    if len(first) == len(stripped):  # a single token
        if len(first) >= 4 and len(set(first)) == 1 and not first.isdigit():
            return "repeated_char"
    elif stripped.count(first) >= 3:  # cheap pre-filter before splitting a long answer
        tokens = stripped.split()
        if len(tokens) >= 3 and len(set(tokens)) == 1:
            return "repeated_token"
    low = answer.lower()
    if "\u2019" in low or "\u2018" in low or "\u02bc" in low:
        low = low.translate(_APOSTROPHES)
    if any(p in low for p in REFUSAL_PHRASES):
        return "refusal"
    return None


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def _percentiles(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)

    def rank(p: float) -> int:
        return s[max(0, math.ceil(p * len(s)) - 1)]

    return {"count": len(s), "min": s[0], "p10": rank(0.10), "p50": rank(0.50), "p90": rank(0.90),
            "p99": rank(0.99), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the smaller index (earliest record) stays the root
        return ra


# ---------------------------------------------------------------- hashing and near-duplicate clustering


class _Vocab:
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


class _WindowHasher:
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

    uf = _UnionFind(n)
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
                            sim = _jaccard(exact(p), exact(m))
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


def _shingle_sets(docs: list[np.ndarray], k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the k-word shingles of each doc (the whole doc when shorter than k)."""
    h, off = _WindowHasher(vocab_size).windows(docs, k, pad=True)
    return (h >> np.uint64(32)).astype(np.uint32), off


# ---------------------------------------------------------------- per-record view


@dataclass
class _Item:
    rec: Record
    prompt: str  # "" for format text
    answer: str  # the text learnt from (last assistant turn for chat, the text for format text)
    example_key: str  # normalised whole example: the exact-duplicate key
    first_word: str
    degenerate: str | None
    pw: np.ndarray  # word ids of the prompt
    aw: np.ndarray  # word ids of the answer
    n_tokens: int | None = None


def _first_word(text: str) -> str:
    m = _WORD.search(text[:200].lower())
    return m.group(0) if m else ""


def _view(rec: Record, cfg: DataConfig, vocab: _Vocab) -> _Item:
    """Parse a record with the training code's own rules; raises DataError naming file:line."""
    degenerate = None
    if cfg.format == "text":
        prompt, answer = "", text_field(rec, cfg, "text")
        key = normalize(answer)
        degenerate = degenerate_reason(answer)
        return _Item(rec, "", answer, key, _first_word(answer), degenerate, vocab.encode(""), vocab.encode(answer))
    if cfg.format == "chat":
        msgs = to_messages(rec, cfg)
        if cfg.system_prompt and msgs and msgs[0]["role"] == "system" and msgs[0]["content"] == cfg.system_prompt:
            msgs = msgs[1:]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
        answer = msgs[last]["content"]
        key = "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in msgs)
        for m in msgs:
            if m["role"] == "assistant" and (degenerate := degenerate_reason(m["content"])):
                break
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if degenerate is None and not any(u.strip() for u in users):
            degenerate = "empty_prompt"
        first = next((u for u in users if u.strip()), "")
        pw = vocab.encode("\n".join(m["content"] for m in msgs[:last]))
        return _Item(rec, prompt, answer, key, _first_word(first), degenerate, pw, vocab.encode(answer))
    prompt, answer = prompt_completion(rec, cfg)
    key = normalize(prompt) + "\x1f" + normalize(answer)
    degenerate = degenerate_reason(answer)
    if degenerate is None and not prompt.strip():
        degenerate = "empty_prompt"
    return _Item(rec, prompt, answer, key, _first_word(prompt), degenerate, vocab.encode(prompt), vocab.encode(answer))


def _strip_where(msg: str, where: str) -> str:
    return msg[len(where) + 2 :] if msg.startswith(where + ": ") else msg


# ---------------------------------------------------------------- the report


@dataclass
class CheckReport:
    """What `check_data` / `cheap_checks` found. Sections that did not run hold {"skipped": reason}."""

    files: list[str]
    format: str
    records: int
    valid: int
    schema: dict[str, Any]
    exact_duplicates: dict[str, Any]
    near_duplicates: dict[str, Any]
    contradictions: dict[str, Any]
    degenerate: dict[str, Any]
    length: dict[str, Any]
    contamination: dict[str, Any]
    diversity: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # where -> (reason, kept where or None, detail): what fix_data removes; not part of the JSON
    removal_plan: dict[str, tuple[str, str | None, str]] = field(default_factory=dict, repr=False)
    contradiction_locations: list[list[str]] = field(default_factory=list, repr=False)
    fingerprints: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def problems(self) -> dict[str, int]:
        """Counts per check: records affected (contradictions: prompts with conflicting answers)."""
        return {
            "schema": self.schema.get("bad", 0),
            "exact_duplicates": self.exact_duplicates.get("duplicates", 0),
            "near_duplicates": self.near_duplicates.get("duplicates", 0),
            "contradictions": self.contradictions.get("groups", 0),
            "degenerate": self.degenerate.get("count", 0),
            "truncated": self.length.get("over_max_length", 0),
            "contaminated": self.contamination.get("contaminated", 0),
        }

    @property
    def total_problems(self) -> int:
        return sum(self.problems.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "format": self.format,
            "records": self.records,
            "valid": self.valid,
            "problems": self.problems,
            "total_problems": self.total_problems,
            "schema": self.schema,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "contradictions": self.contradictions,
            "degenerate": self.degenerate,
            "length": self.length,
            "contamination": self.contamination,
            "diversity": self.diversity,
            "settings": self.settings,
            "timings": self.timings,
        }


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._t, 3)
        self._t = now


def _fingerprints(files: list[str]) -> dict[str, list[int]]:
    out = {}
    for f in files:
        p = Path(f).expanduser()
        if p.is_file():
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


# ---------------------------------------------------------------- sections


def _schema_and_views(
    records: list[Record], bad: list[BadLine], cfg: DataConfig, max_examples: int, vocab: _Vocab
) -> tuple[list[_Item], dict[str, Any], dict[str, tuple[str, str | None, str]]]:
    items: list[_Item] = []
    invalid: list[tuple[str, str]] = []
    for rec in records:
        try:
            items.append(_view(rec, cfg, vocab))
        except DataError as e:
            invalid.append((rec.where, _strip_where(str(e), rec.where)))
    plan: dict[str, tuple[str, str | None, str]] = {}
    for b in bad:
        plan[b.where] = (b.kind, None, b.error)
    for where, err in invalid:
        plan[where] = ("schema", None, err)
    order = {src: k for k, src in enumerate(dict.fromkeys(r.source for r in records))}

    def position(where: str) -> tuple[int, int]:
        src, _, line = where.rpartition(":")
        return order.get(src, len(order)), int(line) if line.isdigit() else 0

    problems = sorted([(b.where, b.error) for b in bad] + invalid, key=lambda we: position(we[0]))
    examples = [{"where": w, "error": e} for w, e in problems[:max_examples]]
    section = {
        "records": len(records) + len(bad),
        "valid": len(items),
        "bad": len(bad) + len(invalid),
        "malformed": sum(b.kind == "malformed_json" for b in bad),
        "invalid": len(invalid) + sum(b.kind != "malformed_json" for b in bad),
        "examples": examples,
    }
    return items, section, plan


def _lengths(
    items: list[_Item], cfg: DataConfig, tokenizer: Any, max_examples: int
) -> tuple[list[_Item], dict[str, Any], list[tuple[str, str]]]:
    """Token lengths with the training encoder; per-record encoding errors become schema errors."""
    chat = uses_chat_template(cfg, tokenizer)
    kept: list[_Item] = []
    errors: list[tuple[str, str]] = []
    over: list[_Item] = []
    for it in items:
        try:
            ids, _ = encode_record(it.rec, cfg, tokenizer, chat)
        except DataError as e:
            errors.append((it.rec.where, _strip_where(str(e), it.rec.where)))
            continue
        it.n_tokens = len(ids)
        if len(ids) > cfg.max_length:
            over.append(it)
        kept.append(it)
    section = {
        "unit": "tokens",
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "chat_template": chat,
        "max_length": cfg.max_length,
        "overlong_policy": cfg.overlong,
        "distribution": _percentiles([it.n_tokens or 0 for it in kept]),
        "over_max_length": len(over),
        "examples": [{"where": it.rec.where, "tokens": it.n_tokens} for it in over[:max_examples]],
    }
    return kept, section, errors


def _degenerate_section(items: list[_Item], max_examples: int) -> dict[str, Any]:
    flagged = [it for it in items if it.degenerate]
    by_reason = Counter(it.degenerate for it in flagged)
    return {
        "count": len(flagged),
        "by_reason": {r: by_reason[r] for r in DEGENERATE_REASONS if by_reason[r]},
        "examples": [{"where": it.rec.where, "reason": it.degenerate, "answer": _snippet(it.answer)}
                     for it in flagged[:max_examples]],
    }


def _exact_groups(items: list[_Item], idx: list[int]) -> list[list[int]]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_key[items[i].example_key].append(i)
    return [g for g in by_key.values() if len(g) > 1]


def _exact_section(items: list[_Item], groups: list[list[int]], max_examples: int) -> dict[str, Any]:
    ordered = sorted(groups, key=lambda g: (-len(g), g[0]))
    return {
        "groups": len(groups),
        "duplicates": sum(len(g) - 1 for g in groups),
        "examples": [{"copies": len(g), "kept": items[g[0]].rec.where,
                      "locations": [items[i].rec.where for i in g[:max_examples]],
                      "text": _snippet(items[g[0]].prompt or items[g[0]].answer)} for g in ordered[:max_examples]],
    }


def _example_ids(it: _Item) -> np.ndarray:
    return np.concatenate((it.pw, it.aw)) if it.pw.size else it.aw


def _contradictions(
    items: list[_Item], idx: list[int], threshold: float, shingle: int, num_perm: int, max_examples: int,
    vocab: _Vocab,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Prompts that are the same (normalised) or near-duplicates with materially different answers."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        if items[i].prompt.strip():
            by_prompt[normalize(items[i].prompt)].append(i)
    members = {g[0]: g for g in by_prompt.values()}
    reps = [r for r in members if items[r].pw.size]
    threshold = max(threshold, PROMPT_MIN_JACCARD)
    hashes, offsets = _shingle_sets([items[r].pw for r in reps], shingle, len(vocab))
    clusters, _ = near_duplicate_clusters(hashes, offsets, threshold, num_perm=num_perm)
    prompt_groups = [sorted(i for c in cl for i in members[reps[c]]) for cl in clusters]
    in_cluster = {reps[c] for cl in clusters for c in cl}
    prompt_groups += [g for r, g in members.items() if len(g) > 1 and r not in in_cluster]
    found: list[tuple[list[int], list[list[int]]]] = []
    for group in sorted(prompt_groups, key=lambda g: g[0]):
        variants: list[tuple[set[int], list[int]]] = []  # answer clusters: (word set of the first, members)
        norms: dict[str, int] = {}  # normalised answer -> variant index
        for i in group:
            na = normalize(items[i].answer)
            if na in norms:
                variants[norms[na]][1].append(i)
                continue
            ws = set(items[i].aw.tolist())
            for v, (rep_ws, ms) in enumerate(variants):
                union = len(ws | rep_ws)
                if (len(ws & rep_ws) / union if union else 1.0) >= ANSWER_JACCARD_DIFFERENT:
                    ms.append(i)
                    norms[na] = v
                    break
            else:
                norms[na] = len(variants)
                variants.append((ws, [i]))
        if len(variants) > 1:
            found.append((group, [ms for _, ms in variants]))
    section = {
        "groups": len(found),
        "records": sum(len(g) for g, _ in found),
        "definition": f"same normalised or near-duplicate (Jaccard >= {threshold}) prompt; answers differ after "
        f"normalisation and their word Jaccard < {ANSWER_JACCARD_DIFFERENT}",
        "examples": [
            {"prompt": _snippet(items[g[0]].prompt), "records": len(g), "answers": len(vs),
             "variants": [{"where": items[ms[0]].rec.where, "answer": _snippet(items[ms[0]].answer),
                           "count": len(ms)} for ms in vs[:max_examples]]}
            for g, vs in found[:max_examples]
        ],
    }
    return section, [g for g, _ in found]


def _contamination(
    items: list[_Item], against: dict[str, list[str]], n: int, max_examples: int, vocab: _Vocab
) -> tuple[dict[str, Any], dict[int, str]]:
    """Training examples sharing an n-gram of normalised words with an eval item, per task."""
    by_len: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for task, texts in against.items():
        for j, text in enumerate(texts):
            ids = vocab.encode(text)
            if ids.size >= n:
                by_len[n].append((task, j, ids))
            elif ids.size >= min(n, MIN_SHORT_ITEM_WORDS):
                by_len[int(ids.size)].append((task, j, ids))
    hasher = _WindowHasher(len(vocab))
    docs = [_example_ids(it) for it in items]
    first_hit: dict[tuple[int, str], tuple[int, int, int]] = {}  # (example, task) -> (eval item, pos, length)
    for length, evals in sorted(by_len.items()):
        eh, eoff = hasher.windows([ids for _, _, ids in evals], length, pad=False)
        owner = np.repeat(np.arange(len(evals)), np.diff(eoff))
        gram_owner: dict[int, int] = {}
        for h, o in zip(eh.tolist(), owner.tolist(), strict=True):
            gram_owner.setdefault(h, o)
        th, toff = hasher.windows(docs, length, pad=False)
        hits = np.flatnonzero(np.isin(th, eh))
        if not hits.size:
            continue
        doc_of = np.searchsorted(toff, hits, side="right") - 1
        for hit, d in zip(hits.tolist(), doc_of.tolist(), strict=True):
            task, j, _ = evals[gram_owner[int(th[hit])]]
            first_hit.setdefault((d, task), (j, hit - int(toff[d]), length))
    per_task: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    contaminated: dict[int, str] = {}
    for (d, task), (j, pos, length) in sorted(first_hit.items()):
        per_task[task].append((d, j, pos, length))
        contaminated[d] = f"{contaminated[d]}, {task}" if d in contaminated else task
    tasks = {}
    for task, texts in against.items():
        hs = per_task.get(task, [])
        tasks[task] = {
            "items": len(texts),
            "contaminated_examples": len(hs),
            "eval_items_hit": len({j for _, j, _, _ in hs}),
            "examples": [{"where": items[d].rec.where, "eval_item": j,
                          "ngram": _snippet(" ".join(vocab.decode(docs[d][pos : pos + length])), 160)}
                         for d, j, pos, length in hs[:max_examples]],
        }
    section = {"ngram": n, "contaminated": len(contaminated), "tasks": tasks}
    return section, contaminated


def _diversity(items: list[_Item], clusters: list[list[int]], max_examples: int) -> dict[str, Any]:
    n = len(items)
    firsts = Counter(it.first_word for it in items if it.first_word)
    prompt_lens = [int(it.pw.size) for it in items] if any(it.prompt for it in items) else []
    answer_lens = [int(it.aw.size) for it in items]
    distinct_prompts = len({normalize(it.prompt) for it in items if it.prompt.strip()})
    sizes = sorted((len(c) for c in clusters), reverse=True)
    return {
        "examples": n,
        "distinct_first_words": len(firsts),
        "top_first_words": [{"word": w, "count": c, "share": round(c / n, 4)} for w, c in firsts.most_common(10)],
        "distinct_prompt_share": round(distinct_prompts / n, 4) if n and prompt_lens else None,
        "prompt_words": _percentiles(prompt_lens),
        "answer_words": _percentiles(answer_lens),
        "largest_duplicate_clusters": [{"size": s, "share": round(s / n, 4)} for s in sizes[:max_examples]],
        "duplicate_cluster_share": round(sum(sizes) / n, 4) if n else 0.0,
    }


# ---------------------------------------------------------------- entry points


def _run(
    records: list[Record],
    bad: list[BadLine],
    cfg: DataConfig,
    files: list[str],
    *,
    tokenizer: Any,
    full: bool,
    against: dict[str, list[str]] | None,
    threshold: float,
    ngram: int,
    shingle: int,
    num_perm: int,
    max_examples: int,
    timer: _Timer,
) -> CheckReport:
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if max_examples < 0:
        raise DataError(f"max_examples must be >= 0, got {max_examples}")
    if ngram < 1:
        raise DataError(f"contamination n-gram size must be >= 1, got {ngram}")
    vocab = _Vocab()
    all_items, schema, plan = _schema_and_views(records, bad, cfg, max_examples, vocab)
    timer.lap("schema")
    if tokenizer is not None:
        all_items, length, errors = _lengths(all_items, cfg, tokenizer, max_examples)
        for where, err in errors:
            plan[where] = ("schema", None, err)
            schema["invalid"] += 1
            schema["bad"] += 1
            schema["valid"] -= 1
            if len(schema["examples"]) < max_examples:
                schema["examples"].append({"where": where, "error": err})
        timer.lap("length")
    else:
        length = _skipped("no tokenizer given")
    items = all_items
    degenerate = _degenerate_section(items, max_examples)
    for it in items:
        if it.degenerate:
            plan[it.rec.where] = (it.degenerate, None, _snippet(it.answer))
    timer.lap("degenerate")
    sound = [i for i, it in enumerate(items) if not it.degenerate]  # dedup / contradictions run on these
    groups = _exact_groups(items, sound)
    exact = _exact_section(items, groups, max_examples)
    timer.lap("exact_duplicates")

    contaminated: dict[int, str] = {}
    if full and against:
        contamination, contaminated = _contamination(items, against, ngram, max_examples, vocab)
        timer.lap("contamination")
    else:
        contamination = _skipped("no --against eval sets given" if full else "not part of the cheap checks")
    for i, tasks in contaminated.items():
        where = items[i].rec.where
        if where not in plan or plan[where][0] in DEGENERATE_REASONS:
            plan[where] = ("contaminated", None, tasks)

    dup_of: dict[int, int] = {}  # exact-duplicate member -> first member of its group
    for g in groups:
        for i in g[1:]:
            dup_of[i] = g[0]
    clusters: list[list[int]] = [list(g) for g in groups]
    contradiction_groups: list[list[int]] = []
    if full:
        reps = [i for i in sound if i not in dup_of and (items[i].pw.size or items[i].aw.size)]
        hashes, offsets = _shingle_sets([_example_ids(items[i]) for i in reps], shingle, len(vocab))
        timer.lap("shingles")
        near, sims = near_duplicate_clusters(hashes, offsets, threshold, num_perm=num_perm)
        near_clusters = [[reps[c] for c in cl] for cl in near]
        near_section = {
            "threshold": threshold,
            "shingle_words": shingle,
            "num_perm": num_perm,
            "clusters": len(near_clusters),
            "duplicates": sum(len(c) - 1 for c in near_clusters),
            "examples": [
                {"size": len(c), "min_jaccard": sims[near[k][0]], "kept": items[c[0]].rec.where,
                 "locations": [items[i].rec.where for i in c[:max_examples]],
                 "text": _snippet(items[c[0]].prompt or items[c[0]].answer)}
                for k, c in sorted(enumerate(near_clusters), key=lambda kc: (-len(kc[1]), kc[1][0]))[:max_examples]
            ],
        }
        timer.lap("near_duplicates")
        # merge exact groups into near clusters for the fix plan and the diversity profile
        uf = _UnionFind(len(items))
        for c in clusters + near_clusters:
            for i in c[1:]:
                uf.union(c[0], i)
        merged: dict[int, list[int]] = defaultdict(list)
        for c in clusters + near_clusters:
            for i in c:
                merged[uf.find(i)].append(i)
        clusters = [sorted(set(c)) for c in merged.values()]
        if cfg.format != "text":
            contradictions, contradiction_groups = _contradictions(items, sound, threshold, shingle, num_perm,
                                                                   max_examples, vocab)
        else:
            contradictions = _skipped("format text has no prompt/answer split")
        timer.lap("contradictions")
        diversity = _diversity(items, clusters, max_examples)
        timer.lap("diversity")
    else:
        near_section = _skipped("not part of the cheap checks")
        contradictions = _skipped("not part of the cheap checks")
        diversity = _skipped("not part of the cheap checks")

    # duplicates: keep the first member not removed for another reason, drop the rest
    for c in clusters:
        eligible = [i for i in c if items[i].rec.where not in plan]
        if not eligible:
            continue
        keep = eligible[0]
        for i in eligible[1:]:
            same = items[i].example_key == items[keep].example_key
            plan[items[i].rec.where] = ("exact_duplicate" if same else "near_duplicate", items[keep].rec.where,
                                        _snippet(items[i].prompt or items[i].answer))
    return CheckReport(
        files=files,
        format=cfg.format,
        records=schema["records"],
        valid=schema["valid"],
        schema=schema,
        exact_duplicates=exact,
        near_duplicates=near_section,
        contradictions=contradictions,
        degenerate=degenerate,
        length=length,
        contamination=contamination,
        diversity=diversity,
        settings={"near_dup_threshold": threshold, "shingle_words": shingle, "num_perm": num_perm,
                  "ngram": ngram, "answer_jaccard_different": ANSWER_JACCARD_DIFFERENT,
                  "prompt_near_dup_threshold": max(threshold, PROMPT_MIN_JACCARD),
                  "max_length": cfg.max_length if tokenizer is not None else None, "max_examples": max_examples},
        timings=timer.timings,
        removal_plan=plan,
        contradiction_locations=[[items[i].rec.where for i in g] for g in contradiction_groups],
        fingerprints=_fingerprints(files),
    )


def check_data(
    files: str | list[str],
    cfg: DataConfig,
    *,
    tokenizer: Any = None,
    against: dict[str, list[str]] | None = None,
    near_dup_threshold: float = 0.8,
    ngram: int = 13,
    max_examples: int = 5,
    shingle: int = 3,
    num_perm: int = 64,
) -> CheckReport:
    """Run every check on `files` read as `cfg` says (format, fields, max_length, chat template).

    `tokenizer` enables the token-length section; `against` (task name -> eval item texts, see
    `load_against`) enables the contamination section. Never stops at a bad record.
    """
    files = [files] if isinstance(files, str) else list(files)
    if not files:
        raise DataError("no data files given")
    timer = _Timer()
    records, bad = read_records_tolerant(files, cfg.split)
    timer.lap("read")
    return _run(records, bad, cfg, files, tokenizer=tokenizer, full=True, against=against,
                threshold=near_dup_threshold, ngram=ngram, shingle=shingle, num_perm=num_perm,
                max_examples=max_examples, timer=timer)


def cheap_checks(records: list[Record], cfg: DataConfig, tokenizer: Any = None, max_examples: int = 5) -> CheckReport:
    """Schema, empty/degenerate answers, exact duplicates and (with a tokenizer) the truncation count only:
    fast enough to run before every training run."""
    files = sorted({r.source for r in records})
    return _run(records, [], cfg, files, tokenizer=tokenizer, full=False, against=None, threshold=0.8, ngram=13,
                shingle=3, num_perm=64, max_examples=max_examples, timer=_Timer())


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """'1 record', '3 records' (or the given plural)."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def report_problems(report: CheckReport) -> list[str]:
    """One human-readable line per check that found something (empty when the data is clean)."""

    def first(section: dict[str, Any], fmt: Callable[[dict[str, Any]], str]) -> str:
        ex = section.get("examples") or []
        return f"; first: {fmt(ex[0])}" if ex else ""

    lines = []
    s = report.schema
    if s.get("bad"):
        where = "; ".join(f"{e['where']}: {e['error']}" for e in s["examples"][:2])
        lines.append(f"schema: {s['bad']} of {counted(s['records'], 'record')} unusable ({s['malformed']} malformed "
                     f"JSON, {s['invalid']} invalid)" + (f"; first: {where}" if where else ""))
    e = report.exact_duplicates
    if e.get("duplicates"):
        lines.append(f"exact duplicates: {counted(e['duplicates'], 'extra copy', 'extra copies')} in "
                     f"{counted(e['groups'], 'group')}" + first(e, lambda g: f"{g['kept']} ({g['copies']} copies)"))
    nd = report.near_duplicates
    if nd.get("duplicates"):
        lines.append(f"near duplicates: {counted(nd['duplicates'], 'record')} in {counted(nd['clusters'], 'cluster')} "
                     f"at Jaccard >= {nd['threshold']}" + first(nd, lambda g: f"{g['kept']} (cluster of {g['size']})"))
    c = report.contradictions
    if c.get("groups"):
        lines.append(f"contradictions: {counted(c['groups'], 'prompt')} with materially different answers "
                     f"({counted(c['records'], 'record')})"
                     + first(c, lambda g: " vs ".join(x["where"] for x in g["variants"][:2])))
    d = report.degenerate
    if d.get("count"):
        reasons = ", ".join(f"{n} {r}" for r, n in d["by_reason"].items())
        lines.append(f"empty/degenerate: {counted(d['count'], 'example')} ({reasons})"
                     + first(d, lambda x: f"{x['where']} ({x['reason']})"))
    ln = report.length
    if ln.get("over_max_length"):
        verb = "dropped" if ln["overlong_policy"] == "drop" else "truncated"
        lines.append(f"length: {counted(ln['over_max_length'], 'example')} longer than max_length {ln['max_length']} "
                     f"would be {verb}" + first(ln, lambda x: f"{x['where']} ({x['tokens']} tokens)"))
    ct = report.contamination
    if ct.get("contaminated"):
        per = ", ".join(f"{t}: {v['contaminated_examples']}" for t, v in ct["tasks"].items()
                        if v["contaminated_examples"])
        wheres = [v["examples"][0]["where"] for v in ct["tasks"].values() if v["examples"]]
        lines.append(f"contamination: {counted(ct['contaminated'], 'example')} sharing a {ct['ngram']}-gram with eval "
                     f"items ({per})" + (f"; first: {wheres[0]}" if wheres else ""))
    return lines


# ---------------------------------------------------------------- eval sets for contamination


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _task_name(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.rsplit(".", 1)[0] if "." in name else name


def _against_file(path: Path) -> list[str]:
    texts = []
    for line, value, problem in iter_json_file(path):
        if problem is not None:
            raise DataError(f"{problem.where}: {problem.error}")
        text = "\n".join(_strings(value))
        if text.strip():
            texts.append(text)
        elif not isinstance(value, (str, list, dict)):
            raise DataError(f"{path}:{line}: an eval item must be a string or an object, got {type(value).__name__}")
    return texts


#: Extension point: named eval sets (e.g. retention suites) that `load_against` resolves before trying a
#: file. Maps a name to a loader returning the item texts.
AGAINST_SOURCES: dict[str, Callable[[], list[str]]] = {}


def resolve_against(spec: str) -> tuple[str, list[str]]:
    """One `--against` spec -> (task name, item texts). `name=path` names the task; else the file stem."""
    if spec in AGAINST_SOURCES:
        return spec, AGAINST_SOURCES[spec]()
    name, _, rest = spec.partition("=")
    if rest and "/" not in name and not Path(spec).expanduser().exists():
        return name, _against_file(Path(rest).expanduser())
    path = Path(spec).expanduser()
    if not path.is_file():
        known = f" (named sets: {', '.join(sorted(AGAINST_SOURCES))})" if AGAINST_SOURCES else ""
        raise DataError(f"{spec}: eval file not found{known}")
    return _task_name(path), _against_file(path)


def suite_against(spec: str, data_root: str | Path | None = None) -> dict[str, list[str]] | None:
    """A retention suite (built-in name or YAML file) as eval sets, one per task; None if `spec` is no suite.
    Every record of each task's data counts (not only the evaluated sample); self-reference tasks
    contribute their prompts."""
    # here, not at the top: the retention suites import torch, which `forgetless data check` otherwise never needs
    from ..retention.kinds.self_reference import BUILTIN_PROMPTS
    from ..retention.suite import BUILTIN_DIR, load_suite
    from ..retention.tasks import load_rows, resolve_data_root

    if not ((BUILTIN_DIR / f"{spec}.yaml").is_file() or (spec.endswith((".yaml", ".yml")) and Path(spec).is_file())):
        return None
    suite = load_suite(spec)
    root = resolve_data_root(data_root)
    out: dict[str, list[str]] = {}
    for task in suite.tasks:
        if task.kind == "self_reference" and getattr(task, "prompts", "") == "builtin":
            rows = read_file(BUILTIN_PROMPTS)
        elif task.data is not None and (task.data.path or task.data.hf):
            rows = load_rows(task, root)
        else:
            continue
        out[f"{suite.name}/{task.name}"] = [t for t in ("\n".join(_strings(r.data)) for r in rows) if t.strip()]
    return out


def load_against(specs: list[str], data_root: str | Path | None = None) -> dict[str, list[str]]:
    """Eval sets to check for contamination: task name -> item texts (every string field of a record joined,
    strings inside lists such as `choices` included). A spec may be a retention suite (`general`, or a suite
    YAML), which expands to one set per task. Same-named tasks get a numeric suffix."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        suite_sets = suite_against(spec, data_root)
        if suite_sets is not None:
            out.update(suite_sets)
            continue
        name, texts = resolve_against(spec)
        key, k = name, 2
        while key in out:
            key, k = f"{name}_{k}", k + 1
        out[key] = texts
    return out


# ---------------------------------------------------------------- fix


@dataclass
class FixResult:
    """What `fix_data` wrote."""

    out: str
    removed_log: str
    kept: int
    removed: int
    by_reason: dict[str, int]
    contradictions_left: list[list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "removed_log": self.removed_log, "kept": self.kept, "removed": self.removed,
                "by_reason": self.by_reason, "contradictions_left": self.contradictions_left}


def removed_log_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".removed.jsonl")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def fix_data(
    files: str | list[str],
    cfg: DataConfig,
    out_path: str | Path,
    report: CheckReport | None = None,
    *,
    overwrite: bool = False,
    against: dict[str, list[str]] | None = None,
    near_dup_threshold: float = 0.8,
) -> FixResult:
    """Write a cleaned JSONL copy of `files` to `out_path`, and `<out>.removed.jsonl` listing every removal.

    Removed: malformed/invalid records, contaminated and empty/degenerate examples, and exact and near
    duplicates (the first occurrence is kept). Contradictions are left in place and returned for the user.
    The inputs are never modified; `out_path` must not be an input, nor exist unless `overwrite`.
    `report` is the `check_data` report for the same files (checked again here when None).
    """
    files = [files] if isinstance(files, str) else list(files)
    out = Path(out_path).expanduser()
    log = removed_log_path(out)
    if not out.name.endswith((".jsonl", ".ndjson")):
        raise DataError(f"{out}: the cleaned copy is JSONL; give it a .jsonl name (no .gz)")
    for f in files:
        if is_hf_id(f):
            raise DataError(f"{f}: --fix works on local files only")
        for target in (out, log):
            if _same_file(target, Path(f).expanduser()):
                raise DataError(f"{target}: refusing to write over the input file {f}; choose another output path")
    for target in (out, log):
        if target.exists() and not overwrite:
            raise DataError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if report is None:
        report = check_data(files, cfg, against=against, near_dup_threshold=near_dup_threshold)
    elif report.fingerprints != _fingerprints(files):
        raise DataError("the data files changed (or differ) since the check; run the check again before --fix")
    plan = report.removal_plan
    kept_lines: list[str] = []
    log_lines: list[str] = []
    by_reason: Counter[str] = Counter()
    seen: set[str] = set()
    for spec in files:
        source = str(Path(spec).expanduser())
        for line, value, problem in iter_json_file(spec):
            where = problem.where if problem is not None else f"{source}:{line}"
            seen.add(where)
            if where in plan:
                reason, kept, detail = plan[where]
                entry: dict[str, Any] = {"where": where, "reason": reason, "kept": kept, "detail": detail}
                if problem is not None:
                    entry["raw"] = problem.raw
                else:
                    entry["record"] = value
                log_lines.append(json.dumps(entry, ensure_ascii=False))
                by_reason[reason] += 1
            elif problem is None and isinstance(value, dict):
                kept_lines.append(json.dumps(value, ensure_ascii=False))
            else:  # a non-object value the check reported as a schema problem
                raise DataError(f"{where}: not in the check's plan; the files changed since the check")
    missing = set(plan) - seen
    if missing:
        raise DataError(f"{sorted(missing)[0]}: in the check's plan but not in the files; run the check again")
    atomic_write_text(out, "".join(line + "\n" for line in kept_lines))
    atomic_write_text(log, "".join(line + "\n" for line in log_lines))
    return FixResult(
        out=str(out),
        removed_log=str(log),
        kept=len(kept_lines),
        removed=len(log_lines),
        by_reason={r: by_reason[r] for r in REASONS if by_reason[r]},
        contradictions_left=report.contradiction_locations,
    )
