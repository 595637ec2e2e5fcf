"""Entry points: check_data (the whole check), cheap_checks (the subset training runs), report_problems."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ...config import DataConfig
from ...errors import DataError
from ..loading import BadLine, Record, load_records
from .common import ANSWER_JACCARD_DIFFERENT, DEGENERATE_REASONS, PROMPT_MIN_JACCARD
from .near_dup import Vocab, near_duplicate_clusters, shingle_sets
from .report import CheckReport, Timer, fingerprints, skipped
from .sections import (
    contamination_section,
    contradictions_section,
    degenerate_section,
    diversity_section,
    exact_groups,
    exact_section,
    example_ids,
    lengths,
    schema_and_views,
)
from .text import UnionFind, snippet


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
    timer: Timer,
) -> CheckReport:
    if not 0.0 < threshold <= 1.0:
        raise DataError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if max_examples < 0:
        raise DataError(f"max_examples must be >= 0, got {max_examples}")
    if ngram < 1:
        raise DataError(f"contamination n-gram size must be >= 1, got {ngram}")
    vocab = Vocab()
    all_items, schema, plan = schema_and_views(records, bad, cfg, max_examples, vocab)
    timer.lap("schema")
    if tokenizer is not None:
        all_items, length, errors = lengths(all_items, cfg, tokenizer, max_examples)
        for where, err in errors:
            plan[where] = ("schema", None, err)
            schema["invalid"] += 1
            schema["bad"] += 1
            schema["valid"] -= 1
            if len(schema["examples"]) < max_examples:
                schema["examples"].append({"where": where, "error": err})
        timer.lap("length")
    else:
        length = skipped("no tokenizer given")
    items = all_items
    degenerate = degenerate_section(items, max_examples)
    for it in items:
        if it.degenerate:
            plan[it.rec.where] = (it.degenerate, None, snippet(it.answer))
    timer.lap("degenerate")
    sound = [i for i, it in enumerate(items) if not it.degenerate]  # dedup / contradictions run on these
    groups = exact_groups(items, sound)
    exact = exact_section(items, groups, max_examples)
    timer.lap("exact_duplicates")

    contaminated: dict[int, str] = {}
    if full and against:
        contamination, contaminated = contamination_section(items, against, ngram, max_examples, vocab)
        timer.lap("contamination")
    else:
        contamination = skipped("no --against eval sets given" if full else "not part of the cheap checks")
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
        hashes, offsets = shingle_sets([example_ids(items[i]) for i in reps], shingle, len(vocab))
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
                 "text": snippet(items[c[0]].prompt or items[c[0]].answer)}
                for k, c in sorted(enumerate(near_clusters), key=lambda kc: (-len(kc[1]), kc[1][0]))[:max_examples]
            ],
        }
        timer.lap("near_duplicates")
        # merge exact groups into near clusters for the fix plan and the diversity profile
        uf = UnionFind(len(items))
        for c in clusters + near_clusters:
            for i in c[1:]:
                uf.union(c[0], i)
        merged: dict[int, list[int]] = defaultdict(list)
        for c in clusters + near_clusters:
            for i in c:
                merged[uf.find(i)].append(i)
        clusters = [sorted(set(c)) for c in merged.values()]
        if cfg.format != "text":
            contradictions, contradiction_groups = contradictions_section(items, sound, threshold, shingle, num_perm,
                                                                   max_examples, vocab)
        else:
            contradictions = skipped("format text has no prompt/answer split")
        timer.lap("contradictions")
        diversity = diversity_section(items, clusters, max_examples)
        timer.lap("diversity")
    else:
        near_section = skipped("not part of the cheap checks")
        contradictions = skipped("not part of the cheap checks")
        diversity = skipped("not part of the cheap checks")

    # duplicates: keep the first member not removed for another reason, drop the rest
    for c in clusters:
        eligible = [i for i in c if items[i].rec.where not in plan]
        if not eligible:
            continue
        keep = eligible[0]
        for i in eligible[1:]:
            same = items[i].example_key == items[keep].example_key
            plan[items[i].rec.where] = ("exact_duplicate" if same else "near_duplicate", items[keep].rec.where,
                                        snippet(items[i].prompt or items[i].answer))
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
        fingerprints=fingerprints(files),
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
    timer = Timer()
    bad: list[BadLine] = []
    records = load_records(files, cfg.split, bad=bad)
    timer.lap("read")
    return _run(records, bad, cfg, files, tokenizer=tokenizer, full=True, against=against,
                threshold=near_dup_threshold, ngram=ngram, shingle=shingle, num_perm=num_perm,
                max_examples=max_examples, timer=timer)


def cheap_checks(records: list[Record], cfg: DataConfig, tokenizer: Any = None, max_examples: int = 5) -> CheckReport:
    """Schema, empty/degenerate answers, exact duplicates and (with a tokenizer) the truncation count only:
    fast enough to run before every training run."""
    files = sorted({r.source for r in records})
    return _run(records, [], cfg, files, tokenizer=tokenizer, full=False, against=None, threshold=0.8, ngram=13,
                shingle=3, num_perm=64, max_examples=max_examples, timer=Timer())


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
