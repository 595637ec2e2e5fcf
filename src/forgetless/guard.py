"""The forgetting budget during training: a retention monitor, a guard that acts on breaches, and the
selection of the final model among the states that stayed within budget.

monitor: every N steps the current weights are scored on a fast probe suite (default `auto`: general-probe
  where its data files are, else `self`, the base model's own answers) against the base model measured at
  step 0; the retention score, its interval and per-task significance go to metrics.jsonl and the progress
  bar. `every: auto` (the default) places the probes so that they take at most `max_share` (10%) of the
  training time: the first after AUTO_WARMUP_STEPS steps have been timed (estimated from the step-0 reference,
  which costs more than a probe), each next one from the last probe's time and the mean step time so far.
guard: when the retention drop exceeds the budget (and, by default, is significant, so noise does not
  trigger it) the next action of an ordered list is taken: lower_lr, more_replay, rollback (restore the
  last state within budget, then take the next action), stop. Every breach and action is logged.
selection: at the end the final model is the state with the best validation loss among those within
  budget (the base model if none was, said loudly); summary.json records why.

The budget, both ways: every probe records the drop's point estimate (`fl_drop`) and its 95% upper bound
(`fl_drop_upper`, 1 - the score interval's lower end), with `fl_within_budget` and `fl_within_budget_95`;
breach events and the final selection carry the same two verdicts. What the guard acts on: the point
estimate, gated by significance when `require_significant` (the default): a breach is a drop over the
budget whose interval excludes "no loss". A state is "within budget" for the selection when it had no
breach; `within_budget_95` says whether the budget also held with 95% confidence there. With a probe
whose half-width is wider than the budget, the 95% verdict is rarely yes: use a probe that resolves the
budget (more items, continuous metrics) before acting on it.

Checkpoints: every checkpoint holds the monitor's and guard's state (`forgetless_monitor/`: the base model's
reference probe and the self-reference answers it scored against, the probes and events so far, the next
action, the snapshots that rollback and the final selection restore; the base snapshot once, in
`checkpoints/guard_base.safetensors`), so a resumed run continues exactly as the uninterrupted one would: the
same reference, budget, actions and selection (more_replay's swaps are made again from the events). Not for
sharded runs (FSDP2: each rank holds slices): those, and checkpoints without the state, resume measuring
forgetting from the resumed weights, said loudly and recorded as `monitor.resumed_at`.

With several processes (DDP) every rank holds the same weights, so the retention probe runs once, on rank 0,
while the others wait; rank 0 broadcasts the probe and its breaches, and every rank then takes the same
action at the same step (lower_lr on its optimizer, more_replay on its copy of the data, rollback to its
identical snapshot, stop). The validation loss is measured by all ranks together (the Trainer shards it).
Only rank 0 writes metrics.jsonl.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from . import distributed as dist
from .config import GuardConfig, MonitorConfig
from .fingerprint import fingerprint_model
from .io import append_jsonl, atomic_write_bytes, atomic_write_json, save_safetensors
from .retention.evaluate import SuiteResult, cache_root, compare, evaluate, result_from_cache
from .retention.metrics import budget_check
from .retention.suite import probe_suite
from .retention.tasks import resolve_data_root

if TYPE_CHECKING:
    from transformers import Trainer


class _NoControl:
    should_training_stop = False
    should_log = False


@dataclass
class Snapshot:
    step: int
    weights: list[torch.Tensor]
    optimizer: dict[str, Any] | None
    val_loss: float | None = None
    within_95: bool | None = None  # the budget held with 95% confidence at this state's probe


def snapshot(params: list[torch.nn.Parameter], step: int, optimizer=None, val_loss: float | None = None) -> Snapshot:
    import copy

    opt = None
    if optimizer is not None:
        opt = copy.deepcopy({k: v for k, v in optimizer.state_dict().items()})
    # under FSDP2 each rank keeps its slice of every parameter (and its optimizer state holds its slices)
    return Snapshot(step, [dist.local(p.detach()).to("cpu", copy=True) for p in params], opt, val_loss)


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], snap: Snapshot, optimizer=None) -> None:
    for p, w in zip(params, snap.weights, strict=True):
        dist.local(p).copy_(w.to(p.device))
    if optimizer is not None and snap.optimizer is not None:
        # the moments and step counts of the snapshot, the learning rates of now: the schedule (and a lower_lr
        # taken since the snapshot) sets them, and the snapshot's would drive the next step at the old rate
        lrs = [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(snap.optimizer)
        for g, now in zip(optimizer.param_groups, lrs, strict=True):
            g.update(now)


def reshard(model: torch.nn.Module) -> None:
    """Free the whole parameters an FSDP2 forward left gathered: units that do not reshard after their forward
    (accelerate's root unit: embedding, final norm, head) keep them after an evaluation, holding that memory, and
    the next forward would use them as they are, not weights restored into the slices meanwhile."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


MONITOR_DIR = "forgetless_monitor"  # in a checkpoint: the monitor's and guard's state
BASE_SNAPSHOT = "guard_base.safetensors"  # in the checkpoints folder: the snapshot of the start, written once
MONITOR_STATE_VERSION = 1


def _save_snapshot(snap: Snapshot, path: Path) -> None:
    save_safetensors({f"p{i}": w.contiguous() for i, w in enumerate(snap.weights)}, path)
    if snap.optimizer is not None:
        import io

        buf = io.BytesIO()
        torch.save(snap.optimizer, buf)
        atomic_write_bytes(path.with_suffix(".optimizer.pt"), buf.getvalue())


def _load_snapshot(meta: dict[str, Any], path: Path) -> Snapshot:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    opt = path.with_suffix(".optimizer.pt")
    optimizer = torch.load(opt, weights_only=True) if meta.get("optimizer") else None  # tensors and numbers only
    return Snapshot(meta["step"], [tensors[f"p{i}"] for i in range(len(tensors))], optimizer, meta.get("val_loss"),
                    meta.get("within_95"))


AUTO_WARMUP_STEPS = 5  # every: auto measures this many training steps before it places the first probe


def auto_interval(probe_s: float, step_s: float, max_share: float) -> int:
    """Steps between probes so that a probe of `probe_s` seconds costs at most `max_share` of the training time
    around it, at `step_s` seconds per step: ceil(probe_s / (max_share x step_s)), at least 1."""
    return max(1, math.ceil(probe_s / (max_share * max(step_s, 1e-9))))


@dataclass
class GuardState:
    events: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_s: float = 0.0
    next_probe: int | None = None  # every: auto: the step of the next probe
    intervals: list[dict[str, Any]] = field(default_factory=list)  # every: auto: each interval and its inputs
    next_action: int = 0
    last_ok: Snapshot | None = None
    best_ok: Snapshot | None = None
    base: Snapshot | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    resumed_at: int | None = None  # the step a resumed run started from: its reference (see on_train_begin)


class MonitorCallback(TrainerCallback):
    """Probes retention every `every` steps; with a guard, acts on breaches and keeps the states to select from."""

    def __init__(self, monitor: MonitorConfig, guard: GuardConfig | None, tokenizer, metrics, metrics_path: Path,
                 bf16: bool, mitigations: list, has_validation: bool):
        self.monitor, self.guard = monitor, guard
        self.tokenizer, self.metrics, self.metrics_path = tokenizer, metrics, metrics_path
        self.bf16, self.mitigations, self.has_validation = bf16, mitigations, has_validation
        self.state = GuardState()
        # set by the run: validation at a probe, and the training set more_replay changes
        self.trainer: Trainer | None = None
        self._suite: Any = None  # the probe suite (set at the start of training)
        self._base_result: SuiteResult | None = None
        self._ref_fp = None
        self._last_breaches: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.sharded = False  # FSDP2: parameters are DTensors (set at the start of training)
        self.model: torch.nn.Module | None = None
        self._last_probe_s = 0.0  # the last probe's seconds (every: auto)
        self._train_clock = (0, 0.0, 0.0)  # (step, time, probe seconds so far) at the start of training
        self._reference_here = True  # whether this process scored the reference (not restored from a checkpoint)
        self.resume_from: Path | None = None  # set by the run: the checkpoint it resumes from
        self.checkpoints: Path | None = None  # set by the run: where the start's snapshot is kept (BASE_SNAPSHOT)

    # ------------------------------------------------------------ set before use

    @property
    def _guard_config(self) -> GuardConfig:
        if self.guard is None:
            raise RuntimeError("MonitorCallback: no guard configured (recipe.guard is None)")
        return self.guard

    @property
    def _base(self) -> Snapshot:
        if self.state.base is None:
            raise RuntimeError("MonitorCallback: no base snapshot (on_train_begin has not run)")
        return self.state.base

    @property
    def _last_ok(self) -> Snapshot:
        if self.state.last_ok is None:
            raise RuntimeError("MonitorCallback: no last state within budget (on_train_begin has not run)")
        return self.state.last_ok

    @property
    def _base_reference(self) -> SuiteResult:
        if self._base_result is None:
            raise RuntimeError("MonitorCallback: no reference result (on_train_begin has not run on this rank)")
        return self._base_result

    # ------------------------------------------------------------ probe

    def _restore(self, snap: Snapshot, optimizer=None) -> None:
        """Put a snapshot's weights (and optimizer state) back. Under FSDP2 into each rank's slices, after freeing
        any whole parameters a forward left gathered (they would be used as they are by the next forward)."""
        if self.sharded and self.model is not None:
            reshard(self.model)
        restore(self.params, snap, optimizer)

    def _probe_suite(self):
        s, why = probe_suite(self.monitor.suite, self.monitor.data_root, self.monitor.limit)
        s = s.only(self.monitor.tasks)
        if dist.is_main():
            from rich.console import Console

            Console(stderr=True).print(f"monitor: {why}", highlight=False, markup=False)
        if self.monitor.max_new_tokens:
            s = s.model_copy(update={"tasks": [
                t.model_copy(update={"max_new_tokens": self.monitor.max_new_tokens}) if t.kind == "self_reference"
                else t
                for t in s.tasks]})
        return s

    def _evaluate(self, model):
        was_training = model.training
        try:
            return evaluate(model, self.tokenizer, self._suite, data_root=self.monitor.data_root, bf16=self.bf16,
                            reference_fingerprint=self._ref_fp, progress=False)
        finally:
            model.train(was_training)
            if self.sharded:
                reshard(model)


    def _probes_here(self) -> bool:
        """Whether this rank runs the probe: rank 0 alone when every rank holds the whole model (DDP); every rank
        under FSDP2, whose forward is a collective (they score the same items; rank 0's result is used)."""
        return dist.is_main() or self.sharded

    def on_train_begin(self, args, state, control, model=None, **kw):
        t0 = time.perf_counter()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sharded = any(dist.is_sharded(p) for p in self.params)
        self.model = model
        self._suite = self._probe_suite()
        saved = None if self.resume_from is None else self.resume_from / MONITOR_DIR / "state.json"
        if state.global_step > 0 and not self.sharded and saved is not None and saved.is_file():
            self._restore_state(saved)
            self._reference_here = False
            self._train_clock = (state.global_step, time.perf_counter(), self.state.probe_s)
            return
        if self._probes_here():
            # a sharded model has no one-process fingerprint: the reference is this run's own
            fresh = state.global_step == 0 and not self.sharded
            self._ref_fp = fingerprint_model(model) if fresh else f"resumed-{id(self)}"
            # step 0 (or the resume point) is the reference: the base model's own behaviour
            self._base_result = self._evaluate(model)
        if state.global_step > 0:
            # a sharded run, or a checkpoint without the monitor's state (written by an older version): the
            # reference probe of the base model, the snapshots and the next action are not there. The run measures
            # forgetting from here, and a guard acts on that: said loudly, and recorded (monitor.resumed_at).
            self.state.resumed_at = state.global_step
            if dist.is_main():
                from rich.console import Console

                why = ("a sharded run keeps it in no checkpoint" if self.sharded
                       else f"{self.resume_from} has no {MONITOR_DIR}/ (written by an older forgetless)")
                Console(stderr=True).print(
                    f"monitor: resumed at step {state.global_step} without the monitor's state ({why}): the "
                    "retention reference is the weights at this step, not the base model, so probes measure "
                    "forgetting since here and a guard's budget counts from here. For a guarded run that must "
                    "match an uninterrupted one, train again with --overwrite.",
                    style="bold yellow", highlight=False, markup=False)
        self.state.base = snapshot(self.params, state.global_step)
        self.state.last_ok = self.state.base
        if state.global_step == 0 and self.guard is not None and not self.sharded and dist.is_main() \
                and args.save_strategy != "no" and self.checkpoints is not None:
            self.checkpoints.mkdir(parents=True, exist_ok=True)  # the start's weights, once: a resumed run's base
            _save_snapshot(self.state.base, self.checkpoints / BASE_SNAPSHOT)
        self._last_probe_s = time.perf_counter() - t0  # every: auto's first estimate (the reference costs more)
        self.state.probe_s += self._last_probe_s
        self._train_clock = (state.global_step, time.perf_counter(), self.state.probe_s)

    # ------------------------------------------------------------ checkpoints

    def _reference_entries(self) -> list[Path]:
        """The self-reference cache entries the reference probe scored against (the base's answers)."""
        from .retention.kinds.self_reference import reference_cache_entry

        if self._ref_fp is None:
            return []
        root = resolve_data_root(self.monitor.data_root)
        device = next(self.model.parameters()).device.type if self.model is not None else "cpu"
        return [reference_cache_entry(t, cache_root(), self._ref_fp, self.bf16, root, device)
                for t in self._suite.tasks if t.kind == "self_reference"]

    def save_checkpoint(self, folder: Path) -> None:
        """The monitor's and guard's state into checkpoint `folder` (rank 0; before it is marked complete)."""
        if self.sharded or self._base_result is None or not dist.is_main():
            return
        import shutil

        d = folder / MONITOR_DIR
        d.mkdir(parents=True, exist_ok=True)
        snaps: dict[str, Any] = {}
        for name in ("last_ok", "best_ok"):
            snap = getattr(self.state, name)
            if snap is None or snap is self.state.base:
                snaps[name] = None if snap is None else "base"
                continue
            file = d / f"snapshot-{snap.step}.safetensors"
            if not file.is_file():
                _save_snapshot(snap, file)
            snaps[name] = {"step": snap.step, "val_loss": snap.val_loss, "within_95": snap.within_95,
                           "optimizer": snap.optimizer is not None, "file": file.name}
        for entry in self._reference_entries():
            if entry.is_dir() and not (d / "self_reference" / entry.name).is_dir():
                shutil.copytree(entry, d / "self_reference" / entry.name)
        st = self.state
        atomic_write_json(d / "state.json", {
            "version": MONITOR_STATE_VERSION, "ref_fp": self._ref_fp, "suite": self._suite.name,
            "reference": {n: r.to_cache() for n, r in self._base_reference.tasks.items()},
            "base_step": self._base.step, "snapshots": snaps, "last_breaches": self._last_breaches,
            "last_probe_s": self._last_probe_s,
            "state": {"events": st.events, "probes": st.probes, "probe_s": st.probe_s, "next_probe": st.next_probe,
                      "intervals": st.intervals, "next_action": st.next_action, "selection": st.selection,
                      "resumed_at": st.resumed_at}})

    def _restore_state(self, path: Path) -> None:
        """Continue from a checkpoint's monitor state: the base model's reference probe (and the self-reference
        answers it scored against, put back in the cache if gone), the probes, events, next action and snapshots,
        and the training data as more_replay left it (its swaps made again, in order: they are seeded)."""
        import json
        import shutil

        saved = json.loads(path.read_text())
        if saved.get("version") != MONITOR_STATE_VERSION:
            raise RuntimeError(f"{path}: monitor state version {saved.get('version')}, this forgetless reads "
                               f"{MONITOR_STATE_VERSION}: train again with --overwrite")
        if saved["suite"] != self._suite.name:
            raise RuntimeError(f"{path}: saved for probe suite {saved['suite']!r}, the recipe's is "
                               f"{self._suite.name!r}: a resumed run keeps its recipe")
        self._ref_fp = saved["ref_fp"]
        for entry in self._reference_entries():
            kept = path.parent / "self_reference" / entry.name
            if not entry.is_dir() and kept.is_dir():
                shutil.copytree(kept, entry, dirs_exist_ok=True)
        by_name = {t.name: t for t in self._suite.tasks}
        self._base_result = SuiteResult(self._suite.name, {n: result_from_cache(d, by_name[n])
                                                           for n, d in saved["reference"].items()})
        st = saved["state"]
        self.state = GuardState(events=st["events"], probes=st["probes"], probe_s=st["probe_s"],
                                next_probe=st["next_probe"], intervals=st["intervals"],
                                next_action=st["next_action"], selection=st["selection"], resumed_at=st["resumed_at"])
        self._last_breaches = list(saved["last_breaches"])
        self._last_probe_s = saved["last_probe_s"]
        base_file = (self.checkpoints or path.parents[2]) / BASE_SNAPSHOT
        if self.guard is not None:
            if not base_file.is_file():
                raise RuntimeError(f"{base_file}: the guard's snapshot of the start is missing (needed to resume "
                                   "a guarded run): train again with --overwrite")
            self.state.base = _load_snapshot({"step": saved["base_step"]}, base_file)
        else:  # a monitor alone never restores a snapshot
            self.state.base = Snapshot(saved["base_step"], [], None)
        for name, meta in saved["snapshots"].items():
            snap = self.state.base if meta == "base" else None if meta is None else (
                self.state.last_ok if self.state.last_ok is not None and self.state.last_ok.step == meta["step"]
                else _load_snapshot(meta, path.parent / meta["file"]))
            setattr(self.state, name, snap)
        if self.state.last_ok is None:
            self.state.last_ok = self.state.base
        for ev in self.state.events:  # more_replay's swaps (and any mitigation's data action), again
            doer = next((m for m in self.mitigations if ev["guard"] in m.guard_actions), None)
            if doer is not None and "skipped" not in ev and self.trainer is not None:
                doer.guard_action(ev["guard"], self.trainer.train_dataset, self._guard_config.replay_factor)
        if self.state.probes:
            self.metrics.last.update(self.state.probes[-1])

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        every = self.monitor.every
        if every != "auto":
            if state.global_step % every == 0:
                self.probe(model, state, control, optimizer=optimizer, lr_scheduler=lr_scheduler)
            return
        step0 = self._train_clock[0]
        if self.state.next_probe is None and state.global_step - step0 >= AUTO_WARMUP_STEPS:
            self._place_next_probe(state.global_step, state.max_steps)
        if self.state.next_probe is not None and state.global_step >= self.state.next_probe:
            self.probe(model, state, control, optimizer=optimizer, lr_scheduler=lr_scheduler)
            self._place_next_probe(state.global_step, state.max_steps)

    def _place_next_probe(self, step: int, max_steps: int = 0) -> None:
        """every: auto: the next probe's step, from the last probe's time and the mean training step time so far
        (wall time less the probes'), decided on rank 0 and the same on every rank.
        At the first placement it also estimates what `max_share` does not cap: the reference probe at the start
        (step 0, or the resume point of a run resumed without the monitor's state; a reference restored from a
        checkpoint costs nothing now) and the final probe at the end, each about the reference's time, as a share
        of the training still to run (`max_steps` less the start's step, x the step time); over `max_share` it warns
        (a run too short for this probe suite)."""
        step0, t0, probes0 = self._train_clock
        train_s = (time.perf_counter() - t0) - (self.state.probe_s - probes0)
        step_s = train_s / max(1, step - step0)
        n = auto_interval(self._last_probe_s, step_s, self.monitor.max_share)
        n = dist.broadcast_object(n)
        self.state.next_probe = step + n
        record: dict[str, Any] = {"step": step, "every": n, "probe_s": round(self._last_probe_s, 3),
                                  "step_s": round(step_s, 4)}
        first = not self.state.intervals
        left = max_steps - step0
        n_fixed = 1 + self._reference_here  # the final probe, and the reference if this process scored it
        fixed = n_fixed * self._last_probe_s / (left * step_s) if first and left > 0 and step_s > 0 else None
        if fixed is not None:
            record["fixed_share"] = round(fixed, 4)
        self.state.intervals.append(record)
        if dist.is_main() and first:
            from rich.console import Console

            console = Console(stderr=True)
            console.print(
                f"monitor: every auto: a probe every {n} steps (probe about {self._last_probe_s:.1f} s, a training "
                f"step {step_s:.2f} s, probes at most {self.monitor.max_share:.0%} of the training time; "
                "re-estimated after every probe)", highlight=False, markup=False)
            if fixed is not None and fixed > self.monitor.max_share:
                which = (f"the reference probe at step {step0} and the final probe (about "
                         f"{self._last_probe_s:.0f} s each) take" if self._reference_here else
                         f"the final probe (about {self._last_probe_s:.0f} s) takes")
                console.print(
                    f"monitor: warning: {which} about {fixed:.0%} of this run's training time "
                    f"({left} steps x {step_s:.2f} s), over max_share {self.monitor.max_share:.0%}, which caps "
                    "only the probes between them: this run is short for its probe suite; a smaller one "
                    "(monitor.suite, monitor.limit) costs less", highlight=False, markup=False)

    def probe(self, model, state, control=None, optimizer=None, lr_scheduler=None, final: bool = False
              ) -> dict[str, Any] | None:
        """Score the probe suite against the reference, log it, and (with a guard) judge the budget and act: the
        optimizer and scheduler are the Trainer's, handed in by the hook (lower_lr and rollback change them; a
        guarded probe that is not `final` needs them).
        `final`: the end of training (train() calls it): only records whether the end state is within budget,
        and is skipped when this step was just probed. Returns the probe's record (the same on every rank)."""
        if final:
            last = self.state.probes[-1] if self.state.probes else None
            if last is not None and last["step"] == state.global_step:
                return last
        control = control if control is not None else _NoControl()
        t0 = time.perf_counter()

        candidate = self._evaluate(model) if self._probes_here() else None
        report = compare(self._base_reference, candidate) if candidate is not None and dist.is_main() else None
        val_loss = None
        if self.has_validation and self.trainer is not None:
            should_log = control.should_log  # evaluate() logs, and logging resets the flag: keep this step's loss line
            val_loss = self.trainer.evaluate()["eval_loss"]  # every rank: the Trainer shards and gathers it
            control.should_log = should_log
        probe: dict[str, Any] | None = None
        why: list[str] = []
        if report is not None:
            probe = {
                "step": state.global_step,
                "fl_retention": report["retention_score"],
                "fl_retention_lo": report["retention_ci"][0],
                "fl_retention_hi": report["retention_ci"][1],
                "fl_significant_drops": report["significant_drops"],
                **{f"fl_{n}_delta": t["delta"] for n, t in report["tasks"].items()},
            }
            if val_loss is not None:
                probe["eval_loss"] = val_loss
            if self.guard is not None:
                check = budget_check(report["retention_score"], report["retention_ci"], self.guard.budget)
                probe.update({"fl_drop": check["drop"], "fl_drop_upper": check["drop_upper"],
                              "fl_within_budget": check["within_budget"],
                              "fl_within_budget_95": check["within_budget_95"]})
            why = self.breaches(report) if self.guard is not None else []
        # rank 0's probe and verdict, on every rank: all of them act on the same decision at this step
        probe, why = dist.broadcast_object((probe, why))
        assert probe is not None  # rank 0 always has a report, and every rank receives rank 0's probe
        self.state.probes.append(probe)
        if dist.is_main():
            append_jsonl(self.metrics_path, {**probe, "epoch": round(state.epoch or 0, 4)})
        self.metrics.last.update(probe)
        if self.guard is not None:
            if final:  # the final probe only records whether the end state is within budget
                self._last_breaches = why
            else:
                self._guard(why, probe["fl_retention"], state, control, val_loss, optimizer, lr_scheduler)
        self._last_probe_s = time.perf_counter() - t0
        self.state.probe_s += self._last_probe_s
        return probe

    # ------------------------------------------------------------ guard

    def breaches(self, report: dict[str, Any]) -> list[str]:
        g = self._guard_config
        out = []
        drop = report["retention_drop"]
        significant = report["retention_ci"][1] < 1.0
        if drop > g.budget and (significant or not g.require_significant):
            out.append(f"retention drop {drop:.2%} > budget {g.budget:.2%}")
        for name, budget in g.per_task.items():
            t = report["tasks"].get(name)
            if t is None:
                continue
            rel = 1 - t["retention"]
            if rel > budget and (t["significant_drop"] or not g.require_significant):
                out.append(f"{name} dropped {rel:.2%} > {budget:.2%}")
        return out

    def _guard(self, why: list[str], retention: float, state, control, val_loss, optimizer, lr_scheduler) -> None:
        self._last_breaches = why
        probe = self.state.probes[-1] if self.state.probes else {}
        if not why:
            snap = snapshot(self.params, state.global_step, optimizer, val_loss)
            snap.within_95 = probe.get("fl_within_budget_95")
            self.state.last_ok = snap
            if self.state.best_ok is None or (val_loss is not None
                                              and (self.state.best_ok.val_loss is None
                                                   or val_loss <= self.state.best_ok.val_loss)):
                self.state.best_ok = snap
            return
        self._event(state.global_step, "breach", {"reasons": why, "retention": retention, "drop": probe.get("fl_drop"),
                                                  "drop_upper": probe.get("fl_drop_upper"),
                                                  "within_budget_95": probe.get("fl_within_budget_95")})
        self._act(state, control, optimizer, lr_scheduler)

    def _act(self, state, control, optimizer, lr_scheduler) -> None:
        actions = self._guard_config.actions
        if self.state.next_action >= len(actions):
            self._event(state.global_step, "stop", {"why": "no actions left"})
            control.should_training_stop = True
            return
        action = actions[self.state.next_action]
        self.state.next_action += 1
        if action == "lower_lr":
            opt, sched = optimizer, lr_scheduler
            for group in opt.param_groups:
                group["lr"] *= self._guard_config.lr_factor
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [lr * self._guard_config.lr_factor for lr in sched.base_lrs]
            self._event(state.global_step, "lower_lr",
                        {"factor": self._guard_config.lr_factor, "lr": opt.param_groups[0]["lr"]})
        elif action == "rollback":
            snap = self._last_ok
            self._restore(snap, optimizer if snap.optimizer is not None else None)
            self._event(state.global_step, "rollback", {"to_step": snap.step})
            return self._act(state, control, optimizer, lr_scheduler)  # and continue with the next action
        elif action == "stop":
            control.should_training_stop = True
            self._event(state.global_step, "stop", {})
        else:  # an action a mitigation offers (replay: more_replay)
            doer = next((m for m in self.mitigations if action in m.guard_actions), None)
            if doer is None:
                self._event(state.global_step, action, {"skipped": f"no mitigation in the recipe offers {action}"})
                return self._act(state, control, optimizer, lr_scheduler)
            if self.trainer is None:
                raise RuntimeError(f"guard action {action}: MonitorCallback.trainer is not set")
            self._event(state.global_step, action,
                        doer.guard_action(action, self.trainer.train_dataset, self._guard_config.replay_factor))

    def rollback_before(self, step: int) -> int:
        """The run diverged from `step` on: restore the newest kept state from before it (the last within budget,
        else the start) and never select a later one. Returns the step restored."""
        ok = self.state.last_ok
        snap = ok if ok is not None and ok.step < step else self._base
        self._restore(snap)
        if self.state.best_ok is not None and self.state.best_ok.step >= step:
            self.state.best_ok = snap
        self.state.last_ok = snap
        self._event(step, "rollback", {"to_step": snap.step, "why": "divergence"})
        return snap.step

    def _event(self, step: int, kind: str, info: dict[str, Any]) -> None:
        ev = {"step": step, "guard": kind, **info}
        self.state.events.append(ev)
        if dist.is_main():
            append_jsonl(self.metrics_path, ev)

    # ------------------------------------------------------------ selection

    def select_final(self, step: int) -> dict[str, Any]:
        """After the final probe (`probe(..., final=True)`): restore the chosen state into the model; returns why it
        was chosen."""
        last = self.state.probes[-1] if self.state.probes else {}
        final_within_budget = self.guard is None or not self._last_breaches
        final_val_loss = (last or {}).get("eval_loss")
        g = self.guard
        sel: dict[str, Any]
        if g is None or g.select == "last":
            sel = {"chosen_step": step, "why": "last state (guard.select: last)" if g else "no guard"}
        elif final_within_budget and (self.state.best_ok is None or final_val_loss is None
                                      or self.state.best_ok.val_loss is None
                                      or final_val_loss <= self.state.best_ok.val_loss):
            sel = {"chosen_step": step, "why": "the final state is within budget and has the best validation loss"}
        elif self.state.best_ok is not None and self.state.best_ok.step != self._base.step:
            self._restore(self.state.best_ok)
            sel = {"chosen_step": self.state.best_ok.step, "why": "best validation loss among the states within budget",
                   "val_loss": self.state.best_ok.val_loss}
        else:
            self._restore(self._base)
            what = ("the base model" if self.state.resumed_at is None
                    else f"the weights this resumed run started from (step {self.state.resumed_at})")
            sel = {"chosen_step": self._base.step,
                   "why": f"NO STATE STAYED WITHIN BUDGET: the final model is {what}", "warning": True}
        if g is not None:
            by_step = {p["step"]: p for p in self.state.probes if p}
            chosen = by_step.get(sel["chosen_step"], {})
            sel["within_budget_95"] = True if sel["chosen_step"] == self._base.step and self._base.step == 0 \
                else chosen.get("fl_within_budget_95")
            sel["drop"], sel["drop_upper"] = chosen.get("fl_drop"), chosen.get("fl_drop_upper")
            sel["acted_on"] = ("the drop's point estimate"
                               + (", breaches only where significant" if g.require_significant else "")
                               + "; within_budget_95: whether the budget held with 95% confidence at the chosen state")
        self.state.selection = sel
        return sel
