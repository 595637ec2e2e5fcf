"""Mitigation overhead: tokens/s and peak memory of plain fine-tuning vs each mitigation, side by side.

Same model, same data, same steps; each configuration trains in a fresh subprocess (so peak memory is
its own) and the plain baseline is re-run between mitigations to track the machine's drift. Ratios are
against the mean of the plain runs. Two step-time ratios: over the whole run, and in steady state (the
steps after the first third, from the per-step log). On this project's 2-core VM the first ~10 steps after a
mitigation has written 0.5-1 GB of state run 10-30% slower (the kernel settling the new memory), then the
runs converge; a 10-step run is all transient, which is why the default is 30 steps. Targets (smollm2-135m-instruct):
l2sp and ewc <= 1.10x the step time of plain full FT, kl on a PEFT method <= 1.6x of plain LoRA, replay at ratio r costs
no more than its extra tokens (time ratio <= 1 / (1 - r), i.e. tokens/s within noise).

Each run is a `forgetless train` command, so it runs under the caching allocator the command picks
(forgetless/allocator.py: tcmalloc, mimalloc or jemalloc when installed). The last two configurations rerun
plain full FT and l2sp with FORGETLESS_MALLOC=system (glibc's malloc): the plain one against the default
plain run (what the allocator buys), l2sp against the plain system-malloc run (the overhead without it).

    python bench/overhead.py                      # smollm2-135m-instruct, 8 x 128 tokens, 30 steps
    python bench/overhead.py --model stories260k --steps 40
    python bench/overhead.py --configs full+l2sp,full+ewc --repeats 3 --out bench/results/overhead-penalties.json
    python bench/overhead.py --render bench/results/overhead.json   # only re-render the markdown beside it

The JSON's `provenance` block (forgetless.provenance) names the commit, versions, CPU, allocator and the precision
path the runs took (every recipe sets train.bf16 to the resolved --precision, default auto; each run's summary.json
`precision` is kept in `runs`). The .md beside the JSON is rendered from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from forgetless import precision, provenance
from forgetless.io import atomic_write_json, atomic_write_text
from forgetless.models import resolve_model
from forgetless.testing import WORDS

RESULTS = Path(__file__).resolve().parent / "results"


def write_data(d: Path, n: int) -> dict[str, Path]:
    rng = random.Random(0)
    task = [{"text": " ".join(rng.choice(WORDS) for _ in range(320))} for _ in range(n)]
    general = [{"text": " ".join(rng.choice(WORDS[::-1]) for _ in range(320))} for _ in range(n)]
    out = {"task": d / "task.jsonl", "general": d / "general.jsonl"}
    for k, rows in (("task", task), ("general", general)):
        out[k].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


SYSTEM = " (system malloc)"  # the same run with train.cpu_allocator: system (glibc's defaults)
CONFIGS = {
    "full": ("full", []),
    "full+l2sp": ("full", [{"name": "l2sp", "weight": 0.01}]),
    "full+ewc": ("full", [{"name": "ewc", "weight": 100.0, "samples": 16, "reference": "GENERAL"}]),
    "full+si": ("full", [{"name": "si"}]),
    "full+kl": ("full", [{"name": "kl", "weight": 1.0}]),
    "full+replay10%": ("full", [{"name": "replay", "ratio": 0.1, "data": "GENERAL"}]),
    "lora": ("lora", []),
    "lora+kl": ("lora", [{"name": "kl", "weight": 1.0}]),
    "full" + SYSTEM: ("full", []),
    "full+l2sp" + SYSTEM: ("full", [{"name": "l2sp", "weight": 0.01}]),
}


def baseline(name: str) -> str:
    """What a configuration's ratios are against: plain full FT or plain LoRA under the same allocator,
    except the plain system-malloc run, which is measured against the default (cached) plain run."""
    if name == "full" + SYSTEM:
        return "full"
    base = "lora" if CONFIGS[name][0] == "lora" else "full"
    return base + SYSTEM if name.endswith(SYSTEM) else base


def recipe(name: str, model: str, data: dict[str, Path], out: Path, steps: int, batch: int, seq: int,
           bf16: bool) -> dict:
    method, mitigations = CONFIGS[name]
    general = {"train": str(data["general"]), "format": "text", "max_length": seq}
    mits = [{k: (general if v == "GENERAL" else v) for k, v in m.items()} for m in mitigations]
    return {
        "name": name.replace(SYSTEM, "-system-malloc"),
        "model": model,
        "data": {"train": str(data["task"]), "format": "text", "max_length": seq, "packing": True, "check": "off"},
        "method": {"name": method, **({"r": 16} if method == "lora" else {})},
        "optim": {"lr": 2e-5 if method == "full" else 2e-4, "max_steps": steps, "batch_size": batch, "warmup_steps": 0},
        "train": {"output_dir": str(out / name.replace(SYSTEM, "-system-malloc")), "save_steps": None,
                  "progress": False, "bf16": bf16, "logging_steps": 1, "report": False},
        "mitigations": mits,
    }


def run_one(spec: dict, tmp: Path, system_malloc: bool) -> dict:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FORGETLESS_MALLOC_REEXEC")}
    env["FORGETLESS_MALLOC"] = "system" if system_malloc else env.get("FORGETLESS_MALLOC", "auto")
    out = subprocess.run([sys.executable, "-m", "forgetless", "train", str(path), "--json", "--overwrite"],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{spec['name']} failed:\n{out.stderr[-3000:]}")
    s = json.loads(out.stdout)
    log = [json.loads(x) for x in (Path(spec["train"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
    return {"allocator": s["allocator"], "tokens_per_s": s["tokens_per_s"], "wall_time_s": s["wall_time_s"],
            "tokens": s["tokens_seen"],
            "steps": s["steps"], "peak_memory_mb": s["peak_memory_mb"], "mitigations": s["mitigations"],
            "step_tokens_per_s": per_step, "precision": s.get("precision")}


def steady_step_time(runs: list[dict]) -> float:
    """Mean seconds per token over the steps after the first third, pooled over the runs."""
    times = [1 / t for r in runs for t in r["step_tokens_per_s"][len(r["step_tokens_per_s"]) // 3:]]
    return sum(times) / len(times)


def median_step_s(run: dict) -> float:
    """Median seconds per step after the first third of the run (robust to a slow step or two)."""
    times = sorted(1 / t for t in run["step_tokens_per_s"][len(run["step_tokens_per_s"]) // 3:])
    return times[len(times) // 2] * run["tokens"] / run["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the whole sequence this many times (each mitigation paired with the plain run just "
                         "before it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute of every run (auto: bf16 only where this CPU runs it fast)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, render_md)
        return

    model = resolve_model(args.model).path
    # every configuration trains at the resolved precision (recipe(): train.bf16): that is the path measured
    prec = precision.resolve(args.precision, "cpu", widths=precision.config_widths(model))
    prov = provenance.collect(prec, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="fl-overhead-"))
    data = write_data(tmp, args.steps * args.batch * 2)
    names = args.configs.split(",")
    results: dict[str, list[dict]] = {}
    baseline_of = {n: baseline(n) for n in {*names, *map(baseline, names)}}  # --configs may leave the baselines out
    order = []
    for n in names:  # plain baseline re-run before every mitigation: drift shows up in the baseline spread
        if n not in ("full", "lora"):
            order.append(baseline_of[n])
        order.append(n)
    pair_ratios: dict[str, list[float]] = {}  # each run's median step time over the plain run just before it
    for rep in range(args.repeats):
        for n in order:
            print(f"[{rep + 1}/{args.repeats}] running {n} ...", file=sys.stderr, flush=True)
            run = run_one(recipe(n, model, data, tmp, args.steps, args.batch, args.seq, prec.bf16), tmp,
                          n.endswith(SYSTEM))
            if n != baseline_of[n]:
                pair_ratios.setdefault(n, []).append(
                    round(median_step_s(run) / median_step_s(results[baseline_of[n]][-1]), 3))
            results.setdefault(n, []).append(run)

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    table = []
    for n in names:
        base = baseline_of[n]
        tps, base_tps = mean(results[n], "tokens_per_s"), mean(results[base], "tokens_per_s")
        step_ratio = (mean(results[n], "wall_time_s") / mean(results[n], "steps")) / (
            mean(results[base], "wall_time_s") / mean(results[base], "steps"))
        extra_tokens = mean(results[n], "tokens") / mean(results[base], "tokens")
        row = {
            "config": n,
            "baseline": base,
            "allocator": results[n][-1]["allocator"],
            "tokens_per_s": round(tps, 1),
            "baseline_tokens_per_s": round(base_tps, 1),
            "step_time_ratio": round(step_ratio, 3),
            "steady_step_time_ratio": round(steady_step_time(results[n]) / steady_step_time(results[base]), 3),
            "token_ratio": round(extra_tokens, 3),
            "paired_median_step_ratios": pair_ratios.get(n, []),
            "paired_median_step_ratio": round(statistics.median(pair_ratios[n]), 3) if pair_ratios.get(n) else 1.0,
            "peak_memory_mb": round(mean(results[n], "peak_memory_mb")),
            "baseline_peak_memory_mb": round(mean(results[base], "peak_memory_mb")),
            "baseline_runs_tokens_per_s": [r["tokens_per_s"] for r in results[base]],
            "mitigations": results[n][-1]["mitigations"],
        }
        table.append(row)
    prov = provenance.finish(prov)
    prov["precision"] = {**prov["precision"], "observed": sorted(
        {(r.get("precision") or {}).get("dtype") for rs in results.values() for r in rs} - {None})}
    result = {
        "bench": "overhead", "model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "targets": {"full+l2sp": "<= 1.10x", "full+ewc": "<= 1.10x", "lora+kl": "<= 1.6x",
                    "full+replay10%": "time <= tokens ratio"},
        "repeats": args.repeats,
        "note": "step_time_ratio: whole run (train() wall time per step); steady_step_time_ratio: steps after the "
                "first third, pooled; paired_median_step_ratio: median over repeats of (median step time after the "
                "first third) / (the same of the plain run just before it)",
        "rows": table, "runs": results, "provenance": prov,
    }
    atomic_write_json(args.out, result)
    md = render_md(result)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def render_md(result: dict) -> str:
    """The markdown table, from the JSON result alone."""
    prov = result.get("provenance") or {}
    dtype = (prov.get("precision") or {}).get("dtype")
    rows = result["rows"]
    lines = [f"# mitigation overhead: {result['model']}, batch {result['batch']} x {result['seq']} tokens, "
             f"{result['steps']} steps, {result.get('repeats', 1)} repeat(s)", "",
             f"{f'{dtype} compute' if dtype else 'Compute precision not recorded'}, fp32 master weights; each run a "
             f"fresh `forgetless train` process. {result['note']}.", "",
             provenance.provenance_line(result), "",
             "Targets: " + "; ".join(f"{k} {v}" for k, v in result["targets"].items()) + ".", "",
             "| config | vs | allocator | tok/s | base tok/s | step time x | steady x | "
             "paired median x (each repeat) | tokens x | peak MiB | base MiB | hook share |", "|---" * 12 + "|"]
    for r in rows:
        share = sum(m.get("step_time_share") or 0 for m in r["mitigations"])
        paired = r.get("paired_median_step_ratios") or []
        pm = (f"{r['paired_median_step_ratio']:.3f} ({', '.join(f'{x:.3f}' for x in paired)})"
              if paired else "-")  # a baseline is not paired with itself
        lines.append(f"| {r['config']} | {r['baseline']} | {r.get('allocator', '-')} | {r['tokens_per_s']:.1f} | "
                     f"{r['baseline_tokens_per_s']:.1f} | {r['step_time_ratio']:.3f} | "
                     f"{r['steady_step_time_ratio']:.3f} | {pm} | {r['token_ratio']:.3f} | {r['peak_memory_mb']} | "
                     f"{r['baseline_peak_memory_mb']} | {100 * share:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
