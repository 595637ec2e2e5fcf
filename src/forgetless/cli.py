"""The `forgetless` command: a thin typer app that parses, calls the library and prints."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import ForgetlessError
from .output import json_mode, print_json

app = typer.Typer(
    name="forgetless",
    help="Fine-tune LLMs without catastrophic forgetting: train, measure retention, stay inside a forgetting budget.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


def _models_app() -> typer.Typer:
    from .models.cli import app as models_app

    return models_app


def _data_app() -> typer.Typer:
    from .data.cli import app as data_app

    return data_app


app.add_typer(_models_app(), name="models", help="Catalog of small real models usable offline: list, pull, import.")
app.add_typer(_data_app(), name="data",
              help="Check SFT data before training: schema, duplicates, contradictions, contamination.")


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: --set optim.lr=1e-5")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    merge: Annotated[bool, typer.Option(help="Also save the PEFT result merged into the base weights.")] = False,
    out: Annotated[Path | None, typer.Option(help="Run directory (overrides train.output_dir).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or data report.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")] = False,
    break_lock: Annotated[bool, typer.Option(help="Take over the run directory's lock held by a process on "
                                                  "another host.")] = False,
) -> None:
    """Fine-tune a causal LM as the recipe says; writes a run directory with model, metrics and summary."""
    from .recipe import load_recipe
    from .report import write_report
    from .train import train as run_train

    overrides = list(set_ or [])
    if merge:
        overrides.append("train.merge=true")
    if out is not None:
        overrides.append(f"train.output_dir={out}")
    r = load_recipe(recipe, overrides)
    # the CLI, not train(), renders the report (train.report): train() calls it once summary.json is written
    summary = run_train(r, overwrite=overwrite, resume=resume, quiet=quiet or json_out, break_lock=break_lock,
                        report=write_report).summary
    from .distributed import is_main

    if not is_main():  # under torchrun / accelerate launch only rank 0 reports
        return
    if json_out:
        print_json(summary)
        return
    if not quiet:
        _print_summary(summary)


def _print_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {s['name']}", show_header=False)
    rows = [
        ("method", s["method"]),
        ("trainable / total params",
         f"{s['trainable_parameters']:,} / {s['total_parameters']:,} ({100 * s['trainable_share']:.2f}%)"),
        ("steps / tokens", f"{s['steps']} / {s['tokens_seen']:,}"),
        ("wall time", f"{s['wall_time_s']:.1f} s ({s['tokens_per_s']} tok/s)"),
        ("peak memory", f"{s['peak_memory_mb']:.0f} MiB"),
        ("final train loss", f"{s['final_train_loss']}"),
        ("final validation loss", f"{s['final_validation_loss']}"),
        ("output", f"{s['output']['final']} ({s['output']['kind']})"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="Model directory, catalog alias, hub id, or a run directory.")],
    suite: Annotated[str, typer.Option(help="Built-in suite (general, self) or a suite YAML file.")] = "general",
    baseline: Annotated[str, typer.Option(help="auto (a run's base model), base, none, or a model "
                                               "path/alias.")] = "auto",
    limit: Annotated[int | None, typer.Option(help="At most N items per task (quick look).")] = None,
    task: Annotated[list[str] | None, typer.Option(help="Only these tasks of the suite (repeatable).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder the suite's data paths are relative to "
                                                        "($FORGETLESS_DATA).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here (beside it: flipped items, "
                                                  ".flips.jsonl; both models' per-item scores, .items.json).")] = None,
    precision: Annotated[str, typer.Option(help="auto: bf16 autocast where a timed probe finds it faster on this CPU "
                                                "(native bf16), else fp32; bf16; fp32 (reproduces lm-eval's numbers "
                                                "exactly).")] = "auto",
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Aliases of --precision bf16 / "
                                                                       "--precision fp32.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Cap on the scoring window (tokens).")] = None,
    refresh_baseline: Annotated[bool, typer.Option(help="Re-evaluate the baseline instead of using "
                                                        "its cache.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    device: Annotated[str, typer.Option(help="auto (the GPU when there is one, else the CPU), cpu, cuda or mps: "
                                             "candidate and baseline are scored there.")] = "auto",
) -> None:
    """Score a model on a retention suite; against a baseline, show what was forgotten and whether it is noise."""
    from .retention.api import eval_model
    from .retention.report import print_report

    report = eval_model(
        model, suite, baseline=baseline, limit=limit, tasks=task, data_root=data_root,
        precision=_precision_option(precision, bf16),
        max_length=max_length, out=out, progress=not (quiet or json_out), refresh_baseline=refresh_baseline,
        device=device,
    )
    if json_out:
        print_json(report)
        return
    print_report(report)
    if out:
        console.print(f"report: {out}")


def _precision_option(precision: str, bf16: bool | None) -> str:
    from .precision import combine

    try:
        return combine(precision, bf16)
    except ValueError as e:
        raise ForgetlessError(f"--precision: {e}") from None


def parse_budget(text: str) -> float:
    """'1%' -> 0.01; '0.01' -> 0.01."""
    from .config import parse_budget as parse

    try:
        return parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def merge(
    base: Annotated[str, typer.Option(help="Base model (path, alias).")],
    tuned: Annotated[str, typer.Option(help="Fine-tuned model, adapter or run directory.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    alpha: Annotated[str, typer.Option(help="Weight of the tuned model in [0, 1], or auto.")] = "auto",
    budget: Annotated[str, typer.Option(help="With --alpha auto: largest retention drop allowed, e.g. 1%.")] = "1%",
    task_suite: Annotated[str | None, typer.Option(help="With --alpha auto: suite scoring the new task.")] = None,
    retention_suite: Annotated[str, typer.Option(help="With --alpha auto: suite scoring retention.")] = "self",
    data_root: Annotated[Path | None, typer.Option(help="Where the suites' data paths are relative to.")] = None,
    search: Annotated[str, typer.Option(help="With --alpha auto: grid (score every alpha) or descending (from 1.0 "
                                                "down, stop at the first within the budget).")] = "grid",
    decide_on: Annotated[str, typer.Option(help="With --alpha auto: point (the drop's estimate within budget) or "
                                                   "confident (its 95% upper bound within budget).")] = "point",
    precision: Annotated[str, typer.Option(help="With --alpha auto: evaluation compute, auto | bf16 | fp32 (as "
                                                "in eval).")] = "auto",
    report_task_suite: Annotated[str | None, typer.Option(
        help="With --alpha auto: score the chosen alpha on this task suite (the choice uses --task-suite).")] = None,
    report_retention_suite: Annotated[str | None, typer.Option(
        help="With --alpha auto: score the chosen alpha on this retention suite (the choice uses "
             "--retention-suite).")] = None,
    full: Annotated[bool, typer.Option(help="Write a full model even for a LoRA adapter.")] = False,
    device: Annotated[str, typer.Option(help="With --alpha auto: where the alphas are scored, auto | cpu | cuda | "
                                             "mps (auto: the GPU when there is one).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Interpolate base and fine-tuned weights (WiSE-FT); --alpha auto finds the best alpha within a budget."""
    from . import merge as merge_lib

    if alpha == "auto":
        if not task_suite:
            raise typer.BadParameter("--alpha auto needs --task-suite (a suite scoring the new task)")
        result = merge_lib.auto_alpha(base, tuned, budget=parse_budget(budget), task_suite=task_suite,
                                      retention_suite=retention_suite, data_root=data_root, out=out,
                                      overwrite=overwrite,
                                      progress=not (json_out or quiet), search=search, decide_on=decide_on,
                                      precision=_precision_option(precision, None),
                                      report_task_suite=report_task_suite,
                                      report_retention_suite=report_retention_suite, full=full, device=device)
    else:
        try:
            a = float(alpha)
        except ValueError:
            raise typer.BadParameter(f"--alpha {alpha!r}: a number in [0, 1] or auto") from None
        result = merge_lib.merge(base, tuned, a, out, overwrite=overwrite, full=full)
    if json_out:
        print_json(result)
        return
    if quiet:
        return
    if "curve" in result:
        from rich.table import Table

        t = Table(title=f"interpolation curve (budget {parse_budget(budget):.1%} retention drop)")
        for col in ("alpha", "task score", "retention", "95% CI", "within budget", "within at 95%"):
            t.add_column(col, justify="right")
        for c in result["curve"]:
            mark = "[bold]*[/bold] " if c is result["chosen"] or c == result["chosen"] else ""
            ci = c.get("retention_ci") or [float("nan")] * 2
            t.add_row(f"{mark}{c['alpha']}", f"{c['task_score']:.4f}", f"{c['retention']:.4f}",
                      f"[{ci[0]:.4f}, {ci[1]:.4f}]",
                      "yes" if c["within_budget"] else "no", "yes" if c.get("within_budget_95") else "no")
        console.print(t)
        console.print(f"""chosen on the {'95% upper bound of the drop' if result.get('decide_on') == 'confident'
                                         else 'point estimate'}"""
                      " (--decide-on)")
        console.print(f"chosen alpha {result['chosen']['alpha']}; saved to {out} (curve: {out / 'alpha_curve.png'})")
        if "reported_on" in result:
            rep, on = result["comparison"], result["reported_on"]
            console.print(f"reported on {on['task_suite']} / {on['retention_suite']} (not used to choose): task "
                          f"score {rep['task']['retention_score']:.4f}, retention "
                          f"{rep['retention']['retention_score']:.4f} [{rep['retention']['retention_ci'][0]:.4f}, "
                          f"{rep['retention']['retention_ci'][1]:.4f}]")
    else:
        console.print(f"wrote {result['kind']} with alpha {result['alpha']} to {out}")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep YAML: a base recipe plus runs: and/or grid:.")],
    jobs: Annotated[int, typer.Option(min=1, help="Train this many runs at once (processes share the CPU "
                                                  "threads).")] = 1,
    budget: Annotated[str | None, typer.Option(help="Forgetting budget, e.g. 1%: marks the recommended run.")] = None,
    out: Annotated[Path | None, typer.Option(help="Sweep directory (overrides output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start again, replacing an existing sweep directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print sweep.json on stdout.")] = False,
    break_lock: Annotated[bool, typer.Option(help="Take over the sweep directory's lock held by a process on "
                                                  "another host.")] = False,
) -> None:
    """Run recipe variants, score each on the task and on retention, and recommend one within a budget.

    Re-running the same command resumes: finished runs are skipped."""
    from .sweep import run_sweep, sweep_table

    state = run_sweep(sweep_file, jobs=jobs, budget=parse_budget(budget) if budget else None, output_dir=out,
                      overwrite=overwrite, quiet=quiet or json_out, break_lock=break_lock)
    if json_out:
        print_json(state)
        return
    if not quiet:
        _table_console().print(sweep_table(state))
        if state.get("budget") is not None:
            rec = state.get("recommended")
            console.print(f"recommended: {rec}" if rec else "[red]no run stays within the budget[/red]")
            console.print(f"""acting on the {'95% upper bound of the drop' if state.get('decide_on') == 'confident'
                                             else 'point estimate'}"""
                          f" (decide_on); point pick: {state.get('recommended_point')}, budget holds at 95%: "
                          f"{state.get('recommended_95')}")
        console.print(f"sweep.json and report: {state['dir']}")


@app.command()
def continual(
    sequence_file: Annotated[Path, typer.Argument(help="Sequence YAML: a base recipe plus an ordered list of tasks.")],
    out: Annotated[Path | None, typer.Option(help="Sequence directory (overrides output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start again, replacing an existing sequence directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print continual.json on stdout.")] = False,
    break_lock: Annotated[bool, typer.Option(help="Take over the sequence directory's lock held by a process on "
                                                  "another host.")] = False,
) -> None:
    """Fine-tune on tasks one after another; score every task after every step (accuracy matrix, BWT, FWT)
    and the retention suite.

    Re-running the same command resumes: finished steps are skipped."""
    from .continual import continual_table, run_continual

    state = run_continual(sequence_file, output_dir=out, overwrite=overwrite, quiet=quiet or json_out,
                          break_lock=break_lock)
    if json_out:
        print_json(state)
        return
    if not quiet:
        _table_console().print(continual_table(state))
        console.print(f"continual.json, matrix.png, trajectory.png and report.html: {state['dir']}")


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run, sweep or continual-sequence directory.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the HTML (default: PATH/report.html).")] = None,
    drift: Annotated[bool, typer.Option(help="Compute the layer-wise drift chart (loads base and tuned "
                                             "weights).")] = True,
) -> None:
    """Write one self-contained report.html: frontier, training curves, retention table, flips, layer drift."""
    from .report import write_report

    print(write_report(path, out, drift=drift))


def _table_console() -> Console:
    import sys

    return Console(width=None if sys.stdout.isatty() else 160)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its runs.")] = Path("runs/demo"),
    tiny: Annotated[bool, typer.Option(help="Same code path on a tiny local model, in seconds.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Pull the default model offline, fine-tune it on a generated task with several recipes, compare."""
    from .demo import run_demo
    from .sweep import sweep_table

    state = run_demo(out, tiny=tiny, quiet=quiet or json_out, overwrite=overwrite)
    if json_out:
        print_json(state)
        return
    if not quiet:
        _table_console().print(sweep_table(state))
        from .demo import headline

        rec = state.get("recommended")
        console.print(f"recommended within the {100 * state['budget']:.3g}% budget: {rec}" if rec else
                      f"[red]no recipe stays within the {100 * state['budget']:.3g}% budget[/red]")
        console.print(f"[bold]{headline(state)}[/bold]", highlight=False)
        console.print(f"report: {state['report']}")


@app.command()
def version() -> None:
    """Print the version."""
    _print_version(True)


def main() -> None:
    from .allocator import reexec

    if Path(sys.argv[0]).name in ("forgetless", "__main__.py"):  # the command itself, not a harness calling main()
        reexec()  # under tcmalloc / mimalloc / jemalloc when installed (FORGETLESS_MALLOC): faster CPU steps
    import torch

    torch.set_flush_denormal(True)  # fp32 stalls on denormals on many CPUs
    try:
        with json_mode("--json" in sys.argv[1:]):  # stdout carries the JSON alone (forgetless.output)
            app()
    except ForgetlessError as e:
        console.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or "the output directory"
        console.print(f"[red]error:[/red] disk full while writing {where} ({e.strerror}). Files written before "
                      "are intact (every file is written to a temporary name and renamed into place); free some "
                      "space and run the command again (a training run: with --resume).",
                      markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
