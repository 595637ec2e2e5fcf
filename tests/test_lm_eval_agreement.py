"""forgetless's multiple-choice scoring agrees with lm-evaluation-harness on the same items.

A local lm-eval YAML task over generated items is run on the tiny Llama with lm-eval's HFLM; forgetless scores
the same context/choices pairs with its engine (tree attention mask, fp32) and with its multiple_choice kind.
Per-choice log-likelihoods must agree to 1e-3 and acc / acc_norm must be equal item by item.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from forgetless.testing import WORDS

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (forgetless[lmeval]) is not installed")

N_ITEMS = 20


def _items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        # a trailing space on some contexts exercises the pair encoding (the space moves to the continuation)
        query = f"Question: copy: {words}\nAnswer:" + (" " if i % 5 == 0 else "")
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 5))]
        out.append({"id": f"q{i}", "query": query, "choices": choices, "gold": rng.randrange(len(choices))})
    return out


def _write_task(tmp_path, items: list[dict]) -> str:
    data = tmp_path / "toy_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in items))
    name = "fl_toy_mc"
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return name


@pytest.fixture
def toy_task(tiny_model, tmp_path, monkeypatch):
    """The generated items as a local lm-eval task (offline) and the tiny model in fp32:
    (items, task name, tokenizer, model)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = _items(N_ITEMS)
    name = _write_task(tmp_path, items)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return items, name, tok, AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_loglikelihoods_and_accuracy_match_lm_eval(toy_task, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from forgetless.retention.evaluate import evaluate
    from forgetless.retention.kinds.base import encode_pair
    from forgetless.retention.lm import Request, score_requests
    from forgetless.retention.suite import Suite

    items, name, tok, model = toy_task

    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
        tasks=[name],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [d["id"] for d in items]
    lm_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    # the engine on the same pairs (lm-eval's target delimiter " "), fp32, the tree mask sharing the context
    requests = []
    for d in items:
        pairs = [encode_pair(tok, d["query"], " " + c) for c in d["choices"]]
        assert all(p[0] == pairs[0][0] for p in pairs)
        requests.append(Request(pairs[0][0], [p[1] for p in pairs]))
    scores = score_requests(model, requests, bf16=False)
    fl_lls = [[s.logprob for s in item] for item in scores]
    for d, a, b in zip(items, lm_lls, fl_lls, strict=True):
        assert len(a) == len(b) == len(d["choices"])
        np.testing.assert_allclose(b, a, atol=1e-3, rtol=0, err_msg=f"item {d['id']}")

    # the multiple_choice kind end to end: the same per-item acc and acc_norm as lm-eval
    task = {"name": "toy", "kind": "multiple_choice", "data": {"path": str(tmp_path / "toy_mc.jsonl")},
            "prompt": "{{query}}", "choices": "choices", "gold": "gold"}
    res = evaluate(model, tok, Suite.model_validate({"name": "t", "tasks": [task]}), bf16=False, progress=False)
    r = res.tasks["toy"]
    assert r.item_ids == [d["id"] for d in items]
    assert r.columns["acc"].tolist() == [float(s["acc"]) for s in samples]
    assert r.columns["acc_norm"].tolist() == [float(s["acc_norm"]) for s in samples]
    assert float(r.columns["acc"].mean()) == pytest.approx(out["results"][name]["acc,none"], abs=1e-12)
    assert float(r.columns["acc_norm"].mean()) == pytest.approx(out["results"][name]["acc_norm,none"], abs=1e-12)


@pytest.mark.slow  # 30 s of lm-eval runs on an AVX2-only CPU: make test stays under 7 min there; CI runs it
def test_the_lm_eval_kind_samples_items_as_the_native_kinds_do(toy_task, tmp_path):
    """limit / seed / sample / exclude pick the same documents as for a native kind (lm-eval's own limit would take
    the first ones and ignore the rest)."""
    from forgetless.retention.evaluate import evaluate
    from forgetless.retention.suite import Suite

    items, name, tok, model = toy_task
    mc = {"kind": "multiple_choice", "data": {"path": str(tmp_path / "toy_mc.jsonl")}, "prompt": "{{query}}",
          "choices": "choices", "gold": "gold", "limit": 5, "seed": 7}
    le = {"kind": "lm_eval", "task": name, "include_path": str(tmp_path), "limit": 5, "seed": 7, "batch_size": 4}
    probe = {"exclude": {"limit": 5, "seed": 7}, "limit": 6, "seed": 3}
    suite = Suite.model_validate({"name": "t", "tasks": [{"name": "mc", **mc}, {"name": "le", **le},
                                                         {"name": "mc_probe", **mc, **probe},
                                                         {"name": "le_probe", **le, **probe}]})
    res = evaluate(model, tok, suite, bf16=False, progress=False).tasks
    ids = {k: [items[int(i)]["id"] for i in res[k].item_ids] for k in ("le", "le_probe")}  # lm-eval: doc ids
    assert ids["le"] == res["mc"].item_ids and len(ids["le"]) == 5
    assert ids["le"] != [d["id"] for d in items[:5]], "a random sample, not the first documents"
    assert ids["le_probe"] == res["mc_probe"].item_ids and not set(ids["le_probe"]) & set(ids["le"])
    assert res["le"].columns["acc"].tolist() == res["mc"].columns["acc"].tolist()
