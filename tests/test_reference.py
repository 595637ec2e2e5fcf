"""The README's recipe reference is generated from the recipe's pydantic models and must not go stale."""

from __future__ import annotations

from pathlib import Path

from forgetless import reference
from forgetless.methods import METHODS
from forgetless.mitigations import MITIGATIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_is_the_generated_one():
    text = README.read_text()
    assert reference.splice(text, reference.render()) == text, (
        "README.md's recipe reference is stale: run `python -m forgetless.reference --write README.md`")


def test_reference_lists_every_method_mitigation_and_option():
    block = reference.render()
    for name, cls in METHODS.items():
        assert f"`{name}` (default lr" in block
        assert all(f"| `{k}` |" in block for k in cls.model_fields if k != "name")
    for name, cls in MITIGATIONS.items():
        assert f"`{name}` (sharded:" in block
        assert all(f"| `{k}` |" in block for k in cls.config_model.model_fields if k != "name")
    assert "| `weight` | `1000.0` | float | lambda: strength of the penalty. |" in block  # ewc: default, description
    assert '| `overlong` | `"truncate"` | truncate \\| drop |' in block
