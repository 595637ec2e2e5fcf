"""Mitigations: their math, and that each one really reduces forgetting on a model organism.

The organism is a tiny Llama that has learned task A (copy the words) in a session fixture. Fine-tuning it
on task B (reverse the words) with plain full fine-tuning at a high learning rate raises its loss on A
a lot; each mitigation must forget measurably less under the same steps and learning rate, and still
keep at least half of plain fine-tuning's gain on B.
"""

from __future__ import annotations

import json
import math
import os
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from forgetless.mitigations.base import TrainContext, file_backed
from forgetless.mitigations.ewc import EWC, EWCConfig, fisher_diag
from forgetless.mitigations.kl import kl_to_base
from forgetless.mitigations.l2sp import L2SP, L2SPConfig
from forgetless.mitigations.replay import interleave
from forgetless.mitigations.si import SI, SIConfig
from forgetless.recipe import recipe_from_dict
from forgetless.testing import task_loss
from forgetless.train import train

# ---------------------------------------------------------------- math


class TwoParams(nn.Module):
    """p(y=1 | x) = sigmoid(w1 * x1 + w2 * x2): a two-parameter model with a hand-computable Fisher."""

    def __init__(self, w1: float, w2: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w1, w2]))

    def nll(self, x: torch.Tensor, y: float) -> torch.Tensor:
        p = torch.sigmoid((self.w * x).sum())
        return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def _ctx(model: nn.Module) -> TrainContext:
    return TrainContext(recipe=None, model=model, tokenizer=None, run_dir=None, device=torch.device("cpu"),
                        base_model_path="", bf16=False, data=None, cache_dir=None)


def test_fisher_matches_hand_computation_on_two_parameters():
    m = TwoParams(0.5, -1.0)
    data = [(torch.tensor([1.0, 2.0]), 1.0), (torch.tensor([-1.0, 0.5]), 0.0)]
    fisher = fisher_diag([m.w], [lambda x=x, y=y: m.nll(x, y) for x, y in data])[0]
    # d nll / dw = (p - y) x, so F = mean over samples of ((p - y) x)^2
    expected = torch.zeros(2)
    for x, y in data:
        p = 1 / (1 + math.exp(-(0.5 * x[0].item() - 1.0 * x[1].item())))
        expected += ((p - y) * x) ** 2
    torch.testing.assert_close(fisher, expected / 2)


@pytest.mark.parametrize("kind", ["l2sp", "ewc", "si"])
def test_quadratic_penalties_are_zero_at_theta0_and_have_the_closed_form_gradient(kind):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    if kind == "l2sp":
        pen = L2SP(L2SPConfig(weight=0.7))
        pen.setup(_ctx(model))
    elif kind == "ewc":
        pen = EWC(EWCConfig(weight=0.7))
        pen.params = list(model.parameters())
        pen.anchor = [p.detach().clone() for p in pen.params]
        pen.weights = [torch.rand_like(p) for p in pen.params]
    else:
        pen = SI(SIConfig(weight=0.7))
        pen.params = list(model.parameters())
        pen.anchor = [p.detach().clone() for p in pen.params]
        pen.weights = [torch.rand_like(p) for p in pen.params]
    assert pen.penalty().item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    # autograd of the penalty equals the gradient penalty_grad() adds: lam * w * (theta - theta0)
    auto = torch.autograd.grad(pen.penalty_tensor(), pen.params)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pen.penalty_grad()
    for a, p, a0, i in zip(auto, pen.params, pen.anchor, range(len(pen.params)), strict=True):
        w = pen.weights[i] if pen.weights is not None else 1.0
        torch.testing.assert_close(p.grad, a)
        torch.testing.assert_close(p.grad, 0.7 * w * (p.detach() - a0))
    assert math.isclose(pen.penalty().item(), pen.penalty_tensor().item(), rel_tol=1e-5)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux /proc)")
def test_file_backed_state_is_an_exact_copy_in_an_unlinked_file_mapping(tmp_path):
    torch.manual_seed(0)
    src = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 2)]
    mapped = file_backed(src, tmp_path / "mmap")
    for a, b in zip(src, mapped, strict=True):
        assert b.shape == a.shape and b.dtype == torch.float32 and torch.equal(a, b)
        assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()  # a copy, not a view
    assert list((tmp_path / "mmap").iterdir()) == []  # nothing left on disk
    # the memory is a mapping of the (deleted) file, not anonymous memory
    ptr = mapped[0].untyped_storage().data_ptr()
    spans = [line.split() for line in open("/proc/self/maps")]
    owner = next(x for x in spans if int(x[0].split("-")[0], 16) <= ptr < int(x[0].split("-")[1], 16))
    assert "penalty-" in owner[-2] and owner[-1] == "(deleted)", owner
    mapped[1].add_(1.0)  # copy-on-write: writable, and the source is untouched
    assert torch.equal(mapped[1], src[1] + 1.0)
    # other dtypes (and devices) get plain copies, never the tensors themselves (callers pass live parameters)
    half = [torch.ones(4, dtype=torch.bfloat16)]
    copy = file_backed(half, tmp_path / "mmap")
    assert (torch.equal(copy[0], half[0])
            and copy[0].untyped_storage().data_ptr() != half[0].untyped_storage().data_ptr())


def test_si_path_integral_by_hand():
    """Two SGD steps on L = (w - 3)^2 / 2 from w = 0, lr 0.5: omega = sum of -g * dw."""
    w = nn.Parameter(torch.tensor([0.0]))
    si = SI(SIConfig(damping=0.1))
    si.setup(_ctx(nn.ParameterList([w])))
    expected_omega = 0.0
    for _ in range(2):
        w.grad = (w.detach() - 3.0).clone()
        si.observe_step("before")
        g = w.grad.item()
        with torch.no_grad():
            w -= 0.5 * w.grad
        si.observe_step("after")
        expected_omega += -g * (-0.5 * g)
    assert math.isclose(si.omega[0].item(), expected_omega, rel_tol=1e-6)  # 4.5 + 1.125
    delta = w.item() - 0.0
    assert math.isclose(si.importance()[0].item(), expected_omega / (delta**2 + 0.1), rel_tol=1e-6)


def test_kl_is_zero_for_the_base_itself_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert kl_to_base(logits, logits, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_base(logits, logits + torch.randn_like(logits), mask, 1.0).item() > 0.01


def test_interleave_spreads_replay_evenly_and_keeps_orders():
    task = [{"i": i} for i in range(10)]
    extra = [{"r": j} for j in range(5)]
    out = interleave(task, extra)
    assert len(out) == 15
    assert [e["i"] for e in out if "i" in e] == list(range(10))
    assert [e["r"] for e in out if "r" in e] == list(range(5))
    gaps = [k for k, e in enumerate(out) if "r" in e]
    assert max(b - a for a, b in zip(gaps, gaps[1:], strict=False)) <= 4


def _replay(by: str, ratio: float = 0.1):
    from forgetless.mitigations.replay import Replay, ReplayConfig

    r = Replay(ReplayConfig(data={"train": "unused", "format": "text"}, ratio=ratio, by=by))
    r.pool = [{"input_ids": [1] * 5, "replay": True} for _ in range(40)]  # short replay examples
    return r


def test_more_replay_raises_the_share_in_the_unit_of_by():
    """by: tokens counts the share in tokens: with replay examples 20x shorter than the task's, the swap
    continues until the replay tokens reach the new share (counted in examples it barely moved them)."""
    for by in ("tokens", "examples"):
        r = _replay(by)
        task = [{"input_ids": [2] * 100} for _ in range(90)]
        dataset = task[:81] + [{"input_ids": [1] * 5, "replay": True} for _ in range(9)]
        assert r.raise_ratio(dataset, 2.0) == pytest.approx(0.2) and len(dataset) == 90
        replay = [e for e in dataset if e.get("replay")]
        share = (sum(len(e["input_ids"]) for e in replay) / sum(len(e["input_ids"]) for e in dataset)
                 if by == "tokens" else len(replay) / len(dataset))
        assert share >= 0.2 and share == pytest.approx(r.notes["ratio_reached"], abs=1e-4), (by, share)
        if by == "tokens":
            assert share < 0.2 + 5 / 100, share  # it stopped at the first swap that reached it


def test_a_replay_ratio_that_rounds_to_no_example_is_an_error():
    from forgetless.errors import DataError

    r = _replay("examples", ratio=0.05)
    with pytest.raises(DataError, match="ratio 0.05 of 5 training examples rounds to no replay example"):
        r.replay_examples([{"input_ids": [2] * 10} for _ in range(5)], 0.05)
    assert len(_replay("tokens", ratio=0.05).replay_examples([{"input_ids": [2] * 10} for _ in range(5)], 0.05)) == 1


# ---------------------------------------------------------------- the model organism


def _finetune_b(org, tmp_path, mitigations, name):
    data_a = {"train": str(org["a_train"]), "format": "prompt_completion", "chat_template": False}
    spec = []
    for m in mitigations:
        m = dict(m)
        for key in ("reference", "data", "seeds"):
            if m.get(key) == "A":
                m[key] = data_a
        spec.append(m)
    r = recipe_from_dict({
        "name": name,
        "model": str(org["model"]),
        "data": {"train": str(org["b_train"]), "format": "prompt_completion", "chat_template": False, "max_length": 64},
        "method": "full",
        "optim": {"lr": 3e-3, "max_steps": 80, "batch_size": 16, "warmup_steps": 5, "schedule": "constant"},
        "train": {"output_dir": str(tmp_path / name), "save_steps": None, "progress": False, "seed": 0},
        "mitigations": spec,
    })
    res = train(r, quiet=True)
    forgot = task_loss(res.model, res.tokenizer, org["a_val"]) - org["a0"]
    gain = org["b0"] - task_loss(res.model, res.tokenizer, org["b_val"])
    return forgot, gain, res.summary


@pytest.fixture(scope="session")
def plain(organism, tmp_path_factory):
    forgot, gain, _ = _finetune_b(organism, tmp_path_factory.mktemp("plain"), [], "plain")
    assert organism["a0"] < 1.0, "the organism did not learn task A"
    assert forgot > 0.3, f"plain fine-tuning should forget A clearly (forgot {forgot:.3f})"
    assert gain > 1.0, f"plain fine-tuning should learn B (gain {gain:.3f})"
    return forgot, gain


MITIGATION_CASES = {
    "l2sp": [{"name": "l2sp", "weight": 0.2}],
    "ewc": [{"name": "ewc", "weight": 1e5, "reference": "A", "samples": 64}],
    "si": [{"name": "si", "weight": 1.0, "previous": "RUN_A"}],
    "kl": [{"name": "kl", "weight": 1.0}],
    "replay": [{"name": "replay", "ratio": 0.2, "data": "A"}],
    "self_replay": [{"name": "self_replay", "source": "seeds", "n": 64, "ratio": 0.2, "max_new_tokens": 12,
                     "min_answer_words": 1, "seeds": "A"}],
    "freeze": [{"name": "freeze", "embeddings": True, "bottom_k_blocks": 1}],
}


@pytest.mark.parametrize("name", list(MITIGATION_CASES))
def test_mitigation_reduces_forgetting_and_still_learns(name, organism, plain, tmp_path):
    spec = [dict(m, previous=str(organism["run"])) if m.get("previous") == "RUN_A" else m
            for m in MITIGATION_CASES[name]]
    forgot, gain, summary = _finetune_b(organism, tmp_path, spec, name)
    plain_forgot, plain_gain = plain
    assert forgot < 0.75 * plain_forgot, f"{name}: forgot {forgot:.3f} vs plain {plain_forgot:.3f}"
    assert gain >= 0.5 * plain_gain, f"{name}: gain on B {gain:.3f} vs plain {plain_gain:.3f}"
    (report,) = summary["mitigations"]
    assert report["name"] == name and {"setup_s", "step_time_share", "extra_memory_mb"} <= set(report)


def test_mitigations_compose_and_save_state_for_the_next_run(organism, tmp_path):
    spec = [{"name": "l2sp", "weight": 0.05}, {"name": "ewc", "weight": 1e4, "reference": "A", "samples": 16},
            {"name": "si"}, {"name": "replay", "ratio": 0.1, "data": "A"}]
    _, _, summary = _finetune_b(organism, tmp_path, spec, "combo")
    assert [m["name"] for m in summary["mitigations"]] == ["l2sp", "ewc", "si", "replay"]
    run = tmp_path / "combo"
    assert (run / "ewc_state.safetensors").is_file() and (run / "si_state.safetensors").is_file()
    (tmp_path / "plain").write_text("")  # the states are as readable as a plain open() makes a file here
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert {(run / f).stat().st_mode & 0o777 for f in ("ewc_state.safetensors", "si_state.safetensors")} == {mode}
    # online EWC: the next run adds the saved Fisher, decayed by gamma. Both runs start from the same model with the
    # same 16 reference samples, so the second reads the first's Fisher from the cache, and saves
    # F_new + gamma * F_saved = (1 + 0.5) * F_first
    nxt = [{"name": "ewc", "weight": 1e4, "reference": "A", "samples": 16, "previous": [str(run)], "gamma": 0.5}]
    _, _, s2 = _finetune_b(organism, tmp_path, nxt, "online")
    assert s2["mitigations"][0]["fisher_cached"] is True and s2["mitigations"][0]["samples"] == 16
    first = load_file(str(run / "ewc_state.safetensors"))
    online = load_file(str(tmp_path / "online" / "ewc_state.safetensors"))
    fishers = [k for k in first if k.startswith("fisher.")]
    assert fishers and sorted(fishers) == sorted(k for k in online if k.startswith("fisher."))
    assert sum(float(first[k].sum()) for k in fishers) > 0
    for k in fishers:
        torch.testing.assert_close(online[k], 1.5 * first[k], rtol=1e-6, atol=0)


def test_kl_uses_adapters_disabled_for_peft(organism, tmp_path):
    r = recipe_from_dict({
        "name": "lora-kl",
        "model": str(organism["model"]),
        "data": {"train": str(organism["b_train"]), "format": "prompt_completion", "chat_template": False,
                 "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "optim": {"lr": 1e-2, "max_steps": 5, "batch_size": 8},
        "train": {"output_dir": str(tmp_path / "r"), "save_steps": None, "progress": False},
        "mitigations": [{"name": "kl", "weight": 1.0}],
    })
    import peft

    calls = []
    real = peft.PeftModel.disable_adapter

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    with mock.patch.object(peft.PeftModel, "disable_adapter", counted):
        s = train(r, quiet=True).summary
    assert s["mitigations"][0]["extra_memory_mb"] == 0.0  # no second copy of the model
    assert len(calls) == 5  # the base's logits came from the same model with its adapters off, once per step


# ---------------------------------------------------------------- when penalty gradients are added


def _one_step_grads(tiny_model, toy_data, out, monkeypatch, l2sp: dict | None, max_grad_norm):
    """One optimizer step of full FT on the tiny model: the gradients handed to the optimizer (after every hook) and
    the logged grad_norm. With l2sp, its anchor is moved 0.5 below the starting weights, so the penalty's gradient
    is weight * 0.5 on every element from the first step on (at theta0 itself it would be zero)."""
    from conftest import tiny_recipe

    from forgetless.mitigations.base import MitigationCallback

    seen: dict = {}
    real_setup, real_pre = L2SP.setup, MitigationCallback.on_pre_optimizer_step

    def setup(self, ctx):
        real_setup(self, ctx)
        self.anchor = [a - 0.5 for a in self.anchor]
        seen["params"] = self.params

    def pre(self, *a, **kw):
        out_ = real_pre(self, *a, **kw)
        seen["grads"] = [p.grad.detach().clone() for p in seen["params"]]
        return out_

    spec = tiny_recipe(tiny_model, toy_data, out, optim__max_steps=1, optim__max_grad_norm=max_grad_norm,
                       train__logging_steps=1)
    spec["mitigations"] = [{"name": "l2sp", **(l2sp or {"weight": 0.0})}]
    with monkeypatch.context() as mp:
        mp.setattr(L2SP, "setup", setup)
        mp.setattr(MitigationCallback, "on_pre_optimizer_step", pre)
        train(recipe_from_dict(spec), quiet=True)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.cat([g.flatten() for g in seen["grads"]]), next(x["grad_norm"] for x in logged if "grad_norm" in x)


@pytest.mark.parametrize(("clip", "c"), [(False, 0.01), pytest.param(True, 0.01, marks=pytest.mark.slow),
                                         pytest.param(True, None, marks=pytest.mark.slow)])
def test_penalty_gradient_is_added_after_clipping_unless_clip(clip, c, tiny_model, toy_data, tmp_path, monkeypatch):
    # the task gradient alone, unclipped (weight 0: the penalty adds nothing)
    g, g_norm = _one_step_grads(tiny_model, toy_data, tmp_path / "ref", monkeypatch, None, None)
    assert g_norm == pytest.approx(float(g.norm()), rel=1e-5)
    lam = 2.0
    assert c is None or float(g.norm()) > 10 * c  # clipping acts
    final, logged = _one_step_grads(tiny_model, toy_data, tmp_path / "pen", monkeypatch,
                                    {"weight": lam, "clip": clip}, c)
    pen = torch.full_like(g, lam * 0.5)
    if clip:  # clipped together (c None: no clipping, still counted in grad_norm)
        total = g + pen
        want, want_norm = total * (c / float(total.norm()) if c else 1.0), float(total.norm())
    else:  # the task gradient clipped, the penalty added at full strength after; grad_norm the task's alone
        want, want_norm = g * (c / float(g.norm())) + pen, float(g.norm())
    torch.testing.assert_close(final, want, rtol=1e-4, atol=1e-7)
    assert logged == pytest.approx(want_norm, rel=1e-4)


def test_self_replay_seed_prompts_follow_the_seed_files_format_and_key_the_cache(tmp_path, tiny_model, monkeypatch):
    """Instruction seeds keep their input, chat seeds go through data.fields, `limit` caps them; an edited seed
    file is another pool of pairs (the cache was keyed by the settings alone and kept the old pairs)."""
    from types import SimpleNamespace

    from forgetless.mitigations.self_replay import SelfReplay, SelfReplayConfig
    from forgetless.testing import write_jsonl
    from forgetless.train.model import load_tokenizer

    inst = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Sum these", "input": "2 and 3", "output": "5"},
                                                 {"instruction": "Say hi", "output": "hi"},
                                                 {"instruction": "unused", "output": "x"}])
    sr = SelfReplay(SelfReplayConfig(source="seeds", seeds={"train": str(inst), "format": "instruction", "limit": 2}))
    assert sr._seed_prompts(None) == ["Sum these\n\n2 and 3", "Say hi"]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "system", "value": "be brief"},
                                                                    {"from": "human", "value": "What is 2+2?"},
                                                                    {"from": "gpt", "value": "4"}]}])
    sr = SelfReplay(SelfReplayConfig(source="seeds", seeds={
        "train": str(chat), "format": "chat", "fields": {"messages": "conversations", "role": "from",
                                                         "content": "value"}}))
    assert sr._seed_prompts(None) == ["What is 2+2?"]

    calls = []
    monkeypatch.setattr(SelfReplay, "_generate_pairs",
                        lambda self, ctx: calls.append(1) or ([{"prompt": "a b c", "completion": "one two three"}], {}))
    ctx = SimpleNamespace(recipe=SimpleNamespace(data=SimpleNamespace(chat_template=False, max_length=64)),
                          tokenizer=load_tokenizer(str(tiny_model)), fingerprint=lambda: "m", cache_dir=tmp_path)
    cfg = SelfReplayConfig(source="seeds", seeds={"train": str(inst), "format": "instruction"})
    SelfReplay(cfg).setup(ctx)
    SelfReplay(cfg).setup(ctx)
    assert calls == [1]  # the same seeds: the cached pairs
    write_jsonl(inst, [{"instruction": "Another question", "output": "y"}])
    SelfReplay(cfg).setup(ctx)
    assert calls == [1, 1]
