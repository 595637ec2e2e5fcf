"""The plan: one validated recipe per step, each starting from the previous step's model, with the carried
mitigations filled in and the replay buffer chosen."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import load_records
from ..errors import RecipeError
from ..mitigations import MITIGATIONS, CarryStep
from ..recipe import Recipe, base_recipe_tree, recipe_from_dict
from .sequence import ContinualConfig, TaskSpec


@dataclass
class Step:
    index: int  # 1-based
    task: TaskSpec
    recipe: Recipe
    dir: Path
    replay: list[tuple[str, Path, list[dict[str, Any]]]] = field(default_factory=list)  # (task, buffer file, records)

    @property
    def model_dir(self) -> Path:
        """The model the next step starts from: the weights, or the adapter merged into them."""
        return self.dir / ("merged" if self.recipe.method.peft and self.recipe.train.merge else "final")


def resolve_path(p: str, folder: Path) -> str:
    """`p` relative to the sequence file's folder where a file is there, else as given."""
    q = Path(p)
    return str(folder / q) if not q.is_absolute() and (folder / q).is_file() else p


def select_buffer(sizes: list[int], policy: str, per_task: int, size: int, seed: int) -> list[list[int]]:
    """Which examples of each earlier task the replay buffer keeps (indices, per task).

    quota: min(per_task, n) of each task, a fixed-seed sample per task (a task's share never changes as more
    tasks arrive). reservoir: reservoir sampling (algorithm R) of `size` over the stream of all earlier
    tasks' examples in order, so every example seen so far is equally likely to be kept."""
    if policy == "quota":
        return [sorted(random.Random(seed * 1_000_003 + k).sample(range(n), min(per_task, n)))
                for k, n in enumerate(sizes)]
    rng = random.Random(seed)
    buf: list[tuple[int, int]] = []
    seen = 0
    for k, n in enumerate(sizes):
        for i in range(n):
            if len(buf) < size:
                buf.append((k, i))
            else:
                r = rng.randrange(seen + 1)
                if r < size:
                    buf[r] = (k, i)
            seen += 1
    return [sorted(i for kk, i in buf if kk == k) for k in range(len(sizes))]


def _train_records(recipe: Recipe) -> list[dict[str, Any]]:
    recs = load_records(recipe.data.train, recipe.data.split)
    recs = recs[: recipe.data.limit] if recipe.data.limit else recs
    return [r.data for r in recs]


def _carry_mitigations(cfg: ContinualConfig, i: int, prev: list[Step],
                       buffer: list[tuple[str, Path, dict]]) -> list[dict[str, Any]]:
    """The carried mitigations' configs for step i (each mitigation's `carry` decides; forgetless.mitigations)."""
    step = CarryStep(index=i, previous=[s.dir for s in prev],
                     previous_data=[s.recipe.data.model_dump(mode="json") for s in prev],
                     buffer=[d for _, _, d in buffer])
    out = []
    for entry in cfg.carried():
        options = {k: v for k, v in entry.items() if k != "name"}
        made = MITIGATIONS[entry["name"]].carry(options, step)
        if made is not None:
            out.append(made)
    return out


def _buffer_spec(cfg: ContinualConfig) -> dict[str, Any] | None:
    """Which earlier tasks' examples to keep, if a carried mitigation replays them (replay's buffer options)."""
    for entry in cfg.carried():
        spec = MITIGATIONS[entry["name"]].carry_buffer(entry)
        if spec is not None:
            return spec
    return None


def plan(cfg: ContinualConfig, folder: Path, out: Path, where: str = "sequence") -> list[Step]:
    """Every step's recipe, validated up front (data files are read for the replay buffer)."""
    base, source = base_recipe_tree(cfg.base if isinstance(cfg.base, dict) else resolve_path(cfg.base, folder),
                                    f"{where}: base")
    clash = sorted({m if isinstance(m, str) else m.get("name") for m in base.get("mitigations") or []}
                   & {e.name for e in cfg.carry})
    if clash:
        raise RecipeError(f"{where}: carry.{clash[0]} and a {clash[0]} mitigation in the base recipe: keep one (carry: "
                          "hands it from step to step)")
    steps: list[Step] = []
    records: list[list[dict[str, Any]]] = []
    for i, task in enumerate(cfg.tasks, 1):
        label = f"{where} tasks[{i - 1}] ({task.name})"
        run_dir = out / "steps" / f"{i}-{task.name}"
        tree = copy.deepcopy(base)
        data = {k: v for k, v in (tree.get("data") or {}).items()
                if k not in ("train", "validation", "validation_fraction")}
        tree["data"] = {**data, **task.data}
        if steps:
            model = tree.get("model")
            tree["model"] = {**(model if isinstance(model, dict) else {}), "name": str(steps[-1].model_dir.resolve())}
        tree["name"] = f"{i}-{task.name}"
        tree["train"] = {**(tree.get("train") or {}), "output_dir": str(run_dir)}
        overrides = [f"{k}={json.dumps(v)}" for k, v in task.set.items()]
        probe = recipe_from_dict(tree, overrides, source=label)
        method = probe.method
        if method.peft and method.can_merge():
            # the next step starts from the merged weights; this step's adapter stays in final/
            tree["train"]["merge"] = True
        elif method.peft and i < len(cfg.tasks):
            raise RecipeError(f"{label}: method {method.name!r} cannot be merged into the weights, so the next "
                              "step cannot start from it; use full, freeze, lora, dora, qlora, ia3 or adapter with "
                              "activation: identity")
        buffer: list[tuple[str, Path, dict]] = []
        keep: list[tuple[str, Path, list[dict[str, Any]]]] = []
        spec = _buffer_spec(cfg)
        if spec is not None and i >= 2:
            chosen = select_buffer([len(x) for x in records], spec["policy"], spec["per_task"], spec["size"],
                                   spec["seed"])
            for prev, recs, idx in zip(steps, records, chosen, strict=True):
                if not idx:
                    continue
                path = (out / "replay" / f"step-{i}" / f"{prev.index}-{prev.task.name}.jsonl").resolve()
                d = prev.recipe.data.model_dump(mode="json")
                d.update({"train": str(path), "validation": None, "validation_fraction": 0.0, "limit": None,
                          "split": "train", "self_distill": None})  # the kept examples as they were written
                buffer.append((prev.task.name, path, d))
                keep.append((prev.task.name, path, [recs[k] for k in idx]))
        tree["mitigations"] = list(tree.get("mitigations") or []) + _carry_mitigations(cfg, i, steps, buffer)
        recipe = recipe_from_dict(tree, overrides, source=label)
        steps.append(Step(i, task, recipe, run_dir, keep))
        if spec is not None and i < len(cfg.tasks):
            records.append(_train_records(recipe))
    return steps
