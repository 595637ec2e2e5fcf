"""knowledge_qa: best-alias likelihood against a plain forward, exact match on a subset, metrics by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED
from transformers import AutoModelForCausalLM

from forgetless.retention import metrics as M
from forgetless.retention.evaluate import compare, evaluate
from forgetless.retention.kinds import knowledge_qa as kqa
from forgetless.retention.kinds.generate.qa import qa_scores
from forgetless.retention.suite import Suite, load_suite
from forgetless.train.model import load_tokenizer


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), load_tokenizer(str(tiny_model))


def _direct_loglik(model, tok, context: str, cont: str) -> tuple[float, int]:
    """Reference: one plain forward of context+continuation, lm-eval's split (spaces move to the continuation)."""
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits.float(), -1)[0]
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx_ids), len(whole))), len(whole) - len(ctx_ids)


NQ = [
    {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
    {"question": "capital of france", "answer": ["Paris"]},
    {"question": "largest planet", "answer": ["Jupiter", "jupiter", "Jupiter"]},
]
TQA = [
    {"question_id": "tq1", "question": "Which metal is liquid at room temperature?",
     "answer": {"value": "Mercury", "aliases": ["Hg", "Mercury", "Quicksilver", "Element 80"]}},
    {"question_id": "tq2", "question": "What colour is the sky?",
     "answer": {"value": "Blue", "aliases": ["blue", "Azure"]}},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(model_tok, tmp_path, task):
    m, tok = model_tok
    suite = Suite.model_validate({"name": "k", "tasks": [task]})
    return evaluate(m, tok, suite, data_root=tmp_path, bf16=False, progress=False,
                    cache_dir=tmp_path / "c").tasks[task["name"]]


def test_best_alias_likelihood_matches_a_plain_forward(model_tok, tmp_path):
    _write(tmp_path / "nq.jsonl", NQ)
    r = _run(model_tok, tmp_path,
             {"name": "nq", "kind": "knowledge_qa", "data": {"path": "nq.jsonl"}, "generate_limit": 0})
    model, tok = model_tok
    best_nll, best_tokens = [], []
    for row in NQ:
        golds = list(dict.fromkeys(row["answer"]))  # "Jupiter" twice counts once
        scored = [_direct_loglik(model, tok, f"Question: {row['question']}\nAnswer:", " " + a) for a in golds]
        lp, n = max(scored)
        best_nll.append(-lp)
        best_tokens.append(n)
    np.testing.assert_allclose(r.columns["nll"], best_nll, rtol=1e-4)
    assert r.columns["tokens"].tolist() == best_tokens
    np.testing.assert_allclose(r.columns["p"], np.exp(-np.array(best_nll)), rtol=1e-4)
    assert r.main == "alias_nll" and not r.main_metric.higher_is_better
    assert M.value(r.main_metric, r.columns) == pytest.approx(np.mean(best_nll), rel=1e-4)
    assert r.columns["generated"].sum() == 0 and r.info["generated"] == 0


def test_triviaqa_layout_dedupes_and_caps_the_aliases(model_tok, tmp_path):
    _write(tmp_path / "tqa.jsonl", TQA)
    task = {"name": "tqa", "kind": "knowledge_qa", "data": {"path": "tqa.jsonl"}, "max_aliases": 3, "generate_limit": 0,
            "prompt": "Q: {{question}}\nA:"}
    r = _run(model_tok, tmp_path, task)
    model, tok = model_tok
    parsed = kqa.KnowledgeQATask.model_validate(task)
    from forgetless.data.loading import Record

    # value first, no repeats, 3 at most
    assert kqa.aliases(parsed, Record(TQA[0], "x", 1)) == ["Mercury", "Hg", "Quicksilver"]
    expect = [max(_direct_loglik(model, tok, f"Q: {row['question']}\nA:", " " + a)[0] for a in al)
              for row, al in zip(TQA, [["Mercury", "Hg", "Quicksilver"], ["Blue", "blue", "Azure"]], strict=True)]
    np.testing.assert_allclose(r.columns["nll"], [-e for e in expect], rtol=1e-4)
    assert r.item_ids == ["tq1", "tq2"]


def test_exact_match_on_the_generated_subset_only(model_tok, tmp_path):
    _write(tmp_path / "nq.jsonl", NQ)
    r = _run(model_tok, tmp_path, {"name": "nq", "kind": "knowledge_qa", "data": {"path": "nq.jsonl"},
                                   "generate_limit": 2, "max_new_tokens": 4})
    gen = r.columns["generated"]
    assert gen.sum() == 2
    for i, d in enumerate(r.details):
        if gen[i]:
            s = qa_scores(d["prediction"], list(dict.fromkeys(NQ[i]["answer"])))
            assert (r.columns["exact_match"][i], r.columns["contains"][i]) == (s["exact_match"], s["contains"])
            assert d["correct"] == bool(s["exact_match"])
        else:
            assert d["prediction"] is None and d["correct"] is None and r.columns["exact_match"][i] == 0
    assert r.metric("exact_match").fn(r.columns) == pytest.approx(r.columns["exact_match"].sum() / 2)


def test_metrics_and_retention_by_hand():
    cols = {
        "nll": np.array([1.0, 2.0, 3.0]), "tokens": np.array([1.0, 2.0, 1.0]), "p": np.exp(-np.array([1.0, 2.0, 3.0])),
        "top1": np.array([1.0, 0.0, 0.0]), "exact_match": np.array([1.0, 0.0, 0.0]),
        "contains": np.array([1.0, 0.0, 1.0]), "generated": np.array([1.0, 0.0, 1.0]),
    }
    ms = {m.name: m for m in kqa.metrics(cols)}
    assert M.value(ms["alias_nll"], cols) == pytest.approx(2.0)
    assert M.value(ms["alias_ce"], cols) == pytest.approx(6.0 / 4.0)  # token-weighted
    assert M.value(ms["p_alias"], cols) == pytest.approx((np.exp(-1) + np.exp(-2) + np.exp(-3)) / 3)
    assert M.value(ms["exact_match"], cols) == pytest.approx(0.5)  # 1 of the 2 generated items
    assert M.value(ms["contains"], cols) == pytest.approx(1.0)
    cand = {**cols, "nll": cols["nll"] * 1.25}
    # lower is better: retention = base / candidate = 2.0 / 2.5
    assert M.retention_ratio(ms["alias_nll"], 2.0, M.value(ms["alias_nll"], cand)) == pytest.approx(0.8)


def test_a_perturbed_model_is_compared_item_by_item(model_tok, tmp_path):
    _write(tmp_path / "nq.jsonl", NQ * 4)
    task = {"name": "nq", "kind": "knowledge_qa", "data": {"path": "nq.jsonl"}, "generate_limit": 3,
            "max_new_tokens": 2}
    base = _run(model_tok, tmp_path, task)
    m, tok = model_tok
    worse = AutoModelForCausalLM.from_config(m.config).eval()
    worse.load_state_dict(m.state_dict())
    with torch.no_grad():
        for p in worse.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    suite = Suite.model_validate({"name": "k", "tasks": [task]})
    from forgetless.retention.evaluate import SuiteResult

    cand = evaluate(worse, tok, suite, data_root=tmp_path, bf16=False, progress=False)
    cmp = compare(SuiteResult("k", {"nq": base}), cand)
    t = cmp["tasks"]["nq"]
    assert t["main"] == "alias_nll" and t["n"] == 12
    assert t["retention"] == pytest.approx(t["base"] / t["candidate"])


@pytest.mark.skipif(not (SHARED / "data" / "knowledge_qa" / "nq_open_dev.jsonl").is_file(),
                    reason="../shared/data/knowledge_qa is absent")
def test_general_knowledge_tasks_read_the_shared_files(model_tok):
    g = load_suite("general").only(["nq_open", "triviaqa"]).with_limit(4)
    m, tok = model_tok
    res = evaluate(m, tok, g, data_root=SHARED / "data", bf16=False, progress=False)
    for name in ("nq_open", "triviaqa"):
        r = res.tasks[name]
        assert r.n == 4 and np.all(r.columns["nll"] > 0) and r.columns["generated"].sum() == 4
