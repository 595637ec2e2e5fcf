"""`forgetless sweep`: run several recipes, score each on the target task and on retention, and say which
one gives the most task gain within a forgetting budget.

A sweep file is a base recipe plus variations:

    name: lr-and-methods
    base: recipe.yaml            # or an inline recipe mapping
    runs:                        # explicit variants: dotted recipe keys, like `forgetless train --set`
      - {name: full-1e-4, set: {optim.lr: 1e-4}}
      - {name: lora, set: {method: lora, optim.lr: 3e-4}}
    grid:                        # and/or a grid: every combination becomes a run
      optim.lr: [1e-5, 1e-4]
    task_suite: auto             # a suite (file or built-in); auto: reference likelihood of the validation data
    retention_suite: self        # what must not be forgotten
    budget: 1%                   # recommend the largest task gain whose retention drop is within this
    seeds: [1, 2, 3]             # optional: train every run once per seed (a run's own `seeds:` overrides)
    decide_on: point             # point: the drop's point estimate within budget; confident: its 95% upper bound

Each run goes to <sweep>/runs/<name>/ (a normal run directory) with its two evaluations beside it
(eval-task.json, eval-retention.json). The base model is evaluated once (and cached by fingerprint).
`sweep.json` is rewritten atomically after every run; re-running the same command resumes: finished runs
are skipped, an interrupted one continues from its newest checkpoint.

Task gain: the change of the task suite's first task's main metric, oriented so that positive is better
(for a cross-entropy: base minus candidate), with its paired 95% interval. Retention change: the retention
suite's score minus 1 (0 = nothing lost; -0.01 = 1% lost), with its paired interval, and each ability's change.

Seeds: with `seeds:` every run is trained once per seed (train.seed), in runs/<name>-seed<s>/, and its row is
the mean over the seeds with an interval that holds both the item noise and the seed-to-seed spread
(forgetless.retention.seeds: a t-based seed component and the shared item noise, added in quadrature). A row
from one seed (no `seeds:`, or a single one) is marked single-seed: its interval is the items' alone.

The budget, both ways: every row says whether its retention drop is within the budget on the point estimate
and with 95% confidence (the drop's upper bound, 1 - the interval's lower end). The sweep records both
recommendations (`recommended_point`, `recommended_95`); `recommended` is the one `decide_on` names
(point by default: the best guess; confident: only runs whose budget holds at 95%).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config import EvalPrecisionOptions, parse_budget
from .errors import ForgetlessError
from .io import atomic_write_json, atomic_write_text
from .models import resolve_model
from .orchestration import claim_dir, locked, refuse_changed_recipes, safe_name, train_or_reuse
from .precision import Precision, device_keyed
from .recipe import Recipe, base_recipe_tree, load_config_file, recipe_from_dict
from .report import write_report
from .results import RetentionChange, TaskGain, ability_names, task_gain  # noqa: F401 (task_gain re-exported)
from .retention.api import baseline_result, eval_device, eval_model, eval_precision
from .retention.kinds.reference_likelihood import ReferenceLikelihoodTask
from .retention.metrics import SCORE_VERSION, budget_check
from .retention.seeds import combine_seeds
from .retention.suite import Suite, load_suite
from .retention.tasks import DataSource, resolve_data_root
from .schema import Strict


class Variant(Strict):
    name: str = Field(description="Run name (its directory under runs/).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted recipe keys and their values.")
    seeds: list[int] | None = Field(None, min_length=1,
                                    description="Train this run once per seed (overrides the sweep's seeds).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return safe_name(v, "run")


class SweepConfig(EvalPrecisionOptions):
    name: str = "sweep"
    base: dict[str, Any] | str = Field(description="The base recipe: a mapping, or a recipe YAML path (relative to the "
                                                   "sweep file).")
    runs: list[Variant] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description="Dotted recipe key -> values; every combination is a run.")
    task_suite: str = Field("auto", description="Suite scoring the target task; auto: reference likelihood of "
                                                "data.validation (chat format).")
    retention_suite: str = Field("self",
                                 description="Suite of what must not be forgotten (built-in name or YAML file).")
    limit: int | None = Field(None, gt=0, description="At most this many items per evaluation task.")
    data_root: str | None = Field(None, description="Folder the suites' data paths are relative to.")
    budget: float | None = Field(None, gt=0, lt=1,
                                 description="Forgetting budget (1% or 0.01): marks the recommended run.")
    seeds: list[int] | None = Field(None, min_length=1, description="Train every run once per seed (train.seed); rows "
                                                                    "aggregate over seeds.")
    decide_on: Literal["point", "confident"] = Field(
        "point",
        description="What `recommended` acts on: the drop's point estimate (point) or its 95% upper bound (confident)."
    )
    output_dir: str | None = Field(None, description="Sweep directory. Default: sweeps/<name>.")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return None if v is None else parse_budget(v)

    @model_validator(mode="after")
    def _unique_names(self) -> SweepConfig:
        names = [v.name for v in self.variants()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"run names must be unique; repeated: {', '.join(dup)}")
        for i, v in enumerate(self.variants()):
            seeds = self.seeds_of(v)
            where = f"runs.{i}" if i < len(self.runs) else f"grid run {v.name}"
            if seeds and len(set(seeds)) != len(seeds):
                raise ValueError(f"{where}: seeds repeat: {seeds}")
            if seeds and "train.seed" in v.set:
                raise ValueError(f"{where}: set train.seed or seeds, not both")
        jobs = [j for j, _, _ in self.jobs()]
        dup = sorted({n for n in jobs if jobs.count(n) > 1})
        if dup:
            raise ValueError(f"run directories must be unique; repeated: {', '.join(dup)} (a run named like another's "
                             "seed run?)")
        return self

    def seeds_of(self, v: Variant) -> list[int] | None:
        return v.seeds if v.seeds is not None else self.seeds

    def jobs(self) -> list[tuple[str, Variant, int | None]]:
        """(run directory name, variant, seed or None) for every training run: one per seed where seeds are given."""
        out: list[tuple[str, Variant, int | None]] = []
        for v in self.variants():
            seeds = self.seeds_of(v)
            out += [(f"{v.name}-seed{s}", v, s) for s in seeds] if seeds else [(v.name, v, None)]
        return out

    def variants(self) -> list[Variant]:
        out = list(self.runs)
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                name = ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in zip(keys, values, strict=True))
                out.append(Variant(name=name, set=dict(zip(keys, values, strict=True))))
        return out or [Variant(name="base")]


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("name", "x"))
    if isinstance(v, list):
        return "+".join(_short(x) for x in v) or "none"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(v))


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """Read and validate a sweep file; errors name the file, key and line. Returns (config, its folder)."""
    cfg = load_config_file(path, SweepConfig, "sweep", "a YAML mapping with base: and runs: or grid:")
    return cfg, Path(path).parent


def base_recipe_dict(cfg: SweepConfig, folder: Path) -> tuple[dict[str, Any], str]:
    base = cfg.base if isinstance(cfg.base, dict) or Path(cfg.base).is_absolute() else folder / cfg.base
    return base_recipe_tree(base, "sweep base")


def variant_recipe(base: dict[str, Any], variant: Variant, run_dir: Path, source: str, seed: int | None = None,
                   name: str | None = None) -> Recipe:
    overrides = [f"{k}={json.dumps(v)}" for k, v in variant.set.items()]
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    tree = copy.deepcopy(base)
    tree["name"] = name or variant.name
    tree.setdefault("train", {})
    tree["train"] = {**tree["train"], "output_dir": str(run_dir)}
    return recipe_from_dict(tree, overrides, source=f"sweep run {variant.name} (base: {source})")


# ---------------------------------------------------------------- task suite


def auto_task_suite(recipe: Recipe) -> Any:
    """The target task, scored as the reference likelihood of the recipe's held-out answers."""
    d = recipe.data
    if not d.validation:
        raise ForgetlessError("sweep task_suite: auto needs data.validation in the base recipe (or name a task suite)")
    val = d.validation if isinstance(d.validation, str) else None
    if val is None or val.startswith("hf:"):
        raise ForgetlessError("sweep task_suite: auto reads a local data.validation file; name a task suite instead")
    if d.format == "chat":
        m = d.field("messages")
        prompt, reference, chat = f"{{{{ ({m} | selectattr('role', 'equalto', 'user') | list)[-1].content }}}}", \
            f"{{{{ ({m} | selectattr('role', 'equalto', 'assistant') | list)[-1].content }}}}", True
    elif d.format == "prompt_completion":
        prompt, reference, chat = f"{{{{ {d.field('prompt')} }}}}", f"{{{{ {d.field('completion')} }}}}", False
    else:
        raise ForgetlessError(
            f"sweep task_suite: auto handles chat and prompt_completion data; data.format is {d.format}: name a "
            "task suite"
        )
    task = ReferenceLikelihoodTask(
        name="task_heldout", data=DataSource(path=str(Path(val).resolve())), prompt=prompt, reference=reference,
        chat=chat, sample="first", target_delimiter="" if d.format == "prompt_completion" else " ",
    )
    return Suite(name="task", description="held-out answers of the training task (reference likelihood)", tasks=[task])


def load_any_suite(name: str) -> Any:
    return load_suite(name)


# ---------------------------------------------------------------- one run


def score_run(run_dir: Path, task_suite: Any, retention_suite: Any, cfg: SweepConfig, progress: bool,
              precision: Precision | str | None = None) -> dict[str, Any]:
    """Task gain and retention change of one run. `precision`: the sweep's resolved evaluation precision
    (a Precision, or bf16 / fp32), so every run and the base are scored alike; None resolves cfg's setting here."""
    kw: dict[str, Any] = {"baseline": "auto", "limit": cfg.limit, "data_root": cfg.data_root,
          "precision": precision or cfg.eval_setting(), "progress": progress,
          # scored where the sweep resolved its precision: the runs' training device
          "device": precision.device if isinstance(precision, Precision) else "auto"}
    task = eval_model(str(run_dir), task_suite, out=run_dir / "eval-task.json", **kw)
    ret = eval_model(str(run_dir), retention_suite, out=run_dir / "eval-retention.json", **kw)
    return {
        "task": TaskGain.of(task["comparison"]).as_dict(),
        "task_tasks": {k: {x: v[x] for x in ("base", "candidate", "delta", "ci", "significant")}
                       for k, v in task["comparison"]["tasks"].items()},
        "retention": RetentionChange.of(ret["comparison"]).as_dict(
            "score", "change", "ci", "score_definition", "abilities", "significant_drops", "tasks",
            task_fields=("main", "base", "candidate", "delta", "ci", "significant", "significant_drop", "flipped")),
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one variant and score it. Module-level so `--jobs` worker processes can run it."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    recipe = Recipe.model_validate(spec["recipe"])
    run_dir = recipe.output_dir
    cfg = SweepConfig.model_validate(spec["config"])
    t0 = time.perf_counter()
    summary = train_or_reuse(recipe, run_dir, f"sweep run {recipe.name}", spec["quiet"])
    scores = score_run(run_dir, spec["task_suite"], spec["retention_suite"], cfg, progress=not spec["quiet"],
                       precision=spec.get("eval_precision"))
    if recipe.train.report:
        write_report(run_dir)  # now with the run's evaluations
    guard = summary.get("guard") or {}
    return {
        "run": recipe.name,
        "variant": spec.get("variant", recipe.name),
        "seed": spec.get("seed"),
        "n_seeds": 1,
        "dir": str(run_dir),
        "method": summary["method"],
        "set": spec["set"],
        **scores,
        "wall_time_s": summary["wall_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "trainable_parameters": summary["trainable_parameters"],
        "trainable_share": summary["trainable_share"],
        "val_loss_before": summary.get("initial_validation_loss"),
        "val_loss_after": summary.get("final_validation_loss"),
        "guard_events": len(guard.get("events") or []),
        "sweep_seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------- the sweep


def aggregate_seeds(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a run trained with several seeds: means over the seeds with intervals combining the item
    noise and the seed spread (forgetless.retention.seeds). Significant drops: the tasks that dropped
    significantly in every seed."""
    first = rows[0]
    out: dict[str, Any] = {
        "run": name, "variant": name, "seeds": [r["seed"] for r in rows], "n_seeds": len(rows),
        "seed_runs": [r["run"] for r in rows],
        "dir": first["dir"], "dirs": [r["dir"] for r in rows], "method": first["method"], "set": first["set"],
    }
    if all(r.get("task") for r in rows):
        g = combine_seeds([r["task"]["gain"] for r in rows], [r["task"]["ci"] for r in rows])
        out["task"] = {**{k: first["task"][k] for k in ("task", "metric", "base")}, "gain": g["mean"], "ci": g["ci"],
                       "significant": g["ci"][0] > 0 or g["ci"][1] < 0, "per_seed": [r["task"]["gain"] for r in rows],
                       "seed_sd": g["seed_sd"], "interval": g["method"]}
    ret = combine_seeds([r["retention"]["change"] for r in rows], [r["retention"]["ci"] for r in rows])
    abilities = {}
    for ab in first["retention"].get("abilities") or {}:
        if all(ab in (r["retention"].get("abilities") or {}) for r in rows):
            per = [r["retention"]["abilities"][ab] for r in rows]
            c = combine_seeds([p["change"] for p in per], [p["ci"] for p in per])
            abilities[ab] = {"change": c["mean"], "ci": c["ci"], "seed_sd": c["seed_sd"], "tasks": per[0]["tasks"],
                             "weight": per[0]["weight"]}
    drops = [set(r["retention"]["significant_drops"]) for r in rows]
    out["retention"] = {
        "score": 1 + ret["mean"], "change": ret["mean"], "ci": ret["ci"],
        "per_seed": [r["retention"]["change"] for r in rows],
        "seed_sd": ret["seed_sd"], "item_half_width": ret["item_half_width"] if len(rows) > 1 else None,
        "seed_half_width": ret.get("seed_half_width"), "interval": ret["method"],
        "score_definition": first["retention"].get("score_definition", 1), "abilities": abilities,
        "significant_drops": sorted(set.intersection(*drops)),
    }
    for key in ("wall_time_s", "tokens_per_s", "trainable_parameters", "trainable_share", "val_loss_before",
                "val_loss_after", "sweep_seconds"):
        vals: list[Any] = [r.get(key) for r in rows]
        out[key] = sum(vals) / len(vals) if all(v is not None for v in vals) else None
    out["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rows)
    out["guard_events"] = sum(r.get("guard_events", 0) for r in rows)
    return out


def budget_verdicts(rows: list[dict[str, Any]], budget: float | None) -> None:
    """Mark every row's retention with the budget both ways (point estimate; 95% upper bound of the drop)."""
    for r in rows:
        ret = r["retention"]
        ret["budget_check"] = budget_check(1 + ret["change"], (1 + ret["ci"][0], 1 + ret["ci"][1]), budget)


def recommend(rows: list[dict[str, Any]], budget: float | None, decide_on: str = "point") -> str | None:
    """The run with the largest task gain whose retention drop is within the budget: on the point estimate
    (decide_on="point"), or with 95% confidence, the drop's upper bound within it (decide_on="confident")."""
    if budget is None:
        return None
    if decide_on == "confident":
        ok = [r for r in rows if -r["retention"]["ci"][0] <= budget]
    else:
        ok = [r for r in rows if -r["retention"]["change"] <= budget]
    ok = [r for r in ok if r.get("task")]
    return max(ok, key=lambda r: r["task"]["gain"])["run"] if ok else None


def sweep_rows(cfg: SweepConfig, finished: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows in sweep order: a finished unseeded run as is, a seeded run aggregated over its finished
    seeds."""
    rows = []
    for v in cfg.variants():
        seeds = cfg.seeds_of(v)
        if not seeds:
            if v.name in finished:
                rows.append({"n_seeds": 1, **finished[v.name]})
            continue
        done = [finished[f"{v.name}-seed{s}"] for s in seeds if f"{v.name}-seed{s}" in finished]
        if done:
            row = aggregate_seeds(v.name, done)
            row["seeds_planned"] = list(seeds)
            rows.append(row)
    return rows


def run_sweep(
    path_or_config: str | Path | SweepConfig,
    *,
    folder: Path | None = None,
    jobs: int = 1,
    budget: float | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    report: bool = True,
    break_lock: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the content of sweep.json. The sweep directory is locked while it runs
    (forgetless.lock): a second sweep on it is refused."""
    return locked("sweep directory", break_lock, lambda lock: _run_sweep(
        path_or_config, folder=folder, jobs=jobs, budget=budget, output_dir=output_dir, overwrite=overwrite,
        quiet=quiet, report=report, lock=lock))


def _run_sweep(path_or_config: str | Path | SweepConfig, *, folder: Path | None, jobs: int, budget: float | None,
               output_dir: str | Path | None, overwrite: bool, quiet: bool, report: bool,
               lock: Callable[[Path], Any]) -> dict[str, Any]:
    from rich.console import Console

    if isinstance(path_or_config, SweepConfig):
        cfg, folder = path_or_config, folder or Path.cwd()
    else:
        cfg, folder = load_sweep(path_or_config)
    if budget is not None:  # validated as the file's budget is (model_copy would skip the 0 < budget < 1 check)
        try:
            cfg = SweepConfig.model_validate({**cfg.model_dump(), "budget": budget})
        except ValidationError as e:
            raise ForgetlessError(f"--budget {budget}: {e.errors()[0]['msg']} (a fraction: 0.01 or 1% is a 1% "
                                  "retention drop)") from None
    console = Console(stderr=True, quiet=quiet)
    out = Path(output_dir or cfg.output_dir or f"sweeps/{cfg.name}")
    state_path = out / "sweep.json"
    base, source = base_recipe_dict(cfg, folder)
    variants = cfg.variants()
    trainings = cfg.jobs()
    recipes = {name: variant_recipe(base, v, out / "runs" / name, source, seed=seed, name=name)
               for name, v, seed in trainings}  # all errors up front
    lock(out)
    claim_dir(out, ("sweep.json", "sweep.yaml"), "sweep", overwrite)  # sweep.yaml: written first
    prior = json.loads(state_path.read_text()) if state_path.is_file() else {}
    # finished training runs: unseeded ones are rows of `runs` (as in sweeps before seeds), seeded ones are in
    # `seed_runs`
    done = {r["run"]: r for r in prior.get("runs", []) if not r.get("seed_runs")}
    done.update({r["run"]: r for r in prior.get("seed_runs", [])})
    refuse_changed_recipes(((f"sweep run {name}", out / "runs" / name, r) for name, r in recipes.items()), "the sweep")
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    first = next(iter(recipes.values()))
    task_suite = auto_task_suite(first) if cfg.task_suite == "auto" else load_any_suite(cfg.task_suite)
    retention_suite = load_any_suite(cfg.retention_suite)
    # resolved once, so every run and the base model are scored at the same precision (caches key on it)
    prec = eval_precision(cfg.eval_setting(), resolve_model(first.model.name, revision=first.model.revision,
                                                            allow_pickle=first.model.allow_pickle).path,
                          eval_device(first.train.device))  # scored where the runs train
    # what a finished run's scores depend on besides its training: when it changed since they were written
    # (suites, their items, --limit, precision, the score's definition), every run is scored again; the
    # training is reused
    root = resolve_data_root(cfg.data_root)
    # scored on a GPU: rescored when it moves to the CPU or back
    eval_key = device_keyed({"task_suite": task_suite.with_limit(cfg.limit).fingerprint(root),
                             "retention_suite": retention_suite.with_limit(cfg.limit).fingerprint(root),
                             "precision": prec.dtype, "score_definition": SCORE_VERSION}, prec.device)
    if done and prior.get("eval_key", eval_key) != eval_key:
        changed = ", ".join(k for k in {**prior["eval_key"], **eval_key}
                            if prior["eval_key"].get(k) != eval_key.get(k))
        console.print(f"[yellow]the evaluation changed since {state_path} was written ({changed}): every finished "
                      "run is scored again (its training is reused)[/yellow]")
        done = {}
    # a finished row whose evaluation files are gone (a run directory deleted to train it again) is not finished
    done = {name: row for name, row in done.items()
            if all((out / "runs" / name / f).is_file() for f in ("summary.json", "eval-task.json",
                                                                 "eval-retention.json"))}
    todo = [(name, v, seed) for name, v, seed in trainings if name not in done]

    console.print(f"[bold]sweep {cfg.name}[/bold]: {len(variants)} runs, {len(trainings)} trainings "
                  f"({len(trainings) - len(todo)} finished), task suite {task_suite.name}, retention suite "
                  f"{retention_suite.name} -> {out}")
    console.print(f"evaluation {prec.line()}", highlight=False)
    finished = {name: done[name] for name, _, _ in trainings if name in done}
    state: dict[str, Any] = {
        "name": cfg.name, "dir": str(out), "budget": cfg.budget, "task_suite": task_suite.name,
        "retention_suite": retention_suite.name, "base_model": first.model.name, "score_definition": SCORE_VERSION,
        "eval_precision": {"dtype": prec.dtype, "reason": prec.reason},
        "decide_on": cfg.decide_on, "eval_key": eval_key, "runs": [], "seed_runs": [], "recommended": None,
    }

    def save() -> None:
        state["runs"] = sweep_rows(cfg, finished)
        seeded = {name for name, _, seed in trainings if seed is not None}
        state["seed_runs"] = [finished[name] for name, _, _ in trainings if name in finished and name in seeded]
        budget_verdicts(state["runs"], cfg.budget)
        state["recommended_point"] = recommend(state["runs"], cfg.budget, "point")
        state["recommended_95"] = recommend(state["runs"], cfg.budget, "confident")
        state["recommended"] = state["recommended_95"] if cfg.decide_on == "confident" else state["recommended_point"]
        atomic_write_json(state_path, state)

    save()
    specs = [{
        "recipe": recipes[name].model_dump(mode="json"), "config": cfg.model_dump(mode="json"), "set": v.set,
        "variant": v.name, "seed": seed,
        "task_suite": task_suite, "retention_suite": retention_suite, "quiet": quiet, "eval_precision": prec,
        # worker processes share the cores; a run trained here (one left, or --jobs 1) has them all
        "threads": max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 and len(todo) > 1 else None,
    } for name, v, seed in todo]
    if jobs > 1 and len(specs) > 1:
        _prime_base(first, task_suite, retention_suite, cfg, quiet, prec.dtype)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, s): s for s in specs}
            for f in as_completed(futures):
                try:
                    row = f.result()
                except BaseException:
                    # no queued run starts after a failure; those running finish (their training is kept and
                    # a rerun reuses it), and every run finished so far is in sweep.json
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                finished[row["run"]] = row
                save()
                console.print(f"finished {row['run']}")
    else:
        for i, s in enumerate(specs, 1):
            console.print(f"[bold]run {i}/{len(specs)}[/bold]: {s['recipe']['name']} "
                          f"{json.dumps(s['set']) if s['set'] else ''}")
            row = run_one(s)
            finished[row["run"]] = row
            save()
    if report:
        state["report"] = str(write_report(out))
        atomic_write_json(state_path, state)
    return state


def _prime_base(recipe: Recipe, task_suite: Any, retention_suite: Any, cfg: SweepConfig, quiet: bool,
                precision: str) -> None:
    """Evaluate the base model once before parallel workers start (they then read the cache)."""
    path = resolve_model(recipe.model.name, revision=recipe.model.revision,
                         allow_pickle=recipe.model.allow_pickle).path
    root = resolve_data_root(cfg.data_root)
    for s in (task_suite, retention_suite):
        baseline_result(path, s.with_limit(cfg.limit), root, bf16=precision == "bf16", progress=not quiet,
                        device=eval_device(recipe.train.device))


# ---------------------------------------------------------------- table


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def seeds_label(r: dict[str, Any]) -> str:
    """'3 seeds' or '1 seed (single)' (a single-seed row's interval has no seed-to-seed spread in it)."""
    n = r.get("n_seeds", 1)
    return f"{n} seeds" if n > 1 else "1 seed (single)"


def sweep_table(state: dict[str, Any]) -> Any:
    from rich.table import Table

    budget = state.get("budget")
    rows = state["runs"]
    abilities = ability_names(rows)
    t = Table(title=f"sweep {state['name']}: task gain vs retention change"
              + (f" (budget {100 * budget:.3g}%; recommended on the "
                 f"{'95% upper bound' if state.get('decide_on') == 'confident' else 'point estimate'})"
                 if budget else ""),
              caption="single: one training seed, the interval is the items' alone; abilities: change in points, 95% "
                      "half-width"
              if rows else None)
    cols = ["run", "seeds", "method", "task gain [95% CI]", "retention change [95% CI]"]
    if budget:
        cols.append("within budget: point / 95%")
    cols += abilities + ["significant drops", "wall s", "tok/s", "peak MB", "trainable"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("run", "seeds", "method", "significant drops") else "right")
    for r in rows:
        g, ret = r.get("task"), r["retention"]
        mark = ""
        if r["run"] == state.get("recommended"):
            mark = " [bold green]<- recommended[/bold green]"
        elif r["run"] == state.get("recommended_95") or r["run"] == state.get("recommended_point"):
            mark = " [green](" + ("95%" if r["run"] == state.get("recommended_95") else "point") + " pick)[/green]"
        over = budget is not None and -ret["change"] > budget
        cells = [
            r["run"] + mark, seeds_label(r), r["method"],
            f"{g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]{' *' if g['significant'] else ''}" if g else "-",
            ("[red]" if over else "") + f"{_pct(ret['change'])} [{_pct(ret['ci'][0])}, {_pct(ret['ci'][1])}]"
            + ("[/red]" if over else ""),
        ]
        if budget:
            point_ok, conf_ok = -ret["change"] <= budget, -ret["ci"][0] <= budget
            cells.append(f"{'yes' if point_ok else '[red]no[/red]'} / {'yes' if conf_ok else 'no'}")
        for ab in abilities:
            a = (ret.get("abilities") or {}).get(ab)
            cells.append(f"{100 * a['change']:+.2f} ±{50 * (a['ci'][1] - a['ci'][0]):.2f}" if a else "-")
        cells += [
            ", ".join(ret["significant_drops"]) or "none",
            f"{r['wall_time_s']:.0f}" if r.get("wall_time_s") is not None else "-",
            f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") is not None else "-",
            f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") is not None else "-",
            (f"{int(r['trainable_parameters']):,} ({100 * r['trainable_share']:.2f}%)"
             if r.get("trainable_parameters") is not None else "-"),
        ]
        t.add_row(*cells)
    return t
