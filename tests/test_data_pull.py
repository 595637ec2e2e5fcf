"""`forgetless data pull`: hub rows (local stand-in datasets, no hub here) -> the files `general` reads ->
evaluation."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless.retention.evaluate import evaluate
from forgetless.retention.pull import pull_suite
from forgetless.retention.suite import load_suite
from forgetless.retention.tasks import MissingDataError, load_rows
from forgetless.train.model import load_tokenizer

# Rows in each hub dataset's own layout (as documented on its dataset card), three per split.
HUB = {
    ("allenai/ai2_arc", "ARC-Easy", "test"): [
        {"id": f"arc{i}", "question": f"Which is thing {i}?", "choices": {"text": ["red", "green", "blue", "gray"],
                                                                          "label": ["A", "B", "C", "D"]},
         "answerKey": "ABC"[i]}
        for i in range(3)],
    ("Rowan/hellaswag", None, "validation"): [
        {"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
         "ctx": "A man cuts onions. he",
         "endings": ["cries.", "sings [title] loudly.", "sleeps.", "runs."], "source_id": "x", "split": "val",
         "split_type": "indomain", "label": str(i)} for i in range(3)],
    ("ybisk/piqa", None, "validation"): [
        {"goal": f"How to do {i}?", "sol1": "this way", "sol2": "that way", "label": i % 2} for i in range(3)],
    ("Salesforce/wikitext", "wikitext-2-v1", "test"): [
        {"text": ""}, {"text": " = Alpha = \n"}, {"text": " Alpha is a letter . \n"}, {"text": " = Beta = \n"},
        {"text": " Beta follows it . \n"}],
    ("allenai/scitldr", "Abstract", "test"): [
        {"source": ["We study x.", "It works."], "source_labels": [0, 1], "rouge_scores": [0.1, 0.2],
         "paper_id": f"p{i}", "target": [f"x works {i}."], "title": "X"} for i in range(3)],
    ("facebook/flores", "eng_Latn-deu_Latn", "devtest"): [
        {"id": i + 1, "URL": "u", "domain": "d", "topic": "t", "has_image": 0, "has_hyperlink": 0,
         "sentence_eng_Latn": f"The house {i}.", "sentence_deu_Latn": f"Das Haus {i}."} for i in range(3)],
    ("google-research-datasets/nq_open", "nq_open", "validation"): [
        {"question": f"who wrote book {i}", "answer": [f"Author {i}", "Someone"]} for i in range(3)],
    ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext", "validation"): [
        {"question": f"Which planet {i}?", "question_id": f"tq{i}", "question_source": "s",
         "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
         "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                            "search_context": []},
         "answer": {"aliases": ["Mars", "Red planet"], "normalized_aliases": ["mars"], "matched_wiki_entity_name": "",
                    "normalized_matched_wiki_entity_name": "", "normalized_value": "mars", "type": "WikipediaEntity",
                    "value": "Mars"}} for i in range(3)],
}


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub, config=None, split=None, **kw):
        calls.append((hub, config, split))
        if (hub, config, split) not in HUB:
            raise FileNotFoundError(f"no dataset {hub} {config} {split}")
        return datasets.Dataset.from_list(HUB[(hub, config, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_pull_general_writes_every_file_in_the_layout_the_tasks_read(fake_hub, tmp_path, tiny_model):
    g = load_suite("general")
    report = pull_suite(g, tmp_path, check_hub=False)
    assert sorted(r["task"] for r in report) == sorted(t.name for t in g.tasks if t.kind != "self_reference")
    assert all(r["status"] == "written" and r["source"]["verified"] is False for r in report)
    assert len(fake_hub) == 8
    by = {t.name: t for t in g.tasks}
    arc = load_rows(by["arc_easy"], tmp_path)
    assert [r.data["gold"] for r in arc] == [0, 1, 2] and arc[0].data["choices"] == ["red", "green", "blue", "gray"]
    piqa = load_rows(by["piqa"], tmp_path)
    assert [r.data["label"] for r in piqa] == ["0", "1", "0"] and "label" not in json.loads(
        (tmp_path / "commonsense_mc/piqa_valid.jsonl").read_text().splitlines()[0])
    wiki = load_rows(by["wikitext"], tmp_path)
    assert [r.data["text"].split("\n")[0] for r in wiki] == [" = Alpha = ", " = Beta = "]  # one document per title
    flores = [r.data for r in load_rows(by["flores_en_de"], tmp_path)]
    assert flores[0] == {"id": "flores200-devtest-ende-0", "src": "The house 0.", "ref": "Das Haus 0.",
                         "src_lang": "en", "tgt_lang": "de"}
    with gzip.open(tmp_path / "knowledge_qa/triviaqa_rc_wikipedia_nocontext_validation.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["answer"]["value"] == "Mars"
    # and the suite evaluates on the pulled files
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    suite = g.only([t.name for t in g.tasks if t.kind != "self_reference"]).with_limit(2)
    res = evaluate(model, load_tokenizer(str(tiny_model)), suite, data_root=tmp_path, bf16=False, progress=False)
    assert {n: r.n for n, r in res.tasks.items()} == {"arc_easy": 2, "hellaswag": 2, "piqa": 2, "wikitext": 2,
                                                      "scitldr": 2, "flores_en_de": 2, "nq_open": 2, "triviaqa": 2}
    # a second pull keeps what is there
    again = pull_suite(g, tmp_path, tasks=["nq_open"], check_hub=False)
    assert again[0]["status"] == "present" and len(fake_hub) == 8


def test_a_missing_file_says_where_it_comes_from_and_how_to_get_it(tmp_path, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with pytest.raises(MissingDataError) as e:
        evaluate(model, load_tokenizer(str(tiny_model)), load_suite("general").only(["nq_open"]), data_root=tmp_path,
                 bf16=False, progress=False)
    msg = str(e.value)
    assert ("nq_open_dev.jsonl not found" in msg
            and "hf:google-research-datasets/nq_open (config nq_open, split validation)" in msg)
    assert "`forgetless data pull general --to DIR`" in msg and "not verified" in msg


def test_a_hub_failure_names_the_task_and_source(fake_hub, tmp_path):
    from forgetless.errors import DataError
    from forgetless.retention.suite import Suite

    s = Suite.model_validate({"name": "s", "tasks": [{"name": "x", "kind": "perplexity", "data": {
        "path": "x.jsonl", "source": {"hub": "nobody/nothing", "split": "test"}}}]})
    with pytest.raises(DataError,
                       match=r"task x: cannot load hf:nobody/nothing \(default, split test\).*not be verified"):
        pull_suite(s, tmp_path, check_hub=False)


def test_cli_data_pull_without_the_hub_fails_cleanly(tmp_path):
    from typer.testing import CliRunner

    from forgetless.cli import app

    res = CliRunner().invoke(app, ["data", "pull", "general", "--to", str(tmp_path / "d")])
    assert res.exit_code == 2 and "forgetless data pull general" in res.output and "unreachable" in res.output
    assert not (tmp_path / "d").exists()
