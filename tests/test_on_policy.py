"""data.self_distill mode on_policy: the student's and teacher's prompts as training renders them, the reverse-KL
loss against a reference computed by hand from plain forward passes, the EMA teacher (update, checkpoint, resume),
and real runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe

from forgetless.config import DataConfig
from forgetless.data import load_records
from forgetless.data.examples import build_examples
from forgetless.data.self_distill import on_policy_examples
from forgetless.errors import RecipeError
from forgetless.mitigations.base import TrainContext, load_states, save_states
from forgetless.recipe import recipe_from_dict
from forgetless.testing import write_jsonl
from forgetless.train import train
from forgetless.train.model import load_tokenizer
from forgetless.train.on_policy import OnPolicyDistill, reverse_kl


def test_reverse_kl_by_hand():
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[2.0, 1.0, 0.0]])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    want = float((ps * (ps.log() - pt.log())).sum())
    assert float(reverse_kl(s, t)[0]) == pytest.approx(want, rel=1e-6)
    # the two share a normaliser, so log p - log q = s - t = (-2, 0, 2): KL = 2 (p2 - p0), p = softmax(0, 1, 2)
    assert want == pytest.approx(2 * (0.66524 - 0.09003), abs=1e-4)
    assert float(reverse_kl(s, s)[0]) == pytest.approx(0.0, abs=1e-7)


def _first_target(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != -100)


@pytest.mark.parametrize(("fmt", "chat_template"), [("prompt_completion", False), ("instruction", False),
                                                    ("chat", None)])
def test_student_prompts_are_the_training_prompts(tiny_model, toy_data, fmt, chat_template):
    cfg = DataConfig(train=str(toy_data[fmt]), format=fmt, chat_template=chat_template, max_length=256,
                     self_distill={"mode": "on_policy"})
    tok = load_tokenizer(str(tiny_model))
    records = load_records(str(toy_data[fmt]))
    examples, stats = on_policy_examples(records, cfg, tok)
    reference, _ = build_examples(records, cfg, tok)
    assert stats["prompts"] == len(examples) == len(reference) == 64 and stats["dropped_overlong_prompts"] == 0
    for ex, ref in zip(examples, reference, strict=True):
        # the prompt is the training example up to its first target token; nothing in it is a target
        assert ex["input_ids"] == ref["input_ids"][: _first_target(ref["labels"])]
        assert set(ex["labels"]) == {-100}
        # the teacher sees the reference answer in its prompt
        answer = tok.decode(ref["input_ids"][_first_target(ref["labels"]):], skip_special_tokens=True).strip()
        assert answer in tok.decode(ex["teacher_ids"])


def test_chat_turns_each_get_their_context(tiny_model, tmp_path):
    convo = {"messages": [{"role": "user", "content": "first question"},
                          {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "second question"},
                          {"role": "assistant", "content": "second answer"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [convo])
    cfg = DataConfig(train=str(path), format="chat", max_length=256, self_distill={"mode": "on_policy"})
    tok = load_tokenizer(str(tiny_model))
    records = load_records(str(path))
    examples, _ = on_policy_examples(records, cfg, tok)
    (ref,), _ = build_examples(records, cfg, tok)
    # the starts of the two label runs: each turn's prompt is the conversation up to there
    starts = [i for i, t in enumerate(ref["labels"]) if t != -100 and (i == 0 or ref["labels"][i - 1] == -100)]
    assert [ex["input_ids"] for ex in examples] == [ref["input_ids"][:s] for s in starts]
    assert "second answer" in tok.decode(examples[1]["teacher_ids"])
    short = cfg.model_copy(update={"max_length": len(examples[1]["input_ids"])})
    kept, stats = on_policy_examples(records, short, tok)
    assert len(kept) == 1 and stats["dropped_overlong_prompts"] == 1 and stats["first_dropped"][0].endswith(
        f"({len(examples[1]['input_ids'])} tokens)")


def _distiller(model, tok, **cfg) -> OnPolicyDistill:
    from forgetless.config import SelfDistillConfig

    m = OnPolicyDistill(SelfDistillConfig(mode="on_policy", **cfg))
    m.setup(TrainContext(recipe=None, model=model, tokenizer=tok, run_dir=Path("."), device=torch.device("cpu"),
                         base_model_path="", bf16=False, data=None, cache_dir=None))
    return m


def _logits(model, seq: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([seq])).logits[0].float()


def test_the_loss_is_the_reverse_kl_over_the_sampled_tokens(tiny_model, monkeypatch):
    from forgetless.train import load_model

    model, tok = load_model(str(tiny_model))
    torch.manual_seed(0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    teachers = [[11, 12, 13, 14, 15, 16], [17, 18, 19]]
    responses = [[20, 21, 22], [23]]
    m = _distiller(model, tok, teacher="base", max_new_tokens=3)
    monkeypatch.setattr(m, "sample", lambda model, p: [list(r) for r in responses])
    pad = tok.pad_token_id
    ids = torch.tensor([prompts[0], prompts[1] + [pad, pad]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    inputs = {"input_ids": ids, "attention_mask": attn, "labels": torch.full_like(ids, -100),
              "teacher_ids": teachers}
    # the trained weights move away from the base teacher
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = m.loss(model, inputs, None)
    # by hand: one unpadded forward per sequence; the base teacher is the weights before the change
    base, _ = load_model(str(tiny_model))
    kls = []
    with torch.no_grad():
        for p, t, r in zip(prompts, teachers, responses, strict=True):
            s_log = _logits(model, p + r)[len(p) - 1: len(p) - 1 + len(r)]
            t_log = _logits(base, t + r)[len(t) - 1: len(t) - 1 + len(r)]
            kls.append(reverse_kl(s_log, t_log))
    want = torch.cat(kls).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-4) and float(loss) > 0.01
    # the gradient reaches the trained weights; the teacher's copy has none
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(not t.requires_grad for t in m.teacher_params.values())
    # a replay example carries no teacher prompt and is not scored by the term
    inputs["teacher_ids"] = [None, None]
    assert m.loss(model, inputs, None) is None


def test_a_live_teacher_shown_the_students_own_prompt_gives_zero_loss(tiny_model, monkeypatch):
    from forgetless.train import load_model

    model, tok = load_model(str(tiny_model))
    m = _distiller(model, tok, teacher="live", max_new_tokens=4)
    assert m.teacher_params is None and m.checkpoint_state() is None
    ids = torch.tensor([[5, 6, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100),
              "teacher_ids": [[5, 6, 7]]}
    model.train()  # as the Trainer calls it: the teacher still scores in eval mode (no dropout), the student not
    modes: list[bool] = []
    hook = model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    loss = m.loss(model, inputs, None)  # really sampled (4 tokens at most)
    hook.remove()
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert modes[-2:] == [False, True] and model.training  # teacher, then student; the mode restored
    assert 1 <= m.response_tokens <= 4 and m.responses == 1


def test_the_ema_teacher_moves_after_each_step_and_is_checkpointed(tiny_model, tmp_path):
    from forgetless.train import load_model

    model, tok = load_model(str(tiny_model))
    m = _distiller(model, tok, teacher="ema", ema_rate=0.25)
    name, p = next(iter(m.params))
    before = m.teacher_params[name].clone()
    with torch.no_grad():
        p.add_(1.0)
    m.observe_step("before")  # nothing moves before the step
    assert torch.equal(m.teacher_params[name], before)
    m.observe_step("after")
    assert torch.allclose(m.teacher_params[name], before + 0.25 * (p.detach() - before), atol=1e-6)
    save_states([m], tmp_path)
    fresh = _distiller(model, tok, teacher="ema", ema_rate=0.25)
    assert not torch.equal(fresh.teacher_params[name], m.teacher_params[name])
    load_states([fresh], tmp_path)
    assert all(torch.equal(fresh.teacher_params[n], m.teacher_params[n]) for n in m.teacher_params)
    with pytest.raises(FileNotFoundError, match="no state of self_distill_on_policy"):
        load_states([fresh], tmp_path / "elsewhere")


def test_a_real_on_policy_run_and_its_resume(tiny_model, toy_data, tmp_path, capsys):
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "run", fmt="chat", optim__max_steps=2, optim__batch_size=4)
    spec["data"]["self_distill"] = {"mode": "on_policy", "max_new_tokens": 5}
    spec["train"]["save_steps"] = 1
    res = train(recipe_from_dict(spec))
    assert "self_distill (on_policy): 64 prompts" in capsys.readouterr().err
    s = res.summary
    sd = next(x for x in s["mitigations"] if x["name"] == "self_distill_on_policy")
    assert sd["responses"] == 8 and 1 <= sd["mean_response_tokens"] <= 5 and sd["teacher"] == "ema"
    assert sd["sample_s_per_step"] > 0 and sd["teacher_s_per_step"] > 0
    assert s["data"]["self_distill"]["mode"] == "on_policy" and s["data"]["self_distill"]["prompts"] == 64
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["self_distill"]["prompts"] == 64
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "mitigation-self_distill_on_policy.safetensors"
            ).is_file()
    assert s["final_train_loss"] is not None and s["final_train_loss"] >= 0
    # as if killed after checkpoint 1: resumed, step 2 is trained again from the saved EMA teacher, and the
    # model is the whole run's
    import shutil

    first = {k: v.clone() for k, v in res.model.state_dict().items()}
    for rest in ("checkpoints/checkpoint-2", "final"):
        shutil.rmtree(tmp_path / "run" / rest, ignore_errors=True)
    (tmp_path / "run" / "summary.json").unlink()
    res2 = train(recipe_from_dict(spec), quiet=True, resume=True)
    assert res2.summary["resumed_from"].endswith("checkpoint-1")
    assert all(torch.allclose(first[k], v, atol=1e-6) for k, v in res2.model.state_dict().items())


def test_replayed_examples_keep_their_loss_beside_on_policy_prompts(tiny_model, toy_data, tmp_path, monkeypatch):
    import forgetless.train.trainer as trainer_mod

    seen = []
    real = trainer_mod.Trainer.compute_loss

    def spy(self, model, inputs, *a, **k):  # the task (cross-entropy) forward: which rows carry targets
        if model.training:  # not the validation loss
            seen.append(int((inputs["labels"] != -100).any(-1).sum()))
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(trainer_mod.Trainer, "compute_loss", spy)
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "mix", fmt="chat", optim__max_steps=3, optim__batch_size=4)
    spec["data"]["self_distill"] = {"mode": "on_policy", "max_new_tokens": 3}
    spec["mitigations"] = [{"name": "replay", "ratio": 0.5, "data": {"train": str(toy_data["text"]),
                                                                     "format": "text"}}]
    s = train(recipe_from_dict(spec), quiet=True).summary
    assert [m["name"] for m in s["mitigations"]] == ["self_distill_on_policy", "replay"]
    sd = s["mitigations"][0]
    # every step holds prompts and replayed texts; only the replayed rows have targets, the prompts are sampled
    assert seen and all(0 < n < 4 for n in seen) and sd["responses"] == 12 - sum(seen)


def test_on_policy_errors():
    with pytest.raises(ValueError, match="accept: not read in mode on_policy"):
        DataConfig(train="t", self_distill={"mode": "on_policy", "accept": {"kind": "answer"}})
    with pytest.raises(ValueError, match="teacher: not read in mode offline"):
        DataConfig(train="t", self_distill={"teacher": "base"})
    base = {"model": "m", "data": {"train": "t", "self_distill": {"mode": "on_policy"}}}
    with pytest.raises(RecipeError, match="mitigations.kl: not combined with data.self_distill mode on_policy"):
        recipe_from_dict({**base, "mitigations": ["kl"]})
    with pytest.raises(RecipeError, match="needs one prompt per example: not data.packing"):
        recipe_from_dict({**base, "data": {**base["data"], "packing": True}})
    for mode in ("offline", "on_policy"):  # refused when the recipe is read, not after the model has loaded
        with pytest.raises(RecipeError, match="self_distill needs prompt/answer data .* not format text"):
            recipe_from_dict({**base, "data": {**base["data"], "format": "text", "self_distill": {"mode": mode}}})


def test_sampled_generation_keeps_eos_and_ignores_the_models_sampling_defaults(tiny_model):
    from types import SimpleNamespace

    from forgetless.retention.lm import _cut, greedy_generate
    from forgetless.train import load_model

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    assert _cut([5, 6, 2, 7], tok, ()) == [5, 6] and _cut([5, 6, 2, 7], tok, (), keep_eos=True) == [5, 6, 2]
    assert _cut([5, 0, 0], tok, (), keep_eos=True) == [5]  # padding is never kept
    model, real_tok = load_model(str(tiny_model))
    # the model's generation_config asks for greedy top-k 1: sampling must not inherit it
    model.generation_config.top_k, model.generation_config.do_sample = 1, False
    prompts = [[5, 6, 7]] * 8
    torch.manual_seed(0)
    sampled = greedy_generate(model, real_tok, prompts, max_new_tokens=6, batch_size=8, bf16=False, temperature=1.0)
    greedy = greedy_generate(model, real_tok, prompts, max_new_tokens=6, batch_size=8, bf16=False)
    assert len({tuple(g) for g in greedy}) == 1  # the same prompt, the same greedy answer
    assert len({tuple(s) for s in sampled}) > 1  # a random tiny model's samples differ
