"""The recipe: one YAML file, validated by these pydantic models.

These models (with `config.py` and the mitigation configs in `mitigations/`) are the single source of
truth for every option and its default. The CLI and the run directory read them; nothing else
re-declares defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from . import schema
from .config import (  # noqa: F401 (re-exported)
    FORMAT_FIELDS,
    OPTIONAL_FIELDS,
    DataConfig,
    DataFormat,
    DeepSpeedOptions,
    FsdpOptions,
    GuardConfig,
    ModelConfig,
    MonitorConfig,
)
from .distributed import read_accelerate_config
from .errors import RecipeError
from .methods import METHOD_NAMES, METHODS, MethodConfig
from .mitigations import MITIGATION_NAMES, MITIGATIONS, Mitigation, MitigationConfig
from .schema import Strict, compose_yaml, load_yaml

# ---------------------------------------------------------------- methods

#: The recipe's `method:`: one of the registered methods (forgetless.methods, one file each).
Method = MethodConfig
#: Discriminator values pydantic puts into a recipe's error paths (method.lora.r): dropped from the messages.
RECIPE_TAGS = METHOD_NAMES + MITIGATION_NAMES


# ---------------------------------------------------------------- optimisation


#: optim.warmup_ratio when neither warmup_steps nor warmup_ratio is set
DEFAULT_WARMUP_RATIO = 0.03


class OptimConfig(Strict):
    optimizer: Literal["adamw"] = "adamw"
    lr: float | None = Field(None, gt=0, description="Peak learning rate. None: the method's default.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decay (toward zero, not toward the pretrained weights: see l2sp)."
    )
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (exclusive with warmup_ratio).")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of all steps. Default 0.03.")
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    eval_batch_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _warmup(self) -> OptimConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must each be in [0, 1)")
        return self


# ---------------------------------------------------------------- training run


class EarlyStopping(Strict):
    patience: int = Field(3, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest drop in validation loss that counts.")


_ENGINE_SHORTHANDS: dict[str, dict[str, Any]] = {
    "ddp": {"engine": "ddp"},
    "fsdp": {"engine": "fsdp"},
    "deepspeed": {"engine": "deepspeed"},
    "zero2": {"engine": "deepspeed", "deepspeed": {"stage": 2}},
    "zero3": {"engine": "deepspeed", "deepspeed": {"stage": 3}},
}


class DistributedConfig(Strict):
    """Multi-process training, used when the run is launched with `torchrun --nproc_per_node N` or `accelerate
    launch` (a single process ignores it). `distributed: fsdp | zero2 | zero3 | ddp | path/to/accelerate.yaml`
    is short for the engine (or the accelerate config) alone."""

    engine: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: data parallel, a whole model per process (CPU or GPU); fsdp: sharded (FSDP2; GPUs or "
        "CPUs); deepspeed: ZeRO-2/3 (GPUs or CPUs)."
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (from `accelerate config`): its distributed_type and fsdp/deepspeed "
        "settings choose the engine and its options."
    )
    fsdp: FsdpOptions | None = Field(None, description="FSDP options (engine: fsdp; defaults when absent).")
    deepspeed: DeepSpeedOptions | None = Field(None, description="DeepSpeed ZeRO options (engine: deepspeed; ZeRO-2 "
                                                                 "when absent).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Process-group backend. auto: nccl on GPUs, "
                                                                         "gloo on CPUs.")
    find_unused_parameters: bool | None = Field(
        None, description="DDP's find_unused_parameters. None: the Trainer's choice (off with gradient checkpointing)."
    )
    timeout_s: int | None = Field(None, gt=0,
                                  description="Collective timeout (the Trainer's ddp_timeout, default 1800 s).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v in _ENGINE_SHORTHANDS:
                return dict(_ENGINE_SHORTHANDS[v])
            if v.endswith((".yaml", ".yml", ".json")):
                return {"accelerate_config": v}
            raise ValueError(f"{v!r}: write one of {', '.join(_ENGINE_SHORTHANDS)}, an accelerate config file (.yaml), "
                             "or a mapping (engine:, fsdp:, deepspeed:, ...)")
        if isinstance(v, dict) and "engine" not in v:
            if v.get("fsdp") is not None and v.get("deepspeed") is None:
                v = {**v, "engine": "fsdp"}
            elif v.get("deepspeed") is not None and v.get("fsdp") is None:
                v = {**v, "engine": "deepspeed"}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DistributedConfig:
        if self.fsdp is not None and self.deepspeed is not None:
            raise ValueError("fsdp and deepspeed options both set; pick one engine")
        if self.fsdp is not None and self.engine != "fsdp":
            raise ValueError(f"fsdp: FSDP options, but engine is {self.engine}; set engine: fsdp or drop them")
        if self.deepspeed is not None and self.engine != "deepspeed":
            raise ValueError(f"deepspeed: DeepSpeed options, but engine is {self.engine}; set engine: deepspeed or "
                             "drop them")
        if self.accelerate_config is not None:
            opts = read_accelerate_config(self.accelerate_config)  # ValueError names the file and the setting
            try:
                found = DistributedConfig.model_validate(opts)
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"accelerate_config {self.accelerate_config}: {problems}") from None
            # The file decides; options written beside it must say the same (as in a saved recipe.yaml).
            for key in ("engine", "fsdp", "deepspeed"):
                mine, theirs = getattr(self, key), getattr(found, key)
                if key in self.model_fields_set and mine != theirs:
                    raise ValueError("accelerate_config decides the engine and its options, and "
                                     f"{self.accelerate_config} says {key}: {theirs!r}, not {mine!r}; drop {key} (or "
                                     "drop accelerate_config)")
                self.__dict__[key] = theirs  # filled in (no re-validation): recipe.yaml records what ran
        return self


ReportTo = Literal["none", "tensorboard", "wandb", "mlflow"]


def _no_reporting() -> list[ReportTo]:
    return ["none"]


class TrainConfig(Strict):
    output_dir: str | None = Field(None, description="Run directory. Default: runs/<recipe name>.")
    seed: int = 42
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast compute with fp32 master weights. auto: bf16 where it is measurably "
        "faster on this device (a timed probe on CPU, cached; bf16 support on CUDA), else fp32. true on a CPU "
        "without native bf16 runs (far slower) and warns.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA, else Apple MPS (untested here), else the CPU.")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch (default: torch's choice).")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Validate every N steps (default: once at the end).")
    save_steps: int | None = Field(200, gt=0, description="Checkpoint every N steps (null: only at the end).")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept.")
    early_stopping: EarlyStopping | None = None
    report_to: list[ReportTo] = Field(default_factory=_no_reporting)
    gradient_checkpointing: bool = False
    merge: bool = Field(False, description="Also save a merged model (PEFT methods that allow it).")
    progress: bool = Field(True, description="Show a progress bar.")
    report: bool = Field(True, description="Write report.html at the end (training curves, layer drift; see "
                                           "`forgetless report`): `forgetless train`, sweeps and sequences do; from "
                                           "Python, train(recipe, report=forgetless.report.write_report).")
    divergence_factor: float | None = Field(
        10.0, gt=1, description="Stop the run (exit code 2, last good checkpoint kept) when a step's training loss is "
        "above this multiple of the first logged training loss (taken as at least 1.0); a non-finite loss or gradient "
        "always stops it. null: only the non-finite check. See docs/reliability.md.")
    distributed: DistributedConfig | None = Field(
        None, description="Multi-process options (torchrun / accelerate launch): engine ddp, fsdp or deepspeed, or an "
        "accelerate config."
    )

    @model_validator(mode="before")
    @classmethod
    def _report_to_str(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("report_to"), str):
            v = {**v, "report_to": [v["report_to"]]}
        return v


# ---------------------------------------------------------------- recipe


class Recipe(Strict):
    name: str = Field("run", description="Run name; also the default run directory under runs/.")
    model: ModelConfig
    data: DataConfig
    method: Method = Field(default_factory=METHODS["full"])
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mitigations: list[MitigationConfig] = Field(
        default_factory=list,
        description=f"Defences against forgetting, composed in order: {', '.join(MITIGATION_NAMES)}."
    )
    monitor: MonitorConfig | None = Field(None, description="Probe retention during training (see guard).")
    guard: GuardConfig | None = Field(None, description="Keep training inside a forgetting budget (implies monitor).")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, v: Any) -> Any:
        """`method: lora` and `mitigations: [l2sp]` are short for `{name: ...}`."""
        if isinstance(v, dict) and isinstance(v.get("method"), str):
            v = {**v, "method": {"name": v["method"]}}
        if isinstance(v, dict) and isinstance(v.get("mitigations"), list):
            v = {**v, "mitigations": [{"name": m} if isinstance(m, str) else m for m in v["mitigations"]]}
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.train.merge and self.method.peft and not self.method.can_merge():
            raise ValueError(f"train.merge: method {self.method.name!r} cannot be merged: "
                             f"{self.method.unmergeable_why}")
        names = [m.name for m in self.mitigations]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"mitigations: {', '.join(sorted(dup))} listed twice; combine their options into "
                             "one entry")
        if self.method.moves_base:
            # kl and self_replay read the base behind disabled adapters; olora's penalties pull the adapter (which
            # now holds part of the base) toward zero and away from earlier adapters' directions
            needs = [f"mitigations.{m.name}" for m in self.mitigations if m.name in ("kl", "self_replay", "olora")]
            needs += ["data.self_distill"] if self.data.self_distill is not None else []
            if needs:
                raise ValueError(f"{needs[0]}: not supported with method.init {getattr(self.method, 'init', '?')} "
                                 "(the base model "
                                 "is no longer the model with adapters disabled: part of it moved into the adapter); "
                                 "use init default or gaussian")
        sd = self.data.self_distill
        if sd is not None and sd.mode == "on_policy":
            if "kl" in names:
                raise ValueError("mitigations.kl: not combined with data.self_distill mode on_policy (the training "
                                 "examples are prompts only: the KL term would score no response)")
            if self.data.packing:  # (format text is refused by DataConfig, for both modes)
                raise ValueError("data.self_distill mode on_policy needs one prompt per example: not data.packing")
        for m in self.mitigations:
            MITIGATIONS[m.name].check_recipe(m, self)
            for key in type(m).model_fields:  # type: ignore[attr-defined]  # each is a pydantic model
                # data sets a mitigation reads: self_distill is for data.train only
                for d in (lambda v: v if isinstance(v, list) else [v])(getattr(m, key)):
                    if isinstance(d, DataConfig) and d.self_distill is not None:
                        raise ValueError(f"mitigations.{m.name}.{key}.self_distill: only the training data "
                                         "(data.self_distill) is rewritten")
        if self.guard is not None and self.monitor is None:
            self.monitor = MonitorConfig()
        for action in self.guard.actions if self.guard else []:
            offered = sorted(n for n, c in MITIGATIONS.items() if action in c.guard_actions)
            if offered and not set(offered) & set(names):
                raise ValueError(f"guard.actions: {action} needs a {' or '.join(offered)} mitigation")
        if self.train.early_stopping and not self.train.eval_steps:
            raise ValueError("train.early_stopping needs train.eval_steps (how often to validate)")
        return self

    def mitigation_classes(self) -> list[type[Mitigation]]:
        """The registered class of each of this recipe's mitigations, in order."""
        return [MITIGATIONS[m.name] for m in self.mitigations]

    @staticmethod
    def shardable_names(kind: Literal["methods", "mitigations"]) -> list[str]:
        """The registered methods or mitigations that run on sharded parameters (FSDP2)."""
        registry: dict[str, Any] = METHODS if kind == "methods" else MITIGATIONS
        return [n for n, c in registry.items() if c.shardable]

    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else self.method.default_lr

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    def resolved(self) -> dict[str, Any]:
        """The recipe with the defaults applied at run time filled in (learning rate, warmup, eval batch size,
        run directory), as written to the run directory."""
        out = self.model_dump(mode="json")
        o = out["optim"]
        o["lr"] = self.lr
        if o["warmup_steps"] is None and o["warmup_ratio"] is None:
            o["warmup_ratio"] = DEFAULT_WARMUP_RATIO
        o["eval_batch_size"] = o["eval_batch_size"] or o["batch_size"]
        out["train"]["output_dir"] = str(self.output_dir)
        return out


# ---------------------------------------------------------------- loading and errors


def format_validation_error(
    err: ValidationError,
    source: str = "recipe",
    root: yaml.Node | None = None,
    what: str = "recipe",
    tags: tuple[str, ...] = RECIPE_TAGS,
) -> str:
    """One line per problem: key path, YAML line, and what is valid (forgetless.schema); an unknown key in a
    recipe also lists the valid keys at its place."""
    return schema.format_validation_error(err, source, root, what=what, tags=tags,
                                          hint_model=Recipe if what == "recipe" else None)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in the tree (missing mappings are made, a name alone becomes {name: ...}); a number indexes a
    list (`mitigations.0.weight`)."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, k in enumerate(keys):
        key: int | str = k
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"--set {dotted}: {'.'.join(keys[:depth]) or 'the recipe'} is a list of "
                                  f"{len(node)}: {k!r} is not an index in it (0 to {len(node) - 1})")
            key = int(k)
        if depth == len(keys) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(key, int) else node.get(key)
        if child is None or isinstance(child, str):
            child = node[key] = {} if child is None else {"name": child}
        node = child


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """`optim.lr=1e-5` -> ("optim.lr", 1e-05); values are parsed as YAML scalars/lists."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=1e-5")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: value is not valid YAML: {e}") from None
        # YAML 1.1 reads 1e-5 as a string; accept it as a number
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def recipe_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "recipe", root: yaml.Node | None = None
) -> Recipe:
    tree = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source, root)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe; errors name the file, the key path and the line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        root = compose_yaml(text)
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (model:, data:, method:, ...)")
    return recipe_from_dict(data, overrides, source=str(path), root=root)


def base_recipe_tree(base: dict[str, Any] | str | Path, label: str) -> tuple[dict[str, Any], str]:
    """The raw mapping of a `base:` recipe (sweep and sequence files), given inline or as a file path already
    resolved against its folder, and the name errors of the recipes built from it should give."""
    if isinstance(base, dict):
        return copy.deepcopy(base), label
    path = Path(base)
    if not path.is_file():
        raise RecipeError(f"{label}: recipe file {path} not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    return data, str(path)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def load_config_file(
    path: str | Path, model: type[Any], what: str, shape: str, tags: tuple[str, ...] | None = None,
    error: type[Exception] = RecipeError,
) -> Any:
    """forgetless.schema.load_config_file with the recipe's discriminator tags (method and mitigation names)
    dropped from error paths unless `tags` says otherwise."""
    return schema.load_config_file(path, model, what, shape, tags=RECIPE_TAGS if tags is None else tags, error=error,
                                   hint_model=Recipe if what == "recipe" else None)
