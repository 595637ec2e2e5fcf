"""The forgetting budget on the model organism: monitor probes, guard actions, rollback, selection."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from forgetless.recipe import recipe_from_dict
from forgetless.testing import task_loss
from forgetless.train import load_model, train


@pytest.fixture(scope="module")
def probe_suite(organism, tmp_path_factory):
    """Retention probe: the likelihood of the organism's task-A answers after their prompts (what fine-tuning on
    B makes it forget). Not the perplexity of whole A texts: B's training (same words) lowers that at first
    while the A skill is already going, so whether a probe breached depended on the CPU's rounding."""
    p = tmp_path_factory.mktemp("probe") / "probe.yaml"
    p.write_text(yaml.safe_dump({"name": "probe", "tasks": [
        {"name": "task_a", "kind": "reference_likelihood", "data": {"path": str(organism["a_val"])},
         "prompt": "{{prompt}}", "reference": "{{completion}}", "target_delimiter": ""}]}))
    return str(p)


def _run(org, out, probe, guard=None, every=10, steps=80, mitigations=None, save_steps=None, **monitor):
    spec = {
        "name": out.name,
        "model": str(org["model"]),
        "data": {"train": str(org["b_train"]), "validation": str(org["b_val"]), "format": "prompt_completion",
                 "chat_template": False, "max_length": 64},
        "method": "full",
        "optim": {"lr": 3e-3, "max_steps": steps, "batch_size": 16, "warmup_steps": 5, "schedule": "constant"},
        # fp32 pinned: whether a probe breaches must not depend on this CPU's precision path
        "train": {"output_dir": str(out), "save_steps": save_steps, "save_total_limit": None, "progress": False,
                  "seed": 0, "bf16": False},
        "monitor": {"suite": probe, "every": every, "limit": None, **monitor},
    }
    if guard:
        spec["guard"] = guard
    if mitigations:
        spec["mitigations"] = mitigations
    return train(recipe_from_dict(spec), quiet=True)


def _drop(res) -> float:
    probes = res.summary["monitor"]["probes"]
    return 1 - probes[-1]["fl_retention"]


def test_guard_keeps_retention_within_budget_where_plain_fine_tuning_breaks_it(organism, probe_suite, tmp_path):
    budget = 0.05
    plain = _run(organism, tmp_path / "plain", probe_suite)
    assert _drop(plain) > budget, "plain fine-tuning should break the budget on the organism"
    lines = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    # the monitor's validation at a probe step keeps that step's training-loss line (logging and probes every 10 steps)
    assert [x["step"] for x in lines if "loss" in x] == [1, *range(10, 81, 10)]  # and the first step
    assert sum(1 for x in lines if x["step"] == 0 and "eval_loss" in x) == 1  # step 0's validation loss, once
    assert plain.summary["guard"] is None and len(plain.summary["monitor"]["probes"]) >= 8

    guarded = _run(organism, tmp_path / "guarded", probe_suite,
                   guard={"budget": budget, "actions": ["lower_lr", "rollback", "stop"]})
    g = guarded.summary["guard"]
    kinds = [e["guard"] for e in g["events"]]
    assert "breach" in kinds and "lower_lr" in kinds
    # what the run hands back (the selected state) is within budget on task A
    m, tok = guarded.model, guarded.tokenizer
    base_model, _ = load_model(organism["model"])
    a_base = task_loss(base_model, tok, organism["a_val"])
    a_final = task_loss(m, tok, organism["a_val"])
    assert a_final - a_base < task_loss(plain.model, tok, organism["a_val"]) - a_base
    assert g["selection"]["chosen_step"] is not None and g["selection"]["why"]
    # the budget itself: the chosen state's probed drop is within it (the point estimate the guard acts on), and
    # the run did not fall back to the base model
    assert not g["selection"].get("warning") and g["selection"]["drop"] <= budget, g["selection"]
    # every guard event is in metrics.jsonl with its step
    lines = [json.loads(x) for x in (tmp_path / "guarded" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "guard" in x]
    assert [x["guard"] for x in logged] == kinds and all("step" in x for x in logged)
    assert any("fl_retention" in x for x in lines)
    # the budget both ways, in every probe, breach and the selection
    for x in lines:
        if "fl_retention" in x:
            assert (x["fl_drop"] == pytest.approx(1 - x["fl_retention"])
                    and x["fl_drop_upper"] == pytest.approx(1 - x["fl_retention_lo"]))
            assert x["fl_within_budget_95"] == (x["fl_drop_upper"] <= budget)
    assert all("drop_upper" in e and "within_budget_95" in e for e in g["events"] if e["guard"] == "breach")
    assert "within_budget_95" in g["selection"] and "point estimate" in g["selection"]["acted_on"]
    assert guarded.summary["monitor"]["probe_share"] is not None


def test_rollback_restores_exact_weights(organism, probe_suite, tmp_path):
    res = _run(organism, tmp_path / "rb", probe_suite, every=10, steps=40,
               guard={"budget": 0.001, "require_significant": False, "actions": ["rollback", "stop"], "select": "last"})
    kinds = [e["guard"] for e in res.summary["guard"]["events"]]
    assert kinds[:3] == ["breach", "rollback", "stop"]
    to_step = res.summary["guard"]["events"][1]["to_step"]
    breach_step = res.summary["guard"]["events"][0]["step"]
    assert to_step < breach_step
    # the same run stopped at `to_step` (training is deterministic on CPU) has exactly the restored weights
    if to_step == 0:
        ref, _ = load_model(organism["model"])
    else:
        ref = _run(organism, tmp_path / "ref", probe_suite, every=10, steps=to_step).model
    for (name, p0), p1 in zip(ref.named_parameters(), res.model.parameters(), strict=True):
        assert torch.equal(p0.detach().cpu(), p1.detach().cpu()), name


def test_rollback_restores_the_optimizer_state_but_keeps_the_learning_rate_of_now():
    """lower_lr then rollback: the snapshot's moments come back, not its (higher) learning rate."""
    from forgetless.guard import restore, snapshot

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1.0)
    p.grad = torch.ones(3)
    opt.step()
    snap = snapshot([p], 1, opt)
    moment = opt.state[p]["exp_avg"].clone()
    p.grad = torch.full((3,), 5.0)
    opt.step()
    opt.param_groups[0]["lr"] = 0.5  # lower_lr
    restore([p], snap, opt)
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.state[p]["exp_avg"], moment) and int(opt.state[p]["step"]) == 1
    assert torch.equal(p.detach(), snap.weights[0])


def test_guard_needs_a_replay_mitigation_for_more_replay(organism):
    from forgetless.errors import RecipeError

    with pytest.raises(RecipeError, match="more_replay needs a replay"):
        recipe_from_dict({"model": "m", "data": {"train": "t"}, "guard": {"actions": ["more_replay"]}})
    r = recipe_from_dict({"model": "m", "data": {"train": "t"}, "guard": {"budget": 0.02}})
    assert r.monitor is not None and r.monitor.suite == "auto"  # general-probe where its files are, else self


@pytest.mark.slow  # the organism trains 20 steps with probes (~15 s)
def test_more_replay_is_carried_out_by_the_replay_mitigation(organism, probe_suite, tmp_path):
    # a guard action a mitigation offers (replay: more_replay), dispatched by its declaration
    replay = {"name": "replay", "ratio": 0.2,
              "data": {"train": str(organism["a_train"]), "format": "prompt_completion", "chat_template": False}}
    res = _run(organism, tmp_path / "mr", probe_suite, every=10, steps=20, mitigations=[replay],
               guard={"budget": 0.001, "require_significant": False, "actions": ["more_replay", "stop"],
                      "replay_factor": 2.0, "select": "last"})
    events = [(e["guard"], e.get("ratio")) for e in res.summary["guard"]["events"]]
    assert events[:2] == [("breach", None), ("more_replay", 0.4)], events
    assert res.summary["mitigations"][0]["ratio_raised_to"] == 0.4


def test_selection_reports_the_95_percent_verdict_of_the_chosen_state():
    from forgetless.config import GuardConfig, MonitorConfig
    from forgetless.guard import MonitorCallback, Snapshot

    cb = MonitorCallback(MonitorConfig(), GuardConfig(budget=0.01), None, None, None, True, [], True)
    cb.params = []
    cb.state.base = Snapshot(0, [], None)
    # step 10: 0.5% drop, up to 1.5% at 95% (within on the point only); step 20: 0.2% [.., 0.6%]: within both ways
    cb.state.probes = [{"step": 10, "fl_drop": 0.005, "fl_drop_upper": 0.015, "fl_within_budget": True,
                        "fl_within_budget_95": False},
                       {"step": 20, "fl_drop": 0.002, "fl_drop_upper": 0.006, "fl_within_budget": True,
                        "fl_within_budget_95": True}]
    cb.state.best_ok = Snapshot(10, [], None, val_loss=1.0, within_95=False)
    cb._last_breaches = ["retention drop 2% > budget 1%"]  # the final probe breached
    sel = cb.select_final(step=30)
    assert sel["chosen_step"] == 10 and sel["within_budget_95"] is False and sel["drop_upper"] == 0.015
    cb.state.best_ok = Snapshot(20, [], None, val_loss=1.0, within_95=True)
    sel = cb.select_final(step=30)
    assert sel["chosen_step"] == 20 and sel["within_budget_95"] is True and sel["drop"] == 0.002
    cb.state.best_ok = None
    sel = cb.select_final(step=30)
    assert sel["warning"] and sel["chosen_step"] == 0 and sel["within_budget_95"] is True  # the base loses nothing
    assert sel["why"].endswith("the final model is the base model")
    # a resumed run's fallback is the weights it resumed from, and says so (not "the base model")
    cb.state.base, cb.state.resumed_at = Snapshot(10, [], None), 10
    sel = cb.select_final(step=30)
    assert sel["chosen_step"] == 10 and "the weights this resumed run started from (step 10)" in sel["why"]


def test_auto_interval_is_the_share_of_training_time_a_probe_may_take():
    from forgetless.guard import auto_interval

    # a 6 s probe at 10% of the time, steps of 0.5 s: 6 / (0.1 x 0.5) = 120 steps between probes
    assert auto_interval(6.0, 0.5, 0.1) == 120
    assert auto_interval(6.01, 0.5, 0.1) == 121  # 120.2 rounds up: never over the share
    assert auto_interval(0.01, 2.0, 0.1) == 1  # a probe cheaper than a step's share: every step


def test_every_auto_places_each_probe_from_the_measured_times(organism, probe_suite, tmp_path):
    # a generous share, so that the tiny model's cheap probes come several times in 40 steps (the probe costs 5-9
    # steps' time on the CPUs seen: intervals of 6-10 steps, the first placed at step 5)
    res = _run(organism, tmp_path / "auto", probe_suite, every="auto", steps=40, max_share=0.9)
    mon = res.summary["monitor"]
    assert mon["every"] == "auto"
    iv = mon["intervals"]
    # the first interval is placed once the warm-up steps are timed, each next one right after a probe
    assert iv[0]["step"] == 5
    from forgetless.guard import auto_interval

    for x in iv:  # recorded rounded: the interval from the rounded inputs is within a step of it
        assert abs(x["every"] - auto_interval(x["probe_s"], x["step_s"], 0.9)) <= max(1, 0.01 * x["every"])
    probed = [p["step"] for p in mon["probes"]]
    planned = [x["step"] + x["every"] for x in iv if x["step"] + x["every"] <= 40]
    assert len(planned) >= 2 and probed[: len(planned)] == planned
    assert all(b["step"] == a["step"] + a["every"] for a, b in zip(iv, iv[1:], strict=False))  # placed at each probe
    # the probes' own time stays near the share (the reference at step 0 is extra, and the last interval is cut
    # short by the end of training)
    assert mon["probe_s"] > 0


def test_every_auto_warns_when_the_reference_and_final_probes_outweigh_the_share(organism, probe_suite, tmp_path,
                                                                                   capfd):
    """max_share caps the probes between the step-0 reference and the final probe, not those two: a run too short
    for its probe suite is told so when the first interval is placed, with the share they take."""
    short = _run(organism, tmp_path / "short", probe_suite, every="auto", steps=10, max_share=0.05)
    iv = short.summary["monitor"]["intervals"][0]
    # 2 probes of the reference's time over the planned training time (probe_s and step_s are recorded
    # rounded to 1 ms and 0.1 ms: a 40 ms probe's record is within 1.3%, inside the 10% the asserts allow)
    assert iv["fixed_share"] == pytest.approx(2 * iv["probe_s"] / (10 * iv["step_s"]), rel=0.1)
    assert iv["fixed_share"] > 0.05
    err = capfd.readouterr().err
    assert "the reference probe at step 0 and the final probe" in err and f"about {iv['fixed_share']:.0%}" in err
    # the same probes over 4x the steps at a 90% share: within it, no warning
    long = _run(organism, tmp_path / "long", probe_suite, every="auto", steps=40, max_share=0.9)
    assert long.summary["monitor"]["intervals"][0]["fixed_share"] < 0.9
    assert "the reference probe at step 0" not in capfd.readouterr().err


def test_every_auto_counts_the_fixed_probes_over_the_steps_left_when_resumed(organism, probe_suite, tmp_path,
                                                                            capfd):
    """A resumed run's fixed probes are weighed against the steps it still has to train: a reference restored from
    the checkpoint costs nothing again (the final probe alone counts); a run resumed without the monitor's state
    scores a new reference at the resume point (both count)."""
    import shutil

    from forgetless.guard import MONITOR_DIR
    from forgetless.recipe import load_recipe

    _run(organism, tmp_path / "r", probe_suite, every="auto", steps=20, max_share=0.05, save_steps=4)
    r = load_recipe(tmp_path / "r" / "recipe.yaml").model_copy(deep=True)
    _cut_at(tmp_path / "r", 4)  # before the first placement (step 5): the saved state has no interval yet
    capfd.readouterr()
    restored = train(r, resume=True, quiet=True).summary["monitor"]
    iv = restored["intervals"][0]
    assert restored["resumed_at"] is None and iv["step"] == 4 + 5
    assert iv["fixed_share"] == pytest.approx(iv["probe_s"] / (16 * iv["step_s"]), rel=0.1)
    err = " ".join(capfd.readouterr().err.split())
    assert iv["fixed_share"] > 0.05 and "warning: the final probe (about" in err  # a probe is 5-9 steps' time
    assert "the reference probe at step" not in err
    _cut_at(tmp_path / "r", 12)
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "checkpoint-12" / MONITOR_DIR)
    fallback = train(r, resume=True, quiet=True).summary["monitor"]
    iv = fallback["intervals"][0]
    assert fallback["resumed_at"] == 12 and iv["step"] == 12 + 5
    assert iv["fixed_share"] == pytest.approx(2 * iv["probe_s"] / (8 * iv["step_s"]), rel=0.1)
    err = " ".join(capfd.readouterr().err.split())
    assert iv["fixed_share"] > 0.05 and "the reference probe at step 12 and the final probe" in err


def _cut_at(run_dir, step):
    """What a kill just after checkpoint-`step` leaves: no final model or summary, no later checkpoint."""
    import shutil

    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    for c in (run_dir / "checkpoints").glob("checkpoint-*"):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)


def test_a_resumed_guarded_run_continues_exactly_as_the_uninterrupted_one(organism, probe_suite, tmp_path, capsys):
    """The monitor's and guard's state is in every checkpoint: the base model's reference probe (and the
    self-reference answers it scored against, even when the evaluation cache lost them), the probes, events and
    next action, the snapshots, and more_replay's swaps of the training data."""
    import shutil

    import forgetless.retention.evaluate as E
    from forgetless.recipe import load_recipe

    probe = yaml.safe_load(open(probe_suite).read())
    probe["tasks"].append({"name": "own", "kind": "self_reference", "limit": 4, "max_new_tokens": 6})
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(probe))
    replay = {"name": "replay", "ratio": 0.2,
              "data": {"train": str(organism["a_train"]), "format": "prompt_completion", "chat_template": False}}
    guard = {"budget": 0.001, "require_significant": False, "select": "best_within_budget",
             "actions": ["lower_lr", "more_replay", "rollback", "stop"]}
    runs = {name: _run(organism, tmp_path / name, str(tmp_path / "probe.yaml"), guard=guard, every=10, steps=40,
                       mitigations=[replay], save_steps=10) for name in ("whole", "cut")}
    whole = runs["whole"].summary
    steps = {e["guard"]: e["step"] for e in whole["guard"]["events"]}
    # the actions straddle the cut below: lower_lr and more_replay before it, rollback after it
    assert steps.get("more_replay", 99) <= 20 < steps.get("rollback", 0), whole["guard"]["events"]
    rec = load_recipe(tmp_path / "cut" / "recipe.yaml").model_copy(deep=True)
    assert rec.train.save_steps == 10
    shutil.rmtree(E.cache_root() / "self_reference")  # the evaluation cache lost the base's answers meanwhile
    _cut_at(tmp_path / "cut", 20)
    capsys.readouterr()
    again = train(rec, resume=True, quiet=True)
    assert again.summary["resumed_from"].endswith("checkpoint-20")
    assert "without the monitor's state" not in capsys.readouterr().err
    got = again.summary
    assert got["monitor"]["resumed_at"] is None  # the reference is still the base model
    assert got["guard"]["events"] == whole["guard"]["events"]
    assert [p["fl_retention"] for p in got["monitor"]["probes"]] == [p["fl_retention"]
                                                                    for p in whole["monitor"]["probes"]]
    assert got["guard"]["selection"] == whole["guard"]["selection"]
    assert got["mitigations"][0]["ratio_raised_to"] == whole["mitigations"][0]["ratio_raised_to"]
    for (name, a), b in zip(runs["whole"].model.named_parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach()), name

    def logged(name):  # metrics.jsonl without wall-clock fields
        return [{k: v for k, v in json.loads(x).items()
                 if not (k.endswith("_s") or any(t in k for t in ("runtime", "per_s", "_time")))}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert logged("cut") == logged("whole")


def test_a_guarded_run_resumed_without_the_monitor_state_says_its_reference_is_the_resume_point(
        organism, probe_suite, tmp_path, capsys):
    """A checkpoint without the monitor's state (an older forgetless; sharded runs keep none): the resumed run
    measures forgetting from the resumed weights: recorded and said (the fallback selection's wording is tested
    in test_selection_reports_the_95_percent_verdict_of_the_chosen_state)."""
    import shutil

    from forgetless.guard import MONITOR_DIR
    from forgetless.recipe import load_recipe

    guard = {"budget": 0.0001, "require_significant": False, "actions": ["stop"], "select": "best_within_budget"}
    first = _run(organism, tmp_path / "g", probe_suite, guard=guard, every=10, steps=20)
    assert first.summary["monitor"]["resumed_at"] is None
    r = load_recipe(tmp_path / "g" / "recipe.yaml").model_copy(deep=True)
    r.train.save_steps = 10
    shutil.rmtree(tmp_path / "g")
    train(r, quiet=True)
    _cut_at(tmp_path / "g", 10)
    shutil.rmtree(tmp_path / "g" / "checkpoints" / "checkpoint-10" / MONITOR_DIR)
    capsys.readouterr()
    again = train(r, resume=True, quiet=True).summary
    assert again["resumed_from"].endswith("checkpoint-10") and again["monitor"]["resumed_at"] == 10
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the line
    assert "resumed at step 10 without the monitor's state" in err
    assert "the retention reference is the weights at this step" in err
