"""`forgetless data check`: a thin typer app over `forgetless.data.check` (mounted as `forgetless data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..errors import DataError, ForgetlessError
from ..output import print_json

app = typer.Typer(help="Training data tools: check SFT data for problems, write a cleaned copy.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True, soft_wrap=True)

FORMATS = ("chat", "instruction", "prompt_completion", "text")


@app.callback()
def _group() -> None:
    """Training data tools: check SFT data for problems, write a cleaned copy."""


def _fail(e: ForgetlessError) -> typer.Exit:
    err.print(f"[red]error:[/red] {e}", highlight=False)
    return typer.Exit(code=2)


def _data_config(files: list[str], fmt: str, field: list[str], max_length: int | None, system_prompt: str | None):
    from pydantic import ValidationError

    from ..recipe import DataConfig

    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: valid formats are {', '.join(FORMATS)}")
    fields: dict[str, str] = {}
    for spec in field:
        canonical, sep, name = spec.partition("=")
        if not sep or not canonical or not name:
            raise DataError(f"--field {spec!r}: expected canonical=name, e.g. --field output=response")
        fields[canonical.strip()] = name.strip()
    kw: dict[str, Any] = {"train": files, "format": fmt, "fields": fields, "system_prompt": system_prompt}
    if max_length is not None:
        kw["max_length"] = max_length
    try:
        return DataConfig(**kw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'data'}: {x['msg']}" for x in e.errors())
        raise DataError(f"invalid options: {msgs}") from None


def _load_tokenizer(name: str) -> Any:
    path = name
    try:
        from ..models import resolve_model
    except ImportError:
        resolve_model = None  # type: ignore[assignment]  # optional import
    if resolve_model is not None:
        path = resolve_model(name).path
    from ..train.model import load_tokenizer

    return load_tokenizer(path)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def print_report(report: Any, console: Console = out) -> None:
    """The rich summary: one overview table, then a table of first examples per check that found something."""
    from .check import counted

    d = report.to_dict()
    p = d["problems"]

    def status(key: str, section: dict) -> str:
        if "skipped" in section:
            return f"[dim]skipped: {section['skipped']}[/dim]"
        return "[green]ok[/green]" if not p[key] else f"[red]{p[key]}[/red]"

    overview = Table(title=f"data check: {', '.join(d['files'])} ({d['format']}, {d['records']:,} records, "
                     f"{d['valid']:,} valid)", title_justify="left")
    overview.add_column("check")
    overview.add_column("found", overflow="fold")
    rows = [
        ("schema (unusable records)", "schema", d["schema"]),
        ("exact duplicates (extra copies)", "exact_duplicates", d["exact_duplicates"]),
        ("near duplicates (extra records)", "near_duplicates", d["near_duplicates"]),
        ("contradictions (prompts)", "contradictions", d["contradictions"]),
        ("empty / degenerate answers", "degenerate", d["degenerate"]),
        ("over max_length", "truncated", d["length"]),
        ("contamination (examples)", "contaminated", d["contamination"]),
    ]
    for label, key, section in rows:
        overview.add_row(label, status(key, section))
    console.print(overview)

    s = d["schema"]
    if s["bad"]:
        console.print(_table(f"schema: {s['malformed']} malformed JSON, {s['invalid']} invalid",
                             ["where", "error"], [[e["where"], e["error"]] for e in s["examples"]]))
    e = d["exact_duplicates"]
    if e.get("duplicates"):
        console.print(_table(f"exact duplicates: {counted(e['duplicates'], 'extra copy', 'extra copies')} in "
                             f"{counted(e['groups'], 'group')}",
                             ["copies", "locations", "text"],
                             [[g["copies"], ", ".join(g["locations"]), g["text"]] for g in e["examples"]]))
    nd = d["near_duplicates"]
    if nd.get("duplicates"):
        console.print(_table(f"near duplicates (Jaccard >= {nd['threshold']} of {nd['shingle_words']}-word "
                             f"shingles): {counted(nd['duplicates'], 'record')} in "
                             f"{counted(nd['clusters'], 'cluster')}",
                             ["size", "min Jaccard", "locations", "text"],
                             [[c["size"], c["min_jaccard"], ", ".join(c["locations"]), c["text"]]
                              for c in nd["examples"]]))
    c = d["contradictions"]
    if c.get("groups"):
        rows2 = []
        for g in c["examples"]:
            for k, v in enumerate(g["variants"]):
                rows2.append([g["prompt"] if k == 0 else "", v["where"], v["count"], v["answer"]])
        console.print(_table(f"contradictions: {counted(c['groups'], 'prompt')} ({counted(c['records'], 'record')}) "
                             "with materially different answers", ["prompt", "where", "records", "answer"], rows2))
    dg = d["degenerate"]
    if dg.get("count"):
        reasons = ", ".join(f"{n} {r}" for r, n in dg["by_reason"].items())
        console.print(_table(f"empty / degenerate: {dg['count']} ({reasons})", ["where", "reason", "answer"],
                             [[x["where"], x["reason"], repr(x["answer"])] for x in dg["examples"]]))
    ln = d["length"]
    if "skipped" not in ln:
        dist = ln["distribution"]
        stats = ", ".join(f"{k} {dist[k]}" for k in ("min", "p50", "p90", "p99", "max") if k in dist)
        console.print(f"token lengths ({ln['tokenizer']}): {stats}; {ln['over_max_length']} over max_length "
                      f"{ln['max_length']} ({ln['overlong_policy']})", highlight=False)
        if ln["over_max_length"]:
            console.print(_table("over max_length", ["where", "tokens"],
                                 [[x["where"], x["tokens"]] for x in ln["examples"]]))
    ct = d["contamination"]
    if "skipped" not in ct:
        rows3 = [[t, v["items"], v["contaminated_examples"], v["eval_items_hit"],
                  "; ".join(f"{x['where']} (item {x['eval_item']}): {x['ngram']}" for x in v["examples"][:3])]
                 for t, v in ct["tasks"].items()]
        console.print(_table(f"contamination ({ct['ngram']}-gram overlap)",
                             ["task", "items", "contaminated examples", "eval items hit", "first"], rows3))
    dv = d["diversity"]
    if "skipped" not in dv and dv.get("examples"):
        tops = ", ".join(f"{w['word']} {100 * w['share']:.1f}%" for w in dv["top_first_words"])
        pw, aw = dv["prompt_words"], dv["answer_words"]
        lines = [f"diversity: {dv['distinct_first_words']} distinct first words; top: {tops}"]
        if pw.get("count"):
            lines.append(f"  prompt words p10/p50/p90: {pw['p10']}/{pw['p50']}/{pw['p90']}; "
                         f"distinct prompts {100 * dv['distinct_prompt_share']:.1f}%")
        if aw.get("count"):
            lines.append(f"  answer words p10/p50/p90: {aw['p10']}/{aw['p50']}/{aw['p90']}")
        if dv["largest_duplicate_clusters"]:
            sizes = ", ".join(str(x["size"]) for x in dv["largest_duplicate_clusters"])
            lines.append(f"  largest duplicate clusters: {sizes} "
                         f"({100 * dv['duplicate_cluster_share']:.1f}% of examples are in one)")
        console.print("\n".join(lines), highlight=False)


@app.command("check")
def check_cmd(
    files: Annotated[list[str], typer.Argument(help="JSONL/JSON data files (optionally .gz).")],
    fmt: Annotated[str, typer.Option("--format",
                                     help="chat | instruction | prompt_completion | text.")] = "instruction",
    field: Annotated[list[str] | None, typer.Option("--field", help="Map a canonical field to the file's name: "
                                                    "--field output=response (repeatable).")] = None,
    against: Annotated[list[str] | None, typer.Option("--against", help="Retention suite (general, a suite YAML) or "
                                                      "eval set (JSONL/JSON, or name=path) to check for n-gram "
                                                      "contamination (repeatable).")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root",
                                                   help="Where a suite's data paths are relative to.")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Token budget per example "
                                                   "(needs --tokenizer; default 1024).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Model path, hub id or alias whose "
                                                  "tokenizer measures lengths.")] = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="As data.system_prompt.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Near-duplicate Jaccard threshold.")] = 0.8,
    ngram: Annotated[int, typer.Option("--ngram", help="Contamination n-gram size (words).")] = 13,
    examples: Annotated[int, typer.Option("--examples", help="Examples listed per check.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the full report as JSON here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (no tables).")] = False,
    fix: Annotated[Path | None, typer.Option("--fix", help="Write a cleaned JSONL copy here, and "
                                             "<OUT>.removed.jsonl listing every removal.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Let --fix replace an existing output.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when any problem is found.")] = False,
) -> None:
    """Check SFT data for schema errors, duplicates, near-duplicates, contradictions, over-long and degenerate examples,
    eval contamination.

    Prints a summary table per check with the file:line of the first examples; --json-out / --json give the full report,
    --fix a cleaned copy.

    Exit codes: 0 done (problems are reported, not fatal, unless --strict), 1 problems found with --strict, 2 error.
    """
    from ..io import atomic_write_json
    from .check import check_data, fix_data, load_against, report_problems

    try:
        if max_length is not None and tokenizer is None:
            raise DataError("--max-length needs --tokenizer (lengths are counted in tokens of the model)")
        cfg = _data_config(files, fmt, field or [], max_length, system_prompt)
        tok = _load_tokenizer(tokenizer) if tokenizer else None
        evals = load_against(against, data_root) if against else None
        report = check_data(files, cfg, tokenizer=tok, against=evals, near_dup_threshold=threshold, ngram=ngram,
                            max_examples=examples)
        fixed = fix_data(files, cfg, fix, report, overwrite=overwrite) if fix is not None else None
        result = report.to_dict()
        if fixed is not None:
            result["fix"] = fixed.to_dict()
        if json_out is not None:
            atomic_write_json(json_out, result)
    except ForgetlessError as e:
        raise _fail(e) from None
    if as_json:
        print_json(result, ensure_ascii=False)
    else:
        print_report(report)
        lines = report_problems(report)
        if lines:
            out.print(f"[bold]{report.total_problems} problems:[/bold]", highlight=False)
            for line in lines:
                out.print(f"  [yellow]{line}[/yellow]", highlight=False)
        else:
            out.print("[green]no problems found[/green]")
        if fixed is not None:
            reasons = ", ".join(f"{n} {r}" for r, n in fixed.by_reason.items()) or "nothing"
            out.print(f"fix: kept {fixed.kept:,}, removed {fixed.removed:,} ({reasons}) -> {fixed.out}; "
                      f"removal log {fixed.removed_log}", highlight=False)
            if fixed.contradictions_left:
                out.print(f"fix: {len(fixed.contradictions_left)} contradictions left for you to resolve "
                          f"(first: {', '.join(fixed.contradictions_left[0][:4])})", highlight=False)
        if json_out is not None:
            out.print(f"report: {json_out}", highlight=False)
    if strict and report.total_problems:
        raise typer.Exit(code=1)


@app.command("pull")
def pull_cmd(
    suite: Annotated[str, typer.Argument(help="A built-in retention suite (general, basic-skills) or a suite "
                                              "YAML file.")],
    to: Annotated[Path, typer.Option("--to",
                                     help="Folder to write the suite's data files into (then --data-root DIR).")],
    task: Annotated[list[str] | None, typer.Option(help="Only this task (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Fetch again files that are already there.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Fetch the public datasets a retention suite reads (through `datasets`; needs the hub) and write its files."""
    from ..retention.pull import pull_suite
    from ..retention.suite import load_suite

    try:
        report = pull_suite(load_suite(suite), to, tasks=task, overwrite=overwrite)
    except ForgetlessError as e:
        raise _fail(e) from None
    if as_json:
        print_json(report)
        return
    rows = [[r["task"], r["status"],
             f"hf:{r['source']['hub']}" + (f" ({r['source']['config']})" if r["source"].get("config") else "")
             + f" [{r['source']['split']}]" + ("" if r["source"].get("verified") else " (mapping unverified)"),
             ", ".join(r["files"])] for r in report]
    out.print(_table(f"data pull {suite} -> {to}", ["task", "status", "source", "files"], rows))
    out.print(f"evaluate with --data-root {to} (or FORGETLESS_DATA={to})", highlight=False)
