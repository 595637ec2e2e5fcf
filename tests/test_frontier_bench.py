"""bench/frontier.py on constructed ledgers (no training): selection rules, pre-registration, the replication
suite's disjointness from the selection probe, verdicts over seeds, and the markdown regenerated from the JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fr(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("_bench_frontier", REPO / "bench" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    return mod


def test_selection_rules(fr):
    def e(gain, change):
        return {"task": {"gain": gain}, "retention": {"change": change}}

    pts = [({"name": "a"}, e(0.10, -0.05)), ({"name": "b"}, e(0.30, -0.02)), ({"name": "c"}, e(0.20, -0.005))]
    assert fr.choose(pts, within_budget=False)["name"] == "b"  # a baseline: the best validation gain
    assert fr.choose(pts, within_budget=True)["name"] == "c"  # a candidate: the best gain within the 1% probe budget
    over = [({"name": "a"}, e(0.1, -0.05)), ({"name": "b"}, e(0.3, -0.02))]
    assert fr.choose(over, within_budget=True)["name"] == "b"  # none within: the smallest drop


def test_preregistration_rule(fr):
    fams = list(fr.CANDIDATE_FAMILIES)[:5]  # five families: a, b inside the budget; c, d, e outside it
    drops = {fams[0]: 0.5, fams[1]: -0.2, fams[2]: 3.0, fams[3]: 1.5, fams[4]: 2.0}
    gains = {fams[0]: 0.20, fams[1]: 0.25, fams[2]: 0.30, fams[3]: 0.10, fams[4]: 0.29}
    sel = {"chosen": {"full": {"name": "full-0"}, **{f: {"name": f + "-1"} for f in fams}},
           "table": [{"run": "full-0", "probe_drop": 9.0, "val_gain": 0.31}]
           + [{"run": f + "-1", "probe_drop": drops[f], "val_gain": gains[f]} for f in fams]}
    # within the budget by validation gain (b before a), then the smallest drop outside it (d at 1.5, not the
    # better-gaining e or c); a baseline is never a candidate
    assert fr.preregister(sel) == (fams[1], fams[0], fams[3])
    assert fr.preregister(sel, k=1) == (fams[1],)
    # full-gentle chooses among full FT's own runs: at full FT's chosen rate it would repeat the baseline
    sel["chosen"]["full"] = {"name": "full-2", "settings": {"optim.lr": 1e-4}}
    sel["table"] += [{"run": "full-2", "probe_drop": 9.0, "val_gain": 0.41},
                     {"run": "full-1", "probe_drop": 0.2, "val_gain": 0.40}]
    sel["chosen"]["full-gentle"] = {"name": "full-1", "settings": {"optim.lr": 5e-5}}
    assert fr.preregister(sel)[0] == "full-gentle"
    sel["chosen"]["full-gentle"] = sel["chosen"]["full"]
    assert "full-gentle" not in fr.preregister(sel)
    # a family added after the scenario's pre-registration is never named there (an extra only)
    late = fr.preregister(sel)[0]
    fr.LATE_FAMILIES["med"] = (late,)
    assert late in fr.preregister({**sel, "scenario": "math"}) and late not in fr.preregister({**sel,
                                                                                             "scenario": "med"})


def test_grids_have_at_most_three_points_and_lora_rates_up_to_20x(fr):
    for fam, spec in [*fr.BASELINES.items(), *fr.CANDIDATE_FAMILIES.items()]:
        assert 1 <= len(fr._grid(fam, spec)) <= 3 or "reuse" in spec, fam
    wise = fr._grid("wise-full", fr.CANDIDATE_FAMILIES["wise-full"], {"method": "full", "optim.lr": 5e-5})
    assert [r["settings"]["wise_alpha"] for r in wise] == [0.25, 0.5, 0.75]
    assert all(r["settings"]["optim.lr"] == 5e-5 for r in wise)  # merges of the chosen full-FT run
    assert max(fr.BASELINES["lora"]["grid"][1]) <= 20 * max(fr.BASELINES["full"]["grid"][1])
    runs = fr._grid("full-ewc", fr.CANDIDATE_FAMILIES["full-ewc"], {"method": "full", "optim.lr": 5e-5})
    assert [r["settings"]["mitigations"][0]["weight"] for r in runs] == [1e3, 1e4, 1e5]
    runs[0]["settings"]["mitigations"][0]["weight"] = 7  # copies: the family's definition is not touched
    assert fr.CANDIDATE_FAMILIES["full-ewc"]["grid"][1][0][0]["weight"] == 1e3
    assert all(len(v) <= 3 for v in fr.FINAL_CANDIDATES.values())


def test_the_preregistered_candidates_are_the_rules_choice_from_the_committed_selection(fr):
    # the rule re-applied to each committed selection.json names what FINAL_CANDIDATES holds, in its order
    checked = 0
    for scenario, names in fr.FINAL_CANDIDATES.items():
        path = REPO / "bench" / "results" / f"frontier-{scenario}" / "selection.json"
        if names and path.is_file():
            sel = json.loads(path.read_text())
            assert fr.preregister(sel) == names == tuple(sel["preregister_rule"]), scenario
            checked += 1
    assert checked == 2  # med and math are both pre-registered


def test_final_refuses_without_preregistered_candidates(fr, tmp_path):
    (fr.out_dir("med")).mkdir(parents=True)
    (fr.out_dir("med") / "selection.json").write_text(json.dumps({"chosen": {}}))
    fr.FINAL_CANDIDATES["med"] = ()
    with pytest.raises(SystemExit, match="FINAL_CANDIDATES.*empty"):
        fr.final("med", SimpleNamespace(), {}, "m")
    fr.FINAL_CANDIDATES["med"] = ("full-ewc", "not-a-family")
    with pytest.raises(SystemExit, match="at most 3 of"):
        fr.final("med", SimpleNamespace(), {}, "m")
    (fr.out_dir("med") / "selection.json").unlink()
    with pytest.raises(SystemExit, match="selection phase first"):
        fr.final("med", SimpleNamespace(), {}, "m")


@pytest.mark.skipif(not (SHARED / "data" / "knowledge_qa" / "mmlu_validation.jsonl").is_file(),
                    reason="../shared/data is absent")
def test_the_replication_suite_shares_no_item_with_the_probe(fr, tmp_path):
    from forgetless.retention.suite import load_suite

    root = SHARED / "data"
    rep = load_suite(str(fr.replication_suite(tmp_path)))
    fr.check_disjoint(load_suite("general-probe"), rep, root)  # no error
    sets = fr.item_sets(rep, root)
    assert len(sets["builtin-prompts"]) == 50  # the built-in prompts general leaves out
    general = fr.item_sets(load_suite("general"), root)
    assert not sets["builtin-prompts"] & general["builtin-prompts"]
    with pytest.raises(SystemExit, match="share .* item"):
        fr.check_disjoint(load_suite("general"), load_suite("general"), root)


def _cols(nll):
    nll = np.asarray(nll, dtype=float)
    return {"task": "med_answer_ce", "kind": "reference_likelihood", "main": "ce",
            "item_ids": [f"i{k}" for k in range(len(nll))],
            "columns": {"nll": nll.tolist(), "tokens": [10.0] * len(nll), "bytes": [40.0] * len(nll)},
            "details": [], "info": {}}


def _entry(fr, family, seed, cand_nll, base_nll, change, half=0.003, rep_change=None):
    base = np.asarray(base_nll)
    gain = float((base.sum() - np.asarray(cand_nll).sum()) / (10 * len(base)))
    e = {"run": f"{family}-seed{seed}", "phase": "final", "family": family, "settings": {}, "seed": seed,
         "machine": "test CPU", "task": {"gain": gain, "ci": [gain - 0.01, gain + 0.01]},
         "retention": {"score": 1 + change, "change": change, "ci": [change - half, change + half],
                       "abilities": {"knowledge": {"change": change}}},
         "task_items": {"task": "med_answer_ce", "candidate": _cols(cand_nll), "base": _cols(base_nll)},
         "wall_time_s": 600.0}
    if rep_change is not None:
        e["replication"] = {"retention_score": 1 + rep_change,
                            "retention_ci": [1 + rep_change - half, 1 + rep_change + half], "abilities": {}}
    path = fr.ledger_path("med", "final", e["run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(e))
    return e


def test_verdicts_and_report_from_a_constructed_ledger(fr):
    rng = np.random.default_rng(1)
    base = rng.uniform(20, 30, 200)
    fr.FINAL_CANDIDATES["med"] = ("full-ewc", "full-replay-kl", "full-self-distill")
    for i, seed in enumerate((42, 43, 44)):
        full = base - rng.normal(6, 1, 200)
        _entry(fr, "full", seed, full, base, -0.05 - 0.005 * i, rep_change=-0.03)
        _entry(fr, "lora", seed, base - rng.normal(3, 1, 200), base, -0.008, rep_change=-0.006)
        # keeps full FT's gain item by item and forgets a third of a point
        _entry(fr, "full-ewc", seed, full - rng.normal(0, 0.05, 200), base, -0.003, half=0.002, rep_change=-0.002)
        # the same runs as full FT: no candidate
        _entry(fr, "full-replay-kl", seed, full, base, -0.05 - 0.005 * i, rep_change=-0.03)
    res = fr.summarize("med", None)
    v = res["verdicts"]
    assert v["full-ewc"]["general"]["verdict"] == "MET", v["full-ewc"]["general"]["why"]
    assert v["full-ewc"]["replication"]["verdict"] == "MET"
    assert v["full-replay-kl"] == {"verdict": None, "why": "identical to full FT on every item and seed: no candidate"}
    assert v["full-self-distill"]["verdict"] is None and "seeds []" in v["full-self-distill"]["why"]
    assert res["full_drop"]["reaches_min"] and res["full_drop"]["mean"] == pytest.approx(5.5)
    assert [r["recipe"] for r in res["rows"]] == ["full", "lora", "full-ewc", "full-replay-kl"]
    stem = fr.write_results(res)
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert fr.render_md(saved) == stem.with_suffix(".md").read_text()  # the markdown is the JSON's alone
    md = stem.with_suffix(".md").read_text()
    assert "**full-ewc** on general: **MET**" in md and "no candidate" in md and stem.with_suffix(".png").is_file()


def test_a_bench_where_full_ft_barely_forgets_says_so(fr):
    base = np.full(50, 25.0)
    fr.FINAL_CANDIDATES["med"] = ("full-ewc",)
    for seed in (42, 43, 44):
        _entry(fr, "full", seed, base - 5, base, -0.01)
        _entry(fr, "lora", seed, base - 3, base, -0.005)
        _entry(fr, "full-ewc", seed, base - 5, base, -0.004)
    res = fr.summarize("med", None)
    assert not res["full_drop"]["reaches_min"]
    assert "**does not reach** the 4 points" in fr.render_md(res)


def test_a_selection_under_way_is_shown_from_the_ledger(fr):
    e = _entry(fr, "full", 42, np.full(20, 24.0), np.full(20, 25.0), -0.045)
    e.update(phase="select", settings={"method": "full", "optim.lr": 5e-5})
    path = fr.ledger_path("med", "select", "full-1-seed42")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**e, "run": "full-1-seed42"}))
    res = fr.summarize("med", None)
    assert res["selection"] is None and res["selection_progress"]["done"] == 1
    planned = sum(len(fr._grid(f, s)) for f, s in [*fr.BASELINES.items(), *fr.CANDIDATE_FAMILIES.items()])
    assert res["selection_progress"]["planned"] == planned
    md = fr.render_md(res)
    assert f"Selection under way: 1 of {planned} runs" in md
    assert res["selection_machines"] == ["test CPU"] and "(nothing chosen yet). Machines: test CPU." in md
    assert '| full-1-seed42 | full | {"optim.lr": 5e-05} | +0.100' in md
    assert "+4.50 [+4.20, +4.80]" in md
    # what sets a candidate's runs apart is shown too (not the data paths)
    assert fr._settings_shown({"method": {"name": "lora", "r": 16, "init": "milora"}, "optim.lr": 2e-3,
                               "data.self_distill": {"mode": "on_policy", "accept": {"kind": "answer"}},
                               "mitigations": [{"name": "replay", "ratio": 0.05, "data": {"train": "x.json"}},
                                               {"name": "kl", "weight": 0.3}], "wise_alpha": 0.5}) == {
        "optim.lr": 2e-3, "wise_alpha": 0.5, "init": "milora", "self_distill.mode": "on_policy",
        "replay.ratio": 0.05, "kl.weight": 0.3}


def test_a_ledger_entry_from_other_settings_or_steps_is_refused_not_reused(fr, monkeypatch):
    runs = [{"name": "full-0", "family": "full", "settings": {"method": "full", "optim.lr": 2e-5}}]
    done = {"full-0-seed42": {"run": "full-0-seed42", "phase": "select", "settings": runs[0]["settings"],
                              "steps": 160}}
    where = (fr.out_dir("med") / "ledger" / "select", fr.ROOT / "runs" / "frontier-med" / "select" / "runs")
    fr.stale(done, runs, [42], 160, *where)  # the same: reused
    with pytest.raises(SystemExit, match="other settings or steps"):
        fr.stale(done, runs, [42], 200, *where)
    moved = [{**runs[0], "settings": {"method": "full", "optim.lr": 5e-5}}]
    with pytest.raises(SystemExit, match="remove .*full-0-seed42.json") as e:
        fr.stale(done, moved, [42], 160, *where)
    # the message names the files to remove where they are: another machine's (a pair's tag) too
    assert f"{where[0] / 'full-0-seed42.json'} and its run directory runs/frontier-med/select/runs/full-0-seed42" \
        in str(e.value)
    monkeypatch.setattr(fr, "TAG", "cuda-x")
    with pytest.raises(SystemExit, match="frontier-med-cuda-x/ledger/select/full-0-seed42.json"):
        fr.stale(done, moved, [42], 160, fr.out_dir("med") / "ledger" / "select", where[1])


def test_no_verdict_where_full_ft_gained_nothing_or_lora_lacks_seeds(fr):
    base = np.full(30, 25.0)
    fr.FINAL_CANDIDATES["med"] = ("full-ewc",)
    for seed in (43, 44, 45):
        _entry(fr, "full", seed, base + 0.5, base, -0.05, rep_change=-0.03)  # full FT got worse on the task
        _entry(fr, "lora", seed, base - 1, base, -0.01, rep_change=-0.01)
        _entry(fr, "full-ewc", seed, base - 1, base, -0.004, rep_change=-0.002)
    v = fr.summarize("med", None)["verdicts"]["full-ewc"]
    assert v["general"] == {"verdict": None, "why": v["general"]["why"]} and "gained nothing" in v["general"]["why"]
    fr.ledger_path("med", "final", "lora-seed45").unlink()
    v = fr.summarize("med", None)["verdicts"]["full-ewc"]
    assert v["verdict"] is None and "LoRA's [43, 44]" in v["why"]


def test_family_data_paths_follow_the_data_root(fr, tmp_path):
    s = fr.localize({"mitigations": fr._replay_kl(1.0), "optim.lr": 1e-4}, tmp_path / "d")
    assert s["mitigations"][0]["data"]["train"] == str((tmp_path / "d").resolve()) + (
        "/instruction_sft/llamafactory_alpaca_en_demo_1k.json")
    assert s["optim.lr"] == 1e-4 and fr._replay_kl(1.0)[0]["data"]["train"].startswith("../shared/data/")


def test_combinations_build_on_a_chosen_candidate_setting(fr):
    ewc = fr._grid("full-ewc", fr.CANDIDATE_FAMILIES["full-ewc"], {"method": "full", "optim.lr": 1e-4})[1]["settings"]
    (combo,) = fr._grid("full-replay-ewc", fr.CANDIDATE_FAMILIES["full-replay-ewc"], ewc)
    assert [m["name"] for m in combo["settings"]["mitigations"]] == ["ewc", "replay"]
    assert combo["settings"]["mitigations"][0]["weight"] == 1e4 and combo["settings"]["optim.lr"] == 1e-4
    assert [m["name"] for m in ewc["mitigations"]] == ["ewc"]  # the chosen setting itself is not touched
    wise = fr._grid("wise-ewc", fr.CANDIDATE_FAMILIES["wise-ewc"], ewc)
    assert all(w["settings"]["mitigations"] == ewc["mitigations"] and 0 < w["settings"]["wise_alpha"] < 1
               for w in wise)
    corda = fr.localize(fr._grid("lora-corda", fr.CANDIDATE_FAMILIES["lora-corda"], {"optim.lr": 5e-4})[0][
        "settings"], Path("/d"))
    assert corda["method"]["init"] == "corda_kpm" and corda["method"]["init_data"]["train"] == str(
        REPO / fr.KQA_FILE)


def test_the_moved_base_inits_get_their_own_rate_grid_without_dropout(fr):
    lora = {"method": fr.LORA, "optim.lr": 5e-4}  # default-init LoRA's chosen setting
    for fam, init in (("lora-milora-lr", "milora"), ("lora-corda-lr", "corda_kpm")):
        runs = fr._grid(fam, fr.CANDIDATE_FAMILIES[fam], lora)
        assert [r["settings"]["optim.lr"] for r in runs] == [2e-5, 6e-5, 2e-4]
        assert [r["name"] for r in runs] == [f"{fam}-0", f"{fam}-1", f"{fam}-2"]
        assert all(r["settings"]["method"]["init"] == init and r["settings"]["method"]["dropout"] == 0
                   and r["settings"]["method"]["r"] == 16 for r in runs)
    assert "dropout" not in fr.LORA and lora["optim.lr"] == 5e-4  # the baseline's setting is not touched
    # added after med's pre-registration: measured there, never named by the rule
    assert {"lora-milora-lr", "lora-corda-lr"} <= set(fr.LATE_FAMILIES["med"]) & set(fr.FINAL_EXTRAS["med"])


def test_a_scenario_selects_its_families_and_measures_only_selected_ones(fr):
    from forgetless.recipe import recipe_from_dict

    assert set(fr.families("med")) == set(fr.CANDIDATE_FAMILIES)
    math = fr.families("math")
    assert "full-sdft-on-policy" not in math and "full-sdft-on-policy-base" in math
    for s in fr.SCALE:  # every extra is a family the scenario selects, and every family's settings are a recipe
        assert set(fr.FINAL_EXTRAS[s]) <= set(fr.families(s)), s
    on_policy = fr._grid("full-sdft-on-policy-base", math["full-sdft-on-policy-base"],
                         {"method": "full", "optim.lr": 1e-4})
    assert [g["settings"]["optim.lr"] for g in on_policy] == [2e-5, 5e-5]
    sd = on_policy[0]["settings"]["data.self_distill"]
    r = recipe_from_dict({"name": "x", "model": "m", "data": {"train": "t.jsonl", "self_distill": sd},
                          "method": "full"})
    assert r.data.self_distill.teacher == "base" and r.data.self_distill.max_new_tokens == 64


def _wise_ewc_selection(fr) -> None:
    """A med selection that chose full FT, LoRA, EWC and WiSE-FT of EWC, the last pre-registered."""
    ewc = {"method": "full", "optim.lr": 1e-4, "mitigations": fr._ewc(1e4)}
    chosen = {"full": {"settings": {"method": "full", "optim.lr": 1e-4}}, "lora": {"settings": {"method": fr.LORA}},
              "full-ewc": {"settings": ewc}, "wise-ewc": {"settings": {**ewc, "wise_alpha": 0.75}}}
    fr.out_dir("med").mkdir(parents=True)
    (fr.out_dir("med") / "selection.json").write_text(json.dumps({"chosen": chosen, "steps": 160}))
    fr.FINAL_CANDIDATES["med"] = ("wise-ewc",)


def test_final_trains_the_runs_a_preregistered_wise_family_merges(fr, monkeypatch):
    _wise_ewc_selection(fr)
    calls = []
    monkeypatch.setattr(fr.fb, "task_suite", lambda *a, **k: Path("t.yaml"))
    monkeypatch.setattr(fr, "replication_suite", lambda d: Path("r.yaml"))
    monkeypatch.setattr(fr, "read_ledger", lambda *a: {})
    monkeypatch.setattr(fr, "run_phase",
                        lambda sc, ph, runs, *a, **k: calls.append(("train", [r["name"] for r in runs])))
    monkeypatch.setattr(fr, "wise_runs", lambda sc, ph, runs, sources, *a, **k: calls.append(
        ("merge", [r["name"] for r in runs], sorted(p.name for p in sources.values()))))
    fr.final("med", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    assert calls == [("train", ["full", "lora", "full-ewc"]),
                     ("merge", ["wise-ewc"], ["full-ewc-seed43", "full-ewc-seed44", "full-ewc-seed45"])]


def test_extras_are_trained_into_the_final_ledger_and_shown_without_a_verdict(fr, monkeypatch):
    chosen = {f: {"settings": {"method": "full", "optim.lr": 1e-4, "tag": f}}
              for f in ("full", "lora", "full-ewc", "full-self-distill", "lora-milora")}
    fr.out_dir("med").mkdir(parents=True)
    (fr.out_dir("med") / "selection.json").write_text(json.dumps({"chosen": chosen, "steps": 160}))
    fr.FINAL_CANDIDATES["med"] = ("full-ewc", "full-self-distill")
    fr.FINAL_EXTRAS["med"] = ("full-self-distill", "lora-milora")
    calls = []
    monkeypatch.setattr(fr.fb, "task_suite", lambda *a, **k: Path("t.yaml"))
    monkeypatch.setattr(fr, "replication_suite", lambda d: Path("r.yaml"))
    monkeypatch.setattr(fr, "run_phase", lambda sc, ph, runs, seeds, *a, **k: calls.append(
        (ph, [(r["name"], r["settings"]["tag"]) for r in runs], seeds)))
    fr.extras("med", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    # a pre-registered family is the final pass's, not an extra
    assert calls == [("final", [("lora-milora", "lora-milora")], [43, 44, 45])]
    fr.FINAL_EXTRAS["med"] = ("full-ewc",)
    with pytest.raises(SystemExit, match="no family outside FINAL_CANDIDATES"):
        fr.extras("med", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    fr.FINAL_EXTRAS["med"] = ("lora-corda",)  # not selected yet: nothing to measure
    with pytest.raises(SystemExit, match="chose no setting for any of FINAL_EXTRAS"):
        fr.extras("med", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    calls.clear()  # one not selected yet beside one that is: the other is measured
    fr.FINAL_EXTRAS["med"] = ("lora-corda", "lora-milora")
    fr.extras("med", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    assert [r[0] for r in calls[0][1]] == ["lora-milora"]
    calls.clear()  # --only: some of them now
    chosen["lora-corda"] = {"settings": {"method": "full", "optim.lr": 1e-4, "tag": "lora-corda"}}
    (fr.out_dir("med") / "selection.json").write_text(json.dumps({"chosen": chosen, "steps": 160}))
    fr.extras("med", SimpleNamespace(steps=None, out=Path("/o"), only=["lora-corda"]), {}, "m")
    assert [r[0] for r in calls[0][1]] == ["lora-corda"]
    with pytest.raises(SystemExit, match="--only full-ewc: not among"):
        fr.extras("med", SimpleNamespace(steps=None, out=Path("/o"), only=["full-ewc"]), {}, "m")
    # in the results: a row marked measured, no verdict for it
    fr.FINAL_EXTRAS["med"] = ("lora-milora",)
    (fr.out_dir("med") / "selection.json").unlink()
    rng = np.random.default_rng(2)
    base = rng.uniform(20, 30, 100)
    for seed in (43, 44, 45):
        _entry(fr, "full", seed, base - rng.normal(6, 1, 100), base, -0.05)
        _entry(fr, "lora", seed, base - rng.normal(3, 1, 100), base, -0.01)
        _entry(fr, "lora-milora", seed, base - rng.normal(3, 1, 100), base, -0.02)
    res = fr.summarize("med", None)
    assert [(r["recipe"], r["role"]) for r in res["rows"]] == [("full", "baseline"), ("lora", "baseline"),
                                                               ("lora-milora", "measured")]
    assert "lora-milora" not in res["verdicts"] and res["extras"] == ["lora-milora"]
    assert "| lora-milora | measured | 3 |" in fr.render_md(res)


@pytest.mark.skipif(not (SHARED / "data" / "knowledge_qa").is_dir(), reason="needs ../shared/data/knowledge_qa")
def test_corda_calibration_questions_are_scored_by_no_suite(fr, monkeypatch, tmp_path):
    from forgetless.retention.suite import load_suite

    monkeypatch.setattr(fr, "ROOT", tmp_path)
    path = fr.kqa_calibration(SHARED / "data")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == fr.KQA_N and len({r["source"] for r in rows}) == fr.KQA_N
    used = set()
    for suite in (load_suite("general"), load_suite("general-probe")):
        used |= {w for v in fr.item_sets(suite, SHARED / "data").values() for w in v}
    assert not used & {r["source"] for r in rows}
    assert rows[0]["text"].startswith("Q: ") and "?\nA: " in rows[0]["text"]  # NQ's prompt, then its first answer


def test_a_merge_source_missing_here_is_trained_again_from_its_ledger_entry(fr, monkeypatch, tmp_path):
    e = _entry(fr, "full-ewc-1", 45, np.full(10, 24.0), np.full(10, 25.0), -0.004)
    e["settings"] = {"method": "full", "optim.lr": 1e-4, "mitigations": fr._ewc(1e4)}
    fr.ledger_path("med", "final", "full-ewc-1-seed45").write_text(json.dumps(e))
    trained = []

    def train_run(sc, ph, r, seed, *a, **k):
        trained.append((r["name"], r["settings"], seed))
        return {"task": {"gain": e["task"]["gain"]}, "retention": {"change": -0.004 if len(trained) == 1 else -0.0041}}

    monkeypatch.setattr(fr, "train_run", train_run)
    args = (Path("t.yaml"), "general", SimpleNamespace(), {})
    got = fr.retrain_source("med", "final", tmp_path / "full-ewc-1-seed45", 45, *args)
    assert trained == [("full-ewc-1", e["settings"], 45)] and got["identical"]
    assert not fr.retrain_source("med", "final", tmp_path / "full-ewc-1-seed45", 45, *args)["identical"]
    with pytest.raises(SystemExit, match="neither here nor in the final ledger"):
        fr.retrain_source("med", "final", tmp_path / "full-seed45", 45, *args)


def test_math_trains_one_pass_over_its_first_examples_in_every_phase(fr):
    """math trains on its first steps x batch examples in each phase: 1,280 in the selection (160 steps), 7,040 of
    its 7,273 in the final pass (880); med on its whole training split at the same steps in both."""
    files = {"train": Path("t.jsonl"), "val": Path("v.jsonl")}
    math, med = fr.common_set("math", files, "cpu", 160), fr.common_set("med", files, "cpu", 160)
    assert math["data.limit"] == 160 * 8 == fr.SCALE["math"]["select_steps"] * fr.SCALE["math"]["batch"]
    assert fr.common_set("math", files, "cpu", 880)["data.limit"] == 7040 == fr.steps_of("math", "final") * 8
    assert "data.limit" not in med  # med's ledger was trained on its whole training split
    assert [fr.steps_of("math", ph) for ph in ("select", "scale", "final", "extras")] == [160, 880, 880, 880]
    assert [fr.steps_of("med", ph) for ph in ("select", "final")] == [160, 160]
    assert fr.steps_of("math", "select", SimpleNamespace(steps=8)) == 8  # --steps (a smoke run) sets every phase


def test_pair_runs_the_chosen_recipes_on_another_machine_into_its_own_ledger(fr, monkeypatch):
    """`pair`: full FT and the first pre-registered candidate (or --families) at the main selection's settings, the
    first final seed (or --seeds), into frontier-<scenario>-<tag>/ and runs/frontier-<scenario>-<tag>/: the main
    ledger and runs are never touched."""
    chosen = {f: {"settings": {"method": "full", "optim.lr": 1e-4, "tag": f}} for f in ("full", "lora", "full-ewc")}
    fr.out_dir("med").mkdir(parents=True)
    (fr.out_dir("med") / "selection.json").write_text(json.dumps({"chosen": chosen, "steps": 160}))
    fr.FINAL_CANDIDATES["med"] = ("full-ewc", "wise-ewc")
    monkeypatch.setattr(fr, "TAG", "cuda-nvidia-h200")
    assert fr.out_dir("med").name == "frontier-med-cuda-nvidia-h200"
    assert fr.out_dir("med", tagged=False).name == "frontier-med"
    assert fr.runs_root("med", SimpleNamespace(out=None)) == fr.ROOT / "runs" / "frontier-med-cuda-nvidia-h200"
    # given the main runs' --out, its trainings are not reused as this machine's
    assert fr.runs_root("med", SimpleNamespace(out=Path("/o"))) == Path("/o/frontier-med-cuda-nvidia-h200")
    calls = []
    monkeypatch.setattr(fr.fb, "task_suite", lambda *a, **k: Path("t.yaml"))
    monkeypatch.setattr(fr, "replication_suite", lambda d: Path("r.yaml"))
    monkeypatch.setattr(fr, "run_phase", lambda sc, ph, runs, seeds, *a, **k: calls.append(
        (ph, [(r["name"], r["settings"]["tag"]) for r in runs], seeds)))
    args = SimpleNamespace(steps=None, out=None, families=None, seeds=None)
    # its plan counts this machine's ledger, not the main one's (which has both runs)
    main_ledger = fr.out_dir("med", tagged=False) / "ledger" / "final"
    main_ledger.mkdir(parents=True)
    for run in ("full-seed43", "full-ewc-seed43"):
        (main_ledger / f"{run}.json").write_text("{}")
    _entry(fr, "full", 43, np.full(10, 24.0), np.full(10, 25.0), -0.07)  # into the tagged ledger
    assert fr.pair_plan("med", args) == {"runs": 2, "done": 1}
    assert fr.pair_plan("med", SimpleNamespace(families=["full", "lora"], seeds=[43, 44])) == {"runs": 4, "done": 1}
    fr.ledger_path("med", "final", "full-seed43").unlink()
    fr.pair("med", args, {}, "m")  # the selection is read from the main folder, not the tagged one
    assert calls == [("final", [("full", "full"), ("full-ewc", "full-ewc")], [43])]
    calls.clear()
    fr.pair("med", SimpleNamespace(steps=None, out=None, families=["full", "lora", "full-ewc"], seeds=[43, 44, 45]),
            {}, "m")
    assert calls == [("final", [("full", "full"), ("lora", "lora"), ("full-ewc", "full-ewc")], [43, 44, 45])]
    with pytest.raises(SystemExit, match="--families full-nonsense: not among"):
        fr.pair("med", SimpleNamespace(steps=None, out=None, families=["full", "full-nonsense"], seeds=None), {}, "m")
    fr.FINAL_CANDIDATES["math"] = ()
    with pytest.raises(SystemExit, match="name the recipes with --families"):
        fr.pair("math", args, {}, "m")
    with pytest.raises(SystemExit, match="the selection ran at 160 steps"):  # the main selection's steps only
        fr.pair("med", SimpleNamespace(steps=40, out=None, families=None, seeds=None), {}, "m")


def test_pair_report_shows_each_run_beside_the_main_ledgers_and_its_own_verdict(fr, monkeypatch):
    rng = np.random.default_rng(3)
    base = rng.uniform(20, 30, 200)
    fr.FINAL_CANDIDATES["med"] = ("full-ewc",)
    for seed in (43, 44, 45):  # the main ledger (a CPU)
        _entry(fr, "full", seed, base - rng.normal(6, 1, 200), base, -0.07)
        _entry(fr, "full-ewc", seed, base - rng.normal(6, 1, 200), base, -0.001)
    main_md = fr.render_md(fr.summarize("med", None))
    monkeypatch.setattr(fr, "TAG", "cuda-nvidia-h200")
    full = base - rng.normal(6, 1, 200)
    _entry(fr, "full", 43, full, base, -0.06, rep_change=-0.08)
    _entry(fr, "full-ewc", 43, full - rng.normal(0, 0.05, 200), base, -0.002, rep_change=-0.01)
    res = fr.summarize_pair("med", None)
    assert [(r["run"], r["main"] is not None) for r in res["runs"]] == [("full-seed43", True),
                                                                       ("full-ewc-seed43", True)]
    here, main = res["runs"][0]["here"], res["runs"][0]["main"]
    assert here["drop"] == pytest.approx(6.0) and main["drop"] == pytest.approx(7.0)
    assert here["replication_drop"]["drop"] == pytest.approx(8.0) and main["replication_drop"] is None
    # one seed and no LoRA: the candidate has no verdict on this machine, and says why
    assert res["verdicts"]["full-ewc"] == {"verdict": None, "why": "no seed shared by full FT, LoRA and it"}
    stem = fr.write_results(res)
    assert stem.name == "frontier-med-cuda-nvidia-h200"
    saved = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    assert fr.render_pair_md(saved) == md  # the markdown is the JSON's alone
    assert "| full-seed43 | " in md and "+6.00 [+5.70, +6.30] | +7.00 [+6.70, +7.30]" in md
    assert "no verdict on this machine" in md
    # the main ledger's results are the same as before the pair ran
    monkeypatch.setattr(fr, "TAG", None)
    assert fr.render_md(fr.summarize("med", None)) == main_md
    # with full FT, LoRA and the candidate over the same seeds, the machine gets a verdict of its own
    monkeypatch.setattr(fr, "TAG", "cuda-nvidia-h200")
    for seed in (44, 45):
        full = base - rng.normal(6, 1, 200)
        _entry(fr, "full", seed, full, base, -0.06, rep_change=-0.08)
        _entry(fr, "full-ewc", seed, full - rng.normal(0, 0.05, 200), base, -0.002, rep_change=-0.01)
    for seed in (43, 44, 45):
        _entry(fr, "lora", seed, base - rng.normal(3, 1, 200), base, -0.03, rep_change=-0.03)
    _entry(fr, "full", 46, full, base, -0.06, rep_change=-0.08)  # a seed the others lack: not in the verdict
    res = fr.summarize_pair("med", None)
    assert res["verdicts"]["full-ewc"]["general"]["verdict"] == "MET" and res["verdict_seeds"]["full-ewc"] == [43, 44,
                                                                                                              45]
    assert len(res["verdicts"]["full-ewc"]["general"]["per_seed"]) == 3
    assert ("**full-ewc** on general, this machine's runs (seeds 43, 44, 45: those full FT, LoRA and it share): "
            "**MET**") in fr.render_pair_md(res)
    # a family the main ledger did not pre-register is measured here but not judged, even over the same seeds
    extra = next(f for f in fr.CANDIDATE_FAMILIES if f != "full-ewc" and "wise" not in fr.CANDIDATE_FAMILIES[f])
    for seed in (43, 44, 45):
        _entry(fr, extra, seed, base - rng.normal(0.1, 0.05, 200), base, -0.001, rep_change=-0.001)
    res = fr.summarize_pair("med", None)
    assert res["verdicts"][extra] == {"verdict": None, "why": "not pre-registered: measured, not judged"}
    assert extra not in res["verdict_seeds"] and res["verdicts"]["full-ewc"]["general"]["verdict"] == "MET"
    assert {r["recipe"]: r["role"] for r in res["rows"]}[extra] == "measured"


def test_machine_lines_that_differ_only_in_date_are_written_once_in_time_order(fr):
    a = "Xeon (AVX512, native bf16: True), 2 threads, device cuda, commit 2ec33dda71"
    b = "EPYC (AVX2, native bf16: False), 2 threads, device cpu, commit 4611fe6adb"
    lines = [f"{a}, 2026-12-04T17:50:29+00:00", f"{a}, 2026-12-04T17:50:26+00:00", f"{b}, 2026-12-03T09:53:29+00:00",
             f"{a}, 2026-12-04T17:50:27+00:00"]
    # in time order: b's run came first, though a's line sorts first as text
    assert fr.machines_text(lines) == (f"{b}, 2026-12-03T09:53:29+00:00; "
                                       f"{a}, 2026-12-04T17:50:26+00:00 to 2026-12-04T17:50:29+00:00")
    assert fr.machines_text([]) == "-"


def test_a_ledger_entry_written_before_flags_were_named_gets_its_cpu_flags_in_the_table(fr):
    """Two CPUs of one model name (a ledger resumed with --allow-other-cpu) are told apart: an entry whose line
    predates the flags hash gets it from its own `cpu` record; a line that has it, or an entry without one, stays."""
    old = "AMD EPYC (AVX512, native bf16: True), 2 threads, device cpu, commit 6d26caee9e, 2026-12-03T06:52:29+00:00"
    entry = {"machine": old, "cpu": {"cpu": "AMD EPYC", "flags_sha": "25fc08b1fed3"}}
    assert fr.machine_of(entry) == old.replace("True)", "True, flags 25fc08b1fed3)")
    new = {"machine": fr.machine_of(entry), "cpu": {"flags_sha": "fb86c92f4654"}}  # already named: kept as written
    assert fr.machine_of(new) == new["machine"]
    assert fr.machine_of({"machine": old}) == old and fr.machine_of({"machine": old, "cpu": "{...}"}) == old


def test_shards_split_a_phase_and_each_merge_goes_where_its_source_trains(fr, monkeypatch, tmp_path):
    """--shard I/N: each process trains every N-th run of the phase's runs x seeds list into a folder of its own,
    a WiSE-FT merge is done by the shard that trained its source, and a shard stops (ShardWait) while runs it does
    not own are missing; run again, the last shard completes the phase."""
    _wise_ewc_selection(fr)
    monkeypatch.setattr(fr.fb, "task_suite", lambda *a, **k: Path("t.yaml"))
    monkeypatch.setattr(fr, "replication_suite", lambda d: Path("r.yaml"))
    trained, merged = [], []

    def train_run(sc, ph, r, seed, *a, **k):
        d = fr.runs_root(sc, args) / ph / "runs" / f"{r['name']}-seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"wall_time_s": 1.0}))
        (d / "eval-replication.json").write_text("{}")  # scored: run_phase does not score it again
        trained.append((fr.SHARD, d.name))
        return {"dir": str(d)}

    def record_run(sc, ph, run, family, settings, seed, d, row, *a):
        path = fr.ledger_path(sc, ph, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": run, "phase": ph, "family": family, "settings": settings, "seed": seed,
                                    "steps": 160}))
        return path

    monkeypatch.setattr(fr, "train_run", train_run)
    monkeypatch.setattr(fr, "record_run", record_run)
    monkeypatch.setattr(fr, "score_model", lambda d, *a: ({}, {}))
    import forgetless.merge
    import forgetless.models
    monkeypatch.setattr(forgetless.models, "resolve_model", lambda m: SimpleNamespace(path="base"))
    monkeypatch.setattr(forgetless.merge, "merge", lambda base, src, alpha, d, **k: merged.append(
        (fr.SHARD, Path(src).relative_to(tmp_path / "runs").parts[0], Path(d).name)))
    args = SimpleNamespace(steps=None, out=tmp_path / "runs", data_root=tmp_path, device="cpu", model="m")
    monkeypatch.setattr(fr, "SHARD", (1, 2))
    with pytest.raises(fr.ShardWait) as w:
        fr.final("med", args, {}, "m")
    # the runs x seeds list: full 43-45, lora 43-45, full-ewc 43-45; shard 1 of 2 takes places 0, 2, 4, 6, 8
    assert [n for _, n in trained] == ["full-seed43", "full-seed45", "lora-seed44", "full-ewc-seed43",
                                       "full-ewc-seed45"]
    assert merged == [((1, 2), "shard-1of2", "wise-ewc-seed43"), ((1, 2), "shard-1of2", "wise-ewc-seed45")]
    assert w.value.missing == ["full-seed44", "lora-seed43", "lora-seed45", "full-ewc-seed44", "wise-ewc-seed44"]
    monkeypatch.setattr(fr, "SHARD", (2, 2))
    assert set(fr.final("med", args, {}, "m")) == {f"{f}-seed{s}" for f in ("full", "lora", "full-ewc", "wise-ewc")
                                                   for s in (43, 44, 45)}
    assert [n for sh, n in trained if sh == (2, 2)] == ["full-seed44", "lora-seed43", "lora-seed45",
                                                        "full-ewc-seed44"]
    assert merged[-1] == ((2, 2), "shard-2of2", "wise-ewc-seed44")
    # a source trained by another shard of the same split is found there, not trained again
    monkeypatch.setattr(fr, "SHARD", (1, 2))
    assert fr.source_dir("med", args, "final", "full-ewc-seed44") == \
        tmp_path / "runs" / "shard-2of2" / "final" / "runs" / "full-ewc-seed44"
    assert fr.source_dir("med", args, "final", "full-ewc-seed46").parent.parent.parent.name == "shard-1of2"
    unsharded = tmp_path / "runs" / "final" / "runs" / "full-ewc-seed46"  # trained before the phase was split
    unsharded.mkdir(parents=True)
    (unsharded / "summary.json").write_text("{}")
    assert fr.source_dir("med", args, "final", "full-ewc-seed46") == unsharded
    monkeypatch.setattr(fr, "SHARD", None)  # and a phase run without shards finds what the shards trained
    assert fr.source_dir("med", args, "final", "full-ewc-seed44") == \
        tmp_path / "runs" / "shard-2of2" / "final" / "runs" / "full-ewc-seed44"
    # run again once everything is in, a shard does nothing and completes; checkpoints a kill left beside a
    # recorded run (between its ledger entry and their deletion) are deleted, whichever shard trained it
    n = len(trained)
    left = tmp_path / "runs" / "shard-2of2" / "final" / "runs" / "full-ewc-seed44" / "checkpoints" / "checkpoint-5"
    left.mkdir(parents=True)
    fr.final("med", args, {}, "m")
    assert len(trained) == n and not left.exists()
    assert fr.parse_shard("2/8") == (2, 8)
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(SystemExit, match="--shard"):
            fr.parse_shard(bad)


def test_jobs_runs_shards_round_after_round_until_the_phase_is_done(fr, tmp_path):
    """--jobs N: N shard processes a round (the same command with --shard i/N, --jobs dropped, each logging to its
    own file), again while some wait for others' stages; a failed shard or a round that adds nothing stops it."""
    led = fr.RESULTS / "frontier-med" / "ledger" / "select"
    led.mkdir(parents=True)
    launched = []

    def script(plan):  # plan: per round, per shard, (exit status, ledger runs it adds)
        def launch(cmd, stdout, stderr):
            rnd = len(launched) // 2
            i = int(cmd[-1].split("/")[0])
            launched.append(cmd)
            code, adds = plan[rnd][i - 1]
            for run in adds:
                (led / f"{run}.json").write_text("{}")
            stdout.write(f"shard {i} round {rnd}\n")
            return SimpleNamespace(wait=lambda: code)
        return launch

    args = SimpleNamespace(jobs=2, scenario="med", phase="select", out=tmp_path / "runs")
    argv = ["select", "--scenario", "med", "--jobs", "2", "--out", str(tmp_path / "runs")]
    rounds = fr.drive_shards(args, argv, script([[(0, ["a"]), (3, [])], [(0, []), (0, ["b"])]]))
    assert rounds == [[0, 3], [0, 0]]
    assert [c[2:] for c in launched[:2]] == [["select", "--scenario", "med", "--out", str(tmp_path / "runs"),
                                               "--shard", f"{i}/2"] for i in (1, 2)]
    assert "shard 2 round 1" in (tmp_path / "runs" / "shard-logs" / "select-2of2.log").read_text()
    launched.clear()
    with pytest.raises(SystemExit, match="shard 2/2 exited with status 1: see .*select-2of2.log"):
        fr.drive_shards(args, argv, script([[(0, ["c"]), (1, [])]]))
    launched.clear()
    with pytest.raises(SystemExit, match="added no run to the ledger"):
        fr.drive_shards(args, argv, script([[(3, []), (3, [])]]))
    assert fr.strip_option(["x", "--jobs=4", "--jobs", "2", "y"], "--jobs") == ["x", "y"]


_ITEMS = np.random.default_rng(7).normal(0, 3, 200)  # the validation items' own difficulty, shared by every run


def _val_items(gain, noise=0.0, seed=0):
    """Validation columns of a run with this gain: 200 items of 10 tokens around a base ce of 1.3, each item's own
    difficulty shared by every run (so two runs differ item by item only by their gains), plus `noise` nats of the
    run's own per-item noise (which can hide a small difference)."""
    own = np.random.default_rng(seed).normal(0, noise, 200) if noise else 0.0
    return {"task": "math_val_ce", "candidate": _cols(10 * (1.3 - gain) + _ITEMS + own)}


def _scale_entry(fr, phase, name, lr, gain, drop, steps, family="full", settings=None, noise=0.0, seed=0):
    """A math ledger entry for full FT at `lr` (or `family` at `settings`): validation gain (and the per-item
    columns behind it) and probe drop (points) with intervals."""
    e = {"run": f"{name}-seed42", "phase": phase, "family": family,
         "settings": settings or {"method": "full", "optim.lr": lr}, "seed": 42, "steps": steps,
         "machine": "test CPU", "task": {"gain": gain, "ci": [gain - 0.03, gain + 0.03]},
         "retention": {"change": -drop / 100, "ci": [-(drop + 0.8) / 100, -(drop - 0.8) / 100]},
         "task_items": _val_items(gain, noise, seed)}
    path = fr.ledger_path("math", phase, e["run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(e))


def test_a_selection_at_reduced_steps_must_hold_at_the_final_steps_before_the_final_pass(fr, monkeypatch):
    """math selects at 160 steps and trains the final pass at more (320 here): `scale` trains full FT at its chosen
    rate and the rate below it at 320 steps; `final` runs only where the chosen rate still has the better validation
    gain and loses at least MIN_FULL_DROP points on the probe there, and the table shows the check."""
    fr.SCALE["math"]["steps"] = 320  # (this module's own copy: the check's mechanics, whatever math's steps are)
    with pytest.raises(SystemExit, match="run `select` first"):
        fr.scale_runs("math")
    assert fr.scale_status("math") is None  # nothing to check yet
    # (each run's own item noise hides 1e-4's lead over 5e-5: the grid does not slide, see the test below)
    for i, (lr, gain, drop) in enumerate([(2e-5, 0.52, 0.7), (5e-5, 0.57, 1.4), (1e-4, 0.59, 3.2)]):
        _scale_entry(fr, "select", f"full-{i}", lr, gain, drop, 160, noise=3.0, seed=i)
    runs, chosen = fr.scale_runs("math")
    assert chosen["name"] == "full-2" and [r["name"] for r in runs] == ["full-2", "full-1"]
    assert [r["settings"]["optim.lr"] for r in runs] == [1e-4, 5e-5]
    st = fr.scale_status("math")
    assert st["missing"] == ["full-2", "full-1"] and st["holds"] is None
    assert "Scale check (the selection ran at 160 steps, the final pass at 320" in "\n".join(fr._scale_lines(st))
    assert "not run yet" in "\n".join(fr._scale_lines(st))
    with pytest.raises(SystemExit, match="no reduced-step selection"):
        fr.scale_check("med", SimpleNamespace(steps=None), {}, "m")

    chosen_settings = {"full": {"settings": runs[0]["settings"]}, "lora": {"settings": {"method": fr.LORA}},
                       "full-ewc": {"settings": {**runs[0]["settings"], "mitigations": fr._ewc(1e4)}}}
    fr.out_dir("math").mkdir(parents=True, exist_ok=True)
    (fr.out_dir("math") / "selection.json").write_text(json.dumps({"chosen": chosen_settings, "steps": 160}))
    fr.FINAL_CANDIDATES["math"] = ("full-ewc",)
    trained = []
    monkeypatch.setattr(fr.fb, "task_suite", lambda *a, **k: Path("t.yaml"))
    monkeypatch.setattr(fr, "replication_suite", lambda d: Path("r.yaml"))
    monkeypatch.setattr(fr, "run_phase", lambda sc, ph, rs, *a, **k: trained.append([r["name"] for r in rs]))
    args = SimpleNamespace(steps=None, out=Path("/o"))
    with pytest.raises(SystemExit, match="run `scale` first"):
        fr.final("math", args, {}, "m")
    # at 320 steps the lower rate gains more: the ranking does not hold
    _scale_entry(fr, "scale", "full-2", 1e-4, 0.60, 5.1, 320)
    _scale_entry(fr, "scale", "full-1", 5e-5, 0.61, 2.9, 320)
    with pytest.raises(SystemExit, match=r"does not hold \(.*\+0.600 against \+0.610 .*ranking does not hold"):
        fr.final("math", args, {}, "m")
    # the ranking holds but full FT forgets too little
    _scale_entry(fr, "scale", "full-1", 5e-5, 0.58, 2.9, 320)
    _scale_entry(fr, "scale", "full-2", 1e-4, 0.60, 3.6, 320)
    with pytest.raises(SystemExit, match=r"loses 3.60 points on general-probe \(under 4\)"):
        fr.final("math", args, {}, "m")
    _scale_entry(fr, "scale", "full-2", 1e-4, 0.60, 5.1, 320)
    fr.final("math", args, {}, "m")
    assert trained == [["full", "lora", "full-ewc"]]
    (fr.out_dir("math") / "selection.json").write_text(json.dumps({"chosen": chosen_settings, "steps": 320}))
    with pytest.raises(SystemExit, match="ran at 320 steps, the scale selects at 160"):
        fr.final("math", args, {}, "m")
    # the table: the check and each rate at both step counts, from the result JSON alone
    (fr.out_dir("math") / "selection.json").unlink()  # (a constructed selection.json has no table to show)
    res = fr.summarize("math", None)
    md = fr.render_md(json.loads(json.dumps(res)))
    assert res["scale_check"]["holds"] and "Scale check (the selection ran at 160 steps" in md
    assert "**holds**: at 320 steps full FT at 0.0001 has validation gain +0.600 against +0.580 at 5e-05" in md
    assert "| 0.0001 * | +0.590 [+0.560, +0.620] | +0.600 [+0.570, +0.630] | +3.20 [+2.40, +4.00] | " \
           "+5.10 [+4.30, +5.90] |" in md
    assert "the `general-probe` probe (seed 42, at 160 steps)" in md
    assert not res["rows"] and "| recipe |" not in md  # no final table before the final pass (nor empty columns)


def test_a_grid_whose_best_is_clearly_past_an_edge_slides_one_point_that_way(fr):
    """Stage A's grid slides once where the best validation gain is at an edge and beats the next point by a paired
    interval clear of zero: one more rate past the edge at the grid's ratio, the rate chosen among the 3 points
    ending at it; the scale check then works on the slid grid."""
    lrs = fr.BASELINES["full"]["grid"][1]
    assert lrs == [2e-5, 5e-5, 1e-4]

    def stage_a(gains, noise=0.0):
        for i, (lr, g) in enumerate(zip(lrs, gains, strict=True)):
            _scale_entry(fr, "select", f"full-{i}", lr, g, 1.0 + i, 160, noise=noise, seed=i)
        return fr.read_ledger("math", "select")

    # the best inside the grid: no slide
    assert fr.slide_point("full", stage_a([0.52, 0.60, 0.59])) is None
    # at the top edge, but within noise of the next point (each item's own noise of 3 nats hides 0.02 nats)
    led = stage_a([0.52, 0.57, 0.59], noise=3.0)
    c = fr.edge_vs_next(led["full-2-seed42"], led["full-1-seed42"])
    assert c.ci[0] < 0 < c.ci[1] and fr.slide_point("full", led) is None
    # clearly at the bottom edge: one point below it, at the grid's ratio there (2e-5 x 2e-5 / 5e-5)
    p = fr.slide_point("full", stage_a([0.60, 0.55, 0.50]))
    assert p["name"] == "full-3" and p["slid"] == "down" and p["settings"] == {"method": "full", "optim.lr": 8e-6}
    # clearly at the top edge (0.02 nats on every item, as math's 1e-4 against 5e-5: +0.018 [+0.014, +0.022])
    led = stage_a([0.52, 0.57, 0.59])
    c = fr.edge_vs_next(led["full-2-seed42"], led["full-1-seed42"])
    assert c.delta == pytest.approx(-0.02) and c.significant and not c.worse  # ce: the edge's is lower
    p = fr.slide_point("full", led)
    assert p == {"name": "full-3", "family": "full", "settings": {"method": "full", "optim.lr": 2e-4},
                 "value": 2e-4, "slid": "up"}
    kept, every = fr.baseline_points("full", led)
    assert [g["name"] for g in kept] == ["full-1", "full-2", "full-3"] and len(every) == 4
    assert fr.slide_point("lora", led) is None  # LoRA's grid is not in the ledger yet
    # the scale check waits for the slid rate, then checks the chosen rate of the slid grid and its neighbour
    assert fr._scale_points("math") is None
    with pytest.raises(SystemExit, match="no full-3-seed42: run `select` first"):
        fr.scale_runs("math")
    _scale_entry(fr, "select", "full-3", 2e-4, 0.61, 6.0, 160)
    runs, chosen = fr.scale_runs("math")
    assert chosen["name"] == "full-3" and [r["settings"]["optim.lr"] for r in runs] == [2e-4, 1e-4]
    _scale_entry(fr, "select", "full-3", 2e-4, 0.58, 6.0, 160)  # the slid rate gains less: 1e-4 stays chosen
    runs, chosen = fr.scale_runs("math")
    assert chosen["name"] == "full-2" and [r["settings"]["optim.lr"] for r in runs] == [1e-4, 5e-5]
    plan = fr.plan("math", SimpleNamespace(steps=None))
    assert plan["select_runs"] == 7 + sum(len(fr._grid(f, s)) for f, s in fr.families("math").items())


def test_the_selection_trains_the_slid_rate_before_stage_b_and_shows_the_point_it_left(fr, monkeypatch):
    """selection() on math with a fake trainer: full FT's best (1e-4) is clearly at the top of its grid, so 2e-4 is
    trained right after full FT's grid (before LoRA's and any candidate); it wins and is chosen; 2e-5 is shown
    outside the slid grid, and gentle optimisation still chooses among all 4 of full FT's rates (2e-5 is the only
    one within the budget)."""
    lrs = {2e-5: (0.52, 0.7), 5e-5: (0.57, 1.4), 1e-4: (0.59, 3.2), 2e-4: (0.61, 6.0)}
    batches = []

    def run_phase(sc, ph, runs, seeds, *a, **k):
        batches.append([r["name"] for r in runs])
        for r in runs:
            st = r["settings"]
            if r["family"] == "full":
                g, d = lrs[st["optim.lr"]]
            else:  # every other run: a gain and drop of its own, from its name
                g, d = 0.4 + 0.001 * len(batches), 0.5 + 0.1 * (len(r["name"]) % 7)
            _scale_entry(fr, "select", r["name"], st.get("optim.lr"), g, d, 160, family=r["family"], settings=st)
        return fr.read_ledger(sc, ph)

    def wise_runs(sc, ph, runs, *a, **k):
        for r in runs:
            _scale_entry(fr, "select", r["name"], None, 0.5, 0.9, 160, family=r["family"], settings=r["settings"])

    monkeypatch.setattr(fr, "run_phase", run_phase)
    monkeypatch.setattr(fr, "wise_runs", wise_runs)
    monkeypatch.setattr(fr, "val_suite", lambda *a: Path("v.yaml"))
    sel = fr.selection("math", SimpleNamespace(steps=None, out=Path("/o")), {}, "m")
    assert batches[:3] == [["full-0", "full-1", "full-2"], ["full-3"], ["lora-0", "lora-1", "lora-2"]]
    assert sel["chosen"]["full"]["name"] == "full-3" and sel["chosen"]["full"]["settings"]["optim.lr"] == 2e-4
    assert sel["chosen"]["full-gentle"]["name"] == "full-0"  # within the 1% budget on the probe: 2e-5 only
    assert [t["run"] for t in sel["table"]][:7] == ["full-0", "full-1", "full-2", "full-3", "lora-0", "lora-1",
                                                    "lora-2"]
    rows = {t["run"]: t for t in sel["table"]}
    assert rows["full-0"].get("outside") and not any(t.get("outside") for r, t in rows.items() if r != "full-0")
    assert sel["full_probe_drop"] == pytest.approx(6.0)
    md = fr.render_md(json.loads(json.dumps(fr.summarize("math", None))))
    assert "| full-0 | full | 2e-05 (outside the slid grid) | +0.520" in md
    assert "| full-3 * | full | 0.0002 | +0.610" in md


def test_long_math_runs_checkpoint_and_a_resumed_run_gets_its_whole_wall_time_and_no_checkpoints_left(fr, tmp_path):
    """math checkpoints every SCALE['math']['save_steps'] steps (its final runs take about 95 minutes), med not; a
    run resumed at checkpoint-330 of 880 has its last session's wall time scaled to all its steps, marked as an
    estimate; once a run is in the ledger its checkpoints are deleted (its final model stays)."""
    files = {"train": Path("t.jsonl"), "val": Path("v.jsonl")}
    assert fr.common_set("math", files, "cpu", 880)["train.save_steps"] == 110 == fr.SCALE["math"]["save_steps"]
    assert fr.common_set("med", files, "cpu", 160)["train.save_steps"] is None
    assert fr.common_set("math", files, "cpu", 100)["train.save_steps"] is None  # a smoke run under one interval
    d = tmp_path / "run"
    for sub in ("checkpoints/checkpoint-220", "checkpoints/checkpoint-330", "final"):
        (d / sub).mkdir(parents=True)
    items = {"tasks": {"math_val_ce": _cols([5.0, 6.0])}, "base": {"tasks": {"math_val_ce": _cols([7.0, 8.0])}}}
    (d / "eval-task.items.json").write_text(json.dumps(items))
    (d / "summary.json").write_text(json.dumps({"resumed_from": str(d / "checkpoints" / "checkpoint-330")}))
    row = {"task": {"gain": 0.2}, "retention": {"change": -0.05}, "wall_time_s": 3000.0, "tokens_per_s": 250.0}
    path = fr.record_run("math", "scale", "full-2-seed42", "full", {"optim.lr": 1e-4}, 42, d, row, "m", steps=880)
    e = json.loads(path.read_text())
    assert e["wall_time_s"] == 4800.0 and e["wall_time_session_s"] == 3000.0  # 3000 s for 550 steps, x 880 / 550
    assert e["wall_time_estimated"] and e["resumed_at_step"] == 330
    assert not list((d / "checkpoints").iterdir()) and (d / "final").is_dir()
    (d / "summary.json").write_text(json.dumps({"resumed_from": None}))  # trained in one go: as the trainer says
    e = json.loads(fr.record_run("math", "scale", "full-2-seed42", "full", {}, 42, d, row, "m", steps=880)
                   .read_text())
    assert e["wall_time_s"] == 3000.0 and "wall_time_estimated" not in e


def test_a_resumed_run_takes_its_recorded_training_time_and_names_every_session(fr, monkeypatch, tmp_path):
    """A run resumed from a checkpoint that records the training seconds before it: the entry's wall time is the
    summary's total over all sessions (not estimated) and its tokens/s the whole run's; resumed at its last step
    from a checkpoint without them, the wall time is unknown, never the few seconds the last session took. Each
    session that trained it is named (commit, machine) in the entry."""
    d = tmp_path / "runs" / "scale" / "runs" / "full-2-seed42"
    (d / "checkpoints" / "checkpoint-880").mkdir(parents=True)
    items = {"tasks": {"math_val_ce": _cols([5.0, 6.0])}, "base": {"tasks": {"math_val_ce": _cols([7.0, 8.0])}}}
    (d / "eval-task.items.json").write_text(json.dumps(items))
    row = {"task": {"gain": 0.2}, "retention": {"change": -0.05}, "wall_time_s": 2000.0, "tokens_per_s": 250.0}
    (d / "summary.json").write_text(json.dumps({"resumed_from": str(d / "checkpoints" / "checkpoint-550"),
                                                "train_time_total_s": 5500.0, "tokens_seen": 1_100_000}))
    monkeypatch.setattr(fr, "RUN_PROVENANCE", {"commit": "abc", "dirty": False, "machine": {"cpu": "X"},
                                               "precision": {}})
    import forgetless.provenance

    monkeypatch.setattr(forgetless.provenance, "machine_line", lambda prov: f"cpu {prov['machine']['cpu']}")
    fr.note_session(d)
    fr.RUN_PROVENANCE["commit"] = "def"
    fr.note_session(d)
    e = json.loads(fr.record_run("math", "scale", "full-2-seed42", "full", {}, 42, d, row, "m", steps=880)
                   .read_text())
    assert e["wall_time_s"] == 5500.0 and e["tokens_per_s"] == 200.0 and e["wall_time_session_s"] == 2000.0
    assert e["resumed_at_step"] == 550 and "wall_time_estimated" not in e and "wall_time_unknown" not in e
    assert [(s["commit"], s["machine"]) for s in e["sessions"]] == [("abc", "cpu X"), ("def", "cpu X")]
    assert not (d / "checkpoints" / "checkpoint-880").exists()  # finished and recorded
    # resumed at checkpoint-880 of 880 (killed during the final evaluation), the checkpoint without its seconds:
    # the last session trained nothing, so its time says nothing of the run's
    (d / "summary.json").write_text(json.dumps({"resumed_from": str(d / "checkpoints" / "checkpoint-880")}))
    row["tokens_per_s"] = 0.0
    e = json.loads(fr.record_run("math", "scale", "full-2-seed42", "full", {}, 42, d, row, "m", steps=880)
                   .read_text())
    assert e["wall_time_s"] is None and e["tokens_per_s"] is None and e["wall_time_unknown"]
    # an unfinished run (no summary.json) keeps its checkpoints
    u = tmp_path / "unfinished"
    (u / "checkpoints" / "checkpoint-110").mkdir(parents=True)
    fr.drop_checkpoints(u)
    assert (u / "checkpoints" / "checkpoint-110").is_dir()
    assert fr._mean_known([100.0, None, 300.0]) == 200.0 and fr._mean_known([None]) is None


def test_a_first_session_on_a_fresh_runs_folder_leaves_the_phase_folder_to_its_sweep(fr, monkeypatch, tmp_path):
    """On a machine without the runs folder (runs/ does not travel), the session note of the first run to train
    is written before its sweep claims the phase's folder: it must not land there, or the sweep refuses the folder
    as not its own. A run begun under the older layout keeps its notes where they are."""
    from forgetless.errors import ForgetlessError
    from forgetless.orchestration import claim_dir

    monkeypatch.setattr(fr, "RUN_PROVENANCE", {"commit": "abc", "dirty": False, "machine": {"cpu": "X"},
                                               "precision": {}})
    import forgetless.provenance

    monkeypatch.setattr(forgetless.provenance, "machine_line", lambda prov: "cpu X")
    phase = tmp_path / "runs" / "select"
    fr.note_session(phase / "runs" / "lora-1-seed42")
    assert fr.sessions_file(phase / "runs" / "lora-1-seed42") == tmp_path / "runs" / "sessions" / "select" / \
        "lora-1-seed42.jsonl"
    assert not phase.exists()
    assert claim_dir(phase, ("sweep.json", "sweep.yaml"), "sweep", False) is False  # claimed, not refused
    (tmp_path / "other" / "sessions").mkdir(parents=True)  # what the older layout did to a fresh folder:
    with pytest.raises(ForgetlessError, match="not a sweep directory"):
        claim_dir(tmp_path / "other", ("sweep.json", "sweep.yaml"), "sweep", False)
    legacy = tmp_path / "old" / "select"
    (legacy / "sessions").mkdir(parents=True)
    (legacy / "sessions" / "full-1-seed42.jsonl").write_text('{"commit": "zzz"}\n')
    fr.note_session(legacy / "runs" / "full-1-seed42")
    assert [json.loads(x)["commit"] for x in (legacy / "sessions" / "full-1-seed42.jsonl").read_text().splitlines()] \
        == ["zzz", "abc"]


def test_the_final_table_marks_estimated_and_unknown_training_times(fr):
    base = np.full(20, 25.0)
    for seed, (wall, est) in zip((42, 43, 44), ((600.0, False), (900.0, True), (None, False)), strict=True):
        e = _entry(fr, "full", seed, base - 5, base, -0.05)
        e.update(wall_time_s=wall, **({"wall_time_estimated": True} if est else {}))
        fr.ledger_path("med", "final", e["run"]).write_text(json.dumps(e))
    (row,) = fr.family_rows(fr.read_ledger("med", "final"), ("full",), ())
    assert (row["wall_time_s"], row["wall_time_known"], row["wall_time_estimated"]) == (750.0, 2, True)
    assert fr._train_s(row) == "~750 (2 of 3)"
    assert fr._train_s({**row, "wall_time_known": 3, "wall_time_estimated": False}) == "750"
    assert fr._train_s({**row, "wall_time_s": None}) == "-"
    assert fr._train_marks({**row, "wall_time_s": None}) == ("", "")  # no time, nothing for the legend to explain
    md = fr.render_md(json.loads(json.dumps(fr.summarize("med", None))))
    assert "| ~750 (2 of 3) |" in md and "~ = a resumed run's time estimated" in md


def test_a_wise_merge_costs_its_source_runs_whole_training_time(fr, monkeypatch, tmp_path):
    """A merge has no training of its own: its wall time is its source's over all the source's sessions (the
    source's ledger entry), not the source's last session's summary."""
    import forgetless.merge
    import forgetless.models

    args = SimpleNamespace(steps=None, out=tmp_path / "runs", data_root=tmp_path, device="cpu", model="m")
    src = fr.runs_root("math", args) / "select" / "runs" / "full-ewc-1-seed42"
    src.mkdir(parents=True)
    (src / "summary.json").write_text(json.dumps({"wall_time_s": 400.0,
                                                  "resumed_from": str(src / "checkpoints" / "checkpoint-110")}))
    led = fr.ledger_path("math", "select", "full-ewc-1-seed42")
    led.parent.mkdir(parents=True)
    led.write_text(json.dumps({"run": "full-ewc-1-seed42", "settings": {}, "steps": 160, "wall_time_s": 1280.0,
                               "wall_time_estimated": True}))
    monkeypatch.setattr(forgetless.models, "resolve_model", lambda m: SimpleNamespace(path="base"))
    monkeypatch.setattr(forgetless.merge, "merge", lambda *a, **k: None)
    monkeypatch.setattr(fr, "score_model", lambda d, *a: ({"wall_time_s": None}, {}))
    rows = []
    monkeypatch.setattr(fr, "record_run", lambda sc, ph, run, fam, settings, seed, d, row, *a: rows.append(row))
    runs = [{"name": "wise-ewc-0", "family": "wise-ewc", "settings": {"wise_alpha": 0.75}}]
    fr.wise_runs("math", "select", runs, {42: src}, Path("t.yaml"), "general-probe", args, "m", {})
    assert rows == [{"wall_time_s": 1280.0, "wall_time_estimated": True}]
    led.unlink()  # not in the ledger (yet): the source's summary, its whole time estimated (400 s x 160 / 50)
    rows.clear()
    fr.wise_runs("math", "select", runs, {42: src}, Path("t.yaml"), "general-probe", args, "m", {})
    assert rows == [{"wall_time_s": 1280.0, "wall_time_estimated": True}]


def test_render_takes_no_phase_and_a_phase_needs_a_scenario(fr, tmp_path, monkeypatch, capsys):
    """--render FILE itself is tested with every bench's (test_bench_render); here, frontier's own argument rules."""
    saved = tmp_path / "frontier-med.json"
    shutil.copy(REPO / "bench" / "results" / "frontier-med.json", saved)
    for argv in (["plan", "--render", str(saved)], ["plan"], ["--scenario", "med"]):
        monkeypatch.setattr(sys, "argv", ["frontier.py", *argv])
        with pytest.raises(SystemExit):
            fr.main()
    err = capsys.readouterr().err
    assert "give no phase" in err and err.count("a phase and --scenario are required") == 2
