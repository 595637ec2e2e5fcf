"""The sequence file: a base recipe, the tasks in training order, and what is carried from step to step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union

from pydantic import Field, field_validator, model_validator

from ..config import DataConfig, EvalPrecisionOptions
from ..mitigations import MITIGATION_NAMES, MITIGATIONS, Mitigation
from ..orchestration import safe_name
from ..recipe import load_config_file
from ..schema import Strict

if TYPE_CHECKING:
    from ..mitigations.base import MitigationOptions


class TaskSpec(Strict):
    name: str = Field(description="Task name (its step directory is steps/<i>-<name>).")
    data: dict[str, Any] = Field(description="The task's data: train, validation and any data option, over the base "
                                             "recipe's data:.")
    set: dict[str, Any] = Field(default_factory=dict, description="Recipe overrides for this step (dotted keys).")
    eval: str = Field("auto",
                      description="auto: reference likelihood of data.validation; or a suite (file or built-in name).")
    eval_task: str | None = Field(None, description="Which task of the eval suite (default: its first).")
    metric: str | None = Field(None,
                               description="Which metric of the eval task is the score (default: its main metric).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return safe_name(v, "task")

    @field_validator("data")
    @classmethod
    def _data_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(DataConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown data key(s) {', '.join(unknown)}; valid: {', '.join(DataConfig.model_fields)}")
        if "train" not in v:
            raise ValueError("needs train: (the task's training data)")
        return v


def _carried_model(cls: type[Mitigation]) -> type[Strict]:
    """The mitigation's own config as a `carry:` entry: the keys the sequence fills are refused, the mitigation's
    carried defaults apply, and `carried` is true (replay then needs no data: of its own)."""

    class Carried(cls.config_model):  # type: ignore[name-defined,misc]
        carried: ClassVar[bool] = True

        @model_validator(mode="before")
        @classmethod
        def _carry_before(cls_, v: Any) -> Any:
            if isinstance(v, dict):
                filled = sorted(set(v) & set(cls.carry_fills))
                if filled:
                    raise ValueError(f"{filled[0]}: filled in by the sequence for every step; leave it out")
                v = {**cls.carry_defaults, **v}
            return v

    Carried.__name__ = Carried.__qualname__ = f"{cls.config_model.__name__}Carried"
    return Carried


_CARRIED = {n: _carried_model(c) for n, c in MITIGATIONS.items() if c.carryable()}
if TYPE_CHECKING:  # the type checker sees what every mitigation config offers
    CarriedConfig = MitigationOptions
else:
    _carried_union = Union[tuple(_CARRIED.values())]  # noqa: UP007 (built at run time)
    CarriedConfig = Annotated[_carried_union, Field(discriminator="name")]


def _carry_shorthands(v: Any) -> Any:
    """`carry: [ewc, {name: replay, ratio: 0.2}]`; the older mapping form (`{ewc: {...}, replay: true, si: null}`,
    as sequence.yaml files of 0.1 hold it) is read too, replay's policy / per_task / size moving under buffer:."""
    if isinstance(v, dict):
        bad = sorted(k for k, x in v.items() if not isinstance(x, (dict, bool)) and x is not None)
        if bad:
            raise ValueError(f"{bad[0]}: a mapping of options, true or null")
        # 0.1 handed them on in this fixed order, whatever the file's: keep it (mitigations compose in order)
        legacy = ("ewc", "si", "kl", "replay", "olora")
        keys = sorted(v, key=lambda k: legacy.index(k) if k in legacy else len(legacy))
        v = [{"name": k, **({} if v[k] is True else v[k])} for k in keys if v[k] not in (None, False)]
        for e in v:
            if e["name"] == "replay" and {"policy", "per_task", "size"} & set(e):
                e["buffer"] = {k: e.pop(k) for k in ("policy", "per_task", "size") if k in e}
    if isinstance(v, list):
        v = [{"name": e} if isinstance(e, str) else e for e in v]
        names: list[Any] = [e.get("name") for e in v if isinstance(e, dict)]
        for n in names:
            if n is not None and n not in _CARRIED:
                raise ValueError(f"{n!r} cannot be carried from step to step (carried: {', '.join(_CARRIED)})")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{dup[0]} listed twice")
    return v


class ContinualConfig(EvalPrecisionOptions):
    name: str = "continual"
    base: dict[str, Any] | str = Field(description="The base recipe: a mapping, or a recipe YAML path (relative to the "
                                                   "sequence file).")
    tasks: list[TaskSpec] = Field(min_length=1, description="The tasks, in training order.")
    carry: list[CarriedConfig] = Field(
        default_factory=list, description="Mitigations handed from step to step: a list of mitigation configs "
        "(names or {name: ..., options}); each mitigation fills what only the sequence knows (the previous step's "
        "Fisher, importance, adapters or examples).")

    @field_validator("carry", mode="before")
    @classmethod
    def _carry(cls, v: Any) -> Any:
        return _carry_shorthands(v)

    def carried(self) -> list[dict[str, Any]]:
        """The carry: entries as option mappings (without what the sequence fills)."""
        return [e.model_dump(mode="json", exclude=set(MITIGATIONS[e.name].carry_fills)) for e in self.carry]

    def dump(self) -> dict[str, Any]:
        """The sequence as written to sequence.yaml (carry: without what the sequence fills, so it reads back)."""
        return {**self.model_dump(mode="json"), "carry": self.carried()}
    retention_suite: str | None = Field("self", description="What must not be forgotten (built-in name or suite file); "
                                                            "null: none.")
    limit: int | None = Field(None, gt=0, description="At most this many items per evaluation task.")
    data_root: str | None = Field(None, description="Folder the suites' data paths are relative to.")
    output_dir: str | None = Field(None, description="Sequence directory. Default: continual/<name>.")

    @model_validator(mode="after")
    def _unique(self) -> ContinualConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self


def load_continual(path: str | Path) -> tuple[ContinualConfig, Path]:
    """Read and validate a sequence file; errors name the file, key and line. Returns (config, its folder)."""
    cfg = load_config_file(path, ContinualConfig, "sequence", "a YAML mapping with base: and tasks:",
                           tags=MITIGATION_NAMES)
    return cfg, Path(path).parent
