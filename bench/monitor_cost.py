"""Cost of the retention monitor at its default settings, side by side with the same run unmonitored.

Target (issue: forgetting budget): the monitor adds under 15% to training's wall time at its defaults
(`monitor: {}`: suite auto, every auto). Every run trains smollm2-135m-instruct with the same data, steps and
seed, each in a fresh subprocess, alternating plain and monitored (plain, monitored, plain, ...: --repeats
monitored runs). The verdict is on the side-by-side wall ratio: each monitored run's process, timed from its start
to its exit (what the user waits for: the step-0 reference, the probes in between and the final probe, which runs
after the training loop and so is outside the summary's `wall_time_s`), over the mean of the plain runs' on either
side (the machine's drift shows in those), averaged over the repeats. Also reported: the monitor's own
timing as a share of training time (the run's summary: probe_s / wall_time_s, with the one-off generation of the
base model's answers and the step-0 probe). Writes bench/results/monitor_cost.json and .md, with a `provenance` block
(forgetless.provenance: commit, versions, CPU, allocator, and the precision path the runs took: each recipe sets
train.bf16 to the resolved --precision (default auto), and each run's summary.json `precision` is kept in `runs`).

    python bench/monitor_cost.py                        # 200 steps of 8 x 128 tokens (2 probes + the reference)
    python bench/monitor_cost.py --steps 300 --seq 256
    python bench/monitor_cost.py --render bench/results/monitor_cost.json   # only re-render the markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from forgetless import precision, provenance
from forgetless.io import atomic_write_json, atomic_write_text
from forgetless.models import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import write_data  # noqa: E402  (the same synthetic text data as the mitigation overhead bench)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.15


def recipe(name: str, model: str, data: Path, out: Path, steps: int, batch: int, seq: int, monitor: bool,
           bf16: bool) -> dict:
    r = {
        "name": name, "model": model,
        "data": {"train": str(data), "format": "text", "max_length": seq, "packing": True, "check": "off"},
        "method": "full",
        "optim": {"lr": 2e-5, "max_steps": steps, "batch_size": batch, "warmup_steps": 0},
        "train": {"output_dir": str(out / name), "save_steps": None, "progress": False, "bf16": bf16,
                  "logging_steps": 10, "report": False},
    }
    if monitor:
        r["monitor"] = {}  # every default: suite auto, every auto (probes at most 10% of the time)
    return r


def run(spec: dict, tmp: Path) -> dict:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    # a cold evaluation cache for every run, its own: the base answers are generated in each monitored run
    # (one home shared by the runs left the second monitored run a warm cache)
    env = {**os.environ, "FORGETLESS_HOME": str(tmp / f"home-{spec['name']}")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "forgetless", "train", str(path), "--json", "--overwrite"],
                         capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{spec['name']} failed:\n{out.stderr[-3000:]}")
    s = json.loads(out.stdout)
    return {"process_s": round(elapsed, 2), "wall_time_s": s["wall_time_s"], "steps": s["steps"],
            "tokens_per_s": s["tokens_per_s"], "monitor": s.get("monitor"), "precision": s.get("precision")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2,
                    help="monitored runs, each between two plain ones (plain, monitored, plain, monitored, plain)")
    ap.add_argument("--out", type=Path, default=RESULTS / "monitor_cost.json")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute of both runs (auto: bf16 only where this CPU runs it fast)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, render_md)
        return
    model = resolve_model(args.model).path
    # both runs train at the resolved precision (recipe(): train.bf16): that is the path measured
    prec = precision.resolve(args.precision, "cpu", widths=precision.config_widths(model))
    prov = provenance.collect(prec, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="fl-monitor-"))
    data = write_data(tmp, args.steps * args.batch)["task"]
    load0 = os.getloadavg()[0]
    runs: dict[str, dict] = {}
    order = ["plain-1"] + [x for i in range(args.repeats) for x in (f"monitored-{i + 1}", f"plain-{i + 2}")]
    for name in order:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        runs[name] = run(recipe(name, model, data, tmp, args.steps, args.batch, args.seq, name.startswith("monitored"),
                                prec.bf16), tmp)
    load1 = os.getloadavg()[0]
    result = {
        "bench": "monitor_cost", "model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "repeats": args.repeats,
        "monitor": "defaults (monitor: {}): suite auto (general-probe where its data files are, else self on 50 "
                   "prompts), every auto (probes at most 10% of the training time)",
        "machine": {"platform": platform.platform(), "loadavg_start": load0, "loadavg_end": load1},
        "order": order, "runs": runs, "target_share": TARGET, **judge(runs, order),
    }
    prov = provenance.finish(prov)
    prov["precision"] = {**prov["precision"],
                         "observed": sorted({(r.get("precision") or {}).get("dtype") for r in runs.values()} - {None})}
    result["provenance"] = prov
    atomic_write_json(args.out, result)
    md = render_md(result)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)


def judge(runs: dict[str, dict], order: list[str]) -> dict:
    """Each monitored run's process time (start to exit) over the mean of the plain runs' on either side of it (the
    side-by-side ratio: the machine's drift shows in the plain runs); the verdict on the mean of those ratios. Runs
    saved before the process was timed are judged on the training loop's `wall_time_s`, as they were then."""
    key = "process_s" if all("process_s" in r for r in runs.values()) else "wall_time_s"
    pairs = []
    for i, name in enumerate(order):
        if name.startswith("monitored"):
            plain = (runs[order[i - 1]][key] + runs[order[i + 1]][key]) / 2
            pairs.append(round(runs[name][key] / plain, 3))
    ratio = sum(pairs) / len(pairs)
    shares = [r["monitor"]["probe_s"] / r["wall_time_s"] for r in runs.values() if r.get("monitor")]
    return {"ratio_on": key, "wall_ratios": pairs, "wall_ratio_vs_plain": round(ratio, 3),
            "probe_share": round(sum(shares) / len(shares), 4),
            "probes": len(next(r for r in runs.values() if r.get("monitor"))["monitor"]["probes"]),
            "verdict": "PASS" if ratio - 1 < TARGET else "FAIL"}


def render_md(result: dict) -> str:
    """The markdown table, from the JSON result alone (a result saved before the repeats is rendered as it was
    judged then: on the monitor's own timed share; one saved before the process was timed, on the loop's time)."""
    compute = provenance.compute_of(result)
    m = result["machine"]
    lines = [
        f"# monitor_cost: {result['model']}, {result['steps']} steps of {result['batch']} x {result['seq']} tokens, "
        f"full FT, {compute}", "",
        f"{m['platform']}; load average {m['loadavg_start']:.1f} at start, {m['loadavg_end']:.1f} at end. Monitor: "
        f"{result['monitor']}.", "",
        provenance.provenance_line(result), "",
    ]
    timed = result.get("ratio_on") == "process_s"  # each run's process timed from start to exit
    if timed:
        lines += ["| run | process s (start to exit) | training loop s | tokens/s | monitor s (its own timing) | "
                  "monitor share of the loop |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| run | wall s | tokens/s | monitor s (its own timing) | monitor share |", "|---|---|---|---|---|"]
    for k, v in result["runs"].items():
        ms = v["monitor"]["probe_s"] if v.get("monitor") else None
        pct = f"{100 * ms / v['wall_time_s']:.1f}%" if ms is not None else "-"
        lines.append(f"| {k} | " + (f"{v['process_s']:.1f} | " if timed else "")
                     + f"{v['wall_time_s']:.1f} | {v['tokens_per_s']:.0f} | {ms if ms is not None else '-'} | {pct} |")
    target = 100 * result["target_share"]
    n = result["probes"]
    if timed:
        lines += ["", f"Process time of each monitored run (start to exit) over the mean of the plain runs' beside "
                  f"it: {', '.join(f'{x:.3f}x' for x in result['wall_ratios'])}; mean "
                  f"{result['wall_ratio_vs_plain']:.3f}x -> {result['verdict']} (target: the monitor adds < "
                  f"{target:.0f}% to the wall time). The monitor's own timing ({n} probe{'s' if n != 1 else ''} "
                  "after step 0, the final one among them, the step-0 reference and the one-off base answers) is "
                  f"{100 * result['probe_share']:.1f}% of the training loop's time."]
    elif "wall_ratios" in result:
        lines += ["", f"Wall time of each monitored run over the mean of the plain runs beside it: "
                  f"{', '.join(f'{x:.3f}x' for x in result['wall_ratios'])}; mean {result['wall_ratio_vs_plain']:.3f}x "
                  f"-> {result['verdict']} (target: the monitor adds < {target:.0f}% to the wall time). The monitor's "
                  f"own timing ({result['probes']} probes, the step-0 reference and the one-off base answers) "
                  f"is {100 * result['probe_share']:.1f}% of training time.",
                  "", "Judged as saved then, on each run's training-loop time (`wall_time_s`), which leaves out the "
                  "final probe (it runs after the loop): the ratios understate the monitor's cost by that probe. "
                  "Results saved since time each run's process from start to exit."]
    else:
        lines += ["", f"Monitor share of training time: {100 * result['probe_share']:.1f}% ({result['probes']} probes "
                  f"plus the step-0 reference and the one-off base answers) -> {result['verdict']} (target < "
                  f"{target:.0f}%). Wall time monitored / plain (mean of the two plain runs): "
                  f"{result['wall_ratio_vs_plain']:.3f}x. One monitored run, judged on the monitor's own timing, not "
                  "on the wall ratio: superseded when the bench is rerun with repeats."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
