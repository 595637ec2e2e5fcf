"""The forgetting frontier: every recipe under bench/recipes/ on a real model, scored on the target task and
on retention with paired intervals, with the time and memory each one cost, side by side in one sweep.

    python bench/forgetting.py --scenario math --scale quick           # smollm2-135m-instruct, this CPU
    python bench/forgetting.py --scenario med --recipes full-lr1e-4,lora-r16
    python bench/forgetting.py --scenario math --scale full --device cuda
    python bench/forgetting.py --scenario med --prepare-only           # only write bench/data/med/

Scenarios (data from ../shared/data, or --data-root):
- med: MedMCQA validation, a fixed shuffled split (train / test), chat-formatted as the question with its
  four options and the answer "X. option text". Target: test cross-entropy of the reference answers. Letter
  accuracy is not a valid target here (the letter prior alone moves it), so it is not reported.
- math: GSM8K train; target: cross-entropy of the reference solutions on GSM8K test (primary) and the
  exact-match accuracy of greedy answers (the number after ####) on a fixed subset.
  GSM8K solutions over max_length are dropped from training (truncating them would cut off "#### N").
Retention: the `general` suite (quick: 120-200 items per multiple-choice task, see SCALES; full: every
ARC-Easy test and PIQA item, 2,000 HellaSwag items), the base model evaluated once and cached.

Every recipe is a complete YAML file that `forgetless train` runs as it is (data paths point at
bench/data/med/, written by this script; `--set data.train=bench/data/math/train.jsonl --set
data.validation=bench/data/math/val.jsonl` switches scenario). The bench applies the scale's steps and
batch to all recipes alike. Headline recipes run with a second training seed. After the sweep, WiSE-FT of
full-lr1e-4 with auto alpha at a 1% budget is added as one more row (quick: alphas 0.75, 0.5, 0.25 from the
top down, stopping at the first within budget; full: the whole grid 0-1).

Writes bench/results/forgetting-<scenario>-<scale>.json, then the .md and .png from it (`--render FILE` redoes
them from a saved JSON; hand-written remarks live in forgetting-<scenario>-<scale>.notes.md). The JSON's `provenance`
block (forgetless.provenance) names the commit, versions, CPU and the precision path the runs took; the provenance
of the sweep's start is saved beside its directory (<out>.provenance.json), and resuming the sweep on another CPU
or precision path is refused (`--overwrite` starts it afresh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from forgetless.schema import load_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "bench" / "recipes"
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results"
HEADLINE = ("full-lr1e-4", "lora-r16")
BASELINES = ("full-lr1e-4", "full-lr2e-5", "lora-r16")  # what forgetless's recipes are measured against
BUDGET = 0.01

SCALES: dict[str, dict[str, Any]] = {
    # quick: one scenario, all recipes, <= 90 minutes on 2 CPU cores (bf16 compute, fp32 master weights): 12
    # trainings with their scorings, the base model's once, WiSE-FT's alphas. Every run trains on about 30k tokens
    # (GSM8K examples are twice MedMCQA's length, so math takes half the steps). Scoring is most of the cost, so
    # its sizes are small: the retention suite is `general` with 120-200 items per multiple-choice task (they move
    # within their noise at this budget anyway) and all 100 self-reference prompts (the metric that moves most),
    # and the intervals in its table are correspondingly wide. Values given per scenario are {"med": .., "math": ..}.
    "quick": {"steps": {"med": 40, "math": 20}, "batch": 8, "max_length": 256, "n_test": {"med": 300, "math": 150},
              "n_val": 40, "n_exact": 24, "seeds": 2,
              "retention_limits": {"arc_easy": 200, "hellaswag": 120, "piqa": 200, "wikitext": 12, "scitldr": 40,
                                   "flores_en_de": 40},
              "wise_alphas": [0.25, 0.5, 0.75], "wise_search": "descending"},
    "full": {"steps": 600, "batch": 16, "max_length": 512, "n_test": 1000, "n_val": 200, "n_exact": 300, "seeds": 2,
             "retention_limits": {"arc_easy": None, "piqa": None, "hellaswag": 2000}, "wise_alphas": None,
             "wise_search": "grid"},
}


def scale_for(name: str, scenario: str) -> dict[str, Any]:
    """The scale's settings with per-scenario values resolved for `scenario`."""
    return {k: v[scenario] if isinstance(v, dict) and set(v) == {"med", "math"} else v for k, v in SCALES[name].items()}


# ---------------------------------------------------------------- data


def _chat(user: str, assistant: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    return _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write_text(path: Path, text: str) -> Path:
    """Write `path` atomically, leaving it untouched when it already holds `text`: the base model's cached
    scores are keyed on the data files' mtimes, so rewriting a test set unchanged would re-score the base."""
    from forgetless.io import atomic_write_text

    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --data-root (the folder with domain_sft/ and math/)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def prepare_med(root: Path, n_test: int, n_val: int = 200, d: Path = DATA / "med") -> dict[str, Path]:
    rows = _read_jsonl(root / "domain_sft" / "medmcqa_validation.jsonl")
    random.Random(0).shuffle(rows)
    out = []
    for r in rows:
        opts = [r["opa"], r["opb"], r["opc"], r["opd"]]
        letter = "ABCD"[r["cop"]]
        q = r["question"].strip() + "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))
        out.append(_chat(q, f"{letter}. {opts[r['cop']]}", id=r["id"], prompt=q,
                         reference=f"{letter}. {opts[r['cop']]}"))
    # the validation block is 200 long whatever n_val is, so the training split stays the same at every scale
    test, val, train = out[:n_test], out[n_test : n_test + n_val], out[n_test + 200 :]
    return {"train": _write(d / "train.jsonl", train), "val": _write(d / "val.jsonl", val),
            "test": _write(d / "test.jsonl", test)}


def prepare_math(root: Path, n_test: int, n_val: int = 200, d: Path = DATA / "math") -> dict[str, Path]:
    train = _read_jsonl(root / "math" / "gsm8k_train.jsonl")
    test = _read_jsonl(root / "math" / "gsm8k_test.jsonl")
    random.Random(0).shuffle(train)

    def conv(r: dict[str, Any], i: int) -> dict[str, Any]:
        return _chat(r["question"], r["answer"], id=f"gsm8k-{i}", prompt=r["question"], reference=r["answer"],
                     number=r["answer"].rsplit("####", 1)[1].strip())

    val, tr = train[:n_val], train[200:]
    return {"train": _write(d / "train.jsonl", [conv(r, i) for i, r in enumerate(tr)]),
            "val": _write(d / "val.jsonl", [conv(r, i) for i, r in enumerate(val)]),
            "test": _write(d / "test.jsonl", [conv(r, i) for i, r in enumerate(test[:n_test])])}


def task_suite(scenario: str, files: dict[str, Path], n_exact: int, d: Path | None = None) -> Path:
    tasks: list[dict[str, Any]] = [{
        "name": f"{scenario}_answer_ce", "kind": "reference_likelihood", "data": {"path": str(files["test"])},
        "prompt": "{{prompt}}", "reference": "{{reference}}", "chat": "auto", "sample": "first",
    }]
    if scenario == "math":
        tasks.append({"name": "gsm8k_exact", "kind": "generate", "data": {"path": str(files["test"])},
                      "prompt": "{{prompt}}", "answers": "number", "answer_type": "numeric", "chat": "auto",
                      "limit": n_exact, "sample": "first", "max_new_tokens": 256, "stop": []})
    path = (d or DATA / scenario) / "task_suite.yaml"
    return _write_text(path, yaml.safe_dump({"name": f"{scenario}-target", "tasks": tasks}, sort_keys=False))


def retention_suite(scenario: str, limits: dict[str, int | None]) -> str:
    if not limits:
        return "general"
    from forgetless.retention.suite import BUILTIN_DIR

    spec = load_yaml((BUILTIN_DIR / "general.yaml").read_text())
    spec["name"] = f"general-{scenario}-bench"
    for t in spec["tasks"]:
        if t["name"] in limits:
            t["limit"] = limits[t["name"]]
            if t["limit"] is None:
                del t["limit"]
    path = DATA / scenario / "retention_suite.yaml"
    return str(_write_text(path, yaml.safe_dump(spec, sort_keys=False)))


# ---------------------------------------------------------------- the sweep


def recipe_set(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a bench recipe sets on the sweep's base: its method, optimiser, mitigations, monitor and guard, the
    last three set to none where the recipe has none (so another recipe's never leak in from the base)."""
    own = {k: recipe[k] for k in ("method", "optim", "mitigations", "monitor", "guard") if k in recipe}
    for k in ("mitigations", "monitor", "guard"):
        own.setdefault(k, [] if k == "mitigations" else None)
    own["data.self_distill"] = (recipe.get("data") or {}).get("self_distill")  # the only data option a recipe sets
    return own


def load_recipes(names: list[str] | None) -> dict[str, dict[str, Any]]:
    found = {p.stem: load_yaml(p.read_text()) for p in sorted(RECIPES.glob("*.yaml"))}
    if names:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise SystemExit(f"unknown recipes {unknown}; bench/recipes/ has {sorted(found)}")
        found = {n: found[n] for n in names}
    return found


def sweep_config(scenario: str, scale: dict[str, Any], recipes: dict[str, dict[str, Any]], files: dict[str, Path],
                 tsuite: Path, rsuite: str, model: str, device: str, out: Path, data_root: Path) -> Any:
    from forgetless.sweep import SweepConfig, Variant

    first = next(iter(recipes.values()))
    base = json.loads(json.dumps(first))
    base["model"] = model
    common = {
        "data.train": str(files["train"]), "data.validation": str(files["val"]), "data.max_length": scale["max_length"],
        "optim.max_steps": scale["steps"], "optim.batch_size": scale["batch"], "train.device": device,
        "train.save_steps": None, "train.progress": True,
    }
    if scenario == "math":
        # GSM8K: 24% of the training solutions exceed 256 tokens; truncating them would teach answers that stop
        # before "#### N", so examples over max_length are dropped (the test set is scored whole either way)
        common["data.overlong"] = "drop"
    runs = []
    for name, r in recipes.items():
        own = recipe_set(r)
        runs.append(Variant(name=name, set={**own, **common}))
        if name in HEADLINE or name == best_candidate(recipes):
            for seed in range(1, scale["seeds"]):
                runs.append(Variant(name=f"{name}-seed{seed}", set={**own, **common, "train.seed": 42 + seed}))
    return SweepConfig(name=f"forgetting-{scenario}", base=base, runs=runs, task_suite=str(tsuite),
                       retention_suite=rsuite, budget=BUDGET, output_dir=str(out), data_root=str(data_root))


def best_candidate(recipes: dict[str, Any]) -> str | None:
    """The forgetless recipe run with a second seed (the one the README's headline is about)."""
    return "full-replay5" if "full-replay5" in recipes else None


def bench_precision(model_path: str, device: str) -> dict[str, Any]:
    """The precision path a sweep or sequence of this model takes here: training (the recipes leave
    `train.bf16` at auto) and evaluation (`eval_precision: auto`), resolved as forgetless resolves them."""
    from forgetless import precision
    from forgetless.retention.api import eval_device, eval_precision
    from forgetless.train.model import pick_device

    dev = pick_device(device)
    train = precision.resolve("auto", dev, widths=precision.config_widths(model_path))
    ev = eval_precision("auto", model_path, eval_device(device))  # scored where the runs train
    dtype = train.dtype if train.dtype == ev.dtype else f"train {train.dtype} / eval {ev.dtype}"
    return {"dtype": dtype, "reason": f"train: {train.reason}; eval: {ev.reason}", "device": dev.type,
            "train": {"dtype": train.dtype, "reason": train.reason},
            "eval": {"dtype": ev.dtype, "reason": ev.reason, "device": ev.device}}


def observed_precision(dirs: list[str | Path]) -> dict[str, dict[str, int]]:
    """The precision each run directory actually ran at: training from its summary.json `precision` (older
    runs: `bf16_compute`), evaluation from its eval JSONs' `settings.precision` (older: `settings.bf16`)."""
    seen: dict[str, dict[str, int]] = {"train": {}, "eval": {}}

    def note(kind: str, value: Any) -> None:
        if value is not None:
            value = value if isinstance(value, str) else ("bf16" if value else "fp32")
            seen[kind][value] = seen[kind].get(value, 0) + 1

    for d in dirs:
        d = Path(d)
        with contextlib.suppress(OSError, ValueError):
            s = json.loads((d / "summary.json").read_text())
            note("train", (s.get("precision") or {}).get("dtype", s.get("bf16_compute")))
        for name in ("eval-task.json", "eval-retention.json"):
            with contextlib.suppress(OSError, ValueError):
                st = json.loads((d / name).read_text()).get("settings") or {}
                note("eval", st.get("precision", st.get("bf16")))
    return seen


def resume_guard(path: Path, current: dict[str, Any], what: str, resuming: bool,
                 allow_other_cpu: bool = False) -> dict[str, Any] | None:
    """Before resuming `what`: the provenance saved at its start (`path`) must name the CPU (model and flags)
    and precision path of `current` (forgetless.provenance.check_same_machine), else exit with an error naming
    both; with `allow_other_cpu`, another CPU of the same device and precision path is let through with a warning
    (the caller's rows carry their own machine). A fresh start saves `current` there. Returns the start's
    provenance when resuming (None otherwise)."""
    from forgetless.errors import ForgetlessError
    from forgetless.io import atomic_write_json
    from forgetless.provenance import check_same_machine, cpu_label

    if not resuming:
        atomic_write_json(path, current)
        return None
    if not path.is_file():  # started before the benches recorded provenance: nothing to check against
        print(f"warning: {what} has no saved provenance ({path}): cannot check it was started on this CPU and "
              "precision path; recording this machine's", file=sys.stderr)
        atomic_write_json(path, current)
        return None
    saved = json.loads(path.read_text())
    try:
        if not check_same_machine(saved, current, what=what, allow_other_cpu=allow_other_cpu):
            print(f"warning: resuming {what} on another CPU of the same precision path "
                  f"({cpu_label(saved.get('machine', {}))} at its start, {cpu_label(current.get('machine', {}))} "
                  f"here, {(current.get('precision') or {}).get('dtype')}): the new rows carry this machine",
                  file=sys.stderr)
    except ForgetlessError as e:
        raise SystemExit(f"error: {e}\n(the start's provenance: {path}; pass --overwrite to start afresh, or --out for "
                         "another directory)") from None
    return saved


def started(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a resumed result's provenance says about its start."""
    return None if saved is None else {k: saved.get(k) for k in ("commit", "dirty", "date", "command")}


def wise_row(state: dict[str, Any], cfg: Any, tsuite: Path, rsuite: str, alphas: list[float] | None, out: Path,
             search: str = "grid") -> dict | None:
    """WiSE-FT of full-lr1e-4 with auto alpha at the budget, scored like a sweep run."""
    from forgetless.merge import auto_alpha
    from forgetless.models import resolve_model
    from forgetless.results import RetentionChange, TaskGain

    src = next((r for r in state["runs"] if r["run"] == "full-lr1e-4"), None)
    if src is None:
        return None
    from forgetless.errors import ForgetlessError

    base = resolve_model(state["base_model"]).path
    t0 = time.perf_counter()
    # alpha 0 is the base (no drop) and 1 the run itself (already scored): the full grid includes them, quick does not
    grid = alphas or [round(0.1 * i, 1) for i in range(11)]
    try:
        res = auto_alpha(base, src["dir"], budget=BUDGET, task_suite=str(tsuite), retention_suite=rsuite, alphas=grid,
                         data_root=cfg.data_root, out=out / "wise-ft", overwrite=True, search=search)
    except ForgetlessError as e:
        print(f"WiSE-FT row left out: {e} (alphas {grid})", file=sys.stderr)
        return None
    task, ret = res["comparison"]["task"], res["comparison"]["retention"]  # the chosen alpha, as auto_alpha scored it
    return {
        "run": f"wise-ft(full-lr1e-4, alpha {res['chosen']['alpha']})", "dir": str(out / "wise-ft"),
        "method": "full+wise-ft", "task": TaskGain.of(task).as_dict(),
        "task_tasks": {k: {x: v[x] for x in ("base", "candidate", "delta", "ci", "significant")}
                       for k, v in task["tasks"].items()},
        "retention": RetentionChange.of(ret).as_dict("score", "change", "ci", "significant_drops", "tasks"),
        "wall_time_s": src["wall_time_s"] + (time.perf_counter() - t0), "tokens_per_s": src["tokens_per_s"],
        "peak_memory_mb": src["peak_memory_mb"], "trainable_parameters": src["trainable_parameters"],
        "trainable_share": src["trainable_share"], "curve": res["curve"],
    }


# ---------------------------------------------------------------- output


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["run"]: r for r in rows}
    full = [by[n] for n in ("full-lr1e-4", "full-lr2e-5") if n in by]
    lora = by.get("lora-r16")
    cands = [r for r in rows
             if r["run"] not in BASELINES and "-seed" not in r["run"] and -r["retention"]["change"] <= BUDGET]
    lines = []
    if not full or not cands:
        return ["Not enough runs for the headline comparison (needs full FT and a forgetless recipe within budget)."]
    best_full = max(full, key=lambda r: r["task"]["gain"])
    best = max(cands, key=lambda r: r["task"]["gain"])
    share = best["task"]["gain"] / best_full["task"]["gain"] if best_full["task"]["gain"] else float("nan")
    lines.append(f"Best forgetless recipe within a {100 * BUDGET:.0f}% retention budget: **{best['run']}**, task gain "
                 f"{best['task']['gain']:+.3f} = {100 * share:.1f}% of the best full-FT gain ({best_full['run']}: "
                 f"{best_full['task']['gain']:+.3f}), retention change {100 * best['retention']['change']:+.2f}%"
                 + ("." if any(n.startswith(best["run"] + "-seed") for n in by) else
                    " (one training seed; the recipe chosen in advance for a second seed is "
                    f"{best_candidate(by) or 'none'})."))
    if lora:
        lines.append(f"LoRA r16: task gain {lora['task']['gain']:+.3f}, retention change "
                     f"{100 * lora['retention']['change']:+.2f}%; the best recipe's drop is "
                     f"{'<=' if best['retention']['change'] >= lora['retention']['change'] else '>'} LoRA's.")
    goal = share >= 1.0 and (lora is None or best["retention"]["change"] >= lora["retention"]["change"])
    lines.append(f"Goal (>= 100% of full FT's gain at <= 1% drop and <= LoRA's drop): {'MET' if goal else 'NOT MET'}.")
    return lines


def seed_spread(rows: list[dict[str, Any]]) -> list[str]:
    """Run-to-run spread of the recipes trained with a second seed: both seeds' task gain and retention change."""
    by = {r["run"]: r for r in rows}
    pairs = [(n, [by[n], *[by[m] for m in sorted(by) if m.startswith(n + "-seed")]]) for n in by if "-seed" not in n]
    pairs = [(n, rs) for n, rs in pairs if len(rs) > 1]
    if not pairs:
        return []
    out = ["", "Run-to-run spread (the same recipe, training seeds 42 and 43; the intervals above are evaluation "
               "noise only):", "",
           "| recipe | task gain per seed | retention change per seed |", "|---|---|---|"]
    for n, rs in pairs:
        out.append(f"| {n} | " + ", ".join(f"{r['task']['gain']:+.3f}" for r in rs) + " | "
                   + ", ".join(f"{100 * r['retention']['change']:+.2f}%" for r in rs) + " |")
    return out


def write_results(state: dict[str, Any], rows: list[dict[str, Any]], args: Any, scale: dict[str, Any], wall: float,
                  provenance: dict[str, Any] | None = None) -> None:
    """Write forgetting-<scenario>-<scale>.json, then the .md and .png from it (`--render` redoes those two from
    a saved JSON). Hand-written remarks go in forgetting-<scenario>-<scale>.notes.md, never in these files."""
    from forgetless.allocator import loaded_allocator
    from forgetless.io import atomic_write_text

    stem = RESULTS / f"forgetting-{args.scenario}-{args.scale}"
    machine = (f"{platform.platform()}, {os.cpu_count()} CPUs, device {args.device}, "
               f"allocator {loaded_allocator()}")
    out = {"bench": "forgetting", "scenario": args.scenario, "scale": args.scale, "model": args.model,
           "machine": machine, "settings": scale, "budget": BUDGET, "wall_s": round(wall, 1), "rows": rows,
           "verdict": verdict(rows), "sweep_dir": str(state["dir"])}
    if provenance is not None:
        out["provenance"] = provenance
    atomic_write_text(stem.with_suffix(".json"), json.dumps(out, indent=2, default=str) + "\n")
    print(render(out, stem))


def render(result: dict[str, Any], stem: Path) -> str:
    """The .md and .png of a saved result, from its JSON alone; returns the markdown."""
    import base64

    from forgetless.io import atomic_write_text
    from forgetless.report import frontier_plot

    rows = result["rows"]
    png = frontier_plot(rows, result["budget"], None)
    if png:
        stem.with_suffix(".png").write_bytes(base64.b64decode(png))
    md = render_md(result, stem.with_suffix(".png").name)
    atomic_write_text(stem.with_suffix(".md"), md)
    return md


def render_md(result: dict[str, Any], png_name: str) -> str:
    """The markdown, from the JSON result alone."""
    from forgetless.provenance import compute_of, provenance_line

    rows, scale, wall = result["rows"], result["settings"], result["wall_s"]
    tasks = list(next(iter(rows))["retention"]["tasks"]) if rows else []
    extra = list(rows[0].get("task_tasks", {}))[1:] if rows else []  # secondary target metrics (math: exact match)
    lines = [f"# forgetting frontier: {result['scenario']}, {result['scale']} scale, {result['model']}", "",
             f"Machine: {result['machine']}. {scale['steps']} steps of {scale['batch']} examples (max "
             f"{scale['max_length']} tokens), {compute_of(result)} "
             f"with fp32 master weights; whole bench {wall / 60:.0f} min (sum of its runs' times). Task gain: "
             f"{rows[0]['task']['task'] if rows else ''} (positive is better), paired 95% CI. Retention: change of "
             "each task's main metric (paired 95% CI, * = significant) and the mean retention score.", "",
             provenance_line(result), "",
             "**A screen, not a verdict**: one training seed per recipe (a second for a few), every setting and the "
             "best row picked on the scored items themselves, baselines untuned. The decided comparison (tuned "
             "baselines, selection on validation, 3 seeds, paired intervals) is `bench/frontier.py`.", "",
             *result["verdict"], "",
             "| run | task gain [95% CI] | " + "".join(f"{e} change | " for e in extra) + " | ".join(tasks)
             + " | retention score | wall s | tok/s | peak MB | trainable |",
             "|---|---|" + "---|" * (len(extra) + len(tasks)) + "---|---|---|---|---|"]

    def cell(x: dict[str, Any] | None) -> str:
        return "-" if x is None else (f"{x['delta']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"
                                      f"{' *' if x['significant'] else ''}")

    for r in rows:
        cells = [cell(r.get("task_tasks", {}).get(e)) for e in extra] + [cell(r["retention"]["tasks"].get(n))
                                                                         for n in tasks]
        g = r["task"]
        lines.append(f"| {r['run']} | {g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] | " + " | ".join(cells)
                     + f" | {r['retention']['score']:.4f} | {r['wall_time_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     + ("-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}") + " | "
                     f"{r['trainable_parameters']:,} |")
    lines += seed_spread(rows)
    lines += ["", f"Frontier plot: `{png_name}`."
              + (f" Sweep directory: `{result['sweep_dir']}`." if result.get("sweep_dir") else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["med", "math"], default=None, help="required unless --render")
    ap.add_argument("--scale", choices=list(SCALES), default="quick")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipes", default=None, help="comma-separated names from bench/recipes/ (default: all)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="override the scale's steps (smoke tests)")
    ap.add_argument("--out", type=Path, default=None,
                    help="sweep directory (default: runs/bench-forgetting-<scenario>-<scale>)")
    ap.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT row")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="start the sweep afresh (its directory is removed)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the .md and .png beside this saved JSON result, and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import load

        render(load(args.render), args.render.with_suffix(""))
        return
    if args.scenario is None:
        ap.error("--scenario is required (med or math)")
    os.chdir(ROOT)  # the recipes' data paths are relative to the repository root
    scale = scale_for(args.scale, args.scenario)
    if args.steps:
        scale["steps"] = args.steps
    files = (prepare_med if args.scenario == "med" else prepare_math)(args.data_root, scale["n_test"], scale["n_val"])
    tsuite = task_suite(args.scenario, files, scale["n_exact"])
    rsuite = retention_suite(args.scenario, scale["retention_limits"])
    if args.prepare_only:
        print(json.dumps({k: str(v) for k, v in files.items()} | {"task_suite": str(tsuite), "retention_suite": rsuite},
                         indent=2))
        return
    from forgetless import provenance
    from forgetless.models import resolve_model
    from forgetless.sweep import run_sweep, sweep_table

    recipes = load_recipes(args.recipes.split(",") if args.recipes else None)
    out = args.out or ROOT / "runs" / f"bench-forgetting-{args.scenario}-{args.scale}"
    cfg = sweep_config(args.scenario, scale, recipes, files, tsuite, rsuite, args.model, args.device, out,
                       args.data_root)
    prec = bench_precision(resolve_model(args.model).path, args.device)
    prov = provenance.collect(prec, device=prec["device"])
    # saved beside the sweep directory (run_sweep wants that directory to itself); a resume must match it
    start = resume_guard(out.with_name(out.name + ".provenance.json"), prov, f"sweep {out}",
                         resuming=(out / "sweep.json").is_file() and not args.overwrite)
    state = run_sweep(cfg, folder=ROOT, overwrite=args.overwrite)  # resumable: re-running skips finished recipes
    rows = list(state["runs"])
    # the bench's cost is the sum of its runs' own times (each includes its evaluation, the first also the base
    # model's), so a bench resumed after an interruption still reports what one uninterrupted pass costs
    wall = sum(r["sweep_seconds"] for r in rows)
    if not args.no_wise:
        t0 = time.perf_counter()
        w = wise_row(state, cfg, tsuite, rsuite, scale["wise_alphas"], out, scale["wise_search"])
        wall += time.perf_counter() - t0
        if w:
            rows.append(w)
    from rich.console import Console

    Console(stderr=True, width=200).print(sweep_table(state))
    prov = provenance.finish(prov)
    prov["precision"] = {**prov["precision"], "observed": observed_precision([r["dir"] for r in state["runs"]])}
    if start:
        prov["started"] = started(start)
    write_results(state, rows, args, scale, wall, provenance=prov)


if __name__ == "__main__":
    from forgetless.allocator import reexec

    reexec()  # train under the caching allocator, as the forgetless command does
    sys.exit(main())
