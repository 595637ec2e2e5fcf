"""The bottom of every configuration file: the strict pydantic bases, reading a YAML file into a model, and
turning a validation error into one line per problem that names the key path and the YAML line.

Recipes (`forgetless.recipe`), sweep and sequence files and retention suites are all read through here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RecipeError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true / false. YAML 1.1 (PyYAML's default) also reads
    on, off, yes, no, y and n as booleans, so `on: all` (kl's option) became the key True."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
                               for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects) with YAML 1.2's booleans (YamlLoader)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506  # a SafeLoader subclass


def compose_yaml(text: str) -> Any:
    """The node tree of YAML text (for the line numbers errors give), parsed as load_yaml parses it."""
    return yaml.compose(text, Loader=YamlLoader)


class Strict(BaseModel):
    """Unknown keys are errors; values are re-checked on assignment (the --set overrides)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoExtra(BaseModel):
    """Unknown keys are errors (values are not re-checked on assignment): retention task definitions."""

    model_config = ConfigDict(extra="forbid")


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc`, or None when the path is not in the file."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            return None
    return node.start_mark.line + 1 if node is not None else None


def valid_keys_hint(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """'; valid keys here: ...' for an unknown key at `loc` of `model`, or '' where the keys are not known."""
    for key in loc[:-1]:
        field = model.model_fields.get(str(key)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            args = getattr(ann, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None:
        return ""
    return f"; valid keys here: {', '.join(model.model_fields)}"


def format_validation_error(
    err: ValidationError,
    source: str,
    root: yaml.Node | None = None,
    what: str = "recipe",
    tags: tuple[str, ...] = (),
    hint_model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: key path, YAML line, and what is valid. `tags` are discriminator values that
    pydantic inserts into error paths (method.lora.r); they are dropped so the path matches the file. With
    `hint_model`, an unknown key's line lists the valid keys at its place in that model."""
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in tags)
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + (valid_keys_hint(hint_model, loc) if hint_model is not None else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            if loc and isinstance(loc[-1], str):
                noun = loc[-1]
            else:
                parent = loc[-2] if len(loc) > 1 else ""
                nouns: dict[int | str, str] = {"mitigations": "mitigation", "tasks": "task kind"}
                noun = nouns.get(parent, str(ctx.get("discriminator", "value")).strip("'"))
            msg = f"unknown {noun} {ctx.get('tag')!r}; valid: {ctx.get('expected_tags')}"
        elif e["type"] == "union_tag_not_found":
            msg = f"needs a {e.get('ctx', {}).get('discriminator', 'tag')} key"
        line = line_of(root, loc) if root is not None else None
        where = f" (line {line})" if line else ""
        lines.append(f"  {path}{where}: {msg}")
    return "\n".join(lines)


def load_config_file(
    path: str | Path, model: type[Any], what: str, shape: str, tags: tuple[str, ...] = (),
    error: type[Exception] = RecipeError, hint_model: type[BaseModel] | None = None,
) -> Any:
    """Read a YAML file into a pydantic model (sweep, sequence and suite files); errors (of class `error`) name
    the file, key and line. `shape` says what the top level should be (for the error when it is not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data, root = load_yaml(text), compose_yaml(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} is {shape}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(format_validation_error(e, str(path), root, what=what, tags=tags, hint_model=hint_model)) from None
