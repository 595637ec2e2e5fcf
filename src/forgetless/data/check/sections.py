"""The report's sections: schema, lengths, degenerate answers, duplicates, contradictions, contamination,
diversity."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from ...config import DataConfig
from ...errors import DataError
from ..examples import encode_record, uses_chat_template
from ..loading import BadLine, Record
from .common import ANSWER_JACCARD_DIFFERENT, DEGENERATE_REASONS, MIN_SHORT_ITEM_WORDS, PROMPT_MIN_JACCARD
from .items import Item, strip_where, view
from .near_dup import Vocab, WindowHasher, near_duplicate_clusters, shingle_sets
from .text import normalize, percentiles, snippet


def schema_and_views(
    records: list[Record], bad: list[BadLine], cfg: DataConfig, max_examples: int, vocab: Vocab
) -> tuple[list[Item], dict[str, Any], dict[str, tuple[str, str | None, str]]]:
    items: list[Item] = []
    invalid: list[tuple[str, str]] = []
    for rec in records:
        try:
            items.append(view(rec, cfg, vocab))
        except DataError as e:
            invalid.append((rec.where, strip_where(str(e), rec.where)))
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


def lengths(
    items: list[Item], cfg: DataConfig, tokenizer: Any, max_examples: int
) -> tuple[list[Item], dict[str, Any], list[tuple[str, str]]]:
    """Token lengths with the training encoder; per-record encoding errors become schema errors."""
    chat = uses_chat_template(cfg, tokenizer)
    kept: list[Item] = []
    errors: list[tuple[str, str]] = []
    over: list[Item] = []
    for it in items:
        try:
            ids, _ = encode_record(it.rec, cfg, tokenizer, chat)
        except DataError as e:
            errors.append((it.rec.where, strip_where(str(e), it.rec.where)))
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
        "distribution": percentiles([it.n_tokens or 0 for it in kept]),
        "over_max_length": len(over),
        "examples": [{"where": it.rec.where, "tokens": it.n_tokens} for it in over[:max_examples]],
    }
    return kept, section, errors


def degenerate_section(items: list[Item], max_examples: int) -> dict[str, Any]:
    flagged = [it for it in items if it.degenerate]
    by_reason = Counter(it.degenerate for it in flagged)
    return {
        "count": len(flagged),
        "by_reason": {r: by_reason[r] for r in DEGENERATE_REASONS if by_reason[r]},
        "examples": [{"where": it.rec.where, "reason": it.degenerate, "answer": snippet(it.answer)}
                     for it in flagged[:max_examples]],
    }


def exact_groups(items: list[Item], idx: list[int]) -> list[list[int]]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_key[items[i].example_key].append(i)
    return [g for g in by_key.values() if len(g) > 1]


def exact_section(items: list[Item], groups: list[list[int]], max_examples: int) -> dict[str, Any]:
    ordered = sorted(groups, key=lambda g: (-len(g), g[0]))
    return {
        "groups": len(groups),
        "duplicates": sum(len(g) - 1 for g in groups),
        "examples": [{"copies": len(g), "kept": items[g[0]].rec.where,
                      "locations": [items[i].rec.where for i in g[:max_examples]],
                      "text": snippet(items[g[0]].prompt or items[g[0]].answer)} for g in ordered[:max_examples]],
    }


def example_ids(it: Item) -> np.ndarray:
    return np.concatenate((it.pw, it.aw)) if it.pw.size else it.aw


def contradictions_section(
    items: list[Item], idx: list[int], threshold: float, shingle: int, num_perm: int, max_examples: int,
    vocab: Vocab,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Prompts that are the same (normalised) or near-duplicates with materially different answers."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        if items[i].prompt.strip():
            by_prompt[normalize(items[i].prompt)].append(i)
    members = {g[0]: g for g in by_prompt.values()}
    reps = [r for r in members if items[r].pw.size]
    threshold = max(threshold, PROMPT_MIN_JACCARD)
    hashes, offsets = shingle_sets([items[r].pw for r in reps], shingle, len(vocab))
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
            {"prompt": snippet(items[g[0]].prompt), "records": len(g), "answers": len(vs),
             "variants": [{"where": items[ms[0]].rec.where, "answer": snippet(items[ms[0]].answer),
                           "count": len(ms)} for ms in vs[:max_examples]]}
            for g, vs in found[:max_examples]
        ],
    }
    return section, [g for g, _ in found]


def contamination_section(
    items: list[Item], against: dict[str, list[str]], n: int, max_examples: int, vocab: Vocab
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
    hasher = WindowHasher(len(vocab))
    docs = [example_ids(it) for it in items]
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
                          "ngram": snippet(" ".join(vocab.decode(docs[d][pos : pos + length])), 160)}
                         for d, j, pos, length in hs[:max_examples]],
        }
    section = {"ngram": n, "contaminated": len(contaminated), "tasks": tasks}
    return section, contaminated


def diversity_section(items: list[Item], clusters: list[list[int]], max_examples: int) -> dict[str, Any]:
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
        "prompt_words": percentiles(prompt_lens),
        "answer_words": percentiles(answer_lens),
        "largest_duplicate_clusters": [{"size": s, "share": round(s / n, 4)} for s in sizes[:max_examples]],
        "duplicate_cluster_share": round(sum(sizes) / n, 4) if n else 0.0,
    }
