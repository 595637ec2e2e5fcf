"""replay: mix general data into training at a ratio, by examples or by tokens, deterministically.

`ratio` is the replay share of the mixed training stream (0.05 = 5% replay). Replay examples are spread
evenly through the task examples (the Trainer then shuffles with the run's seed) and carry a flag so
other mitigations (kl with `on: replay`) can tell them apart. Keep replay data disjoint from the
retention probes you measure with.

With several processes every rank builds the same mixed stream (the same seeded draws, checked by a
digest before training) and the Trainer's distributed sampler gives each position of it to exactly one
rank per epoch: nothing is replayed twice or lost across ranks. `raise_ratio` is deterministic too, so the
guard's more_replay, taken by every rank at the same step, swaps the same positions everywhere.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..config import DataConfig
from ..errors import DataError
from ..schema import Strict
from .base import CarryStep, Mitigation, TrainContext, register
from .data import count_tokens, examples_from, sample


class ReplayBuffer(Strict):
    """Which earlier tasks' examples a continual sequence keeps for replay (only when replay is carried)."""

    policy: Literal["quota", "reservoir"] = Field(
        "quota",
        description="quota: per_task examples of every earlier task; reservoir: one buffer of `size` over all of them."
    )
    per_task: int = Field(50, gt=0, description="quota: examples kept from each earlier task.")
    size: int = Field(200, gt=0, description="reservoir: examples in the buffer.")


class ReplayConfig(Strict):
    name: Literal["replay"] = "replay"
    data: DataConfig | None = Field(None, description="The general data set: `train:` file(s) and its format, like "
                                    "the task's `data:`. Required, except when carried in a continual sequence "
                                    "(the earlier tasks' kept examples are the data).")
    extra_data: list[DataConfig] = Field(
        default_factory=list, description="More data sets, each with its own format, replayed from the same pool "
        "(`forgetless continual` replays every earlier task this way)."
    )
    ratio: float = Field(0.05, gt=0, lt=1, description="Replay share of the training stream (0.2 by default when "
                         "carried in a continual sequence).")
    by: Literal["examples", "tokens"] = Field("examples", description="Count the ratio in examples or in tokens.")
    seed: int = Field(0, description="Seed of the replay draw.")
    buffer: ReplayBuffer | None = Field(None, description="Continual sequences only (carry:): which earlier tasks' "
                                        "examples are kept; default quota of 50 per task.")

    carried: ClassVar[bool] = False  # true for a continual sequence's carry: entry (forgetless.continual)

    @model_validator(mode="after")
    def _needs_data(self) -> ReplayConfig:
        carried = type(self).carried
        if self.data is None and not carried:
            raise ValueError("replay needs data: (the general data set to mix in: train: file(s) and format)")
        if self.buffer is not None and not carried:
            raise ValueError("buffer: applies only when replay is carried in a continual sequence (carry:)")
        return self


def interleave(task: list[dict], extra: list[dict]) -> list[dict]:
    """Spread `extra` evenly through `task`, keeping both orders."""
    keyed = [((i + 0.5) / len(task), 0, e) for i, e in enumerate(task)]
    keyed += [((j + 0.5) / len(extra), 1, e) for j, e in enumerate(extra)]
    return [e for _, _, e in sorted(keyed, key=lambda k: (k[0], k[1]))]


@register(ReplayConfig)
class Replay(Mitigation):
    name = "replay"
    marks_replay = True
    guard_actions = ("more_replay",)
    carry_fills: ClassVar[tuple[str, ...]] = ("data", "extra_data")
    carry_defaults: ClassVar[dict[str, Any]] = {"ratio": 0.2}

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any] | None:
        """From step 2: the kept examples of every earlier task (the buffer) replayed at `ratio`."""
        if step.index < 2 or not step.buffer:
            return None
        opts = {k: v for k, v in options.items() if k != "buffer"}
        return {"name": cls.name, **opts, "data": step.buffer[0], "extra_data": step.buffer[1:]}

    @classmethod
    def carry_buffer(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {**ReplayBuffer().model_dump(), **(options.get("buffer") or {}), "seed": options.get("seed", 0)}

    def __init__(self, config: ReplayConfig):
        super().__init__(config)
        self.pool: list[dict] = []
        self.ratio = config.ratio

    def setup(self, ctx: TrainContext) -> None:
        assert self.config.data is not None  # ReplayConfig requires it outside a sequence's carry:
        sets = [(self.config.data, "mitigations.replay.data")]
        sets += [(d, f"mitigations.replay.extra_data[{i}]") for i, d in enumerate(self.config.extra_data)]
        self.pool = [{**e, "replay": True} for d, where in sets for e in examples_from(d, ctx, where)]

    def replay_examples(self, task: list[dict], ratio: float) -> list[dict]:
        want = ratio / (1 - ratio)
        if self.config.by == "examples":
            n = round(want * len(task))
            if n == 0:
                raise DataError(f"mitigations.replay: ratio {ratio:g} of {len(task)} training examples rounds to no "
                                "replay example at all; raise the ratio, or count it in tokens (by: tokens)")
            return sample(self.pool, n, self.config.seed)
        budget = want * count_tokens(task)
        chosen, tokens = [], 0
        for e in sample(self.pool, 10 * len(self.pool) + len(task), self.config.seed):
            if tokens >= budget:
                break
            chosen.append(e)
            tokens += len(e["input_ids"])
        return chosen

    def prepare_data(self, ctx: TrainContext, train: list[dict]) -> list[dict]:
        extra = self.replay_examples(train, self.ratio)
        self.notes.update({"replay_examples": len(extra), "replay_tokens": count_tokens(extra),
                           "task_tokens": count_tokens(train)})
        return interleave(train, extra)

    def guard_action(self, action: str, dataset: list[dict], factor: float) -> dict[str, Any]:
        """more_replay: see raise_ratio."""
        if action != "more_replay":
            return super().guard_action(action, dataset, factor)
        return {"ratio": self.raise_ratio(dataset, factor)}

    def raise_ratio(self, dataset: list[dict], factor: float) -> float:
        """Raise the replay share mid-run (the guard's more_replay) by swapping task examples for replay ones
        in place: the dataset keeps its length, so the Trainer's sampler stays valid. Returns the new ratio."""
        import random

        new = min(0.5, self.ratio * factor)
        task_idx = [i for i, e in enumerate(dataset) if not e.get("replay")]
        rng = random.Random(self.config.seed + 1)
        if self.config.by == "tokens":  # the share in tokens: swap until the replay tokens reach it
            total, rep = count_tokens(dataset), count_tokens([e for e in dataset if e.get("replay")])
            order = rng.sample(task_idx, len(task_idx))
            for i, e in zip(order, sample(self.pool, len(order), self.config.seed + 2), strict=True):
                if rep >= new * total:
                    break
                total += len(e["input_ids"]) - len(dataset[i]["input_ids"])
                rep += len(e["input_ids"])
                dataset[i] = e
            reached = rep / total if total else 0.0
        else:
            want = round(new * len(dataset)) - (len(dataset) - len(task_idx))
            swap = rng.sample(task_idx, max(0, min(want, len(task_idx))))
            for i, e in zip(swap, sample(self.pool, len(swap), self.config.seed + 2), strict=True):
                dataset[i] = e
            reached = sum(1 for e in dataset if e.get("replay")) / len(dataset) if dataset else 0.0
        self.ratio = new
        self.notes["ratio_raised_to"] = new
        self.notes["ratio_reached"] = round(reached, 4)  # in the unit of `by`, as the dataset now holds it
        return new
