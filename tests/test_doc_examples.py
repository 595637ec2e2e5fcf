"""The YAML examples in the README and docs/ are copy-paste ready: every block parses (as forgetless reads YAML)
and validates as what it shows: a recipe (or a fragment of one, on a minimal recipe), a retention suite (or a list
of its tasks), a sweep or a sequence."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from forgetless.continual.sequence import ContinualConfig
from forgetless.recipe import Recipe, recipe_from_dict
from forgetless.retention.suite import Suite
from forgetless.schema import load_yaml
from forgetless.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(f"{doc.name}-{i}", textwrap.dedent(b)) for doc in DOCS
          for i, b in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S))]
#: what a fragment lacks to be a whole recipe (a guard's more_replay needs a replay mitigation to act on)
MINIMAL = {"model": "m", "data": {"train": "t.jsonl"}, "mitigations": [{"name": "replay", "data": {"train": "g"}}]}


def _kind(tree: dict | list) -> str:
    if isinstance(tree, list):
        return "suite tasks"
    if "runs" in tree or "grid" in tree:
        return "sweep"
    if "tasks" in tree and "base" in tree:
        return "sequence"
    if "tasks" in tree:
        return "suite"
    assert set(tree) <= set(Recipe.model_fields), f"not a recipe: unknown keys {set(tree) - set(Recipe.model_fields)}"
    return "recipe"


def test_the_docs_have_their_examples():
    kinds = {_kind(load_yaml(b)) for _, b in BLOCKS}
    assert len(BLOCKS) >= 14 and kinds == {"recipe", "suite", "suite tasks", "sweep", "sequence"}


@pytest.mark.parametrize("block", [b for _, b in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_every_yaml_example_validates(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files an example names and validation reads: an accelerate config
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nnum_processes: 2\nfsdp_config: {fsdp_version: 2}\n")
    tree = load_yaml(block)
    kind = _kind(tree)
    if kind == "recipe":
        spec = {**MINIMAL, **tree, "data": {**MINIMAL["data"], **tree.get("data", {})}}
        recipe_from_dict(spec)
    elif kind == "suite":
        Suite.model_validate(tree)
    elif kind == "suite tasks":
        Suite.model_validate({"name": "example", "tasks": tree})
    elif kind == "sweep":
        SweepConfig.model_validate({**tree, "base": MINIMAL})
    else:
        ContinualConfig.model_validate({**tree, "base": MINIMAL})


def _cli_lines() -> list[str]:
    """Every `forgetless ...` line in the README's code blocks (continuation lines joined, comments cut)."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            line = lines[i]
            while i + 1 < len(lines) and (line.rstrip().endswith("\\") or lines[i + 1].startswith("     ")):
                i += 1
                line = line.rstrip().removesuffix("\\") + " " + lines[i].strip()
            if line.startswith("forgetless "):
                out.append(re.split(r"\s#\s", line)[0])
            i += 1
    return out


def _commands() -> dict[str, object]:
    import typer

    from forgetless.cli import app

    found: dict[str, object] = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def test_readme_command_lines_use_real_commands_and_options():
    commands, lines = _commands(), _cli_lines()
    assert len(lines) >= 30
    for line in lines:
        words = line.split()[1:]
        name = next((n for n in sorted(commands, key=len, reverse=True) if words[: len(n.split())] == n.split()), None)
        assert name is not None, f"README: {line!r} names no forgetless command"
        opts = {o for p in commands[name].params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        unknown = [f for f in re.findall(r"(?<![\w-])(--[a-z0-9-]+)", line) if f not in opts]
        assert not unknown, f"README: {line!r}: {unknown} are not options of forgetless {name}"


def test_the_cli_reference_lists_every_command_and_option():
    text = (ROOT / "README.md").read_text()
    ref = text[text.index("## CLI reference"):text.index("## Models offline")]
    for name, cmd in _commands().items():
        assert f"forgetless {name}" in ref, f"the CLI reference lacks forgetless {name}"
        missing = [o for p in cmd.params for o in p.opts if o.startswith("--") and o != "--help" and o not in ref]
        assert not missing, f"the CLI reference lacks {missing} of forgetless {name}"
