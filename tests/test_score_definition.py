"""The retention score by ability (definition 2) through evaluate/compare and the eval report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED
from rich.console import Console
from transformers import AutoModelForCausalLM

from forgetless.retention import metrics as M
from forgetless.retention.evaluate import compare, evaluate, evaluate_cached
from forgetless.retention.report import print_report
from forgetless.retention.suite import Suite, load_suite
from forgetless.train.model import load_tokenizer


@pytest.fixture(scope="module")
def models(tiny_model):
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    worse = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in worse.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return base, worse, load_tokenizer(str(tiny_model))


def _data(tmp_path):
    rows = [{"id": f"q{i}", "question": f"word {i} and {i + 1}", "choices": ["red", "green blue", "sun"], "gold": i % 3}
            for i in range(12)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": f"the cat {i} sat on the mat {i} times and then it slept"} for i in range(10)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


def _suite(tagged: bool) -> Suite:
    tasks = [
        {"name": "mc1", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "main_metric": "pgold"},
        {"name": "mc2", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "Q: {{question}}\nA:",
         "main_metric": "pgold"},
        {"name": "ppl", "kind": "perplexity", "data": {"path": "docs.jsonl"}},
    ]
    if tagged:
        for t, ab in zip(tasks, ["commonsense", "commonsense", "language_modelling"], strict=True):
            t["ability"] = ab
    return Suite.model_validate({"name": "s", "tasks": tasks})


def test_compare_scores_by_ability_and_keeps_definition_1(models, tmp_path):
    _data(tmp_path)
    base, worse, tok = models
    s = _suite(tagged=True)
    kw = {"data_root": tmp_path, "bf16": False, "progress": False}
    cmp = compare(evaluate(base, tok, s, **kw), evaluate(worse, tok, s, **kw))
    r = {n: t["retention"] for n, t in cmp["tasks"].items()}
    assert cmp["score_definition"] == M.SCORE_VERSION == 2
    assert math.isclose(cmp["retention_score"], ((r["mc1"] + r["mc2"]) / 2 + r["ppl"]) / 2)  # abilities weigh equally
    assert math.isclose(cmp["retention_score_v1"], (r["mc1"] + r["mc2"] + r["ppl"]) / 3)
    assert cmp["abilities"]["commonsense"]["tasks"] == ["mc1", "mc2"]
    assert math.isclose(cmp["abilities"]["language_modelling"]["change"], r["ppl"] - 1)
    assert cmp["tasks"]["mc1"]["ability"] == "commonsense" and cmp["tasks"]["ppl"]["weight_in_score"] == 0.5
    assert math.isclose(sum(t["variance_share"] for t in cmp["tasks"].values()), 1.0)
    # untagged: every task its own ability, the score is definition 1's
    u = _suite(tagged=False)
    cu = compare(evaluate(base, tok, u, **kw), evaluate(worse, tok, u, **kw))
    assert math.isclose(cu["retention_score"], cu["retention_score_v1"])

    report = {"suite": "s", "model": "worse", "baseline": "base", "candidate": evaluate(worse, tok, s, **kw).summary(),
              "comparison": cmp}
    con = Console(record=True, width=200)
    print_report(report, con)
    text = con.export_text()
    assert "retention by ability" in text and "commonsense" in text and "language_modelling" in text
    assert "score definition 2" in text


def test_score_definition_is_in_the_cache_key(models, tmp_path, monkeypatch):
    _data(tmp_path)
    base, _, tok = models
    s = _suite(tagged=True)
    calls = []

    def run():
        calls.append(1)
        return evaluate(base, tok, s, data_root=tmp_path, bf16=False, progress=False)

    evaluate_cached({"model": "m"}, s, run, cache_dir=tmp_path / "c")
    evaluate_cached({"model": "m"}, s, run, cache_dir=tmp_path / "c")
    assert len(calls) == 1
    monkeypatch.setattr(M, "SCORE_VERSION", 99)
    res, hit = evaluate_cached({"model": "m"}, s, run, cache_dir=tmp_path / "c")
    assert not hit and len(calls) == 2
    assert res.tasks["mc1"].ability == "commonsense"


def test_general_tags_every_task_with_one_of_five_abilities_and_continuous_main_metrics():
    g = load_suite("general")
    abilities = {t.name: t.ability for t in g.tasks}
    assert set(abilities.values()) == set(M.ABILITIES)
    for t in g.tasks:
        if t.kind == "multiple_choice":
            assert t.main_metric == "pgold"


def test_old_comparisons_without_abilities_still_print():
    old = {"suite": "s", "model": "m", "baseline": "b",
           "candidate": {"t": {"main": "acc", "n": 3, "metrics": {"acc": 0.5}, "ci": {"acc": [0.4, 0.6]}}},
           "comparison": {"tasks": {"t": {"higher_is_better": True, "significant_drop": False, "significant": False,
                                          "base": 0.5,
                                          "candidate": 0.5, "delta": 0.0, "ci": [-0.1, 0.1], "flipped": 0}},
                          "retention_score": 1.0, "retention_ci": [0.9, 1.1], "significant_drops": []}}
    con = Console(record=True, width=200)
    print_report(old, con)
    assert "score definition 1" in con.export_text()


def test_exclude_samples_outside_another_tasks_sample_and_changes_nothing_without_it():
    import random

    from forgetless.data.loading import Record
    from forgetless.retention.kinds.perplexity import PerplexityTask
    from forgetless.retention.tasks import sample_rows

    rows = [Record({"text": f"doc {i}"}, "f", i + 1) for i in range(20)]
    plain = PerplexityTask(name="p", limit=5, seed=1234)
    assert ([r.line for r in sample_rows(plain, rows)]
            == [i + 1 for i in sorted(random.Random(1234).sample(range(20), 5))])
    probe = PerplexityTask(name="q", limit=4, seed=7, exclude={"limit": 5, "seed": 1234})
    got = {r.line for r in sample_rows(probe, rows)}
    taken = {r.line for r in sample_rows(plain, rows)}
    assert len(got) == 4 and not got & taken
    rest = [i for i in range(20) if i + 1 not in taken]
    assert got == {i + 1 for i in random.Random(7).sample(rest, 4)}
    everything_else = PerplexityTask(name="r", exclude={"limit": 5, "seed": 1234})
    assert {r.line for r in sample_rows(everything_else, rows)} == {i + 1 for i in rest}


@pytest.mark.skipif(not (SHARED / "data" / "knowledge_qa" / "nq_open_dev.jsonl").is_file(),
                    reason="../shared/data is absent")
def test_general_probe_mirrors_general_on_other_items():
    from forgetless.retention.tasks import load_rows, sample_rows

    g, p = load_suite("general"), load_suite("general-probe")
    assert [t.name for t in g.tasks] == [t.name for t in p.tasks]
    root = SHARED / "data"
    for tg, tp in zip(g.tasks, p.tasks, strict=True):
        assert (tg.ability, tg.kind, getattr(tg, "main_metric", None)) == (tp.ability, tp.kind,
                                                                           getattr(tp, "main_metric", None))
        if tg.kind == "self_reference":  # general: built-in prompts; the probe: prompts the base model writes
            assert (tg.prompts, tp.prompts) == ("builtin", "generated"), tg.name
            continue
        if tg.data is None:
            continue
        ig = {r.where for r in sample_rows(tg, load_rows(tg, root))}
        ip = {r.where for r in sample_rows(tp, load_rows(tp, root))}
        assert ip and not ig & ip, tg.name


def test_the_monitor_probes_general_probe_where_its_files_are_else_self(tmp_path, monkeypatch):
    from forgetless.config import MonitorConfig
    from forgetless.retention.suite import probe_suite

    monkeypatch.delenv("FORGETLESS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data or ./data to fall back on
    assert MonitorConfig().suite == "auto" and MonitorConfig().limit is None
    root = tmp_path / "files"
    probe = load_suite("general-probe")
    wanted = probe.missing_files(root)
    assert len(wanted) == 9 and "commonsense_mc/piqa_valid-labels.lst" in wanted  # every file, labels too

    s, why = probe_suite("auto", root, None)  # nothing there: self, on 50 prompts
    assert s.name == "self" and [t.limit for t in s.tasks] == [50]
    assert "general-probe's data is not under" in why and f"{wanted[0]} and 8 more" in why
    assert "forgetless data pull general-probe --to DIR" in why

    for rel in wanted[:-1]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    s, why = probe_suite("auto", root, None)  # one file short: still self
    assert s.name == "self" and why.endswith("give the general probe)") and wanted[-1] in why
    (root / wanted[-1]).write_text("")
    s, why = probe_suite("auto", root, None)  # all there: the mirror of general at its own counts
    assert s.name == "general-probe" and str(root) in why
    assert [t.limit for t in s.tasks] == [t.limit for t in probe.tasks]
    s, _ = probe_suite("auto", root, 20)  # a limit caps every task
    assert [t.limit for t in s.tasks] == [min(20, t.limit or 20) for t in probe.tasks]
    s, why = probe_suite("self", root, None)  # named: as asked, self at 50 unless told otherwise
    assert s.name == "self" and s.tasks[0].limit == 50 and why == "probe suite self"
    assert probe_suite("self", root, 8)[0].tasks[0].limit == 8
