"""Retention-eval speed and agreement: lm-eval-harness against forgetless, side by side in one process.

The same first N items (default 500) of ARC-Easy, HellaSwag and PIQA from the built-in `general` suite are
scored on smollm2-135m-instruct by lm-eval (local YAML tasks written to a temp dir, prompts byte-identical to
forgetless's: the contexts and choices are rendered by forgetless's own templates and written as `query` /
`choices` fields) and by `forgetless.retention.evaluate`. The model is loaded once in fp32; the runs are
interleaved per task (the order alternates between tasks) so that machine noise hits both systems alike.

Systems measured (names used in the table and the JSON):
  lm-eval fp32     HFLM(pretrained=model) with its default dtype handling: the fp32 model, no autocast
  lm-eval bf16     HFLM(..., mixed_precision_dtype=bfloat16, softmax_dtype=float32): the same bf16 autocast
                   forgetless uses (HFLM ignores `dtype=` for an in-memory model; see --lm-eval-modes bf16w)
  forgetless bf16  evaluate(..., bf16=True): the default
  forgetless fp32  evaluate(..., bf16=False)

Headline: forgetless bf16 against lm-eval fp32. Targets: acc / acc_norm within 0.5 points of lm-eval on every
task; forgetless >= 1.5x faster in wall time. Per-item agreement (same predicted choice) and the largest
per-choice |log-likelihood difference| come from lm-eval's logged samples and forgetless's scores.

    python bench/eval_speed.py                                   # 500 items per task, writes bench/results/
    python bench/eval_speed.py --limit 20 --tasks piqa --out /tmp/x.json   # a quick look

The JSON's `provenance` block (forgetless.provenance) names the commit, versions, CPU, allocator and the precision
paths measured (the headline forgetless mode as `dtype`, every mode under `modes`, and what `auto` resolves to).
The JSON and its markdown hold only what the run measured; hand-written remarks go in eval_speed.notes.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from forgetless import precision, provenance  # noqa: E402
from forgetless.io import atomic_write_text  # noqa: E402
from forgetless.models import resolve_model  # noqa: E402
from forgetless.retention.evaluate import evaluate  # noqa: E402
from forgetless.retention.kinds import multiple_choice as mc  # noqa: E402
from forgetless.retention.suite import Suite, load_suite  # noqa: E402
from forgetless.retention.tasks import item_id, load_rows, sample_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"
TASKS = ("arc_easy", "hellaswag", "piqa")
LM_MODES = {
    "fp32": {},
    "bf16": {"mixed_precision_dtype": "bfloat16", "softmax_dtype": "float32"},
    "bf16w": {},  # a bf16-weights copy of the model: what `dtype=bfloat16` does for a model loaded by path
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- task preparation


def forgetless_task(name: str, limit: int):
    general = {t.name: t for t in load_suite("general").tasks}
    return general[name].model_copy(update={"limit": limit, "sample": "first"})


def prepare(name: str, limit: int, data_root: Path, tmp: Path) -> dict[str, Any]:
    """Render forgetless's items and write them, verbatim, as an lm-eval local task."""
    task = forgetless_task(name, limit)
    rows = sample_rows(task, load_rows(task, data_root))
    items = mc.build_items(task, rows)
    docs = [{"id": item_id(it["rec"]), "query": it["context"], "choices": it["choices"], "gold": it["gold"]}
            for it in items]
    data_file = tmp / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    lm_name = f"fl_bench_{name}"
    yaml_text = (
        f"task: {lm_name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        f"target_delimiter: {json.dumps(task.target_delimiter)}\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    (tmp / f"{lm_name}.yaml").write_text(yaml_text, encoding="utf-8")
    return {"name": name, "lm_name": lm_name, "task": task, "docs": docs, "data_file": str(data_file)}


# ---------------------------------------------------------------- the two systems


class _Capture:
    """Records what forgetless's multiple_choice kind passes to and gets from the engine (no extra compute)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, list]] = []
        self._orig = mc.score_requests

    def __enter__(self):
        def wrapped(model, requests, **kw):
            out = self._orig(model, requests, **kw)
            self.calls.append((list(requests), out))
            return out

        mc.score_requests = wrapped
        return self

    def __exit__(self, *exc):
        mc.score_requests = self._orig


def run_forgetless(model, tok, prep: dict, data_root: Path, bf16: bool) -> dict[str, Any]:
    suite = Suite(name="eval_speed", tasks=[prep["task"]])
    with _Capture() as cap:
        t0 = time.perf_counter()
        res = evaluate(model, tok, suite, data_root=data_root, bf16=bf16, progress=False)
        wall = time.perf_counter() - t0
    r = res.tasks[prep["name"]]
    requests, scores = cap.calls[-1]
    lls = [[s.logprob for s in item] for item in scores]
    return {
        "seconds": wall,
        "task_seconds": res.seconds[prep["name"]],
        "acc": float(r.columns["acc"].mean()),
        "acc_norm": float(r.columns["acc_norm"].mean()),
        "acc_items": r.columns["acc"].tolist(),
        "acc_norm_items": r.columns["acc_norm"].tolist(),
        "lls": lls,
        "tokens": [(q.context, q.continuations) for q in requests],
        "item_ids": r.item_ids,
        "engine_tokens": r.info.get("tokens"),
    }


def make_hflm(model, tok, batch: int, mode: str):
    from lm_eval.models.huggingface import HFLM

    with contextlib.redirect_stderr(io.StringIO()):
        return HFLM(pretrained=model, tokenizer=tok, batch_size=batch, **LM_MODES[mode])


def run_lm_eval(lm, prep: dict, task_manager, limit: int | None = None) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[prep["lm_name"]], task_manager=task_manager, log_samples=True, bootstrap_iters=0, limit=limit,
        verbosity="ERROR",
    )
    wall = time.perf_counter() - t0
    samples = sorted(out["samples"][prep["lm_name"]], key=lambda s: s["doc_id"])
    res = out["results"][prep["lm_name"]]
    return {
        "seconds": wall,
        "acc": float(res["acc,none"]),
        "acc_norm": float(res["acc_norm,none"]),
        "acc_items": [float(s["acc"]) for s in samples],
        "acc_norm_items": [float(s["acc_norm"]) for s in samples],
        "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "doc_ids": [s["doc"]["id"] for s in samples],
    }


# ---------------------------------------------------------------- comparison


def predictions(lls: list[list[float]], choices: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    pred = np.array([int(np.argmax(ll)) for ll in lls])
    norm = np.array([int(np.argmax(np.array(ll) / np.array([max(1, len(c)) for c in ch])))
                     for ll, ch in zip(lls, choices, strict=True)])
    return pred, norm


def agreement(ref: dict, other: dict, docs: list[dict]) -> dict[str, Any]:
    choices = [d["choices"] for d in docs]
    p_ref, n_ref = predictions(ref["lls"], choices)
    p_oth, n_oth = predictions(other["lls"], choices)
    diffs = np.array([abs(a - b) for la, lb in zip(ref["lls"], other["lls"], strict=True)
                      for a, b in zip(la, lb, strict=True)])
    # the flipped items: how close to a tie were they in the reference?
    flips = []
    for i in np.nonzero(n_ref != n_oth)[0].tolist():
        ll = np.array(ref["lls"][i]) / np.array([max(1, len(c)) for c in choices[i]])
        top = np.sort(ll)[::-1]
        flips.append({"item": docs[i]["id"], "ref_margin_per_char": float(top[0] - top[1]),
                      "gold": docs[i]["gold"], "ref_pred": int(n_ref[i]), "other_pred": int(n_oth[i])})
    return {
        "same_pred_acc": float((p_ref == p_oth).mean()),
        "same_pred_acc_norm": float((n_ref == n_oth).mean()),
        "acc_items_equal": bool(ref["acc_items"] == other["acc_items"]),
        "acc_norm_items_equal": bool(ref["acc_norm_items"] == other["acc_norm_items"]),
        "max_abs_ll_diff": float(diffs.max()),
        "mean_abs_ll_diff": float(diffs.mean()),
        "acc_diff_pts": 100 * abs(ref["acc"] - other["acc"]),
        "acc_norm_diff_pts": 100 * abs(ref["acc_norm"] - other["acc_norm"]),
        "acc_norm_flips": flips,
    }


def tokenization_check(lm, prep: dict, fl: dict) -> dict[str, Any]:
    """lm-eval's own pair encoding of every (context, " " + choice) against what forgetless scored."""
    delim = prep["task"].target_delimiter
    bad = []
    for d, (ctx, conts) in zip(prep["docs"], fl["tokens"], strict=True):
        for c, cont in zip(d["choices"], conts, strict=True):
            lc, lcont = lm._encode_pair(d["query"], delim + c)
            if lc != ctx or lcont != cont:
                bad.append(d["id"])
                break
    return {"items_with_token_mismatch": len(bad), "examples": bad[:10]}


# ---------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import lm_eval
    import transformers

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def fmt_table(rows: list[dict], fl_key: str, lm_key: str) -> list[str]:
    head = (f"| task | n | lm-eval {lm_key} acc / acc_norm | forgetless {fl_key} acc / acc_norm | abs diff pts (acc "
            f"/ norm) | lm-eval s | forgetless s | speed-up | same pred (acc / norm) | max abs ll diff |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        a, b = r["runs"][f"lm-eval {lm_key}"], r["runs"][f"forgetless {fl_key}"]
        ag = (r["agreement"][f"forgetless {fl_key}"] if lm_key == "fp32"
              else r["agreement_vs_lm_bf16"][f"forgetless {fl_key}"])
        out.append(
            f"| {r['task']} | {r['n']} | {100 * a['acc']:.1f} / {100 * a['acc_norm']:.1f} | {100 * b['acc']:.1f} / "
            f"{100 * b['acc_norm']:.1f} | {ag['acc_diff_pts']:.1f} / {ag['acc_norm_diff_pts']:.1f} | "
            f"{a['seconds']:.1f} | {b['seconds']:.1f} | {a['seconds'] / b['seconds']:.2f}x | "
            f"{100 * ag['same_pred_acc']:.1f}% / {100 * ag['same_pred_acc_norm']:.1f}% | {ag['max_abs_ll_diff']:.2g} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--lm-eval-batch", default="8,16",
                    help="lm-eval batch sizes; with several, a calibration run on --calib-limit items of every task "
                         "picks the fastest")
    ap.add_argument("--calib-limit", type=int, default=100)
    ap.add_argument("--calibrate-only", action="store_true",
                    help="only time lm-eval's batch sizes (alternating, --repeats times)")
    ap.add_argument("--repeats", type=int, default=1, help="calibration repeats (the batch sizes alternate)")
    ap.add_argument("--lm-eval-modes", default="fp32,bf16", help=f"lm-eval precision modes among {','.join(LM_MODES)}")
    ap.add_argument("--forgetless-modes", default="bf16,fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default bench/results/eval_speed.json; with --render, the saved file itself)")
    ap.add_argument("--render", type=Path, default=None,
                    help="re-render the markdown of a saved JSON result (beside it, or beside --out) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import load

        write(load(args.render), args.out or args.render)
        return
    args.out = args.out or RESULTS / "eval_speed.json"

    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetless.train.run import setup_torch

    setup_torch(args.threads)  # flush denormals for both systems (forgetless's evaluate sets it anyway)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    for name in ("lm-eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)
    names = [t for t in args.tasks.split(",") if t]
    lm_modes = [m for m in args.lm_eval_modes.split(",") if m]
    fl_modes = [m for m in args.forgetless_modes.split(",") if m]
    batches = [int(b) for b in args.lm_eval_batch.split(",")]
    mach = machine()

    path = resolve_model(args.model).path
    auto = precision.resolve("auto", "cpu", widths=precision.config_widths(path))
    fl_first = "bf16" if "bf16" in fl_modes else fl_modes[0]
    prov = provenance.collect({
        "dtype": fl_first,
        "reason": f"set by the bench: forgetless {', '.join(fl_modes)} and lm-eval {', '.join(lm_modes)} "
        f"measured side by side, headline forgetless {fl_first}; auto here: {auto.dtype} ({auto.reason})",
        "modes": {"forgetless": fl_modes, "lm_eval": lm_modes}, "auto": auto.dtype}, device="cpu")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16w_model = copy.deepcopy(model).to(torch.bfloat16).eval() if "bf16w" in lm_modes else None
    log(f"model {args.model} ({path}), attn {model.config._attn_implementation}, threads {torch.get_num_threads()}")

    tmp = Path(tempfile.mkdtemp(prefix="fl-evalspeed-"))
    preps = {n: prepare(n, args.limit, args.data_root, tmp) for n in names}
    tm = TaskManager(include_path=str(tmp))  # built once, outside the timings (it indexes every built-in task)

    def lm_for(mode: str, batch: int):
        return make_hflm(bf16w_model if mode == "bf16w" else model, tok, batch, mode)

    # warm-up: builds the datasets' arrow caches and the kernels for both systems, untimed
    for n in names:
        run_lm_eval(lm_for("fp32", batches[0]), preps[n], tm, limit=2)
        warm = preps[n]["task"].model_copy(update={"limit": 2})
        evaluate(model, tok, Suite(name="warm", tasks=[warm]), data_root=args.data_root, progress=False)
    log("warm-up done")

    calibration: dict[int, float] = {}
    if len(batches) > 1:
        runs_by_b: dict[int, list[float]] = {b: [] for b in batches}
        for rep in range(args.repeats):
            for b in (batches if rep % 2 == 0 else batches[::-1]):
                total = 0.0
                for n in names:
                    total += run_lm_eval(lm_for("fp32", b), preps[n], tm,
                                         limit=min(args.calib_limit, args.limit))["seconds"]
                runs_by_b[b].append(round(total, 2))
                log(f"calibration: lm-eval fp32 batch {b}: {total:.1f}s on {min(args.calib_limit, args.limit)} "
                    "items/task")
        calibration = {b: round(sum(v) / len(v), 2) for b, v in runs_by_b.items()}
        batch = min(calibration, key=calibration.get)
        if args.calibrate_only:
            out = {"bench": "eval_speed_calibration", "model": args.model, "tasks": names,
                   "items_per_task": min(args.calib_limit, args.limit),
                   "machine": {**mach, "loadavg_end": list(os.getloadavg())}, "lm_eval_fp32_seconds": runs_by_b,
                   "fastest": batch, "provenance": provenance.finish(prov)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
            print(json.dumps(out, indent=2))
            return
    else:
        batch = batches[0]
    log(f"lm-eval batch size {batch}")

    rows = []
    for ti, n in enumerate(names):
        prep = preps[n]
        order = [("lm-eval", m) for m in lm_modes] + [("forgetless", m) for m in fl_modes]
        # interleave: lm-eval fp32, forgetless bf16, lm-eval bf16, forgetless fp32, ...; reversed on odd tasks
        inter = []
        for i in range(max(len(lm_modes), len(fl_modes))):
            if i < len(lm_modes):
                inter.append(("lm-eval", lm_modes[i]))
            if i < len(fl_modes):
                inter.append(("forgetless", fl_modes[i]))
        order = inter[::-1] if ti % 2 else inter
        runs: dict[str, dict] = {}
        for system, mode in order:
            gc.collect()
            load = os.getloadavg()[0]
            if system == "lm-eval":
                runs[f"{system} {mode}"] = run_lm_eval(lm_for(mode, batch), prep, tm)
            else:
                runs[f"{system} {mode}"] = run_forgetless(model, tok, prep, args.data_root, bf16=(mode == "bf16"))
            runs[f"{system} {mode}"]["loadavg_1m_before"] = load
            r = runs[f"{system} {mode}"]
            log(f"{n}: {system} {mode}: {r['seconds']:.1f}s acc {100 * r['acc']:.1f} acc_norm "
                f"{100 * r['acc_norm']:.1f}")
        ref = runs["lm-eval fp32"] if "lm-eval fp32" in runs else runs[f"lm-eval {lm_modes[0]}"]
        assert ref["doc_ids"] == [d["id"] for d in prep["docs"]], "lm-eval scored other items"
        for k, r in runs.items():
            if k.startswith("forgetless"):
                assert r["item_ids"] == [d["id"] for d in prep["docs"]], "forgetless scored other items"
        agree = {k: agreement(ref, r, prep["docs"]) for k, r in runs.items() if r is not ref}
        agree_bf = {}
        if "lm-eval bf16" in runs:
            agree_bf = {k: agreement(runs["lm-eval bf16"], r, prep["docs"]) for k, r in runs.items()
                        if k.startswith("forgetless")}
        fl_any = next(r for k, r in runs.items() if k.startswith("forgetless"))
        tok_check = tokenization_check(lm_for("fp32", batch), prep, fl_any)
        rows.append({
            "task": n, "n": len(prep["docs"]), "order": [f"{s} {m}" for s, m in order],
            "runs": {k: {kk: vv for kk, vv in r.items()
                         if kk not in ("lls", "tokens", "acc_items", "acc_norm_items", "doc_ids", "item_ids")}
                     for k, r in runs.items()},
            "agreement": agree, "agreement_vs_lm_bf16": agree_bf, "tokenization": tok_check,
        })
        del runs

    mach["loadavg_end"] = list(os.getloadavg())
    fl_head = "bf16" if "bf16" in fl_modes else fl_modes[0]
    lm_head = "fp32" if "fp32" in lm_modes else lm_modes[0]
    speed = {}
    for lm_k in lm_modes:
        for fl_k in fl_modes:
            a = sum(r["runs"][f"lm-eval {lm_k}"]["seconds"] for r in rows)
            b = sum(r["runs"][f"forgetless {fl_k}"]["seconds"] for r in rows)
            speed[f"forgetless {fl_k} vs lm-eval {lm_k}"] = {"lm_eval_s": round(a, 2), "forgetless_s": round(b, 2),
                                                             "speedup": round(a / b, 3)}
    worst = {f"forgetless {m}": max(max(r["agreement"][f"forgetless {m}"]["acc_diff_pts"],
                                        r["agreement"][f"forgetless {m}"]["acc_norm_diff_pts"])
                                    for r in rows) for m in fl_modes}
    result = {
        "bench": "eval_speed",
        "model": args.model,
        "model_path": path,
        "model_dtype": "float32 weights",
        "limit": args.limit,
        "sample": "first",
        "tasks": names,
        "machine": mach,
        "settings": {
            "lm_eval": {"batch_size": batch, "batch_calibration_s": calibration,
                        "modes": {m: LM_MODES[m] or "default" for m in lm_modes},
                        "call": "simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=B, ...), "
                                "log_samples=True, bootstrap_iters=0)",
                        "task_manager": "built once before timing (include_path=temp dir)"},
            "forgetless": {"modes": fl_modes, "call": "evaluate(model, tok, Suite(task), bf16=..., progress=False)",
                           "batch_tokens": 4096},
            "timing": "wall clock of the whole simple_evaluate / evaluate call; one run each, interleaved per task, "
            "order reversed on odd tasks",
            "prompts": "rendered by forgetless's templates and written verbatim as lm-eval's query/choices fields",
        },
        "targets": {"max_acc_diff_pts": 0.5, "min_speedup": 1.5},
        "headline": {"forgetless": fl_head, "lm_eval": lm_head,
                     **speed.get(f"forgetless {fl_head} vs lm-eval {lm_head}", {}),
                     "worst_acc_diff_pts": worst.get(f"forgetless {fl_head}")},
        "worst_acc_diff_pts": worst,
        "speed": speed,
        "rows": rows,
        "provenance": provenance.finish(prov),
    }

    write(result, args.out)



def _calibration_text(calibration: dict) -> str:
    """The batch-size calibration as the markdown shows it, the same from the run (int keys) and its JSON (str)."""
    return ", ".join(f"batch {k}: {v} s" for k, v in calibration.items()) or "none"

def render_md(result: dict[str, Any]) -> str:
    """The markdown report, from the JSON result alone (`--render FILE` re-renders a saved run)."""
    mach, rows, speed = result["machine"], result["rows"], result["speed"]
    lm_l = result["settings"]["lm_eval"]
    lm_modes = list(lm_l["modes"])
    fl_modes = result["settings"]["forgetless"]["modes"]
    fl_head, lm_head = result["headline"]["forgetless"], result["headline"]["lm_eval"]
    tgt = result["targets"]
    lines = [f"# eval_speed: {result['model']}, first {result['limit']} items per task", "",
             f"Machine: {mach['cpu']}, {mach['torch_threads']} torch threads, torch {mach['torch']}, lm-eval "
             f"{mach['lm_eval']}, transformers {mach['transformers']} ({mach['platform']}); load average "
             f"{mach['loadavg_start'][0]:.1f} at start, {mach['loadavg_end'][0]:.1f} at end (the 2 cores were shared "
             "with other work: compare the ratios, not the seconds).", "",
             f"lm-eval: `HFLM(pretrained=model, tokenizer=tok, batch_size={lm_l['batch_size']})`, fp32 weights "
             f"(calibration: {_calibration_text(lm_l['batch_calibration_s'])}). forgetless: `evaluate(..., bf16=...)`, "
             f"batch_tokens {result['settings']['forgetless']['batch_tokens']}. Wall time of the whole call; one run "
             f"each, interleaved per task (order in the JSON). Headline: forgetless {fl_head} vs lm-eval {lm_head}.",
             ""]
    lines += [provenance.provenance_line(result), ""]
    lines += ["## verdict", ""]
    for m, worst in result["worst_acc_diff_pts"].items():
        ok = worst <= tgt["max_acc_diff_pts"] + 1e-9
        lines.append(f"- accuracy, {m} vs lm-eval {lm_head}: worst |diff| {worst:.1f} points over tasks and "
                     f"acc/acc_norm -> {'PASS' if ok else 'FAIL'} (target <= {tgt['max_acc_diff_pts']})")
    for k, v in speed.items():
        if k.endswith(f"lm-eval {lm_head}"):
            fl_k = k.split(" vs ")[0]
            per = [r["runs"][f"lm-eval {lm_head}"]["seconds"] / r["runs"][fl_k]["seconds"] for r in rows]
            lines.append(f"- speed, {k}: {v['speedup']:.2f}x in total wall time "
                         f"-> {'PASS' if v['speedup'] >= tgt['min_speedup'] else 'FAIL'} (target >= "
                         f"{tgt['min_speedup']}x over the three tasks; slowest single task {min(per):.2f}x, for "
                         "information)")
    lines.append("")
    for fl_k in fl_modes:
        lines += [f"## forgetless {fl_k} vs lm-eval {lm_head}", "", *fmt_table(rows, fl_k, lm_head), ""]
    if "bf16" in lm_modes and lm_head != "bf16":
        for fl_k in fl_modes:
            lines += [f"## forgetless {fl_k} vs lm-eval bf16 (autocast)", "", *fmt_table(rows, fl_k, "bf16"), ""]
    lines += ["## totals", "", "| comparison | lm-eval s | forgetless s | speed-up |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['lm_eval_s']:.1f} | {v['forgetless_s']:.1f} | {v['speedup']:.2f}x |"
              for k, v in speed.items()]
    if "lm-eval bf16" in rows[0]["agreement"]:
        lines += ["", "## lm-eval bf16 vs lm-eval fp32 (bf16 noise inside lm-eval itself)", "",
                  "| task | abs diff pts (acc / norm) | same pred (acc / norm) | max abs ll diff |",
                  "|---|---|---|---|"]
        for r in rows:
            ag = r["agreement"]["lm-eval bf16"]
            lines.append(f"| {r['task']} | {ag['acc_diff_pts']:.1f} / {ag['acc_norm_diff_pts']:.1f} | "
                         f"{100 * ag['same_pred_acc']:.1f}% / {100 * ag['same_pred_acc_norm']:.1f}% | "
                         f"{ag['max_abs_ll_diff']:.2g} |")
    flips = [(r["task"], k, f) for r in rows for k, ag in r["agreement"].items() for f in ag["acc_norm_flips"]]
    if flips:
        lines += ["", f"## acc_norm flips against lm-eval {lm_head}", "",
                  "Items whose acc_norm prediction differs; the margin is lm-eval's gap (log-likelihood per character) "
                  "between its top two choices: near-ties that bf16 rounding flips.", "",
                  "| task | system | item | gold | lm-eval pred | other pred | lm-eval margin |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t} | {k} | {Path(str(f['item'])).name} | {f['gold']} | {f['ref_pred']} | {f['other_pred']} | "
                  f"{f['ref_margin_per_char']:.2g} |"
                  for t, k, f in flips]
    lines += ["", "Tokenization (lm-eval `_encode_pair` vs forgetless `encode_pair`): " + ", ".join(
        f"{r['task']} {r['tokenization']['items_with_token_mismatch']} mismatching items" for r in rows), ""]
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> None:
    md = render_md(result)
    print("\n" + md)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), md)
    log(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
