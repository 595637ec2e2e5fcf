"""`forgetless data check`: every planted problem is found with its file:line, a clean set is clean,
--fix removes exactly what it logs, malformed input is reported without stopping, lengths match training."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from forgetless.data import build_examples
from forgetless.data.check import (
    CheckReport,
    cheap_checks,
    check_data,
    degenerate_reason,
    fix_data,
    load_against,
    near_duplicate_clusters,
    report_problems,
)
from forgetless.data.cli import app
from forgetless.data.loading import read_file
from forgetless.errors import DataError
from forgetless.recipe import DataConfig
from forgetless.testing import write_jsonl
from forgetless.train.model import load_tokenizer

SYLLABLES = "ka lo mi ne ru ta shi po ve da zo qui bar len tor gis fa mo nu pel ster gra vin dul".split()
TEMPLATES = [
    "Explain how the {a} changes the {b} of a {c}.",
    "Write a short note to a {a} about the {b} near the {c}.",
    "List three facts about {a}, {b} and the {c}.",
    "Describe the {a} that the {b} built for the {c}.",
    "Compare the {a} with the {b} for a {c}.",
    "Summarize what the {a} said about the {b} and the {c}.",
]


def _vocab(n: int = 3000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


VOCAB = _vocab()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def clean_records(n: int, seed: int = 0) -> list[dict]:
    """Diverse instruction records: unique prompts, random answers of 25-60 words, nothing degenerate."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(TEMPLATES).format(a=rng.choice(VOCAB), b=rng.choice(VOCAB), c=rng.choice(VOCAB))
        inp = _sentence(rng, 6, 15) if rng.random() < 0.5 else ""
        out.append({"instruction": t, "input": inp, "output": _sentence(rng, 25, 60)})
    return out


def _cfg(fmt: str = "instruction", **kw) -> DataConfig:
    return DataConfig(train="unused", format=fmt, **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_one_word(text: str, rng: random.Random) -> str:
    ws = text.split(" ")
    i = rng.randrange(1, len(ws) - 1)
    ws[i] = rng.choice([w for w in VOCAB if w != ws[i]][:50])
    return " ".join(ws)


EVAL_ITEMS = [
    {"question": "Which planet in our solar system has the longest day measured against its own year?",
     "choices": ["Venus", "Mars", "Jupiter", "Mercury"], "answer": 0},
    {"question": "What is the chemical symbol that chemists use for the element tungsten in tables?",
     "choices": ["W", "Tu", "Tg", "Ts"], "answer": 0},
]


@pytest.fixture
def planted(tmp_path) -> dict:
    """A clean base with known problems at known lines (1-based)."""
    rng = random.Random(7)
    recs = clean_records(120, seed=3)
    base = list(recs)
    lines: dict[str, list[int]] = {}

    def add(kind: str, rec: dict) -> None:
        recs.append(rec)
        lines.setdefault(kind, []).append(len(recs))

    add("exact", {**base[0], "instruction": "  " + base[0]["instruction"].upper(),
                  "output": base[0]["output"].replace(" ", "   ")})
    add("exact", dict(base[0]))  # a second copy of the same record
    add("exact", dict(base[5]))
    add("near", {**base[10], "output": _edit_one_word(base[10]["output"], rng)})
    add("near", {**base[11], "output": _edit_one_word(base[11]["output"], rng)})
    add("contradiction", {**base[20], "output": _sentence(rng, 25, 40)})
    add("empty", {"instruction": "Tell me about the tor.", "input": "", "output": ""})
    add("whitespace", {"instruction": "Tell me about the gis.", "input": "", "output": "  \n "})
    add("repeated_token", {"instruction": "Tell me about the len.", "input": "", "output": "a a a a a"})
    add("repeated_char", {"instruction": "Tell me about the mo.", "input": "", "output": "!!!!!!"})
    add("refusal", {"instruction": "Tell me about the fa.", "input": "",
                    "output": "As an AI language model, I do not have opinions about that."})
    add("contaminated", {"instruction": "Answer this quiz question.",
                         "input": EVAL_ITEMS[0]["question"].upper(), "output": "Venus, since it spins slowly."})
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    evals = write_jsonl(tmp_path / "mmlu_mini.jsonl", EVAL_ITEMS)
    return {"path": path, "evals": evals, "lines": lines, "n": len(recs)}


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def test_planted_problems_are_all_found(planted):
    p, lines = planted["path"], planted["lines"]
    report = check_data(str(p), _cfg(), against=load_against([str(planted["evals"])]))
    assert report.records == planted["n"] and report.valid == planted["n"]
    assert report.schema["bad"] == 0

    ex = report.exact_duplicates
    assert ex["duplicates"] == 3 and ex["groups"] == 2
    first = ex["examples"][0]
    assert first["copies"] == 3 and first["kept"] == _where(p, 1)
    assert first["locations"] == [_where(p, 1), _where(p, lines["exact"][0]), _where(p, lines["exact"][1])]

    nd = report.near_duplicates
    assert nd["duplicates"] == 2 and nd["clusters"] == 2
    found = {tuple(c["locations"]) for c in nd["examples"]}
    assert found == {(_where(p, 11), _where(p, lines["near"][0])), (_where(p, 12), _where(p, lines["near"][1]))}
    assert all(0.8 <= c["min_jaccard"] < 1.0 for c in nd["examples"])

    c = report.contradictions
    assert c["groups"] == 1 and c["records"] == 2
    assert [v["where"] for v in c["examples"][0]["variants"]] == [_where(p, 21), _where(p, lines["contradiction"][0])]

    dg = report.degenerate
    assert dg["count"] == 5
    assert dg["by_reason"] == {"empty": 1, "whitespace": 1, "repeated_token": 1, "repeated_char": 1, "refusal": 1}
    assert {(x["where"], x["reason"]) for x in dg["examples"]} == {
        (_where(p, lines[k][0]), k) for k in ("empty", "whitespace", "repeated_token", "repeated_char", "refusal")
    }

    ct = report.contamination
    assert ct["contaminated"] == 1
    task = ct["tasks"]["mmlu_mini"]
    assert task["items"] == 2 and task["contaminated_examples"] == 1 and task["eval_items_hit"] == 1
    assert task["examples"][0]["where"] == _where(p, lines["contaminated"][0])
    assert task["examples"][0]["eval_item"] == 0
    assert task["examples"][0]["ngram"] in EVAL_ITEMS[0]["question"].lower()

    assert report.problems == {"schema": 0, "exact_duplicates": 3, "near_duplicates": 2, "contradictions": 1,
                               "degenerate": 5, "truncated": 0, "contaminated": 1}
    text = "\n".join(report_problems(report))
    for kind in ("exact duplicates", "near duplicates", "contradictions", "empty/degenerate", "contamination"):
        assert kind in text
    d = report.to_dict()
    json.dumps(d)  # serialisable
    assert d["total_problems"] == 12 and d["diversity"]["largest_duplicate_clusters"][0]["size"] == 3


def test_clean_diverse_set_is_not_flagged(tmp_path):
    p = write_jsonl(tmp_path / "clean.jsonl", clean_records(400, seed=11))
    evals = write_jsonl(tmp_path / "eval.jsonl", EVAL_ITEMS)
    report = check_data(str(p), _cfg(), against=load_against([str(evals)]))
    assert report.total_problems == 0, report.problems
    assert report_problems(report) == []
    dv = report.diversity
    assert dv["examples"] == 400 and dv["distinct_prompt_share"] == 1.0
    assert dv["distinct_first_words"] == len({t.split()[0].lower() for t in TEMPLATES})
    assert dv["largest_duplicate_clusters"] == [] and dv["duplicate_cluster_share"] == 0.0


def test_fix_removes_exactly_what_it_logs_and_never_touches_the_input(planted, tmp_path):
    p = planted["path"]
    before = _sha(p)
    against = load_against([str(planted["evals"])])
    report = check_data(str(p), _cfg(), against=against)
    out = tmp_path / "clean" / "train.clean.jsonl"
    res = fix_data(str(p), _cfg(), out, report)
    assert _sha(p) == before
    log = [json.loads(x) for x in Path(res.removed_log).read_text().splitlines()]
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert res.kept == len(kept) and res.removed == len(log) and res.kept + res.removed == planted["n"]

    lines = planted["lines"]
    expected = {_where(p, n): k for k, ns in lines.items() if k != "contradiction" for n in ns}
    reasons = {e["where"]: e["reason"] for e in log}
    assert set(reasons) == set(expected)
    for where, kind in expected.items():
        assert reasons[where] == {"exact": "exact_duplicate", "near": "near_duplicate"}.get(kind, kind)
    assert res.by_reason == {"contaminated": 1, "empty": 1, "whitespace": 1, "repeated_token": 1,
                             "repeated_char": 1, "refusal": 1, "exact_duplicate": 3, "near_duplicate": 2}
    # identity: the output is the input minus exactly the logged records, in order, unchanged
    originals = read_file(p)
    logged = set(reasons)
    assert kept == [r.data for r in originals if r.where not in logged]
    assert all(e["record"] == originals[int(e["where"].rsplit(":", 1)[1]) - 1].data for e in log)
    # duplicates name the kept copy, which is in the output
    kept_where = {r.where for r in originals if r.where not in logged}
    for e in log:
        if e["reason"] in ("exact_duplicate", "near_duplicate"):
            assert e["kept"] in kept_where
    # contradictions are left in place and reported
    assert res.contradictions_left == [[_where(p, 21), _where(p, lines["contradiction"][0])]]
    assert originals[20].data in kept

    # refuse to overwrite, refuse to write over the input (even with overwrite)
    with pytest.raises(DataError, match="already exists"):
        fix_data(str(p), _cfg(), out, report)
    fix_data(str(p), _cfg(), out, report, overwrite=True)
    with pytest.raises(DataError, match="input file"):
        fix_data(str(p), _cfg(), p, report, overwrite=True)
    with pytest.raises(DataError, match=".jsonl"):
        fix_data(str(p), _cfg(), tmp_path / "clean.json", report)
    assert _sha(p) == before
    # a report from before the file changed is refused
    p.write_text(p.read_text() + json.dumps(clean_records(1, seed=99)[0]) + "\n")
    with pytest.raises(DataError, match="changed"):
        fix_data(str(p), _cfg(), tmp_path / "other.jsonl", report)


def test_malformed_lines_and_missing_fields_are_reported_and_the_check_goes_on(tmp_path):
    recs = clean_records(20, seed=5)
    body = [json.dumps(r) for r in recs[:3]]
    body.append('{"instruction": "broken", "output": ')  # line 4
    body.append(json.dumps({"instruction": "no answer here"}))  # line 5
    body.append(json.dumps({"instruction": 3, "output": "x y z"}))  # line 6
    body.append("")  # blank line 7: not a record
    body.append(json.dumps(["not", "an", "object"]))  # line 8
    body += [json.dumps(r) for r in recs[3:]] + [json.dumps(recs[0])]  # a duplicate after the bad lines
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(body) + "\n")
    with pytest.raises(DataError):
        read_file(p)  # training would stop at the first bad line
    report = check_data(str(p), _cfg())
    s = report.schema
    assert (s["records"], s["valid"], s["bad"], s["malformed"], s["invalid"]) == (25, 21, 4, 1, 3)
    assert [e["where"] for e in s["examples"]] == [f"{p}:4", f"{p}:5", f"{p}:6", f"{p}:8"]
    assert "malformed JSON" in s["examples"][0]["error"]
    assert "missing field 'output'" in s["examples"][1]["error"]
    assert "must be a string" in s["examples"][2]["error"]
    assert report.exact_duplicates["duplicates"] == 1
    assert report.exact_duplicates["examples"][0]["locations"] == [f"{p}:1", f"{p}:{len(body)}"]
    assert any(f"{p}:4" in line for line in report_problems(report))
    res = fix_data(str(p), _cfg(), tmp_path / "fixed.jsonl", report)
    log = [json.loads(x) for x in Path(res.removed_log).read_text().splitlines()]
    assert [(e["where"], e["reason"]) for e in log] == [
        (f"{p}:4", "malformed_json"), (f"{p}:5", "schema"), (f"{p}:6", "schema"), (f"{p}:8", "schema"),
        (f"{p}:{len(body)}", "exact_duplicate")]
    assert log[0]["raw"] == body[3]
    assert res.kept == 20


def test_json_array_files_and_missing_files(tmp_path):
    p = tmp_path / "data.json"
    p.write_text(json.dumps({"data": clean_records(5, seed=2) + [{"instruction": "x"}]}))
    report = check_data(str(p), _cfg())
    assert report.schema["bad"] == 1 and report.schema["examples"][0]["where"] == f"{p}:6"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"},\n {"oops"}]')
    report = check_data([str(p), str(broken)], _cfg())
    assert report.schema["malformed"] == 1 and report.schema["examples"][-1]["where"] == f"{broken}:2"
    with pytest.raises(DataError, match="not found"):
        check_data(str(tmp_path / "nope.jsonl"), _cfg())


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.mark.parametrize("fmt", ["instruction", "chat", "text"])
def test_truncation_count_matches_build_examples(tok, tmp_path, fmt):
    rng = random.Random(0)
    words = "red green blue cat dog sun moon tree river stone".split()
    recs = []
    for _ in range(40):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        if fmt == "instruction":
            recs.append({"instruction": f"copy: {q}", "output": a})
        elif fmt == "chat":
            recs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            recs.append({"text": f"{q} {a}"})
    p = write_jsonl(tmp_path / f"{fmt}.jsonl", recs)
    cfg = _cfg(fmt, max_length=24)
    _, stats = build_examples(read_file(p), cfg, tok)
    report = check_data(str(p), cfg, tokenizer=tok)
    assert stats.truncated > 0
    assert report.length["over_max_length"] == stats.truncated
    assert report.length["distribution"]["max"] > 24 and report.length["distribution"]["count"] == 40
    assert [f"{e['where']} ({e['tokens']} tokens)" for e in report.length["examples"]] == stats.first_truncated
    cheap = cheap_checks(read_file(p), cfg, tok)
    assert cheap.length["over_max_length"] == stats.truncated


def test_chat_format_checks(tmp_path):
    def conv(u: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}

    recs = [conv(r["instruction"], r["output"]) for r in clean_records(30, seed=4)]
    recs.append(conv(recs[0]["messages"][0]["content"], "Something else entirely, unrelated to the first one."))
    recs.append(json.loads(json.dumps(recs[3])))
    recs.append(conv("Say hi.", "I'm sorry, but I can't do that."))
    recs.append({"messages": [{"role": "user", "content": "no reply"}]})
    recs.append({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})
    p = write_jsonl(tmp_path / "chat.jsonl", recs)
    report = check_data(str(p), _cfg("chat"))
    assert report.contradictions["groups"] == 1
    assert report.exact_duplicates["examples"][0]["locations"] == [f"{p}:4", f"{p}:32"]
    assert report.degenerate["by_reason"] == {"refusal": 1}
    assert [e["where"] for e in report.schema["examples"]] == [f"{p}:34", f"{p}:35"]
    assert "no assistant message" in report.schema["examples"][0]["error"]


def test_cheap_checks_skip_the_expensive_sections(planted):
    records = read_file(planted["path"])
    report = cheap_checks(records, _cfg())
    assert report.exact_duplicates["duplicates"] == 3 and report.degenerate["count"] == 5
    for section in (report.near_duplicates, report.contradictions, report.contamination, report.diversity,
                    report.length):
        assert "skipped" in section
    assert report.problems["near_duplicates"] == 0
    lines = report_problems(report)
    assert len(lines) == 2 and f"{planted['path']}:1" in lines[0]


def test_degenerate_reasons():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason(" \t\n") == "whitespace"
    assert degenerate_reason("a a a a a") == "repeated_token"
    assert degenerate_reason("!!!!!!") == "repeated_char"
    assert degenerate_reason("I\u2019m sorry, but I cannot share that.") == "refusal"
    for fine in ("Paris", "1111", "no no", "ok", "The cat sat on the mat. The end.", "aaa"):
        assert degenerate_reason(fine) is None, fine


def test_near_duplicate_clusters_follow_the_jaccard_threshold():
    rng = np.random.default_rng(0)
    base = rng.choice(2**32, size=100, replace=False).astype(np.uint32)
    near = base.copy()
    near[:5] = rng.choice(2**32, size=5).astype(np.uint32)  # Jaccard 95/105
    far = base.copy()
    far[:40] = rng.choice(2**32, size=40).astype(np.uint32)  # Jaccard 60/140
    other = rng.choice(2**32, size=80).astype(np.uint32)
    sets = [base, other, near, far]
    offsets = np.cumsum([0] + [s.size for s in sets])
    clusters, sims = near_duplicate_clusters(np.concatenate(sets), offsets, 0.8)
    assert clusters == [[0, 2]] and sims[0] == round(95 / 105, 3)
    clusters, _ = near_duplicate_clusters(np.concatenate(sets), offsets, 0.4)
    assert clusters == [[0, 2, 3]]


def test_load_against(tmp_path):
    a = write_jsonl(tmp_path / "arc.jsonl", [{"q": "What is up?", "choices": ["sky", "ground"], "id": 3}])
    b = tmp_path / "other" / "arc.json"
    b.parent.mkdir()
    b.write_text(json.dumps(["plain string item"]))
    out = load_against([str(a), str(b), f"named={a}"])
    assert out == {"arc": ["What is up?\nsky\nground"], "arc_2": ["plain string item"],
                   "named": ["What is up?\nsky\nground"]}
    with pytest.raises(DataError, match="not found"):
        load_against([str(tmp_path / "missing.jsonl")])


runner = CliRunner()


def test_cli_check_exit_codes_and_json(planted, tmp_path):
    p = str(planted["path"])
    res = runner.invoke(app, ["check", p, "--against", str(planted["evals"]), "--json-out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "exact duplicates" in res.output and f"{p}:1" in res.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["problems"]["contaminated"] == 1 and saved["total_problems"] == 12

    res = runner.invoke(app, ["check", p, "--strict", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["problems"]["exact_duplicates"] == 3

    out = tmp_path / "fixed.jsonl"
    res = runner.invoke(app, ["check", p, "--fix", str(out), "--json"])
    assert res.exit_code == 0, res.output
    fixed = json.loads(res.stdout)["fix"]
    assert fixed["removed"] == 10 and out.is_file()  # no --against: contamination stays
    res = runner.invoke(app, ["check", str(out), "--strict"])
    assert res.exit_code == 1  # the contradiction is left for the user
    assert "contradictions" in res.output

    res = runner.invoke(app, ["check", p, "--fix", p, "--overwrite"])
    assert res.exit_code == 2 and "input file" in res.output
    res = runner.invoke(app, ["check", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, ["check", p, "--field", "nonsense"])
    assert res.exit_code == 2 and "canonical=name" in res.output
    res = runner.invoke(app, ["check", p, "--max-length", "10"])
    assert res.exit_code == 2 and "--tokenizer" in res.output


def test_cli_field_mapping_and_tokenizer(tmp_path, tiny_model):
    recs = [{"question": r["instruction"], "answer": r["output"]} for r in clean_records(30, seed=8)]
    p = write_jsonl(tmp_path / "qa.jsonl", recs)
    res = runner.invoke(app, ["check", str(p), "--format", "prompt_completion", "--field", "prompt=question",
                              "--field", "completion=answer", "--tokenizer", str(tiny_model), "--max-length", "16",
                              "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["valid"] == 30 and d["length"]["over_max_length"] == 30 and d["length"]["max_length"] == 16


def _mounted() -> bool:
    from forgetless.cli import app as main_app

    return any(g.name == "data" for g in main_app.registered_groups)


@pytest.mark.slow  # a fresh process (~12 s of start-up): make test-slow
@pytest.mark.skipif(not _mounted(), reason="`forgetless data` is not mounted in forgetless.cli yet")
def test_cli_subprocess_end_to_end(planted, tmp_path):
    cmd = [sys.executable, "-m", "forgetless", "data", "check", str(planted["path"]), "--json", "--strict"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["problems"]["degenerate"] == 5


def test_report_is_a_dataclass_with_counts(planted):
    report = check_data(str(planted["path"]), _cfg(), max_examples=1)
    assert isinstance(report, CheckReport)
    assert len(report.exact_duplicates["examples"]) == 1 and len(report.degenerate["examples"]) == 1
    assert report.total_problems == sum(report.problems.values()) == 11
    quiet = check_data(str(planted["path"]), _cfg(), max_examples=0)
    assert quiet.problems == report.problems and len(report_problems(quiet)) == 4


def test_against_a_retention_suite_lists_contamination_per_task(tmp_path):
    from conftest import SHARED

    from forgetless.data.check import load_against

    data_root = SHARED / "data"
    if not (data_root / "commonsense_mc" / "arc_easy_test.jsonl").is_file():
        pytest.skip(f"../shared is absent ({data_root}): the general suite's data files are needed")
    sets = load_against(["general"], data_root)
    assert {"general/arc_easy", "general/piqa", "general/self_reference"} <= set(sets)
    first_arc = json.loads((data_root / "commonsense_mc" / "arc_easy_test.jsonl").read_text().splitlines()[0])
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"instruction": "q", "input": "",
                             "output": first_arc["question"] + " " + first_arc["choices"][0]}) + "\n"
                 + json.dumps({"instruction": "hi", "input": "", "output": "hello there my good friend"}) + "\n")
    report = check_data(str(f), DataConfig(train=str(f), format="instruction"), against=sets)
    hits = report.to_dict()["contamination"]
    assert hits["contaminated"] == 1
    assert hits["tasks"]["general/arc_easy"]["contaminated_examples"] == 1
    assert hits["tasks"]["general/piqa"]["contaminated_examples"] == 0
