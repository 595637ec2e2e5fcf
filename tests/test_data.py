"""Data formats, completion-only labels, truncation accounting and bad-input errors with file:line."""

from __future__ import annotations

import json

import pytest

from forgetless.data import IGNORE, build_examples, load_datasets, read_file
from forgetless.data.loading import Record
from forgetless.errors import DataError
from forgetless.recipe import DataConfig
from forgetless.train.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def _cfg(**kw) -> DataConfig:
    return DataConfig(train="unused", **kw)


def _decode_target(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])


def test_chat_labels_cover_exactly_the_assistant_turns(tok):
    rec = Record(
        {"messages": [{"role": "user", "content": "copy: red cat"}, {"role": "assistant", "content": "red cat"},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "blue dog"}]},
        "mem", 1,
    )
    (ex,), stats = build_examples([rec], _cfg(format="chat"), tok)
    target = _decode_target(tok, ex)
    assert target == "red cat<|im_end|>\nblue dog<|im_end|>\n"
    assert stats.target_tokens == sum(lab != IGNORE for lab in ex["labels"])


def test_a_chat_template_error_names_the_record(tok):
    """A template's own check (many templates raise on roles that do not alternate) is a DataError naming the
    file and line, not a jinja traceback."""
    import copy

    from forgetless.errors import DataError

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    rec = Record({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "red"}]}, "data.jsonl", 7)
    with pytest.raises(DataError, match=r"data.jsonl:7: the tokenizer's chat template failed.*System role not sup"):
        build_examples([rec], _cfg(format="chat"), strict)


def test_a_generation_prompt_the_conversation_does_not_start_with_is_refused(tok):
    """The loss of an assistant turn starts where the generation prompt ends: a template that renders that
    prompt differently from the turn itself (an inserted think block, say) would move the mask silently."""
    import copy

    from forgetless.errors import DataError

    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>"
                         "{% endif %}")
    rec = Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red cat"}]},
                 "d.jsonl", 3)
    with pytest.raises(DataError, match=r"d.jsonl:3: the chat template does not render conversations prefix"):
        build_examples([rec], _cfg(format="chat"), odd)


def test_chat_template_settings_that_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="chat_template: true needs conversations; format text"):
        _cfg(format="text", chat_template=True)
    with pytest.raises(ValueError, match="chat_template: false with format chat"):
        _cfg(format="chat", chat_template=False)


def test_chat_loss_on_all_tokens(tok):
    rec = Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]}, "m", 1)
    (ex,), _ = build_examples([rec], _cfg(format="chat", loss_on="all"), tok)
    assert ex["labels"] == ex["input_ids"]


def test_sharegpt_style_fields_are_mapped(tok):
    rec = Record({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}, "m", 1)
    cfg = _cfg(format="chat", fields={"messages": "conversations", "role": "from", "content": "value"})
    (ex,), _ = build_examples([rec], cfg, tok)
    assert _decode_target(tok, ex) == "red<|im_end|>\n"


def test_instruction_with_and_without_chat_template(tok):
    rec = Record({"instruction": "copy:", "input": "red", "output": "red"}, "m", 1)
    (chat,), _ = build_examples([rec], _cfg(format="instruction"), tok)  # tokenizer has a template: used
    assert "<|im_start|>user\ncopy:\n\nred" in tok.decode(chat["input_ids"])
    (plain,), _ = build_examples([rec], _cfg(format="instruction", chat_template=False), tok)
    text = tok.decode(plain["input_ids"])
    assert "### Instruction:\ncopy:" in text and "### Input:\nred" in text
    assert _decode_target(tok, plain) == "red</s>"


def test_prompt_completion_and_text(tok):
    rec = Record({"prompt": "copy: red\n", "completion": "red"}, "m", 1)
    (ex,), _ = build_examples([rec], _cfg(format="prompt_completion", chat_template=False), tok)
    assert _decode_target(tok, ex) == "red</s>"
    rec = Record({"text": "red cat sun"}, "m", 1)
    (ex,), _ = build_examples([rec], _cfg(format="text"), tok)
    assert ex["labels"] == ex["input_ids"] and tok.decode(ex["input_ids"]).startswith("red cat sun")


def test_truncation_is_counted_and_drop_is_an_option(tok):
    long = Record({"text": " ".join(["red cat"] * 50)}, "f.jsonl", 7)
    short = Record({"text": "red"}, "f.jsonl", 8)
    exs, stats = build_examples([long, short], _cfg(format="text", max_length=16), tok)
    assert len(exs) == 2 and stats.truncated == 1 and len(exs[0]["input_ids"]) == 16
    assert stats.first_truncated[0].startswith("f.jsonl:7")
    exs, stats = build_examples([long, short], _cfg(format="text", max_length=16, overlong="drop"), tok)
    assert len(exs) == 1 and stats.dropped_overlong == 1


def test_prompt_longer_than_max_length_leaves_no_target_and_is_counted(tok):
    rec = Record({"prompt": "red " * 40, "completion": "cat"}, "f.jsonl", 3)
    exs, stats = build_examples([rec], _cfg(format="prompt_completion", chat_template=False, max_length=8), tok)
    assert exs == [] and stats.dropped_no_target == 1


def test_packing_keeps_every_token(tok):
    recs = [Record({"text": "red cat sun moon"}, "m", i) for i in range(10)]
    plain, _ = build_examples(recs, _cfg(format="text", max_length=16), tok)
    packed, stats = build_examples(recs, _cfg(format="text", max_length=16, packing=True), tok)
    assert sum(len(e["input_ids"]) for e in packed) == sum(len(e["input_ids"]) for e in plain)
    assert all(len(e["input_ids"]) <= 16 for e in packed) and stats.blocks == len(packed)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON line"):
        read_file(p)


def test_missing_field_names_field_and_line(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: missing field 'output'"):
        load_datasets(DataConfig(train=str(p), format="instruction"), tok, 0)
    p.write_text(json.dumps({"q": "a", "a": "b"}) + "\n")
    with pytest.raises(DataError, match=r"missing field 'answer' \(mapped from 'output'"):
        load_datasets(DataConfig(train=str(p), format="instruction", fields={"instruction": "q", "output": "answer"}),
                      tok, 0)


def test_empty_dataset_and_missing_file(tmp_path, tok):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="training set is empty"):
        load_datasets(DataConfig(train=str(p)), tok, 0)
    with pytest.raises(DataError, match="data file not found"):
        load_datasets(DataConfig(train=str(tmp_path / "nope.jsonl")), tok, 0)


def test_chat_format_needs_a_chat_template(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                 + "\n")
    no_template = load_tokenizer(str(tok.name_or_path))
    no_template.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        load_datasets(DataConfig(train=str(p), format="chat"), no_template, 0)


def test_json_array_files_and_validation_fraction(tmp_path, tok):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": f"red cat {i}"} for i in range(20)]))
    ds = load_datasets(DataConfig(train=str(p), format="text", validation_fraction=0.25), tok, 0)
    assert len(ds.train) == 15 and len(ds.validation) == 5


def test_hf_id_offline_fails_fast_with_a_clear_message(tok):
    with pytest.raises(DataError, match="could not load the HF dataset"):
        load_datasets(DataConfig(train="hf:nobody/no-such-dataset"), tok, 0)


def test_a_sweeps_second_tokenization_is_served_from_memory_as_a_copy(tiny_model, toy_data):
    from forgetless.data import examples as E

    records = read_file(toy_data["chat"])
    cfg = _cfg(format="chat")
    first, stats = build_examples(records, cfg, load_tokenizer(str(tiny_model)))
    again = load_tokenizer(str(tiny_model))  # a fresh tokenizer, as the next run of a sweep loads
    calls = []
    real = again.apply_chat_template
    again.apply_chat_template = lambda *a, **k: calls.append(1) or real(*a, **k)
    second, stats2 = build_examples(records, cfg, again)
    assert calls == [] and second == first and stats2 == stats
    second[0]["input_ids"].append(0)  # the caller's copy: the memo and the next caller are unaffected
    third, _ = build_examples(records, cfg, again)
    assert third == first and calls == []
    changed = [Record({**records[0].data,
                       "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                      records[0].source, records[0].line)] + records[1:]
    fourth, _ = build_examples(changed, cfg, again)  # other content, other settings, other template: tokenized anew
    assert calls and fourth[1:] == first[1:] and fourth[0] != first[0]
    calls.clear()
    build_examples(records, _cfg(format="chat", max_length=cfg.max_length - 1), again)
    assert calls
    calls.clear()
    again.chat_template = again.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed_template, _ = build_examples(records, cfg, again)
    assert calls and changed_template != first
    assert len(E._MEMO) <= E._MEMO_SIZE
