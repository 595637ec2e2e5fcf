"""Speed and recall of `forgetless data check` on a synthetic instruction set with planted problems.

Generates N instruction records (default 100,000) from varied templates over a Zipf-distributed vocabulary
of a few thousand pseudo-words (so near-duplicate LSH has shared phrases to sift through), plants known
numbers of exact duplicates, one-word-edit near-duplicates, contradictions, degenerate answers and
copies of eval items, then times `check_data` without a tokenizer and without contamination (target:
<= 60 s for 100k records on 2 CPU cores), and once more with a contamination eval set.
Prints a table and writes bench/results/data_check.json, with a `provenance` block (forgetless.provenance:
commit, versions, CPU, allocator; no model runs here, so its precision is "n/a").

    python bench/data_check.py                 # 100,000 records
    python bench/data_check.py --n 20000 --no-contamination
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from forgetless import provenance
from forgetless.data.check import check_data
from forgetless.io import atomic_write_json
from forgetless.recipe import DataConfig

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 60.0

TEMPLATES = [
    "Explain how the {a} {b} affects the {c}.",
    "Write a short story about a {a} who finds a {b} near the {c}.",
    "Summarize the following passage about {a} and {b}.",
    "List three ways to improve the {a} of a {b} {c}.",
    "What is the difference between a {a} and a {b} in {c}?",
    "Translate the text below into plain {a} for a {b} audience.",
    "Give advice to someone whose {a} keeps breaking the {b}.",
    "Describe the history of the {a} {b} in the {c} region.",
    "Compose a polite email asking the {a} team about the {b} {c}.",
    "Why does the {a} {b} when the {c} is cold?",
    "Classify the following sentence as {a}, {b} or {c}.",
    "Rewrite this paragraph so that a {a} can understand the {b}.",
    "Create a quiz question about {a}, {b} and the {c}.",
    "Outline a plan to build a {a} {b} with a {c}.",
    "Compare the {a} with the {b} and recommend one for {c}.",
    "Answer the question using the context: how many {a} are in the {b}?",
]
FILLERS = ("the a of to and in is that for it with as on by this was be are from at or an have not but".split())
REFUSAL = "I'm sorry, but I cannot help with that request about the {a}."


def make_vocab(n: int, rng: random.Random) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zo", "qui", "bar", "len", "tor", "gis",
            "fa", "mo", "nu", "pel", "ster", "gra", "vin", "dul", "ix", "om", "ur", "eb"]
    vocab: set[str] = set()
    while len(vocab) < n:
        vocab.add("".join(rng.choice(syll) for _ in range(rng.randint(2, 4))))
    return sorted(vocab)


class Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = make_vocab(5000, self.rng)
        weights = [1.0 / (r + 1) ** 1.05 for r in range(len(self.vocab))]  # Zipf-like word frequencies
        self._cum = []
        acc = 0.0
        for w in weights:
            acc += w
            self._cum.append(acc)

    def word(self) -> str:
        return self.rng.choices(self.vocab, cum_weights=self._cum)[0]

    def sentence(self) -> str:
        ws = []
        for _ in range(self.rng.randint(7, 16)):
            ws.append(self.rng.choice(FILLERS) if self.rng.random() < 0.35 else self.word())
        return " ".join(ws).capitalize() + "."

    def text(self, lo: int, hi: int) -> str:
        out: list[str] = []
        target = self.rng.randint(lo, hi)
        while sum(len(s.split()) for s in out) < target:
            out.append(self.sentence())
        return " ".join(out)

    def instruction(self) -> str:
        t = self.rng.choice(TEMPLATES)  # slot words uniform, so distinct records do not share a prompt by chance
        v = self.vocab
        return t.format(a=self.rng.choice(v), b=self.rng.choice(v), c=self.rng.choice(v))

    def record(self) -> dict:
        inp = self.text(8, 40) if self.rng.random() < 0.6 else ""
        return {"instruction": self.instruction(), "input": inp, "output": self.text(40, 160)}


def edit_one_word(text: str, g: Gen) -> str:
    ws = text.split(" ")
    i = g.rng.randrange(len(ws))
    new = g.word()
    while new == ws[i].strip(".").lower():
        new = g.word()
    ws[i] = new
    return " ".join(ws)


def build(n: int, seed: int, eval_items: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    g = Gen(seed)
    planted = {"exact_duplicates": n * 15 // 1000, "near_duplicates": n * 15 // 1000,
               "contradictions": n * 3 // 1000, "degenerate": n * 4 // 1000, "contaminated": n * 2 // 1000}
    n_base = n - sum(v for k, v in planted.items() if k != "contaminated")
    base = [g.record() for _ in range(n_base)]
    evals = [{"question": g.text(18, 40), "choices": [g.word() for _ in range(4)], "answer": "A"}
             for _ in range(eval_items)]
    # contamination: some base records quote an eval question in their input
    sources = g.rng.sample(range(n_base), n_base)
    cont, sources = sources[: planted["contaminated"]], sources[planted["contaminated"] :]
    for k, i in enumerate(cont):
        base[i]["input"] = (base[i]["input"] + " " + evals[k % len(evals)]["question"]).strip()
    extra: list[dict] = []
    ex_src, sources = sources[: planted["exact_duplicates"]], sources[planted["exact_duplicates"] :]
    for i in ex_src:  # same text, different case and whitespace
        r = dict(base[i])
        r["instruction"] = "  " + r["instruction"].upper() + " "
        r["output"] = r["output"].replace(". ", ".  ")
        extra.append(r)
    nd_src, sources = sources[: planted["near_duplicates"]], sources[planted["near_duplicates"] :]
    for i in nd_src:  # one word changed in the answer
        r = dict(base[i])
        r["output"] = edit_one_word(r["output"], g)
        extra.append(r)
    co_src = sources[: planted["contradictions"]]
    for i in co_src:  # same prompt, unrelated answer
        r = dict(base[i])
        r["output"] = g.text(40, 120)
        extra.append(r)
    kinds = ["", "   ", "ok ok ok ok ok", REFUSAL]
    for k in range(planted["degenerate"]):
        r = {"instruction": g.instruction(), "input": "", "output": kinds[k % 4].format(a=g.word())}
        extra.append(r)
    records = base + extra
    g.rng.shuffle(records)
    return records, evals, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-items", type=int, default=1000)
    ap.add_argument("--no-contamination", action="store_true", help="skip the second run with an eval set")
    ap.add_argument("--out", type=Path, default=RESULTS / "data_check.json")
    args = ap.parse_args()
    prov = provenance.collect({"dtype": "n/a", "reason": "no model compute: text checks without a tokenizer"},
                              device="cpu")

    t0 = time.perf_counter()
    records, evals, planted = build(args.n, args.seed, args.eval_items)
    gen_s = time.perf_counter() - t0
    cfg = DataConfig(train="unused", format="instruction")
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        t0, c0 = time.perf_counter(), time.process_time()
        report = check_data(str(data), cfg)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        cont_seconds = cont = cont_section = None
        if not args.no_contamination:
            against = {"synthetic_eval": ["\n".join([e["question"], *e["choices"]]) for e in evals]}
            t0 = time.perf_counter()
            rep2 = check_data(str(data), cfg, against=against)
            cont_seconds = time.perf_counter() - t0
            cont = rep2.contamination["contaminated"]
            cont_section = rep2.timings.get("contamination")

    found = {
        "exact_duplicates": report.exact_duplicates["duplicates"],
        "near_duplicates": report.near_duplicates["duplicates"],
        "contradictions": report.contradictions["groups"],
        "degenerate": report.degenerate["count"],
        "contaminated": cont,
    }
    rows = [
        ("records", f"{report.records:,}"),
        ("seconds (no tokenizer, no contamination)", f"{seconds:.1f}  (target <= {TARGET_S:.0f})"),
        ("CPU seconds of this process (wall when the machine is idle)", f"{cpu_seconds:.1f}"),
        ("records/s", f"{report.records / seconds:,.0f}"),
    ]
    if cont_seconds is not None:
        rows.append((f"seconds with contamination ({args.eval_items} eval items)", f"{cont_seconds:.1f}"))
    rows += [(f"{k}: found / planted", f"{found[k]} / {planted[k]}") for k in planted]
    width = max(len(k) for k, _ in rows)
    print(f"data check bench ({os.cpu_count()} CPUs, Python {platform.python_version()})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  per-section seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()))

    result = {
        "records": report.records,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "records_per_s": round(report.records / seconds),
        "target_seconds": TARGET_S,
        "within_target": seconds <= TARGET_S,
        "seconds_with_contamination": round(cont_seconds, 2) if cont_seconds is not None else None,
        "contamination_section_seconds": cont_section,
        "eval_items": args.eval_items,
        "generate_seconds": round(gen_s, 2),
        "timings": report.timings,
        "planted": planted,
        "found": found,
        "problems": report.problems,
        "settings": report.settings,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "provenance": provenance.finish(prov),
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
