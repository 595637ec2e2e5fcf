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
