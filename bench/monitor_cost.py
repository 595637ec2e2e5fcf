"""Cost of the retention monitor at its default settings, side by side with the same run unmonitored.

Target (issue: forgetting budget): the monitor's own cost stays under 15% of training time at the default
interval (`monitor: {}`: the `self` suite, 50 items, every 100 steps, 64-token answers). Both runs train
smollm2-135m-instruct with the same data, steps and seed, each in a fresh subprocess, plain first and
monitored second, then plain again (the machine's drift shows in the two plain runs). Reported: the
monitor's own time as a share of training time (from the run's summary: probe_s / wall_time_s, which
includes the one-off generation of the base model's answers and the step-0 probe) and the wall-time ratio
against the mean of the plain runs. Writes bench/results/monitor_cost.json and .md, with a `provenance` block
(forgetless.provenance: commit, versions, CPU, allocator, and the precision path the runs took: each recipe sets
train.bf16 to the resolved --precision (default auto), and each run's summary.json `precision` is kept in `runs`).

    python bench/monitor_cost.py                        # 200 steps of 8 x 128 tokens (2 probes + the reference)
    python bench/monitor_cost.py --steps 300 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
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
        r["monitor"] = {}  # every default: the self suite, 50 items, every 100 steps
    return r


def run(spec: dict, tmp: Path) -> dict:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    # a cold evaluation cache: the base answers are generated
    env = {**os.environ, "FORGETLESS_HOME": str(tmp / "home")}
    out = subprocess.run([sys.executable, "-m", "forgetless", "train", str(path), "--json", "--overwrite"],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{spec['name']} failed:\n{out.stderr[-3000:]}")
    s = json.loads(out.stdout)
    return {"wall_time_s": s["wall_time_s"], "steps": s["steps"], "tokens_per_s": s["tokens_per_s"],
            "monitor": s.get("monitor"), "precision": s.get("precision")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "monitor_cost.json")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute of both runs (auto: bf16 only where this CPU runs it fast)")
    args = ap.parse_args()
    model = resolve_model(args.model).path
    # both runs train at the resolved precision (recipe(): train.bf16): that is the path measured
    prec = precision.resolve(args.precision, "cpu", widths=precision.config_widths(model))
    prov = provenance.collect(prec, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="fl-monitor-"))
    data = write_data(tmp, args.steps * args.batch)["task"]
    load0 = os.getloadavg()[0]
    runs = {}
    for name, mon in (("plain", False), ("monitored", True), ("plain-again", False)):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        runs[name] = run(recipe(name, model, data, tmp, args.steps, args.batch, args.seq, mon, prec.bf16), tmp)
    load1 = os.getloadavg()[0]
    plain = (runs["plain"]["wall_time_s"] + runs["plain-again"]["wall_time_s"]) / 2
    m = runs["monitored"]
    share = m["monitor"]["probe_s"] / m["wall_time_s"]
    result = {
        "bench": "monitor_cost", "model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "monitor": "defaults (self suite, limit 50, every 100 steps, 64-token answers)",
        "machine": {"platform": platform.platform(), "loadavg_start": load0, "loadavg_end": load1},
        "runs": runs, "probe_share": round(share, 4), "wall_ratio_vs_plain": round(m["wall_time_s"] / plain, 3),
        "probes": len(m["monitor"]["probes"]), "target_share": TARGET, "verdict": "PASS" if share < TARGET else "FAIL",
    }
    prov = provenance.finish(prov)
    prov["precision"] = {**prov["precision"],
                         "observed": sorted({(r.get("precision") or {}).get("dtype") for r in runs.values()} - {None})}
    result["provenance"] = prov
    atomic_write_json(args.out, result)
    lines = [
        f"# monitor_cost: {args.model}, {args.steps} steps of {args.batch} x {args.seq} tokens, full FT, "
        f"{prec.dtype} compute", "",
        f"{platform.platform()}; load average {load0:.1f} at start, {load1:.1f} at end. Monitor at its defaults "
        "(self suite, 50 items, every 100 steps, 64-token answers).", "",
        f"Provenance: {provenance.machine_line(prov)}.", "",
        "| run | wall s | tokens/s | monitor s | monitor share |", "|---|---|---|---|---|",
    ]
    for k, v in runs.items():
        ms = v["monitor"]["probe_s"] if v.get("monitor") else None
        pct = f"{100 * ms / v['wall_time_s']:.1f}%" if ms is not None else "-"
        lines.append(f"| {k} | {v['wall_time_s']:.1f} | {v['tokens_per_s']:.0f} | {ms if ms is not None else '-'} "
                     f"| {pct} |")
    lines += ["",
              f"Monitor share of training time: {100 * share:.1f}% ({result['probes']} probes plus the step-0 "
              f"reference and the one-off base answers) -> {result['verdict']} (target < {100 * TARGET:.0f}%). Wall "
              f"time monitored / plain (mean of the two plain runs): {result['wall_ratio_vs_plain']:.3f}x."]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
