"""Continual fine-tuning on a real model: three tasks in a row (medical QA, math word problems, code), the
same sequence run with each way of carrying knowledge across steps, side by side.

    python bench/continual.py                                   # smollm2-135m-instruct, this CPU (about 40 min)
    python bench/continual.py --strategies plain,replay --steps 10
    python bench/continual.py --prepare-only                    # only write bench/data/continual/{med,math,code}/

Strategies (one `forgetless continual` sequence each, the same tasks, steps, batch and schedule):
- plain: full fine-tuning, nothing carried (the forgetting reference);
- replay: full fine-tuning + a quota replay buffer of the earlier tasks' training examples;
- ewc: full fine-tuning + online EWC (the Fisher of each finished task, accumulated). Weight 1e4: on
  smollm2 the empirical Fisher's mean is ~1e-6 (median ~2e-8), so the default 1000 pulls about as hard as
  L2-SP at 0.001; 1e4 makes the pull on the top 1% of weights comparable to the task gradient (~1e-4 per
  weight) once they have moved by 1e-3;
- lora: LoRA r 16 on all linear layers, a fresh adapter per step merged into the next step's start;
- olora: LoRA as above + O-LoRA (each new adapter pushed orthogonal to the earlier ones' subspaces).

Each task is scored by the cross-entropy of held-out reference answers (`eval: auto`, score = -CE, higher is
better); retention is the `self` suite (the base model's own answers to 100 instructions). Data come from
../shared/data (or --data-root): MedMCQA validation, GSM8K train, Code Alpaca; fixed splits, chat format.

Writes bench/results/continual.json and continual.md (per strategy: average accuracy, BWT, FWT, forgetting
with 95% bootstrap intervals, the retention change after the last step, wall time) and keeps each sequence
directory (matrix.png, trajectory.png, report.html) under runs/bench-continual/. The JSON's `provenance` block
(forgetless.provenance) names the commit, versions, CPU and the precision path the steps took; the provenance of
each sequence's start is saved beside its directory (runs/bench-continual/<strategy>.provenance.json), and
resuming a sequence on another CPU or precision path is refused (`--overwrite` starts the named strategies afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from forgetting import (
    DATA,
    RESULTS,
    ROOT,
    _chat,
    _write,
    bench_precision,
    observed_precision,
    prepare_math,
    prepare_med,
    resume_guard,
    started,
)

STRATEGIES: dict[str, dict[str, Any]] = {
    "plain": {"method": "full", "lr": 1e-4, "carry": {}},
    "replay": {"method": "full", "lr": 1e-4, "carry": {"replay": {"policy": "quota", "per_task": 64, "ratio": 0.25}}},
    "ewc": {"method": "full", "lr": 1e-4, "carry": {"ewc": {"weight": 1.0e4, "samples": 64}}},
    "lora": {"method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, "lr": 3e-4, "carry": {}},
    "olora": {"method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, "lr": 3e-4,
              "carry": {"olora": {"weight": 0.5}}},
}


def prepare_code(root: Path, n_test: int) -> dict[str, Path]:
    path = root / "domain_sft" / "code_alpaca_2k.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data-root (the folder with domain_sft/ and math/)")
    rows = json.loads(path.read_text())  # one JSON array
    random.Random(0).shuffle(rows)
    out = []
    for i, r in enumerate(rows):
        q = r["instruction"].strip() + (("\n\n" + r["input"].strip()) if r.get("input", "").strip() else "")
        out.append(_chat(q, r["output"].strip(), id=f"code-{i}", prompt=q, reference=r["output"].strip()))
    test, train = out[:n_test], out[n_test:]
    d = DATA / "continual" / "code"
    return {"train": _write(d / "train.jsonl", train), "test": _write(d / "test.jsonl", test)}


def sequence(name: str, strategy: dict[str, Any], files: dict[str, dict[str, Path]], args: Any,
             out: Path) -> dict[str, Any]:
    base = {
        "name": name, "model": args.model, "method": strategy["method"],
        "data": {"format": "chat", "max_length": args.max_length},
        "optim": {"lr": strategy["lr"], "max_steps": args.steps, "batch_size": args.batch, "warmup_ratio": 0.1,
                  "schedule": "cosine", "weight_decay": 0.0},
        "train": {"save_steps": None, "seed": 42, "device": args.device, "progress": False},
    }
    tasks = [{"name": t, "data": {"train": str(f["train"]), "validation": str(f["test"])}} for t, f in files.items()]
    return {"name": name, "base": base, "tasks": tasks, "carry": strategy["carry"], "retention_suite": "self",
            "limit": args.limit, "data_root": str(args.data_root), "output_dir": str(out / name)}


def row(name: str, state: dict[str, Any], wall: float) -> dict[str, Any]:
    m = state["metrics"]
    R = state["matrix"]["score"]
    ret = state["steps"][-1]["retention"]
    return {
        "strategy": name, "method": state["method"], "carry": state["carry"], "dir": state["dir"],
        "average": m["average_accuracy"], "bwt": m["bwt"], "fwt": m["fwt"], "forgetting": m["forgetting"],
        "diagonal": [R[i + 1][i] for i in range(len(R) - 1)], "base": R[0], "final": R[-1],
        "retention": None if ret is None else {k: ret[k] for k in ("score", "change", "ci", "significant_drops")},
        "train_s": round(sum(s["train"]["wall_time_s"] or 0 for s in state["steps"]), 1), "wall_s": round(wall, 1),
        "peak_memory_mb": max(s["train"]["peak_memory_mb"] or 0 for s in state["steps"]),
        "trainable_parameters": state["steps"][0]["train"]["trainable_parameters"],
    }


def _ci(x: dict[str, Any] | None) -> str:
    return "-" if x is None else f"{x['value']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"


def write_results(rows: list[dict[str, Any]], tasks: list[str], args: Any, wall: float,
                  provenance: dict[str, Any] | None = None) -> None:
    from forgetless.io import atomic_write_text

    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, device {args.device}"
    settings = {k: getattr(args, k) for k in ("model", "steps", "batch", "max_length", "limit", "n_test")}
    result = {"bench": "continual", "machine": machine, "tasks": tasks, "settings": settings, "wall_s": round(wall, 1),
              "rows": rows}
    if provenance is not None:
        result["provenance"] = provenance
    atomic_write_text(RESULTS / "continual.json", json.dumps(result, indent=2, default=str) + "\n")
    md = render_md(result)
    atomic_write_text(RESULTS / "continual.md", md)
    print(md)


def render_md(result: dict[str, Any]) -> str:
    """The markdown tables, from the JSON result alone (`--render FILE` re-renders a saved result)."""
    from forgetless.provenance import compute_of, provenance_line

    st, tasks, rows, wall = result["settings"], result["tasks"], result["rows"], result["wall_s"]
    compute = compute_of(result)
    lines = [f"# continual fine-tuning: {' -> '.join(tasks)}, {st['model']}", "",
             f"Machine: {result['machine']}. Each step {st['steps']} steps of {st['batch']} chat examples (max "
             f"{st['max_length']} tokens), {compute} with fp32 master weights; whole bench {wall / 60:.0f} min. "
             f"Scores: minus the cross-entropy (nats per answer token) of {st['limit']} held-out reference answers per "
             "task, higher is better; 95% paired bootstrap intervals over the items (evaluation noise, one training "
             "seed). Retention: the `self` suite (the base model's own answers) after the last step, change against "
             "the base model.", "", provenance_line(result), "",
             "| strategy | average | BWT | FWT | forgetting | R[j][j] (just trained) | retention change | train s | "
             "peak MB | trainable |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ret = r["retention"]
        rc = "-" if ret is None else (f"{100 * ret['change']:+.1f}% [{100 * ret['ci'][0]:+.1f}, "
                                      f"{100 * ret['ci'][1]:+.1f}]"
                                      + (" *" if ret["significant_drops"] else ""))
        lines.append(f"| {r['strategy']} | {_ci(r['average'])} | {_ci(r['bwt'])} | {_ci(r['fwt'])} | "
                     f"{_ci(r['forgetting'])} | "
                     + ", ".join(f"{x:+.2f}" for x in r["diagonal"])
                     + f" | {rc} | {r['train_s']:.0f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['trainable_parameters']:,} |")
    lines += ["", "Score of every task after the last step (and the base model's):", "",
              "| strategy | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines.append("| base model | " + " | ".join(f"{x:+.3f}" for x in rows[0]["base"]) + " |")
    for r in rows:
        lines.append(f"| {r['strategy']} | " + " | ".join(f"{x:+.3f}" for x in r["final"]) + " |")
    lines += ["", "Each sequence's heat-map, trajectory and report: `runs/bench-continual/<strategy>/`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--steps", type=int, default=20, help="training steps per task")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--limit", type=int, default=100, help="evaluation items per task")
    ap.add_argument("--n-test", type=int, default=100,
                    help="held-out items per task (validation loss and score; the first --limit are scored)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-continual")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="start the named strategies' sequences afresh")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, render_md)
        return
    os.chdir(ROOT)
    args.data_root = args.data_root.resolve()
    d = DATA / "continual"
    files = {"med": prepare_med(args.data_root, args.n_test, d=d / "med"),
             "math": prepare_math(args.data_root, args.n_test, d=d / "math"),
             "code": prepare_code(args.data_root, args.n_test)}
    if args.prepare_only:
        print(json.dumps({t: {k: str(v) for k, v in f.items()} for t, f in files.items()}, indent=2))
        return
    from forgetless import provenance
    from forgetless.continual import ContinualConfig, run_continual
    from forgetless.models import resolve_model

    names = args.strategies.split(",")
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    prec = bench_precision(resolve_model(args.model).path, args.device)
    prov = provenance.collect(prec, device=prec["device"])
    out = Path(args.out)
    starts = {}  # each sequence's start saved beside its directory; all checked before anything trains
    for n in names:
        start = resume_guard(out / f"{n}.provenance.json", prov, f"continual sequence {out / n}",
                             resuming=not args.overwrite and (out / n / "continual.json").is_file())
        if start:
            starts[n] = started(start)
    rows, t_all, states = [], time.perf_counter(), []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        cfg = ContinualConfig.model_validate(sequence(name, STRATEGIES[name], files, args, args.out))
        state = run_continual(cfg, folder=ROOT, overwrite=args.overwrite)  # resumable: a finished sequence is skipped
        states.append(state)
        rows.append(row(name, state, time.perf_counter() - t0))
    prov = provenance.finish(prov)
    prov["precision"] = {**prov["precision"],
                         "observed": observed_precision([s["dir"] for st in states for s in st["steps"]])}
    if starts:
        prov["started"] = starts
    write_results(rows, list(files), args, time.perf_counter() - t_all, provenance=prov)


if __name__ == "__main__":
    from forgetless.allocator import reexec

    reexec()  # train under the caching allocator, as the forgetless command does
    sys.exit(main())
