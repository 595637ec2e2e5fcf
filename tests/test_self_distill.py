"""data.self_distill: the model rewrites each training response before training; accepted rewrites replace the
references, the rest are kept; cached and resumable; chat turns rewritten in their context."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe

import forgetless.data.self_distill as sd_mod
from forgetless.config import DataConfig, SelfDistillAccept
from forgetless.data import load_records
from forgetless.data.self_distill import build_requests, judge
from forgetless.errors import RecipeError
from forgetless.recipe import recipe_from_dict
from forgetless.testing import write_jsonl
from forgetless.train import train
from forgetless.train.model import load_tokenizer


def test_acceptance_checks_by_hand():
    rouge = SelfDistillAccept(kind="rouge_l", min=0.5)
    assert judge("the cat sat on the mat", "the cat sat on the mat", rouge, False) is None
    assert judge("quantum flux capacitor", "the cat sat on the mat", rouge, False) == "rouge_l"
    # 3 of 6 reference words, in order, 4 words predicted: P 3/4, R 3/6, F1 = 0.6
    assert sd_mod.rouge_l("the cat sat down", "the cat sat on the mat") == pytest.approx(0.6)
    ans = SelfDistillAccept(kind="answer")
    assert judge("She has 3 + 4 = 7 apples.\n#### 7.", "3 + 4 = 7\n#### 7", ans, False) is None
    assert judge("#### 8", "#### 7", ans, False) == "answer"
    assert judge("7 apples", "#### 7", ans, False) == "answer"
    assert judge("#### 7", "seven", ans, False) == "reference_without_answer"
    assert judge("#### 1,000", "#### 1000", ans, False) is None  # thousands separators do not count
    either = SelfDistillAccept(kind="answer", pattern=r"####\s*(\S+)|(?:^|\s)([A-E])\.(?:\s|$)")
    assert judge("The answer is D. Complex", "D. Complex tongue thrust.", either, False) is None
    assert judge("The answer is C. Simple", "D. Complex tongue thrust.", either, False) == "answer"
    assert judge("so #### 12", "#### 12", either, False) is None
    letter = SelfDistillAccept(kind="answer", pattern=r"answer is \(?([A-D])\)?")
    assert judge("so the answer is (B)", "The answer is B", letter, False) is None
    assert judge("x", "y", SelfDistillAccept(kind="regex", pattern=r"^x$"), False) is None
    assert judge("  ", "y", rouge, False) == "empty"
    assert judge("the cat sat on the mat", "the cat sat on the mat", rouge, True) == "truncated"
    with pytest.raises(ValueError, match="needs a group"):
        SelfDistillAccept(kind="answer", pattern="####")
    with pytest.raises(ValueError, match="needs accept.pattern"):
        SelfDistillAccept(kind="regex")


def _fake_generate(calls):
    """Stands in for greedy generation: reads the reference out of the rewrite request and answers 'REWRITTEN
    <reference>' when the reference's length is even, else 'nope'."""

    def gen(model, tokenizer, prompts, max_new_tokens=128, batch_size=8, bf16=True, **kw):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ref = text.split("### Reference answer\n", 1)[1].split("\n\n### Your answer", 1)[0]
            calls.append(ref)
            out.append(list(tokenizer(f"REWRITTEN {ref}" if len(ref) % 2 == 0 else "nope",
                                      add_special_tokens=False)["input_ids"]))
        return out

    return gen


@pytest.mark.slow  # five tiny trainings (~20 s); the acceptance logic and the chat requests stay in make test
def test_rewrites_replace_accepted_references_and_are_cached(tiny_model, toy_data, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(sd_mod, "greedy_generate", _fake_generate(calls))
    import forgetless.train.run as run_mod

    trained: dict = {}
    real = run_mod.self_distill

    def capture(*a, **kw):
        trained["records"], stats = real(*a, **kw)
        return trained["records"], stats

    monkeypatch.setattr(run_mod, "self_distill", capture)
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "run", fmt="prompt_completion", optim__max_steps=2)
    spec["data"]["self_distill"] = {"accept": {"kind": "regex", "pattern": "^REWRITTEN "}, "batch_size": 5}
    res = train(recipe_from_dict(spec), quiet=True)
    refs = [r.data["completion"] for r in load_records(str(toy_data["prompt_completion"]))]
    even = [r for r in refs if len(r) % 2 == 0]
    assert calls == refs  # one request per record, each showing its own reference
    stats = res.summary["data"]["self_distill"]
    assert stats["responses"] == len(refs) and stats["accepted"] == len(even) > 0
    assert stats["rejected"] == {"regex": len(refs) - len(even)} and stats["generated"] == len(refs)
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["self_distill"] == stats
    # what trained: accepted rewrites in place of their references, the others unchanged, prompts as they were
    recs = load_records(str(toy_data["prompt_completion"]))
    assert [r.data["completion"] for r in trained["records"]] == [
        f"REWRITTEN {r}" if len(r) % 2 == 0 else r for r in refs]
    assert [r.data["prompt"] for r in trained["records"]] == [r.data["prompt"] for r in recs]
    # the same run again reads every rewrite from the cache
    calls.clear()
    res2 = train(recipe_from_dict(spec), quiet=True, overwrite=True)
    assert calls == [] and res2.summary["data"]["self_distill"]["from_cache"] == len(refs)
    # a run killed part-way kept its finished batches: only the missing ones are generated again
    cache = sd_mod.Path(stats["cache"])
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:20]) + "\n" + lines[20][:10])  # 20 whole lines and a cut one
    calls.clear()
    res3 = train(recipe_from_dict(spec), quiet=True, overwrite=True)
    assert len(calls) == len(refs) - 20 and res3.summary["data"]["self_distill"]["accepted"] == len(even)
    calls.clear()  # and the cache file is whole again: the row after the cut line was not swallowed
    train(recipe_from_dict(spec), quiet=True, overwrite=True)
    assert calls == []


def test_chat_turns_are_rewritten_each_in_its_context(tiny_model, tmp_path):
    convo = {"messages": [{"role": "user", "content": "first question"},
                          {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "second question"},
                          {"role": "assistant", "content": "second answer"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [convo])
    cfg = DataConfig(train=str(path), format="chat", self_distill={})
    tok = load_tokenizer(str(tiny_model))
    reqs = build_requests(load_records(str(path)), cfg, tok)
    assert [(r.turn, r.reference) for r in reqs] == [(1, "first answer"), (3, "second answer")]
    second = tok.decode(reqs[1].prompt_ids)
    # the earlier exchange as it was, then the second question wrapped in the rewrite request
    assert second.index("first question") < second.index("first answer") < second.index("### Request\nsecond "
                                                                                           "question")
    assert "### Reference answer\nsecond answer" in second
    assert "first answer" not in tok.decode(reqs[0].prompt_ids).split("### Reference answer")[0]
    rec = load_records(str(path))[0]
    new = sd_mod._replace(rec, cfg, 3, "my second answer")
    assert [m["content"] for m in new.data["messages"]] == ["first question", "first answer", "second question",
                                                             "my second answer"]
    assert rec.data["messages"][3]["content"] == "second answer"  # the original record is not changed
    # an assistant turn after a tool result: the whole conversation is the request, shown before the rewrite request
    tool = {"messages": [{"role": "user", "content": "weather in Oslo?"}, {"role": "assistant", "content": "call"},
                         {"role": "tool", "content": "rain, 4 C"}, {"role": "assistant", "content": "Rain, 4 C."}]}
    reqs = build_requests(load_records(str(write_jsonl(tmp_path / "tool.jsonl", [tool]))), cfg, tok)
    last = tok.decode(reqs[1].prompt_ids)
    assert last.index("weather in Oslo?") < last.index("rain, 4 C") < last.index(
        f"### Request\n{sd_mod.CONVERSATION_ABOVE}\n\n### Reference answer\nRain, 4 C.")
    # with data.system_prompt, to_messages puts a system message first that the record does not hold
    sys_cfg = cfg.model_copy(update={"system_prompt": "Be brief."})
    reqs = build_requests([rec], sys_cfg, tok)
    assert [r.turn for r in reqs] == [2, 4] and "Be brief." in tok.decode(reqs[0].prompt_ids)
    new = sd_mod._replace(rec, sys_cfg, reqs[1].turn, "my second answer")
    assert [m["content"] for m in new.data["messages"]] == ["first question", "first answer", "second question",
                                                             "my second answer"]


@pytest.mark.slow
def test_real_generation_on_the_tiny_model(tiny_model, toy_data, tmp_path, capsys):
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "real", fmt="prompt_completion", optim__max_steps=1)
    spec["data"]["self_distill"] = {"max_new_tokens": 6, "accept": {"kind": "rouge_l", "min": 0.0}}
    s = train(recipe_from_dict(spec)).summary["data"]["self_distill"]
    assert f"self_distill: {s['accepted']} of 64 responses rewritten" in " ".join(capsys.readouterr().err.split())
    assert s["responses"] == 64 and s["generated"] == 64 and s["generated_tokens"] > 0
    # min 0 accepts every rewrite but the empty and the truncated ones (6 tokens: a random model rarely stops)
    assert s["accepted"] + sum(s["rejected"].values()) == 64 and set(s["rejected"]) <= {"empty", "truncated"}


def test_self_distill_errors():
    # the shorthand forms of accept
    assert DataConfig(train="t", self_distill={"accept": "answer"}).self_distill.accept.kind == "answer"
    short = DataConfig(train="t", self_distill={"accept": "rouge_l >= 0.5"}).self_distill.accept
    assert (short.kind, short.min) == ("rouge_l", 0.5)
    with pytest.raises(ValueError, match="accept: 'bleu' is not one of: answer, rouge_l"):
        DataConfig(train="t", self_distill={"accept": "bleu"})
    with pytest.raises(ValueError, match="template needs {answer}"):
        DataConfig(train="t", self_distill={"template": "{prompt}"})
    with pytest.raises(ValueError, match=r"template: only \{prompt\} and \{answer\} may stand in braces"):
        DataConfig(train="t", self_distill={"template": '{prompt} {answer} as JSON: {"a": 1}'})
    with pytest.raises(RecipeError, match=r"mitigations.replay.data.self_distill: only the training data"):
        recipe_from_dict({"model": "m", "data": {"train": "t"}, "mitigations": [
            {"name": "replay", "data": {"train": "g", "self_distill": {}}}]})


def test_the_cache_key_tells_how_the_weights_are_held(tiny_model):
    from forgetless.data.self_distill import weights_tag
    from forgetless.train import load_model

    model, _ = load_model(str(tiny_model))
    assert weights_tag(model) == ""  # fp32, not quantized: the default load (existing caches keep their key)
    assert weights_tag(model.to(torch.bfloat16)) == "weights:torch.bfloat16"



def test_the_cache_key_changes_with_what_the_rewrites_depend_on(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "completion": "#### 4"},
                                              {"prompt": "3+3?", "completion": "#### 6"}])
    tok = load_tokenizer(str(tiny_model))
    cfg = DataConfig(train=str(path), format="prompt_completion", self_distill={})
    reqs = build_requests(load_records(str(path)), cfg, tok)
    key = sd_mod.cache_key("model-a", reqs, cfg, True)
    other_template = cfg.model_copy(update={"self_distill": cfg.self_distill.model_copy(
        update={"template": "Say it again: {prompt} -> {answer}\n"})})
    changed = {
        "model": sd_mod.cache_key("model-b", reqs, cfg, True),
        "precision": sd_mod.cache_key("model-a", reqs, cfg, False),
        "template": sd_mod.cache_key("model-a", build_requests(load_records(str(path)), other_template, tok),
                                     other_template, True),
        "length": sd_mod.cache_key("model-a", reqs, cfg.model_copy(update={"self_distill": cfg.self_distill.model_copy(
            update={"max_new_tokens": 7})}), True),
        "data": sd_mod.cache_key("model-a", reqs[:1], cfg, True),
    }
    assert key == sd_mod.cache_key("model-a", reqs, cfg, True)  # stable
    assert all(k != key for k in changed.values()) and len(set(changed.values())) == len(changed)
    # the acceptance rule is not in the key: rewrites are judged again on reading, so a new rule reuses them
    assert sd_mod.cache_key("model-a", reqs, cfg.model_copy(update={"self_distill": cfg.self_distill.model_copy(
        update={"accept": SelfDistillAccept(kind="rouge_l", min=0.9)})}), True) == key


def test_two_processes_rewriting_the_same_data_generate_it_once(tiny_model, toy_data, tmp_path, monkeypatch):
    """The cache entry is locked while its rows are generated: a second writer (a parallel sweep run or bench
    shard on the same model and data) waits, then reads them, instead of generating them again beside them."""
    import threading
    import time

    calls: list[str] = []
    fake = _fake_generate(calls)

    def slow(*a, **kw):  # each batch takes a while: the two writers overlap unless one waits
        time.sleep(0.05)
        return fake(*a, **kw)

    monkeypatch.setattr(sd_mod, "greedy_generate", slow)
    path = toy_data["prompt_completion"]
    cfg = DataConfig.model_validate({"train": str(path), "format": "prompt_completion",
                                     "self_distill": {"accept": {"kind": "regex", "pattern": "^REWRITTEN "},
                                                      "batch_size": 8}})
    records, tok = load_records(str(path)), load_tokenizer(tiny_model)
    stats: list[dict] = []

    def run() -> None:
        stats.append(sd_mod.self_distill(records, cfg, torch.nn.Linear(1, 1), tok, tmp_path / "cache", False,
                                         quiet=True, model_key="m")[1])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s["generated"] for s in stats) == [0, len(records)]
    assert sorted(s["from_cache"] for s in stats) == [0, len(records)]
    assert len(calls) == len(records)  # generated once
    cache = sd_mod.Path(stats[0]["cache"])
    assert len(cache.read_text().splitlines()) == len(records)  # one row each, not two
    assert stats[0]["accepted"] == stats[1]["accepted"] > 0
