"""The typed result records (forgetless.results) serialise to the layouts sweep.json, continual.json and the
reports have always held: the same keys, in the same order."""

from __future__ import annotations

import json

from forgetless.results import RetentionChange, TaskGain, ability_names, task_gain

CMP = {
    "retention_score": 0.97, "retention_ci": [0.95, 0.99], "significant_drops": ["ppl"],
    "abilities": {"knowledge": {"change": -0.01}}, "score_definition": 2,
    "tasks": {
        "ppl": {"main": "bits_per_byte", "base": 1.0, "candidate": 1.2, "delta": 0.2, "ci": [0.1, 0.3],
                "significant": True, "significant_drop": True, "flipped": 0, "higher_is_better": False, "n": 8},
        "mc": {"main": "acc", "base": 0.5, "candidate": 0.5, "delta": 0.0, "ci": [-0.1, 0.1],
               "significant": False, "significant_drop": False, "flipped": 2, "higher_is_better": True, "n": 8},
    },
}


def test_task_gain_is_oriented_so_that_positive_is_better():
    g = TaskGain.of(CMP)
    assert json.dumps(g.as_dict()) == json.dumps({
        "task": "ppl", "metric": "bits_per_byte", "base": 1.0, "candidate": 1.2, "gain": -0.2, "ci": [-0.3, -0.1],
        "significant": True})
    assert task_gain(CMP) == g.as_dict()


def test_retention_change_in_each_file_layout():
    r = RetentionChange.of(CMP)
    assert r.change == r.score - 1 and r.ci == [0.95 - 1, 0.99 - 1]
    # a lone run's report row
    assert list(r.as_dict("score", "change", "ci", "abilities", "score_definition", "significant_drops")) == [
        "score", "change", "ci", "abilities", "score_definition", "significant_drops"]
    # continual.json: each task cut to its fields, in their order
    entry = r.as_dict("score", "change", "ci", "significant_drops", "tasks",
                      task_fields=("main", "base", "candidate", "delta", "ci", "significant_drop"))
    assert list(entry) == ["score", "change", "ci", "significant_drops", "tasks"]
    assert list(entry["tasks"]["mc"]) == ["main", "base", "candidate", "delta", "ci", "significant_drop"]
    # without task_fields, every task's comparison entry as it is
    assert r.as_dict("tasks")["tasks"] is CMP["tasks"]


def test_defaults_of_older_comparisons():
    old = {k: v for k, v in CMP.items() if k not in ("abilities", "score_definition")}
    r = RetentionChange.of(old)
    assert r.abilities == {} and r.score_definition == 1


def test_ability_names_in_first_seen_order():
    rows = [{"retention": {"abilities": {"b": {}, "a": {}}}}, {"retention": {}},
            {"retention": {"abilities": {"c": {}}}}]
    assert ability_names(rows) == ["b", "a", "c"]
