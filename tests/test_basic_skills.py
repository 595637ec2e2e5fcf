"""Basic skills: ROUGE / chrF / BLEU scorers by hand and against sacrebleu, corpus-level metrics over
resampled statistics, reference likelihood against a plain forward pass, a fixed-format fine-tune flagged
as a significant drop, and the basic-skills task definitions against the shared data."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from conftest import SHARED
from transformers import AutoModelForCausalLM

from forgetless.retention.evaluate import compare, evaluate, result_from_cache
from forgetless.retention.kinds import reference_likelihood as RL
from forgetless.retention.kinds.base import EvalContext
from forgetless.retention.kinds.generate import GenerateTask, metrics
from forgetless.retention.kinds.generate.rouge import rouge_scores
from forgetless.retention.kinds.generate.translation import bleu_tokenizer, translation_scores
from forgetless.retention.kinds.prompting import gold_answers, use_chat
from forgetless.retention.metrics import bootstrap_ci, paired_test
from forgetless.retention.suite import Suite, load_suite
from forgetless.retention.tasks import load_rows, render, resolve_data_root
from forgetless.testing import WORDS
from forgetless.train.model import load_tokenizer

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "summarization").is_dir() or not (DATA / "translation").is_dir(),
    reason=f"../shared is absent ({DATA}/summarization and /translation not found): data-loading tests are skipped",
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _suite(tasks: list[dict]) -> Suite:
    return Suite.model_validate({"name": "t", "tasks": tasks})


def _eval(model, tok, tasks: list[dict], root: Path):
    return evaluate(model, tok, _suite(tasks), data_root=root, bf16=False, progress=False, cache_dir=root / "cache")


@pytest.fixture(scope="module")
def model_tok(tiny_model, one_thread):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), load_tokenizer(str(tiny_model))


# ---------------------------------------------------------------- scorers by hand


def test_rouge_by_hand():
    # prediction 5 words, reference 6: unigram overlap the/cat/on/mat = 4, so F1 = 2*4/(5+6) = 8/11;
    # bigrams: only "the cat" of 4 and 5, F = 2/9; LCS "the cat on mat" = 4, F = 8/11.
    s = rouge_scores("The cat sat on mat", ["the cat lay on the mat"])
    assert math.isclose(s["rouge1"], 8 / 11)
    assert math.isclose(s["rouge2"], 2 / 9)
    assert math.isclose(s["rougeL"], 8 / 11)
    # several references: the best of each
    assert rouge_scores("the cat sat on mat", ["a dog", "the cat sat on mat"]) == {"rouge1": 1.0, "rouge2": 1.0,
                                                                                   "rougeL": 1.0}
    # Porter stemming, as is standard: cats/cat, running/runs/run
    assert rouge_scores("cats running", ["cat runs"])["rouge1"] == 1.0
    assert rouge_scores("cats running", ["cat runs"], stemmer=False)["rouge1"] == 0.0


def test_chrf_and_bleu_sentence_scores():
    assert translation_scores("the cat sat", ["the cat sat"])["chrf"] == 100.0
    # "abc" vs "abd": 1-grams 2/3 matched, 2-grams 1/2, 3-grams 0; orders 4-6 have no n-grams and drop
    # out, so P = R = (2/3 + 1/2 + 0) / 3 = 7/18 and chrF = 100 * 7/18.
    assert math.isclose(translation_scores("abc", ["abd"])["chrf"], 700 / 18)
    hyp, refs = "The quick brown fox jumps over the dog.", ["A quick brown fox jumped over the lazy dog.",
                                                            "The fast fox jumps."]
    s = translation_scores(hyp, refs)
    assert math.isclose(s["chrf"], sacrebleu.sentence_chrf(hyp, refs).score)
    assert math.isclose(s["bleu"], sacrebleu.sentence_bleu(hyp, refs).score)
    zh = translation_scores("我们现在有老鼠", ["我们现在有四个月大的老鼠"], tokenize="zh")
    assert math.isclose(zh["bleu"],
                        sacrebleu.sentence_bleu("我们现在有老鼠", ["我们现在有四个月大的老鼠"], tokenize="zh").score)
    chrfpp = translation_scores(hyp, refs, word_order=2)
    assert math.isclose(chrfpp["chrf"], sacrebleu.sentence_chrf(hyp, refs, word_order=2).score)


PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a dog barks at night", "the dog barked all night"),
    ("we now have four month old mice", "we now have 4-month-old mice that are not diabetic"),
    ("he added", "he added ."),
    ("rain is expected tomorrow in the north", "tomorrow rain is expected in the north"),
    ("", "nothing was said"),
    ("completely unrelated words here", "the government announced a new plan"),
]


def _translation_cols(pairs, tokenize: str = "13a", word_order: int = 0) -> dict[str, np.ndarray]:
    per = [translation_scores(h, [r], tokenize, word_order=word_order) for h, r in pairs]
    return {k: np.asarray([p[k] for p in per], dtype=float) for k in per[0]}


def test_corpus_bleu_and_chrf_from_resampled_statistics_match_sacrebleu():
    cols = _translation_cols(PAIRS)
    by_name = {m.name: m for m in metrics(cols)}
    assert set(by_name) == {"chrf", "bleu", "corpus_chrf", "corpus_bleu"}
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    assert math.isclose(float(by_name["corpus_bleu"].fn(cols)), sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert math.isclose(float(by_name["corpus_chrf"].fn(cols)), sacrebleu.corpus_chrf(hyps, [refs]).score)
    # corpus BLEU is not the mean of sentence BLEU
    assert not math.isclose(float(by_name["corpus_bleu"].fn(cols)), float(cols["bleu"].mean()))
    # on resamples (a [B, n] batch, as the bootstrap calls it): each row is the corpus score of its items
    idx = np.random.default_rng(0).integers(0, len(PAIRS), size=(3, len(PAIRS)))
    batched = by_name["corpus_bleu"].fn({k: v[idx] for k, v in cols.items()})
    for row, ix in zip(batched, idx, strict=True):
        want = sacrebleu.corpus_bleu([hyps[i] for i in ix], [[refs[i] for i in ix]]).score
        assert math.isclose(float(row), want)
    lo, hi = bootstrap_ci(by_name["corpus_bleu"], cols)
    assert lo <= float(by_name["corpus_bleu"].fn(cols)) <= hi
    # Chinese targets: BLEU on sacrebleu's zh tokenization; chrF++ from word n-gram statistics
    zh = [("我们现在有老鼠", "我们现在有四个月大的老鼠"), ("他补充道", "他补充道：我们现在有")]
    zcols = _translation_cols(zh, tokenize="zh")
    zb = next(m for m in metrics(zcols) if m.name == "corpus_bleu")
    assert math.isclose(float(zb.fn(zcols)),
                        sacrebleu.corpus_bleu([h for h, _ in zh], [[r for _, r in zh]], tokenize="zh").score)
    pp = _translation_cols(PAIRS, word_order=2)
    cp = next(m for m in metrics(pp) if m.name == "corpus_chrf")
    assert math.isclose(float(cp.fn(pp)), sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score)


def test_paired_test_on_corpus_bleu_sees_a_worse_system():
    cols = _translation_cols(PAIRS * 4)
    worse = _translation_cols([(" ".join(h.split()[:2]), r) for h, r in PAIRS * 4])
    m = next(m for m in metrics(cols) if m.name == "corpus_bleu")
    c = paired_test(m, cols, worse)
    assert c.delta < 0 and c.significant_drop


def test_scorer_option_and_defaults():
    assert GenerateTask(name="q").resolved_scorer == "qa" and GenerateTask(name="q").main == "exact_match"
    assert GenerateTask(name="n", answer_type="numeric").main == "numeric"
    assert GenerateTask(name="r", scorer="rouge").main == "rougeL"
    t = GenerateTask(name="t", scorer="translation", target_lang="zh")
    assert t.main == "corpus_chrf" and bleu_tokenizer(t) == "zh"
    assert bleu_tokenizer(GenerateTask(name="t", scorer="translation")) == "13a"
    with pytest.raises(ValueError, match="conflicts"):
        GenerateTask(name="x", answer_type="numeric", scorer="rouge")
    with pytest.raises(ValueError, match="not reported by scorer 'rouge'"):
        GenerateTask(name="x", scorer="rouge", main_metric="exact_match")


def test_use_chat_auto(model_tok):
    _, tok = model_tok
    assert use_chat("auto", tok, "t") is True and use_chat(False, tok, "t") is False

    class NoTemplate:
        chat_template = None

    assert use_chat("auto", NoTemplate(), "t") is False
    with pytest.raises(Exception, match="no chat template"):
        use_chat(True, NoTemplate(), "t")


# ---------------------------------------------------------------- reference likelihood


def _direct(model, ctx_ids: list[int], cont_ids: list[int]) -> float:
    """One plain forward of context+reference: the summed log-probabilities of the reference tokens."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(lp[len(ctx_ids) + i - 1, t].item() for i, t in enumerate(cont_ids))


RL_ROWS = [
    {"id": "a", "prompt": "copy: red cat", "reference": "red cat"},
    {"id": "b", "prompt": "copy: one two three", "reference": "one two three"},
    {"id": "c", "prompt": "copy: sun", "reference": ["sun", "the sun"]},
]


def test_reference_likelihood_matches_a_plain_forward(model_tok, tmp_path):
    model, tok = model_tok
    _jsonl(tmp_path / "rl.jsonl", RL_ROWS)
    plain = {"name": "rl", "kind": "reference_likelihood", "data": {"path": "rl.jsonl"}, "prompt": "{{prompt}}\nA:"}
    chat = {**plain, "name": "rl_chat", "chat": True}
    res = _eval(model, tok, [plain, chat], tmp_path)
    r, rc = res.tasks["rl"], res.tasks["rl_chat"]
    refs = ["red cat", "one two three", "sun"]
    nll, ntok, nll_c, ntok_c = [], [], [], []
    for row, ref in zip(RL_ROWS, refs, strict=True):
        ctx = tok(row["prompt"] + "\nA:", add_special_tokens=False)["input_ids"]
        whole = tok(row["prompt"] + "\nA: " + ref, add_special_tokens=False)["input_ids"]
        nll.append(-_direct(model, ctx, whole[len(ctx) :]))
        ntok.append(len(whole) - len(ctx))
        chat_ctx = list(tok.apply_chat_template([{"role": "user", "content": row["prompt"] + "\nA:"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False))
        cont = tok(ref, add_special_tokens=False)["input_ids"]
        nll_c.append(-_direct(model, chat_ctx, cont))
        ntok_c.append(len(cont))
    np.testing.assert_allclose(r.columns["nll"], nll, rtol=1e-4)
    assert r.columns["tokens"].tolist() == ntok
    np.testing.assert_allclose(rc.columns["nll"], nll_c, rtol=1e-4)
    assert rc.columns["tokens"].tolist() == ntok_c
    assert math.isclose(r.metric("ce").fn(r.columns), sum(nll) / sum(ntok), rel_tol=1e-6)
    n_bytes = sum(len(x.encode()) for x in refs)
    assert math.isclose(r.metric("bits_per_byte").fn(r.columns), sum(nll) / n_bytes / math.log(2), rel_tol=1e-6)
    assert r.main == "ce" and not r.metric("ce").higher_is_better and r.item_ids == ["a", "b", "c"]
    # restored from a cached baseline: the same metrics
    back = result_from_cache(json.loads(json.dumps(r.to_cache())), None)
    assert [m.name for m in back.metrics] == ["ce", "bits_per_byte"]


def test_reference_likelihood_few_shot_never_uses_the_item(model_tok, tmp_path):
    model, tok = model_tok
    _jsonl(tmp_path / "rl.jsonl", RL_ROWS)
    task = RL.ReferenceLikelihoodTask(name="rl", data={"path": "rl.jsonl"}, prompt="{{prompt}}\nA:", shots=2)
    ctx = EvalContext(model=model, tokenizer=tok, data_root=tmp_path)
    rows = load_rows(task, tmp_path)
    reqs, _ = RL.build_requests(task, ctx, rows, rows)
    for row, req in zip(RL_ROWS, reqs, strict=True):
        text = tok.decode(req.context)
        assert text.count("copy:") == 3 and text.endswith(row["prompt"] + "\nA:")
        assert text[: -len(row["prompt"] + "\nA:")].count(row["prompt"] + "\n") == 0


# ---------------------------------------------------------------- generation metrics end to end


def test_translation_task_runs_and_restores_from_cache(model_tok, tmp_path):
    model, tok = model_tok
    _jsonl(tmp_path / "mt.jsonl",
           [{"src": "red cat", "ref": "rote Katze"}, {"src": "sun", "ref": "Sonne"}, {"src": "dog", "ref": "Hund"}])
    task = {"name": "mt", "kind": "generate", "scorer": "translation", "data": {"path": "mt.jsonl"}, "answers": "ref",
            "prompt": "English: {{src}}\nGerman:", "max_new_tokens": 4, "shots": 1}
    r = _eval(model, tok, [task], tmp_path).tasks["mt"]
    assert {"chrf", "bleu", "bleu_sys_len", "chrf_match_c6"} <= set(r.columns)
    assert r.main == "corpus_chrf" and "correct" not in r.details[0] and "chrf" in r.details[0]
    hyps = [d["prediction"] for d in r.details]
    assert math.isclose(r.metric("corpus_bleu").fn(r.columns),
                        sacrebleu.corpus_bleu(hyps, [["rote Katze", "Sonne", "Hund"]]).score)
    back = result_from_cache(json.loads(json.dumps(r.to_cache())), None)
    assert [m.name for m in back.metrics] == [m.name for m in r.metrics]
    assert all(math.isclose(m.fn(back.columns), r.metric(m.name).fn(r.columns)) for m in back.metrics)


# ---------------------------------------------------------------- a fixed-format fine-tune is flagged


def _copy_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt words, reference) pairs of a toy skill: answer `the answer is <the words>`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
        rows.append((f"copy: {words}", f"the answer is {words}"))
    return rows


def _train(model_path: Path, train: Path, out: Path, steps: int, lr: float) -> Path:
    from forgetless.recipe import recipe_from_dict
    from forgetless.train import train as run_train

    r = recipe_from_dict({
        "name": out.name,
        "model": str(model_path),
        "data": {"train": str(train), "format": "prompt_completion", "max_length": 64},
        "method": {"name": "full"},
        "optim": {"lr": lr, "max_steps": steps, "batch_size": 16, "warmup_steps": 0, "schedule": "constant"},
        # fp32 pinned: the organisms must be the same on every CPU, whatever its precision path
        "train": {"output_dir": str(out), "save_steps": None, "logging_steps": 50, "progress": False, "seed": 0,
                  "bf16": False},
    })
    return run_train(r).run_dir / "final"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from several threads, and lose a lot on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def skilled_and_fixed(tiny_model, tmp_path_factory, one_thread):
    """A base fine-tuned (chat template) into a toy skill, and that base fine-tuned further into answering
    everything with one fixed string."""
    d = tmp_path_factory.mktemp("basic_ft")
    skill = _jsonl(d / "skill.jsonl", [{"prompt": p, "completion": c} for p, c in _copy_rows(256, 0)])
    fixed = _jsonl(d / "fixed.jsonl", [{"prompt": p, "completion": "ANSWER: yes."} for p, _ in _copy_rows(256, 1)])
    base = _train(tiny_model, skill, d / "skill_run", 50, 1e-2)
    cand = _train(base, fixed, d / "fixed_run", 80, 1e-2)
    return base, cand


def test_fixed_format_fine_tune_is_a_significant_drop(skilled_and_fixed, tmp_path):
    base_dir, cand_dir = skilled_and_fixed
    _jsonl(tmp_path / "pairs.jsonl",
           [{"id": f"p{i}", "prompt": p, "reference": c} for i, (p, c) in enumerate(_copy_rows(40, 7))])
    tasks = [
        {"name": "ref_ce", "kind": "reference_likelihood", "data": {"path": "pairs.jsonl"}, "chat": True},
        {"name": "skill_rouge", "kind": "generate", "scorer": "rouge", "data": {"path": "pairs.jsonl"},
         "prompt": "{{prompt}}", "answers": "reference", "chat": True, "max_new_tokens": 16},
    ]
    results = []
    for d in (base_dir, cand_dir):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        results.append(_eval(model, load_tokenizer(str(d)), tasks, tmp_path))
    base, cand = results
    # the base has the skill
    assert base.tasks["skill_rouge"].metric("rougeL").fn(base.tasks["skill_rouge"].columns) > 0.3
    # the fine-tune took: (nearly) every answer is the fixed one (40 of 40 on an AVX512 CPU, 39 of 40 on an
    # AVX2-only one, whose fp32 kernels round differently)
    preds = [d["prediction"] for d in cand.tasks["skill_rouge"].details]
    assert sum("yes" in p for p in preds) >= 0.9 * len(preds), [p for p in preds if "yes" not in p]
    report = compare(base, cand)
    ce = report["tasks"]["ref_ce"]
    assert ce["main"] == "ce" and ce["delta"] > 0 and ce["significant_drop"]
    rouge = report["tasks"]["skill_rouge"]
    assert rouge["main"] == "rougeL" and rouge["delta"] < 0 and rouge["significant_drop"]
    assert report["retention_score"] < 1.0 and set(report["significant_drops"]) == {"ref_ce", "skill_rouge"}


# ---------------------------------------------------------------- the task definitions on the shared data


@needs_data
@pytest.mark.parametrize("suite", ["basic-skills", "general"])
def test_task_definitions_load_their_data_and_render(suite, model_tok):
    _, tok = model_tok
    root = resolve_data_root(DATA)
    tasks = [t for t in load_suite(suite).tasks
             if t.kind in ("generate", "reference_likelihood") and t.data and t.data.path
             and t.data.path.startswith(("summarization/", "translation/"))]
    assert tasks, suite
    for t in tasks:
        rows = load_rows(t, root)
        for rec in rows[:2]:
            prompt = str(render(t.prompt, rec, t.name, "prompt"))
            golds = gold_answers(t.answers if t.kind == "generate" else t.reference, rec, t.name)
            assert len(prompt) > 20 and golds and all(g.strip() for g in golds), t.name
            assert "{{" not in prompt and "}}" not in prompt
            assert len(prompt) < 3600  # sources are truncated
        if t.name == "xsum":
            assert t.shots == 0  # lowercased references with "#" for "£" are not shown as examples
        if t.name == "dialogsum":
            assert len(gold_answers(t.answers, rows[0], t.name)) == 3
        if t.kind == "generate" and t.resolved_scorer == "translation" and rows[0].data["tgt_lang"] == "zh":
            assert bleu_tokenizer(t) == "zh"
