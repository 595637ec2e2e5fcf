"""Retention tasks on a tiny model: numbers against direct computation, self-reference drift, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from forgetless.errors import DataError, ForgetlessError
from forgetless.retention.evaluate import compare, evaluate, evaluate_cached, fingerprint_model
from forgetless.retention.kinds.generate.numeric import numeric_score, parse_number
from forgetless.retention.kinds.generate.qa import qa_scores, token_f1
from forgetless.retention.suite import Suite, load_suite
from forgetless.train.model import load_tokenizer


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), load_tokenizer(str(tiny_model))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _suite(tasks):
    return Suite.model_validate({"name": "t", "tasks": tasks})


def _eval(mt, tasks, tmp_path, **kw):
    m, tok = mt
    return evaluate(m, tok, _suite(tasks), data_root=tmp_path, bf16=False, progress=False, cache_dir=tmp_path / "cache",
                    **kw)


def _direct_loglik(model, tok, context: str, cont: str) -> float:
    """Independent reference: one plain forward of context+continuation (no batching, no tree mask)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


MC_ROWS = [
    {"id": "q1", "question": "red cat", "choices": ["sun", "moon tree", "blue bird fish"], "gold": 1},
    {"id": "q2", "question": "one two", "choices": ["three", "four five"], "gold": 0},
    {"id": "q3", "question": "apple", "choices": ["bread water", "fire", "wind king queen", "dog"], "gold": 3},
]


def test_multiple_choice_metrics_match_direct_computation(model_tok, tmp_path):
    _jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task = {"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "Q: {{question}}\nA:"}
    r = _eval(model_tok, [task], tmp_path).tasks["mc"]
    model, tok = model_tok
    acc, acc_norm, pgold = [], [], []
    for row in MC_ROWS:
        ll = np.array([_direct_loglik(model, tok, f"Q: {row['question']}\nA:", " " + c) for c in row["choices"]])
        norm = ll / np.array([len(c) for c in row["choices"]])
        p = np.exp(ll - ll.max())
        p /= p.sum()
        acc.append(float(ll.argmax() == row["gold"]))
        acc_norm.append(float(norm.argmax() == row["gold"]))
        pgold.append(p[row["gold"]])
    assert r.columns["acc"].tolist() == acc
    assert r.columns["acc_norm"].tolist() == acc_norm
    np.testing.assert_allclose(r.columns["pgold"], pgold, rtol=1e-4)
    assert r.item_ids == ["q1", "q2", "q3"]


def test_perplexity_matches_direct_computation(model_tok, tmp_path):
    docs = [{"text": "red cat sun moon tree river"}, {"text": "one two three four five six seven"}]
    _jsonl(tmp_path / "docs.jsonl", docs)
    r = _eval(model_tok, [{"name": "ppl", "kind": "perplexity", "data": {"path": "docs.jsonl"}}], tmp_path).tasks["ppl"]
    model, tok = model_tok
    total_nll, total_tok = 0.0, 0
    for d in docs:
        ids = tok(d["text"], add_special_tokens=False)["input_ids"]
        full = torch.tensor([[tok.bos_token_id] + ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=full).logits.float(), -1)[0]
        total_nll -= sum(lp[i, full[0, i + 1]].item() for i in range(len(ids)))
        total_tok += len(ids)
    ppl = r.metric("perplexity")
    assert math.isclose(ppl.fn(r.columns), math.exp(total_nll / total_tok), rel_tol=1e-4)
    n_bytes = sum(len(d["text"].encode()) for d in docs)
    assert math.isclose(r.metric("bits_per_byte").fn(r.columns), total_nll / n_bytes / math.log(2), rel_tol=1e-4)


def test_long_documents_roll_over_several_windows(model_tok, tmp_path):
    words = " ".join(["red cat sun moon"] * 120)  # several windows of 64 tokens
    _jsonl(tmp_path / "long.jsonl", [{"text": words}])
    task = {"name": "ppl", "kind": "perplexity", "data": {"path": "long.jsonl"}}
    short = _eval(model_tok, [task], tmp_path, max_length=64).tasks["ppl"]
    assert short.info["windows"] > 3
    assert short.columns["tokens"][0] == len(model_tok[1](words, add_special_tokens=False)["input_ids"])


def test_left_truncation_is_counted(model_tok, tmp_path):
    rows = [{"id": "long", "question": " ".join(["red"] * 200), "choices": ["cat", "dog"], "gold": 0}]
    _jsonl(tmp_path / "mc.jsonl", rows)
    task = {"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}}
    r = _eval(model_tok, [task], tmp_path, max_length=32).tasks["mc"]
    assert r.info["left_truncated"] == 1


def test_generate_scorers_by_hand():
    assert qa_scores("The Eiffel Tower!", ["eiffel tower"])["exact_match"] == 1.0
    assert qa_scores("It is in Paris, France", ["Paris"])["contains"] == 1.0
    assert math.isclose(token_f1("red big cat", "the red cat"), 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    assert parse_number("so the answer is 1,234.") == 1234.0
    assert parse_number("blah\n#### 42") == 42.0
    assert numeric_score("Total: 18 dollars", "... #### 18")["numeric"] == 1.0
    assert numeric_score("Total: 17", "#### 18")["numeric"] == 0.0


def test_generate_task_runs_and_scores(model_tok, tmp_path):
    _jsonl(tmp_path / "qa.jsonl",
           [{"question": "copy: red", "answer": ["red"]}, {"question": "copy: sun", "answer": "sun"}])
    task = {"name": "qa", "kind": "generate", "data": {"path": "qa.jsonl"}, "max_new_tokens": 4}
    r = _eval(model_tok, [task], tmp_path).tasks["qa"]
    assert set(r.columns) == {"exact_match", "contains", "f1"} and r.n == 2
    assert all("prediction" in d for d in r.details)
    # a generation as long as the window leaves no room for a prompt: an error, not a wrong slice
    with pytest.raises(DataError, match="max_new_tokens 64 leaves no room for a prompt in the 64-token window"):
        _eval(model_tok, [{**task, "max_new_tokens": 64}], tmp_path, max_length=64)


def test_a_registered_scorer_is_one_file_behind_the_scorer_option(model_tok, tmp_path, monkeypatch):
    """A scorer registered from outside the package (as a plugin module would) is accepted by `scorer:`, scores
    each generated prediction, and restores its metrics from cached columns; an unknown name lists the known."""
    from forgetless.retention.kinds.generate import GenerateTask
    from forgetless.retention.kinds.generate.scorer import SCORERS, Scorer, register

    monkeypatch.setattr("forgetless.retention.kinds.generate.scorer.SCORERS", dict(SCORERS))
    import forgetless.retention.kinds.generate as G

    monkeypatch.setattr(G, "SCORERS", G.scorer.SCORERS)
    seen: list[tuple[str, list[str]]] = []

    def length(task, pred, golds):
        seen.append((pred, golds))
        return {"pred_chars": float(len(pred))}

    register(Scorer("length", ("pred_chars",), "pred_chars", length))
    with pytest.raises(ValueError, match="unknown scorer 'nope'; one of numeric, qa, rouge, translation, length"):
        GenerateTask(name="t", scorer="nope")
    _jsonl(tmp_path / "qa.jsonl",
           [{"question": "copy: red", "answer": "red"}, {"question": "copy: sun", "answer": "sun"}])
    task = {"name": "qa", "kind": "generate", "data": {"path": "qa.jsonl"}, "max_new_tokens": 4, "scorer": "length"}
    r = _eval(model_tok, [task], tmp_path).tasks["qa"]
    assert r.main == "pred_chars" and [g for _, g in seen] == [["red"], ["sun"]]
    assert r.columns["pred_chars"].tolist() == [float(len(d["prediction"])) for d in r.details]
    assert r.main_metric.fn(r.columns) == pytest.approx(np.mean([len(d["prediction"]) for d in r.details]))
    assert [m.name for m in G.metrics(r.columns)] == ["pred_chars"]


def test_self_reference_is_zero_for_the_base_and_grows_when_perturbed(model_tok, tmp_path):
    model, tok = model_tok
    task = {"name": "self", "kind": "self_reference", "limit": 8, "max_new_tokens": 12}
    base_fp = fingerprint_model(model)
    base = _eval(model_tok, [task], tmp_path, reference_fingerprint=base_fp)
    again = _eval(model_tok, [task], tmp_path, reference_fingerprint=base_fp)
    assert base.tasks["self"].metric("kl").fn(base.tasks["self"].columns) < 1e-6
    assert np.allclose(base.tasks["self"].columns["nll"], again.tasks["self"].columns["nll"])
    perturbed = AutoModelForCausalLM.from_pretrained(tok.name_or_path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cand = evaluate(perturbed, tok, _suite([task]), bf16=False, progress=False, cache_dir=tmp_path / "cache",
                    reference=lambda: (model, tok), reference_fingerprint=base_fp)
    kl = cand.tasks["self"].metric("kl").fn(cand.tasks["self"].columns)
    assert kl > 0.01
    report = compare(base, cand)
    t = report["tasks"]["self"]
    assert t["main"] == "ce" and t["delta"] > 0 and t["significant_drop"]
    assert report["retention_score"] < 1.0


def test_generated_prompts_leave_the_callers_random_state_alone(model_tok, tmp_path):
    """self_reference's generated prompts come from their own seed, and a cache miss does not reseed the global
    generator (a run's monitor or a mitigation generating before training would change what training draws)."""
    task = {"name": "gen", "kind": "self_reference", "prompts": "generated", "n_generated": 6, "seed": 5,
            "max_new_tokens": 4}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = _eval(model_tok, [task], tmp_path / "a").tasks["gen"]
    assert torch.equal(torch.get_rng_state(), before)
    again = _eval(model_tok, [task], tmp_path / "b").tasks["gen"]  # another cache: generated again, the same
    assert [d["prompt"] for d in again.details] == [d["prompt"] for d in first.details] and first.n > 0


def test_self_reference_prompts_from_an_edited_file_are_not_served_from_the_cache(model_tok, tmp_path, monkeypatch):
    import forgetless.retention.kinds.self_reference as S

    calls: list[int] = []
    real = S.greedy_generate
    monkeypatch.setattr(S, "greedy_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = {"name": "own", "kind": "self_reference", "prompts": "file", "data": {"path": "p.jsonl"},
            "max_new_tokens": 6}
    fp = fingerprint_model(model_tok[0])
    _jsonl(tmp_path / "p.jsonl", [{"instruction": "Name a colour."}, {"instruction": "Name a fruit."}])
    first = _eval(model_tok, [task], tmp_path, reference_fingerprint=fp).tasks["own"]
    again = _eval(model_tok, [task], tmp_path, reference_fingerprint=fp).tasks["own"]
    assert len(calls) == 1 and again.columns["nll"].tolist() == first.columns["nll"].tolist()
    _jsonl(tmp_path / "p.jsonl", [{"instruction": "Name a river."}, {"instruction": "Name a city."}])
    edited = _eval(model_tok, [task], tmp_path, reference_fingerprint=fp).tasks["own"]
    assert len(calls) == 2, "the edited prompts got their own reference answers"
    assert [d["prompt"] for d in edited.details] == ["Name a river.", "Name a city."]


def test_the_retention_score_weighs_tasks_by_the_suite_without_being_told(model_tok, tmp_path):
    """compare() takes each task's weight from the suite it was scored with (the guard's probes and merge's alpha
    search call it without weights): the same score as with the weights given, another than equal weights."""
    _jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    _jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat on the mat and looked at the dog"},
                                  {"text": "red green blue yellow are colours of the sun"}])
    tasks = [{"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "{{question}}",
              "main_metric": "pgold", "weight": 3.0},
             {"name": "ppl", "kind": "perplexity", "data": {"path": "t.jsonl"}, "text": "text"}]
    m, tok = model_tok
    base = _eval(model_tok, tasks, tmp_path)
    perturbed = AutoModelForCausalLM.from_pretrained(tok.name_or_path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cand = evaluate(perturbed, tok, _suite(tasks), data_root=tmp_path, bf16=False, progress=False,
                    cache_dir=tmp_path / "cache")
    told = compare(base, cand, {"mc": 3.0, "ppl": 1.0})
    assert compare(base, cand)["retention_score"] == told["retention_score"]
    equal = compare(base, cand, {"mc": 1.0, "ppl": 1.0})
    assert equal["retention_score"] != pytest.approx(told["retention_score"], abs=1e-6)
    r = [told["tasks"][n]["retention"] for n in ("mc", "ppl")]
    assert told["retention_score"] == pytest.approx((3 * r[0] + r[1]) / 4)  # tasks without abilities: weighted


def test_baseline_is_cached_by_fingerprint(model_tok, tmp_path):
    _jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    suite = _suite([{"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "{{question}}"}])
    m, tok = model_tok
    calls = []

    def run():
        calls.append(1)
        return evaluate(m, tok, suite, data_root=tmp_path, bf16=False, progress=False)

    key = {"model": fingerprint_model(m), "suite": suite.fingerprint(tmp_path)}
    first, hit1 = evaluate_cached(key, suite, run, cache_dir=tmp_path / "c")
    second, hit2 = evaluate_cached(key, suite, run, cache_dir=tmp_path / "c")
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert second.tasks["mc"].columns["acc"].tolist() == first.tasks["mc"].columns["acc"].tolist()
    assert compare(first, second)["tasks"]["mc"]["delta"] == 0.0


def test_builtin_suites_load():
    g = load_suite("general")
    assert [t.name for t in g.tasks] == ["arc_easy", "hellaswag", "piqa", "wikitext", "self_reference", "scitldr",
                                         "flores_en_de", "nq_open", "triviaqa"]
    assert [t.kind for t in load_suite("self").tasks] == ["self_reference"]


# ---------------------------------------------------------------- bad input


def test_missing_mapped_field_names_file_and_line(model_tok, tmp_path):
    _jsonl(tmp_path / "mc.jsonl", [MC_ROWS[0], {"id": "x", "choices": ["a", "b"], "gold": 0}])
    task = {"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "{{question}}"}
    with pytest.raises(DataError, match=r"mc.jsonl:2: task mc: prompt template .*'question' is undefined"):
        _eval(model_tok, [task], tmp_path)


def test_label_out_of_range(model_tok, tmp_path):
    _jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "gold": 5}])
    task = {"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}}
    with pytest.raises(DataError, match=r"mc.jsonl:1: task mc: gold index 5 out of range for 2 choices"):
        _eval(model_tok, [task], tmp_path)


def test_empty_task_and_missing_file(model_tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="task mc: the data source is empty"):
        _eval(model_tok, [{"name": "mc", "kind": "multiple_choice", "data": {"path": "empty.jsonl"}}], tmp_path)
    with pytest.raises(DataError, match="data file .*nope.jsonl not found"):
        _eval(model_tok, [{"name": "mc", "kind": "multiple_choice", "data": {"path": "nope.jsonl"}}], tmp_path)


def test_unknown_task_kind_in_a_suite_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "tasks": [{"name": "x", "kind": "multiple_choise"}]}))
    with pytest.raises(ForgetlessError,
                       match=r"tasks.0 \(line 3\): unknown .*'multiple_choise'; valid: .*multiple_choice"):
        load_suite(p)
    with pytest.raises(ForgetlessError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_bf16_scoring_casts_the_weights_once_per_call_with_the_same_numbers(model_tok):
    """One autocast region around every batch: autocast keeps its bf16 copy of each weight (a leaf that requires
    grad) for the whole call, where a region per batch cast every weight again for each batch. Same casts, so
    the same numbers, bit for bit, as the uncached path (weights that do not require grad are not cached)."""
    from torch.profiler import ProfilerActivity, profile

    from forgetless.retention.lm import Request, score_requests

    model, tok = model_tok
    reqs = [Request(tok(f"red cat {w}", add_special_tokens=False)["input_ids"],
                    [tok(" sun moon", add_special_tokens=False)["input_ids"], tok(" dog", add_special_tokens=False)[
                        "input_ids"]]) for w in ("one", "two three", "four five six", "seven")]

    def run(requires_grad: bool):
        for p in model.parameters():
            p.requires_grad_(requires_grad)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = score_requests(model, reqs, batch_tokens=16, bf16=True)  # a batch per item
        casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        return [[(s.logprob, s.n_tokens, s.greedy) for s in item] for item in out], casts

    cached, cached_casts = run(True)
    uncached, uncached_casts = run(False)
    for p in model.parameters():
        p.requires_grad_(True)
    assert cached == uncached
    n_weights = sum(1 for n, _ in model.named_parameters() if n.endswith("proj.weight"))
    assert uncached_casts - cached_casts >= 3 * n_weights  # 4 batches: 3 fewer casts of every projection


def test_sliding_window_models_are_scored_exactly_not_through_the_shared_context_mask():
    """Gemma-3's sliding layers would see the whole packed row through the tree mask (a 4-D mask reaches every
    layer as it is): such models take the plain causal path, and their scores equal a direct forward's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from forgetless.retention.lm import Request, score_requests

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, vocab_size=97, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], attn_implementation="sdpa")
    model = Gemma3ForCausalLM(cfg).eval()
    ctx, conts = list(range(3, 15)), [[20, 21, 22, 23], [30, 31, 32]]

    def direct(cont):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        return sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))

    got = [s.logprob for s in score_requests(model, [Request(ctx, conts)], bf16=False)[0]]
    assert got == pytest.approx([direct(c) for c in conts], abs=1e-4)
    forced = [s.logprob for s in score_requests(model, [Request(ctx, conts)], bf16=False, share_context=True)[0]]
    assert forced != pytest.approx(got, abs=1e-4), "the tree mask was expected to ignore the sliding window"


def test_multiple_choice_shots_never_show_an_item_its_own_answer(model_tok, tmp_path, monkeypatch):
    """Every row scored (no limit): the shot pool is every row, and an item could be shown its own question with
    its gold answer as an example."""
    import forgetless.retention.kinds.multiple_choice as mc

    _jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    seen = []
    real = mc.score_requests
    monkeypatch.setattr(mc, "score_requests", lambda model, reqs, **kw: seen.extend(reqs) or real(model, reqs, **kw))
    task = {"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "Q: {{question}}\nA:",
            "shots": 2}
    _eval(model_tok, [task], tmp_path)
    tok = model_tok[1]
    assert len(seen) == len(MC_ROWS)
    for row, req in zip(MC_ROWS, seen, strict=True):
        context = tok.decode(req.context)
        own = f"Q: {row['question']}\nA: {row['choices'][row['gold']]}"
        others = [f"Q: {r['question']}\nA: {r['choices'][r['gold']]}" for r in MC_ROWS if r is not row]
        assert own not in context and sum(o in context for o in others) == 2, context


def test_a_continuation_as_long_as_the_window_is_an_error_not_a_wrong_score(model_tok):
    """No context token would be left to predict the continuation's first token from (it was scored from the
    last position of the row, silently)."""
    from forgetless.errors import DataError
    from forgetless.retention.lm import Request, score_requests

    model, _ = model_tok
    with pytest.raises(DataError, match="a continuation of 8 tokens does not fit the 8-token window"):
        score_requests(model, [Request([1, 2, 3], [list(range(10, 18))])], bf16=False, max_len=8)
    assert len(score_requests(model, [Request([1, 2, 3], [list(range(10, 17))])], bf16=False, max_len=8)[0]) == 1


def test_evaluation_runs_on_the_gpu_when_there_is_one_and_keys_its_baseline_apart(tiny_model, tmp_path,
                                                                                  monkeypatch):
    """`eval --device auto` scores on the GPU when CUDA has one (CI has none: the check is stood in for), refuses a
    device that is not there, and a baseline scored on a GPU is cached apart from one scored on the CPU, so a
    candidate is compared with a base scored where it is (the CPU's key is what it was before devices were keyed)."""
    from forgetless.retention import api

    assert api.eval_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert api.eval_device("cpu").type == "cpu"
    with pytest.raises(ForgetlessError, match="use auto, cpu, cuda or mps"):
        api.eval_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ForgetlessError, match="no CUDA device"):
            api.eval_device("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert api.eval_device("auto").type == "cuda"
        monkeypatch.undo()
    # a Precision resolved for the CPU is resolved again for another device, from what it requested
    from forgetless.precision import Precision

    cpu_bf16 = Precision("bf16", "measured", "auto", "cpu")
    assert api.eval_precision(cpu_bf16, None, "cpu") is cpu_bf16
    again = api.eval_precision(Precision("fp32", "requested", "fp32", "cpu"), None, "meta")
    assert (again.dtype, again.device, again.requested) == ("fp32", "meta", "fp32")

    _jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    suite = _suite([{"name": "mc", "kind": "multiple_choice", "data": {"path": "mc.jsonl"}, "prompt": "{{question}}"}])
    calls = []

    def loader():  # what a cuda loader would hand over, here on the CPU
        calls.append(1)
        m = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        return m, load_tokenizer(str(tiny_model))

    kw = {"bf16": False, "progress": False, "loader": loader}
    gpu, hit_gpu = api.baseline_result(str(tiny_model), suite, tmp_path, device="cuda", **kw)
    cpu, hit_cpu = api.baseline_result(str(tiny_model), suite, tmp_path, device="cpu", **kw)
    again_gpu, hit_again = api.baseline_result(str(tiny_model), suite, tmp_path, device="cuda", **kw)
    assert (hit_gpu, hit_cpu, hit_again) == (False, False, True) and len(calls) == 2
    assert again_gpu.tasks["mc"].columns["acc"].tolist() == gpu.tasks["mc"].columns["acc"].tolist()
    # the self-reference answers and distributions too: a GPU's are cached apart, the CPU's key is as it was
    import hashlib

    from forgetless.retention.kinds.self_reference import _cache_key

    task = load_suite("self").tasks[0]
    spec = task.model_dump(exclude={"name", "weight", "main_metric", "batch_size"})
    spec.update(reference="fp", bf16=False)
    old = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    assert _cache_key(task, "fp", False, None) == _cache_key(task, "fp", False, None, "cpu") == old
    assert _cache_key(task, "fp", False, None, "cuda") != old
