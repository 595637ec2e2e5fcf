"""The run: plan, score the base model, then train and score each step in turn, writing continual.json after
every step (so an interrupted sequence resumes), and the plots and report at the end."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ForgetlessError
from ..io import atomic_write_json, atomic_write_text
from ..models import resolve_model
from ..orchestration import claim_dir, locked, refuse_changed_recipes, train_or_reuse
from ..report import write_continual_report, write_plots, write_report
from ..retention.evaluate import load_items
from ..retention.suite import load_suite
from ..schema import load_yaml
from .evaluate import Evaluator, retention_entry, task_suite
from .matrix import fmt_interval, metric_of, score_matrix, summarize
from .plan import Step, plan, resolve_path
from .sequence import ContinualConfig, load_continual


def _train_step(step: Step, quiet: bool) -> dict[str, Any]:
    if not (step.dir / "summary.json").is_file():
        for _, path, recs in step.replay:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    return train_or_reuse(step.recipe, step.dir, f"step {step.index} ({step.task.name})", quiet)


def _step_entry(step: Step, summary: dict[str, Any], retention: dict[str, Any] | None,
                seconds: float) -> dict[str, Any]:
    return {
        "step": step.index, "task": step.task.name, "dir": str(step.dir), "model": str(step.model_dir),
        "method": summary["method"], "complete": True,
        "train": {k: summary.get(k) for k in ("steps", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                                              "trainable_parameters",
                                              "initial_validation_loss", "final_validation_loss")},
        "mitigations": summary.get("mitigations", []),
        "replay_buffer": {task: len(recs) for task, _, recs in step.replay},
        "retention": retention,
        "seconds": round(seconds, 1),
    }


def run_continual(
    path_or_config: str | Path | ContinualConfig,
    *,
    folder: Path | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    report: bool = True,
    break_lock: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a task sequence; returns the content of continual.json. The sequence directory is locked
    while it runs (forgetless.lock): a second run on it is refused."""
    return locked("continual directory", break_lock, lambda lock: _run_continual(
        path_or_config, folder=folder, output_dir=output_dir, overwrite=overwrite, quiet=quiet, report=report,
        lock=lock))


def _run_continual(path_or_config: str | Path | ContinualConfig, *, folder: Path | None,
                   output_dir: str | Path | None, overwrite: bool, quiet: bool, report: bool,
                   lock: Callable[[Path], Any]) -> dict[str, Any]:
    from rich.console import Console

    if isinstance(path_or_config, ContinualConfig):
        cfg, folder, where = path_or_config, folder or Path.cwd(), "sequence"
    else:
        cfg, folder = load_continual(path_or_config)
        where = str(path_or_config)
    console = Console(stderr=True, quiet=quiet)
    out = Path(output_dir or cfg.output_dir or f"continual/{cfg.name}")
    state_path = out / "continual.json"
    steps = plan(cfg, folder, out, where)  # every recipe validated, every data file read, before anything is written
    suite = task_suite(cfg, steps, folder)
    retention = load_suite(resolve_path(cfg.retention_suite, folder)) if cfg.retention_suite else None

    seq_dump = {k: v for k, v in cfg.dump().items() if k != "output_dir"}
    lock(out)
    # sequence.yaml is written before the base row is scored, continual.json after it: either marks a sequence
    # directory (an interruption while the base was scored resumes too)
    if claim_dir(out, ("continual.json", "sequence.yaml"), "continual", overwrite):
        saved = load_yaml((out / "sequence.yaml").read_text()) if (out / "sequence.yaml").is_file() else None
        if saved is not None:  # read through today's schema: a sequence.yaml of an older version compares equal
            try:
                saved = {k: v for k, v in ContinualConfig.model_validate(saved).dump().items() if k != "output_dir"}
            except ValidationError:
                saved = {"unreadable": True}
        if saved is not None and saved != seq_dump:
            raise ForgetlessError(f"{where}: the sequence changed since {out / 'sequence.yaml'} was written; "
                                  "pass --overwrite to start again (or choose another output_dir)")
        refuse_changed_recipes(((f"step {s.index} ({s.task.name})", s.dir, s.recipe) for s in steps), "the sequence")
    atomic_write_text(out / "sequence.yaml", yaml.safe_dump(cfg.dump(), sort_keys=False))

    first = steps[0].recipe.model
    base_path = resolve_model(first.name, revision=first.revision, allow_pickle=first.allow_pickle).path
    evaluator = Evaluator(cfg, suite, retention, base_path, quiet, device=steps[0].recipe.train.device)
    prior = json.loads(state_path.read_text()) if state_path.is_file() else {}
    done = {e["step"]: e for e in prior.get("steps", []) if e.get("complete")}
    T = len(steps)
    carried = ", ".join(e.name for e in cfg.carry) or "nothing"
    console.print(f"[bold]continual {cfg.name}[/bold]: {T} tasks ({len(done)} done), method "
                  f"{steps[0].recipe.method.name}, carry {carried}, retention suite "
                  f"{retention.name if retention else 'none'} -> {out}")
    base_res = evaluator.base_row(out)
    rows = [base_res.tasks]
    specs = [s.task for s in steps]
    for spec in specs:
        metric_of(base_res.tasks[spec.name], spec)  # an unknown metric fails before any training
    state: dict[str, Any] = {
        "name": cfg.name, "dir": str(out), "base_model": base_path, "method": steps[0].recipe.method.name,
        "carry": cfg.carried(), "retention_suite": retention.name if retention else None,
        "tasks": [], "steps": [], "matrix": None, "metrics": None, "trajectory": None, "complete": False,
    }
    for spec in specs:
        m, sign = metric_of(base_res.tasks[spec.name], spec)
        state["tasks"].append({"name": spec.name, "metric": m.name, "higher_is_better": m.higher_is_better,
                               "score": m.name if sign > 0 else f"-{m.name}", "n": base_res.tasks[spec.name].n})

    def save() -> dict[str, Any]:
        R, B = score_matrix(rows, specs)
        summ = summarize(R, B)
        state["matrix"] = {"rows": ["base"] + [f"{e['step']}-{e['task']}" for e in state["steps"]],
                           "columns": [s.name for s in specs], "score": summ["score"], "ci": summ["ci"]}
        state["metrics"] = summ["metrics"]
        for t, entry in enumerate(summ["trajectory"]):
            ret = state["steps"][t - 1]["retention"] if t else (
                {"score": 1.0, "change": 0.0, "ci": [0.0, 0.0], "significant_drops": []} if retention else None)
            entry["after"] = "base" if t == 0 else state["steps"][t - 1]["task"]
            entry["retention"] = None if ret is None else {k: ret[k]
                                                           for k in ("score", "change", "ci", "significant_drops")}
        state["trajectory"] = summ["trajectory"]
        state["complete"] = len(state["steps"]) == T
        atomic_write_json(state_path, state)
        return summ

    save()  # from here on the directory is a sequence directory: a crash in step 1 resumes too
    for step in steps:
        t0 = time.perf_counter()
        prev = done.get(step.index)
        items = step.dir / "eval-task.items.json"
        if prev and items.is_file() and (retention is None or (step.dir / "eval-retention.json").is_file()):
            rows.append(load_items(items, suite))
            state["steps"].append(prev)
            console.print(f"step {step.index}/{T} {step.task.name}: done earlier, skipped")
            continue
        console.print(f"[bold]step {step.index}/{T}[/bold] {step.task.name}: training"
                      + (f" from {steps[step.index - 2].task.name}'s model" if step.index > 1
                         else " from the base model")
                      + (f", replaying {sum(len(r) for _, _, r in step.replay)} earlier examples" if step.replay
                         else ""))
        summary = _train_step(step, quiet)
        res, ret = evaluator.step(step, base_res)
        if step.recipe.train.report:
            write_report(step.dir)  # now with the step's evaluations
        rows.append(res.tasks)
        state["steps"].append(_step_entry(step, summary, retention_entry(ret), time.perf_counter() - t0))
        summ = save()
        i, j = step.index, step.index - 1
        m = summ["metrics"]
        r = state["steps"][-1]["retention"]
        console.print(
            f"step {i}/{T} {step.task.name}: {summary['steps']} steps in {summary['wall_time_s']:.0f}s; "
            f"score {summ['score'][i][j]:+.3f} (base {summ['score'][0][j]:+.3f}); average "
            f"{fmt_interval(m['average_accuracy'])}, BWT {fmt_interval(m['bwt'])}; retention "
            + (f"{100 * r['change']:+.2f}% [{100 * r['ci'][0]:+.2f}%, {100 * r['ci'][1]:+.2f}%]" if r else "-")
        )
    save()
    state["plots"] = write_plots(state, out)
    if report:
        state["report"] = str(write_continual_report(out, state))
    atomic_write_json(state_path, state)
    return state


def continual_table(state: dict[str, Any]) -> Any:
    """The accuracy matrix as a rich table (rows: models; columns: tasks), with the metrics in its caption."""
    from rich.table import Table

    scores = ", ".join(sorted({t["score"] for t in state["tasks"]}))
    t = Table(title=f"continual {state['name']}: score R[i][j] ({scores}, higher is better) [95% CI]")
    t.add_column("after step")
    for c in state["matrix"]["columns"]:
        t.add_column(c, justify="right")
    t.add_column("retention change", justify="right")
    for i, name in enumerate(state["matrix"]["rows"]):
        cells = []
        for j in range(len(state["matrix"]["columns"])):
            v, (lo, hi) = state["matrix"]["score"][i][j], state["matrix"]["ci"][i][j]
            text = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            cells.append(f"[bold]{text}[/bold]" if i == j + 1 else text)
        ret = state["trajectory"][i].get("retention")
        cells.append(f"{100 * ret['change']:+.2f}% [{100 * ret['ci'][0]:+.2f}%, {100 * ret['ci'][1]:+.2f}%]"
                     if ret and i else "-")
        t.add_row(name, *cells)
    m = state["metrics"]
    labels = {"average_accuracy": "average", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting"}
    t.caption = "   ".join(f"{label} {fmt_interval(m[k])}" for k, label in labels.items())
    return t
