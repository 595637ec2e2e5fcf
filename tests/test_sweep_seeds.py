"""Sweeps over training seeds and budget decisions on intervals: hand-made rows, and one small seeded sweep."""

from __future__ import annotations

import math

import pytest
import yaml
from conftest import tiny_recipe
from rich.console import Console

from forgetless.errors import ForgetlessError
from forgetless.report import build_report
from forgetless.retention.seeds import combine_seeds
from forgetless.sweep import SweepConfig, aggregate_seeds, recommend, run_sweep, sweep_table


def _row(run, seed, gain, change, ci, drops=(), abilities=None):
    return {"run": run, "seed": seed, "dir": f"/x/{run}", "method": "full", "set": {},
            "task": {"task": "t", "metric": "ce", "base": 2.0, "gain": gain, "ci": [gain - 0.1, gain + 0.1],
                     "significant": True},
            "retention": {"change": change, "ci": list(ci), "significant_drops": list(drops),
                          "abilities": abilities or {}},
            "wall_time_s": 10.0 + seed, "tokens_per_s": 100.0, "peak_memory_mb": 50.0 + seed,
            "trainable_parameters": 1000, "trainable_share": 1.0, "guard_events": 0}


def test_jobs_expand_seeds_globally_and_per_run():
    cfg = SweepConfig.model_validate({"base": {}, "seeds": [1, 2],
                                      "runs": [{"name": "a"}, {"name": "b", "seeds": [7]}]})
    assert [(n, v.name, s) for n, v, s in cfg.jobs()] == [("a-seed1", "a", 1), ("a-seed2", "a", 2), ("b-seed7", "b", 7)]
    plain = SweepConfig.model_validate({"base": {}, "runs": [{"name": "a"}]})
    assert [(n, s) for n, _, s in plain.jobs()] == [("a", None)]
    with pytest.raises(ValueError, match="runs.0: set train.seed or seeds, not both"):
        SweepConfig.model_validate({"base": {}, "seeds": [1], "runs": [{"name": "a", "set": {"train.seed": 3}}]})
    with pytest.raises(ValueError, match="seeds repeat"):
        SweepConfig.model_validate({"base": {}, "runs": [{"name": "a", "seeds": [1, 1]}]})
    with pytest.raises(ValueError, match="run directories must be unique; repeated: a-seed1"):
        SweepConfig.model_validate({"base": {}, "runs": [{"name": "a", "seeds": [1]}, {"name": "a-seed1"}]})


def test_aggregate_over_seeds_by_hand():
    ab = lambda c: {"knowledge": {"change": c, "ci": [c - 0.004, c + 0.004], "tasks": ["nq"],  # noqa: E731
                                  "weight": 0.5}}
    rows = [_row("a-seed1", 1, 0.5, -0.010, (-0.014, -0.006), ["x", "y"], ab(-0.02)),
            _row("a-seed2", 2, 0.7, -0.020, (-0.024, -0.016), ["x"], ab(-0.01)),
            _row("a-seed3", 3, 0.6, -0.030, (-0.034, -0.026), ["x", "z"], ab(-0.03))]
    agg = aggregate_seeds("a", rows)
    expect = combine_seeds([-0.01, -0.02, -0.03], [(-0.014, -0.006), (-0.024, -0.016), (-0.034, -0.026)])
    assert math.isclose(agg["retention"]["change"], -0.02) and agg["retention"]["ci"] == pytest.approx(expect["ci"])
    # seed sd 0.01, t(2) = 4.3027: the seed half-width 4.3027 * 0.01 / sqrt(3) = 0.02484; items 1.96 * 0.002041 = 0.004
    assert agg["retention"]["seed_half_width"] == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)
    assert agg["retention"]["ci"][1] - (-0.02) == pytest.approx(math.hypot(0.024841, 0.004), rel=1e-3)
    assert math.isclose(agg["task"]["gain"], 0.6) and agg["n_seeds"] == 3 and agg["seeds"] == [1, 2, 3]
    assert agg["retention"]["significant_drops"] == ["x"]  # dropped significantly in every seed
    assert math.isclose(agg["retention"]["abilities"]["knowledge"]["change"], -0.02)
    assert agg["wall_time_s"] == 12.0 and agg["peak_memory_mb"] == 53.0
    assert agg["dirs"] == ["/x/a-seed1", "/x/a-seed2", "/x/a-seed3"]


def test_recommendation_on_the_point_estimate_and_at_95_percent():
    rows = [
        # within on the point only
        {"run": "bold", "task": {"gain": 1.0}, "retention": {"change": -0.006, "ci": [-0.016, 0.004]}},
        # within at 95%
        {"run": "safe", "task": {"gain": 0.6}, "retention": {"change": -0.002, "ci": [-0.006, 0.002]}},
        {"run": "over", "task": {"gain": 2.0}, "retention": {"change": -0.03, "ci": [-0.04, -0.02]}},
    ]
    assert recommend(rows, 0.01) == "bold" and recommend(rows, 0.01, "point") == "bold"
    assert recommend(rows, 0.01, "confident") == "safe"
    assert recommend(rows, 0.001, "confident") is None


def test_table_marks_single_seed_rows_and_shows_abilities_and_both_verdicts():
    ab = {"knowledge": {"change": -0.01, "ci": [-0.02, 0.0], "tasks": ["nq"], "weight": 0.5}}
    single = {"n_seeds": 1, **_row("one", 0, 0.5, -0.005, (-0.012, 0.002), abilities=ab)}
    multi = aggregate_seeds("many", [_row("m1", 1, 0.4, -0.002, (-0.004, 0.0), abilities=ab),
                                     _row("m2", 2, 0.5, -0.003, (-0.005, -0.001), abilities=ab)])
    state = {"name": "s", "budget": 0.01, "runs": [single, multi], "recommended": "one", "recommended_point": "one",
             "recommended_95": "many", "decide_on": "point"}
    con = Console(record=True, width=300)
    con.print(sweep_table(state))
    text = con.export_text()
    assert "1 seed (single)" in text and "2 seeds" in text and "knowledge" in text
    assert "-1.00 ±1.00" in text  # the ability's change and half-width in points
    assert "within budget: point / 95%" in text and "yes / no" in text and "yes / yes" in text


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory, tiny_model, toy_data):
    tmp = tmp_path_factory.mktemp("seeded")
    base = tiny_recipe(tiny_model, toy_data, tmp / "unused", optim__max_steps=6)
    base["train"].pop("output_dir")
    spec = {"name": "seeded", "base": base,
            "runs": [{"name": "full", "seeds": [0, 1]}, {"name": "plain", "set": {"optim.lr": 3e-4}}],
            "task_suite": "auto", "retention_suite": "self", "limit": 4, "budget": "50%", "decide_on": "confident",
            "output_dir": str(tmp / "sweep")}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, run_sweep(path, quiet=True, report=False)


def test_a_seeded_sweep_trains_each_seed_and_aggregates_them(seeded_sweep):
    path, state = seeded_sweep
    rows = {r["run"]: r for r in state["runs"]}
    assert list(rows) == ["full", "plain"]
    full = rows["full"]
    assert full["n_seeds"] == 2 and full["seeds"] == [0, 1] and full["seed_runs"] == ["full-seed0", "full-seed1"]
    runs = path.parent / "sweep" / "runs"
    assert [yaml.safe_load((runs / f"full-seed{s}" / "recipe.yaml").read_text())["train"]["seed"]
            for s in (0, 1)] == [0, 1]
    per = [r["retention"]["change"] for r in state["seed_runs"]]
    assert math.isclose(full["retention"]["change"], sum(per) / 2)
    assert rows["plain"]["n_seeds"] == 1
    assert state["decide_on"] == "confident" and state["recommended"] == state["recommended_95"]
    assert "budget_check" in full["retention"] and "within_budget_95" in full["retention"]["budget_check"]
    # the precision bench's analysis reads the same sweep: per task, ability and score, with seed spreads
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("retention_precision", REPO / "bench" / "retention_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.analyse_sweep(path.parent / "sweep")
    rec = {r["recipe"]: r for r in res["recipes"]}
    assert rec["full"]["n_seeds"] == 2 and rec["plain"]["n_seeds"] == 1
    t = rec["full"]["tasks"]["self_reference"]
    assert t["variance_share"] == pytest.approx(1.0) and t["seed_sd"] is not None and t["item_half_width"] > 0
    assert rec["full"]["score"]["change"] == pytest.approx(100 * full["retention"]["change"])
    md = bench.markdown({**res, "machine": bench.cpu_info(), "scenario": "tiny", "model": "tiny"})
    assert "## full (2 seeds" in md and "| self_reference |" in md and "Largest item half-width" in md
    # the projection to a smaller suite, by hand: shares .2, .3, .5; a and b at a quarter of their items
    run = {"score": {"half_width": 0.4},
           "tasks": {"a": {"n": 100, "variance_share": 0.2, "seconds": 10.0},
                     "b": {"n": 400, "variance_share": 0.3, "seconds": 40.0},
                     "c": {"n": 50, "variance_share": 0.5, "seconds": 5.0}}}
    probe = bench.project(run, {"a": 25, "b": 100, "c": None})
    assert probe["half_width"] == pytest.approx(0.4 * (0.2 * 4 + 0.3 * 4 + 0.5) ** 0.5)
    assert probe["seconds"] == pytest.approx(10 / 4 + 40 / 4 + 5)
    assert bench.project(run, {})["half_width"] == pytest.approx(0.4)  # shares sum to 1: the same counts, the same
    proj = bench.projections(res, "self")  # the tiny sweep's suite at the built-in self suite's counts
    assert {x["run"] for x in proj["runs"]} == {"full-seed0", "full-seed1", "plain"}
    html = build_report(path.parent / "sweep", drift=False)
    assert "1 seed (single)" in html and "2 seeds" in html
    # resuming trains nothing more
    import forgetless.sweep as sweep_mod

    real, calls = sweep_mod.run_one, []
    sweep_mod.run_one = lambda spec: calls.append(spec) or real(spec)
    try:
        again = run_sweep(path, quiet=True, report=False)
    finally:
        sweep_mod.run_one = real
    assert calls == [] and [r["run"] for r in again["runs"]] == ["full", "plain"]


def test_seeds_and_set_train_seed_conflict_names_the_key(tmp_path, tiny_model, toy_data):
    base = tiny_recipe(tiny_model, toy_data, tmp_path / "unused")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": base, "seeds": [1, 2], "runs": [{"name": "a", "set": {"train.seed": 5}}]}))
    with pytest.raises(ForgetlessError, match="train.seed or seeds"):
        run_sweep(path, quiet=True)


def _cmp(score, ci):
    return {"retention_score": score, "retention_ci": ci, "retention_drop": 1 - score}


def test_merge_auto_alpha_chooses_on_the_point_estimate_or_at_95_percent():
    from forgetless.merge import choose_alpha, curve_point

    # alpha: (task score, retention score, retention interval); budget 1%
    spec = {0.0: (1.0, 1.0, (1.0, 1.0)), 0.5: (1.10, 0.996, (0.992, 1.000)), 0.75: (1.20, 0.993, (0.985, 1.001)),
            1.0: (1.30, 0.97, (0.96, 0.98))}
    for decide_on, expect in (("point", 0.75), ("confident", 0.5)):
        curve = [curve_point(a, _cmp(t, (t - 0.01, t + 0.01)), _cmp(r, ci), 0.01, decide_on)
                 for a, (t, r, ci) in spec.items()]
        by = {c["alpha"]: c for c in curve}
        assert by[0.75]["within_budget"] and not by[0.75]["within_budget_95"]
        assert by[0.75]["retention_drop_upper"] == pytest.approx(0.015)
        assert by[0.5]["within_budget_95"] and not by[1.0]["within_budget"]
        assert choose_alpha(curve, 0.01, decide_on)["alpha"] == expect
    with pytest.raises(ForgetlessError, match="with 95% confidence"):
        choose_alpha([curve_point(1.0, _cmp(1.3, (1.2, 1.4)), _cmp(0.97, (0.96, 0.98)), 0.01, "confident")], 0.01,
                     "confident")
