"""The README's YAML examples are copy-paste ready: every block parses (as forgetless reads YAML) and validates as
what it shows: a recipe (or a fragment of one, on a minimal recipe), a retention suite, a sweep or a sequence."""

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

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)]
#: what a fragment lacks to be a whole recipe (a guard's more_replay needs a replay mitigation to act on)
MINIMAL = {"model": "m", "data": {"train": "t.jsonl"}, "mitigations": [{"name": "replay", "data": {"train": "g"}}]}


def _kind(tree: dict) -> str:
    if "runs" in tree or "grid" in tree:
        return "sweep"
    if "tasks" in tree and "base" in tree:
        return "sequence"
    if "tasks" in tree:
        return "suite"
    assert set(tree) <= set(Recipe.model_fields), f"not a recipe: unknown keys {set(tree) - set(Recipe.model_fields)}"
    return "recipe"


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 8 and {_kind(load_yaml(b)) for b in BLOCKS} == {"recipe", "suite", "sweep", "sequence"}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"yaml-{i}" for i in range(len(BLOCKS))])
def test_every_readme_yaml_example_validates(block):
    tree = load_yaml(block)
    kind = _kind(tree)
    if kind == "recipe":
        spec = {**MINIMAL, **tree, "data": {**MINIMAL["data"], **tree.get("data", {})}}
        recipe_from_dict(spec)
    elif kind == "suite":
        Suite.model_validate(tree)
    elif kind == "sweep":
        SweepConfig.model_validate({**tree, "base": MINIMAL})
    else:
        ContinualConfig.model_validate({**tree, "base": MINIMAL})
