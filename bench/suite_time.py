"""Wall time of a built-in retention suite on a real model: bf16 (the default) and fp32 side by side.

Target (issue: measure forgetting): the `general` suite takes at most 3 minutes on smollm2-135m-instruct
on this 2-core machine. Self-reference scores the candidate on the base model's own greedy answers, which
are generated once per base model and cached; the script times a cold start (answers generated) once and
the warm evaluation (what every later evaluation of the same base, or of any candidate against it, costs)
in bf16 (--fp32 adds fp32). Per-task seconds and the load average go to bench/results/suite_time.json and .md,
with a `provenance` block (forgetless.provenance: commit, versions, CPU, allocator, the precision paths timed and
what `auto`, the evaluation default, resolves to here).

    python bench/suite_time.py                         # general suite, smollm2-135m-instruct
    python bench/suite_time.py --candidate runs/x/final --repeats 3   # + a tuned model against the cached base
    python bench/suite_time.py --suite self --model stories260k

It runs as `forgetless eval` does: re-executed under the caching allocator the command uses (tcmalloc where
installed; FORGETLESS_MALLOC=system for the C library's malloc), recorded in the provenance. `--candidate` times
what a user's evaluation of a fine-tune costs: the tuned model scored with the base's answers cached, `--repeats`
times in a row (each judged against the target; the verdict is on the slowest).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from forgetless import precision, provenance
from forgetless.io import atomic_write_json, atomic_write_text
from forgetless.models import resolve_model
from forgetless.retention.evaluate import evaluate
from forgetless.retention.suite import load_suite
from forgetless.train.model import load_model

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 180.0


def timed(model, tok, suite, bf16: bool, cache: Path, base=None) -> dict:
    """One scoring of `model`; `base` (model, fingerprint): the base whose self-reference answers it is scored on,
    as `forgetless eval` scores a fine-tune against its base (default: the model is its own base)."""
    kw = {"reference": lambda: (base[0], tok), "reference_fingerprint": base[1]} if base else {}
    t0 = time.perf_counter()
    res = evaluate(model, tok, suite, bf16=bf16, cache_dir=cache, progress=False, **kw)
    wall = time.perf_counter() - t0
    print(f"{'bf16' if bf16 else 'fp32'}: {wall:.1f} s {dict(res.seconds)}", flush=True)
    info = {k: {x: t.info[x] for x in ("tokens", "generate_s", "generated") if x in t.info}
            for k, t in res.tasks.items()}
    return {"wall_s": round(wall, 1), "tasks_s": {k: round(v, 1) for k, v in res.seconds.items()},
            "tasks_info": info, "scores": {k: v["metrics"][v["main"]] for k, v in res.summary().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="general")
    ap.add_argument("--fp32", action="store_true",
                    help="also time fp32 compute (cold and warm: the answers are keyed by precision)")
    ap.add_argument("--candidate", type=Path, default=None,
                    help="a tuned model (directory) to time against the cached base, warm, in bf16")
    ap.add_argument("--repeats", type=int, default=1, help="warm scorings of each model, one after another")
    ap.add_argument("--out", type=Path, default=RESULTS / "suite_time.json")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, render_md)
        return
    torch.set_flush_denormal(True)
    path = resolve_model(args.model).path
    auto = precision.resolve("auto", "cpu", widths=precision.config_widths(path))
    prov = provenance.collect({"dtype": "bf16",
                               "reason": "set by the bench: evaluate(bf16=True)" + (", then fp32" if args.fp32 else "")
                               + f"; auto here: {auto.dtype} ({auto.reason})",
                               "timed": ["bf16", "fp32"] if args.fp32 else ["bf16"], "auto": auto.dtype}, device="cpu")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    model, tok = load_model(path)
    load_s = time.perf_counter() - t0
    suite = load_suite(args.suite)
    cache = Path(tempfile.mkdtemp(prefix="fl-suite-time-"))  # a cold cache: the answers are generated here
    runs = {"cold bf16": timed(model.eval(), tok, suite, True, cache)}
    for r in range(args.repeats):
        runs["warm bf16" + (f" #{r + 1}" if r else "")] = timed(model, tok, suite, True, cache)
    if args.fp32:
        runs["cold fp32"] = timed(model, tok, suite, False, cache)
        runs["warm fp32"] = timed(model, tok, suite, False, cache)
    if args.candidate:
        from forgetless.fingerprint import fingerprint_model

        tuned, _ = load_model(str(args.candidate))
        base = (model, fingerprint_model(model))  # the key the base's cold run cached its answers under
        for r in range(args.repeats):
            runs["tuned bf16" + (f" #{r + 1}" if r else "")] = timed(tuned.eval(), tok, suite, True, cache, base)
    load1 = os.getloadavg()[0]
    ratio = runs["warm fp32"]["wall_s"] / runs["warm bf16"]["wall_s"] if args.fp32 else None
    result = {
        "bench": "suite_time", "model": args.model, "suite": args.suite, "model_load_s": round(load_s, 1),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "loadavg_start": load0,
                    "loadavg_end": load1},
        "candidate": str(args.candidate) if args.candidate else None, "repeats": args.repeats,
        "command": "python bench/suite_time.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "budget_s": BUDGET_S, "runs": runs, "fp32_over_bf16": round(ratio, 2) if ratio else None,
        "verdict": {k: ("PASS" if v["wall_s"] <= BUDGET_S else "FAIL") for k, v in runs.items()},
        "provenance": provenance.finish(prov),
    }
    atomic_write_json(args.out, result)
    md = render_md(result)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)


def render_md(result: dict) -> str:
    """The markdown table, from the JSON result alone."""
    runs, m = result["runs"], result["machine"]
    tasks = list(runs["warm bf16"]["tasks_s"])
    ratio = result.get("fp32_over_bf16")
    budget = result["budget_s"]
    lines = [f"# suite_time: `{result['suite']}` suite on {result['model']}", "",
             f"{m['platform']}, {m['threads']} torch threads, load average {m['loadavg_start']:.1f} at start, "
             f"{m['loadavg_end']:.1f} at end. Model load {result['model_load_s']:.1f} s (not counted). Target: <= "
             f"{budget:.0f} s.", "",
             provenance.provenance_line(result), "",
             "| run | wall s | verdict | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for k, v in runs.items():
        lines.append(f"| {k} | {v['wall_s']} | {result['verdict'][k]} | "
                     + " | ".join(str(v['tasks_s'].get(t, '-')) for t in tasks) + " |")
    timed_runs = [k for k in runs if not k.startswith("cold")]
    slowest = max(timed_runs, key=lambda k: runs[k]["wall_s"])
    lines += ["", (f"fp32 / bf16 wall time (warm): {ratio:.2f}x. " if ratio else "")
              + "Cold: the self-reference answers of the base model are generated (once per base model and "
              "precision; cached afterwards). Warm: every later evaluation against the same base."
              + (f" Tuned: `{result['candidate']}` scored against the cached base, what evaluating a fine-tune "
                 "costs." if result.get("candidate") else ""),
              "", f"Slowest warm scoring: {runs[slowest]['wall_s']} s ({slowest}): "
              + ("**within** the target." if runs[slowest]["wall_s"] <= budget else "**over** the target.")
              + (f" Command: `{result['command']}`." if result.get("command") else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from forgetless.allocator import reexec

    reexec()  # as the `forgetless` command runs
    main()
