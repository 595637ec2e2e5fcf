"""`forgetless continual` on a tiny model organism: three toy tasks (copy, reverse, last word) learned one
after another. Plain sequential fine-tuning must show clearly negative backward transfer; a replay buffer
and online EWC must each forget measurably less (their BWT intervals above plain's) while still learning;
O-LoRA must keep the second adapter's subspace nearly orthogonal to the first's and forget less than plain
LoRA. The metrics are checked against hand-computed values, and an interrupted sequence resumes without
redoing finished steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import forgetless.train as train_mod
from forgetless.continual import (
    ContinualConfig,
    TaskSpec,
    load_continual,
    plan,
    run_continual,
    score_matrix,
    select_buffer,
    sequence_metrics,
    summarize,
)
from forgetless.errors import ForgetlessError, RecipeError
from forgetless.mitigations.olora import lora_a_matrices, subspace_overlap
from forgetless.testing import WORDS, build_tiny_llama, toy_corpus, write_jsonl

TASKS = ("copy", "rev", "last")

# ---------------------------------------------------------------- metrics by hand

# rows: base, after step 1, 2, 3; columns: tasks 1..3 (higher is better)
R_HAND = np.array([
    [0.10, 0.20, 0.30],
    [0.80, 0.25, 0.30],
    [0.60, 0.90, 0.35],
    [0.50, 0.70, 0.95],
])


def test_metrics_match_hand_computation():
    m = sequence_metrics(R_HAND)
    assert m["average_accuracy"] == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)  # -0.25
    assert m["fwt"] == pytest.approx(((0.25 - 0.20) + (0.35 - 0.30)) / 2)  # +0.05
    assert m["forgetting"] == pytest.approx(((0.80 - 0.50) + (0.90 - 0.70)) / 2)  # max earlier score - last
    after2 = sequence_metrics(R_HAND, 2)
    assert after2["average_accuracy"] == pytest.approx((0.60 + 0.90) / 2)
    assert after2["bwt"] == pytest.approx(0.60 - 0.80) and after2["fwt"] == pytest.approx(0.25 - 0.20)
    after1 = sequence_metrics(R_HAND, 1)
    assert after1["average_accuracy"] == pytest.approx(0.80) and after1["bwt"] is None and after1["fwt"] is None
    # forgetting takes the best earlier score, not the one right after training
    R = R_HAND.copy()
    R[2, 0] = 0.95
    assert sequence_metrics(R)["forgetting"] == pytest.approx(((0.95 - 0.50) + (0.90 - 0.70)) / 2)
    # leading (bootstrap) dimensions are kept
    stacked = sequence_metrics(np.stack([R_HAND, R_HAND + 1]))
    assert stacked["bwt"].shape == (2,) and stacked["bwt"] == pytest.approx([-0.25, -0.25])


def _fake_row(task_nll: dict[str, np.ndarray], tokens: np.ndarray):
    from forgetless.retention.kinds import reference_likelihood as rl
    from forgetless.retention.tasks import TaskResult

    out = {}
    for name, nll in task_nll.items():
        cols = {"nll": nll.astype(float), "tokens": tokens.astype(float), "bytes": 4 * tokens.astype(float)}
        out[name] = TaskResult(name, "reference_likelihood", cols, rl.metrics(cols), "ce",
                               [f"i{k}" for k in range(len(nll))])
    return out


def test_matrix_scores_are_minus_ce_and_bwt_interval_is_paired():
    """Per-item results built by hand: scores are minus the token-weighted cross-entropy, and because task j is
    resampled the same way in every row, a change that is the same on every item has a zero-width interval
    however noisy the items are."""
    rng = np.random.default_rng(0)
    n = 40
    tokens = rng.integers(1, 6, n)
    noisy = {t: rng.uniform(0.5, 4.0, n) * tokens for t in ("a", "b")}
    # after step 1 task a is learned (every item's nll drops by 1 nat per token); step 2 forgets 0.3 of it
    rows = [
        _fake_row(noisy, tokens),
        _fake_row({"a": noisy["a"] - 1.0 * tokens, "b": noisy["b"]}, tokens),
        _fake_row({"a": noisy["a"] - 0.7 * tokens, "b": noisy["b"] - 0.5 * tokens}, tokens),
    ]
    specs = [TaskSpec(name=t, data={"train": "x"}) for t in ("a", "b")]
    R, B = score_matrix(rows, specs, n_boot=300)
    ce_a = noisy["a"].sum() / tokens.sum()
    assert R[0, 0] == pytest.approx(-ce_a) and R[1, 0] == pytest.approx(-ce_a + 1.0)
    s = summarize(R, B)
    bwt = s["metrics"]["bwt"]
    assert bwt["value"] == pytest.approx(-0.3)
    assert bwt["ci"] == pytest.approx([-0.3, -0.3], abs=1e-9)  # paired: the noise cancels
    lo, hi = s["ci"][1][0]
    assert hi - lo > 0.2  # while the score itself is noisy
    assert s["metrics"]["fwt"]["value"] == pytest.approx(0.0)  # task b did not move before its own step
    assert [e["step"] for e in s["trajectory"]] == [0, 1, 2] and s["trajectory"][1]["bwt"] is None


def test_olora_penalty_gradient_matches_autograd_and_vanishes_when_orthogonal():
    import torch

    from forgetless.mitigations.olora import OLoRA, OLoRAConfig

    torch.manual_seed(0)
    pen = OLoRA(OLoRAConfig(weight=0.7, l2=0.1))
    a_new = torch.nn.Parameter(torch.randn(3, 8))
    other = torch.nn.Parameter(torch.randn(8, 3))  # e.g. a lora_B: only the l2 term touches it
    prev = torch.randn(5, 8)
    pen.a_params, pen.a_prev, pen.all_params = [a_new], [prev], [a_new, other]
    auto = torch.autograd.grad(pen.penalty_tensor(), [a_new, other])
    for p in (a_new, other):
        p.grad = torch.zeros_like(p)
    pen.penalty_grad()
    torch.testing.assert_close(a_new.grad, auto[0])
    torch.testing.assert_close(a_new.grad, 0.7 * (a_new.detach() @ prev.T) @ prev + 0.1 * a_new.detach())
    torch.testing.assert_close(other.grad, auto[1])
    assert pen.penalty().item() == pytest.approx(pen.penalty_tensor().item(), rel=1e-5)
    # rows orthogonal to every earlier row: no orthogonality penalty at all
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    pen = OLoRA(OLoRAConfig(weight=1.0))
    pen.a_params, pen.a_prev, pen.all_params = [torch.nn.Parameter(q[:3].clone())], [q[3:].clone()], []
    assert pen.penalty().item() == pytest.approx(0.0, abs=1e-10)
    assert subspace_overlap({"m": q[:3]}, [{"m": q[3:]}]) == pytest.approx(0.0, abs=1e-6)
    assert subspace_overlap({"m": q[:3]}, [{"m": q[:2]}]) > 0.5


# ---------------------------------------------------------------- replay buffer selection


def test_replay_buffer_quota_and_reservoir():
    q2 = select_buffer([100, 30], "quota", per_task=20, size=0, seed=1)
    q3 = select_buffer([100, 30, 5], "quota", per_task=20, size=0, seed=1)
    assert [len(x) for x in q3] == [20, 20, 5]
    assert q3[:2] == q2  # an earlier task's share does not change as tasks arrive
    assert all(len(set(x)) == len(x) and max(x) < n for x, n in zip(q3, [100, 30, 5], strict=True))
    r = select_buffer([300, 300, 300], "reservoir", per_task=0, size=90, seed=0)
    assert sum(len(x) for x in r) == 90
    assert all(15 <= len(x) <= 45 for x in r)  # every example seen equally likely: about a third each
    assert r == select_buffer([300, 300, 300], "reservoir", per_task=0, size=90, seed=0)  # deterministic
    assert select_buffer([10], "reservoir", per_task=0, size=90, seed=0) == [list(range(10))]


# ---------------------------------------------------------------- the organism


def _task(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = [rng.choice(WORDS) for _ in range(rng.randint(2, 3))]
        ans = {"copy": w, "rev": w[::-1], "last": w[-1:]}[kind]
        out.append({"prompt": f"{kind}: {' '.join(w)} =>", "completion": " " + " ".join(ans)})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("continual")
    out = {"dir": d, "model": build_tiny_llama(d / "model")}
    for k, seed in zip(TASKS, (1, 3, 5), strict=True):
        out[k] = {"train": str(write_jsonl(d / f"{k}_train.jsonl", _task(k, 256, seed))),
                  "validation": str(write_jsonl(d / f"{k}_val.jsonl", _task(k, 48, seed + 1)))}
    write_jsonl(d / "text.jsonl", [{"text": t} for t in toy_corpus(40, seed=9)])
    out["suite"] = d / "toy-suite.yaml"
    out["suite"].write_text(yaml.safe_dump({"name": "toy", "tasks": [
        {"name": "toy_text", "kind": "perplexity", "data": {"path": str(d / "text.jsonl")}}]}))
    return out


def _sequence(world: dict, name: str, carry: dict | None = None, tasks=TASKS, method: dict | str = "full",
              model: str | None = None, **extra) -> dict:
    lora = isinstance(method, dict)
    return {
        "name": name,
        "base": {
            "model": model or str(world["model"]),
            "data": {"format": "prompt_completion", "chat_template": False, "max_length": 64},
            "method": method,
            "optim": {"lr": 1e-2 if lora else 3e-3, "max_steps": 40 if lora else 100, "batch_size": 16,
                      "warmup_steps": 2 if lora else 5, "schedule": "constant"},
            "train": {"save_steps": None, "progress": False, "seed": 0, "report": False},
        },
        "tasks": [{"name": k, "data": dict(world[k])} for k in tasks],
        "retention_suite": str(world["suite"]),
        "limit": 32,
        "carry": carry or {},
        "output_dir": str(world["dir"] / name),
        **extra,
    }


def _write(world: dict, spec: dict) -> Path:
    p = world["dir"] / f"{spec['name']}.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def plain(world):
    """Plain sequential full fine-tuning, interrupted as step 3 starts training, then resumed."""
    path = _write(world, _sequence(world, "plain"))
    real = train_mod.train
    calls: list[str] = []

    def crashing(recipe, **kw):
        calls.append(recipe.name)
        if recipe.name == "3-last" and calls.count("3-last") == 1:
            raise KeyboardInterrupt("simulated crash")
        return real(recipe, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "train", crashing)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_continual(path, quiet=True, report=False)
        out = world["dir"] / "plain"
        partial = json.loads((out / "continual.json").read_text())
        kept = {p: (out / p).read_bytes() for p in ("steps/1-copy/summary.json", "steps/2-rev/eval-task.items.json",
                                                      "steps/2-rev/final/model.safetensors")}
        first_calls = list(calls)
        state = run_continual(path, quiet=True)
        resumed_calls = calls[len(first_calls):]
        again = run_continual(path, quiet=True, report=False)
    finally:
        mp.undo()
    return {"path": path, "out": out, "state": state, "partial": partial, "kept": kept, "first_calls": first_calls,
            "resumed_calls": resumed_calls, "calls_after": calls[len(first_calls) + len(resumed_calls):],
            "again": again}


def _bwt(state):
    return state["metrics"]["bwt"]


def _gains(state) -> list[float]:
    """Each task's score right after its own step, over the base model's: R[j][j] - R[0][j]."""
    R = np.asarray(state["matrix"]["score"])
    return [R[j + 1, j] - R[0, j] for j in range(R.shape[1])]


def test_plain_sequential_finetuning_forgets(plain):
    s = plain["state"]
    assert s["complete"] and [e["task"] for e in s["steps"]] == list(TASKS)
    assert s["matrix"]["rows"] == ["base", "1-copy", "2-rev", "3-last"] and s["matrix"]["columns"] == list(TASKS)
    assert all(t["score"] == "-ce" and t["n"] == 32 for t in s["tasks"])
    R = np.asarray(s["matrix"]["score"])
    ci = np.asarray(s["matrix"]["ci"])
    assert R.shape == (4, 3) and np.all(ci[..., 0] <= R + 1e-9) and np.all(R <= ci[..., 1] + 1e-9)
    assert all(g > 2.0 for g in _gains(s)), _gains(s)  # every task is learned (nats per token over the base)
    bwt = _bwt(s)
    assert bwt["ci"][1] < -1.0, bwt  # clearly, significantly negative: earlier tasks forgotten
    assert bwt["value"] == pytest.approx(((R[3, 0] - R[1, 0]) + (R[3, 1] - R[2, 1])) / 2)
    assert s["metrics"]["forgetting"]["value"] >= -bwt["value"] - 1e-9
    # the retention suite was scored after every step, with an interval
    assert [e["step"] for e in s["trajectory"]] == [0, 1, 2, 3]
    for e in s["trajectory"][1:]:
        lo, hi = e["retention"]["ci"]
        assert lo <= e["retention"]["change"] <= hi
    # each step started from the previous step's model
    recipes = [yaml.safe_load((plain["out"] / "steps" / d / "recipe.yaml").read_text()) for d in ("2-rev", "3-last")]
    assert recipes[0]["model"]["name"] == str((plain["out"] / "steps" / "1-copy" / "final").resolve())
    assert recipes[1]["model"]["name"] == str((plain["out"] / "steps" / "2-rev" / "final").resolve())


def test_outputs_json_plots_and_report(plain):
    out = plain["out"]
    on_disk = json.loads((out / "continual.json").read_text())
    assert on_disk["metrics"] == plain["state"]["metrics"]
    for name in ("matrix.png", "trajectory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    for needle in ('id="metrics-table"', 'id="matrix-plot"', 'id="matrix-table"', 'id="trajectory-plot"',
                   'id="steps-table"', "backward transfer", "data:image/png;base64,", "3-last"):
        assert needle in html
    assert html.count('class="diag"') == 3
    for d in ("1-copy", "2-rev", "3-last"):
        step = out / "steps" / d
        assert (step / "eval-task.json").is_file() and (step / "eval-retention.json").is_file()
        assert json.loads((step / "eval-task.json").read_text())["comparison"]["tasks"].keys() == set(TASKS)


def test_resume_skips_finished_steps(plain):
    assert plain["first_calls"] == ["1-copy", "2-rev", "3-last"]
    p = plain["partial"]
    assert [e["task"] for e in p["steps"]] == ["copy", "rev"] and not p["complete"] and len(p["matrix"]["rows"]) == 3
    assert plain["resumed_calls"] == ["3-last"]  # steps 1 and 2 not trained again
    for rel, content in plain["kept"].items():
        assert (plain["out"] / rel).read_bytes() == content, rel  # nor re-evaluated
    assert plain["calls_after"] == []  # a third run has nothing to do
    assert plain["again"]["matrix"] == plain["state"]["matrix"]


def test_a_crash_in_the_first_step_resumes_too(world, monkeypatch):
    spec = _sequence(world, "early", tasks=("copy",), retention_suite=None)
    spec["tasks"][0]["set"] = {"optim.max_steps": 5}
    path = _write(world, spec)

    def crash(recipe, **kw):
        raise KeyboardInterrupt("simulated crash")

    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        run_continual(path, quiet=True, report=False)
    state = json.loads((world["dir"] / "early" / "continual.json").read_text())
    assert state["steps"] == [] and not state["complete"] and state["matrix"]["rows"] == ["base"]
    monkeypatch.setattr(train_mod, "train", real)
    state = run_continual(path, quiet=True, report=False)
    assert state["complete"] and state["metrics"]["bwt"] is None and state["metrics"]["average_accuracy"]["value"] < 0


def test_an_interruption_while_the_base_is_scored_resumes(world, monkeypatch):
    """sequence.yaml is written before the base row is scored and continual.json after it: a rerun after a crash
    in between resumes (it was refused as "not a continual directory")."""
    from forgetless.continual.evaluate import Evaluator

    spec = _sequence(world, "base-crash", tasks=("copy",), retention_suite=None)
    spec["tasks"][0]["set"] = {"optim.max_steps": 5}
    path = _write(world, spec)
    real = Evaluator.base_row

    def crash(self, out):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(Evaluator, "base_row", crash)
    with pytest.raises(KeyboardInterrupt):
        run_continual(path, quiet=True, report=False)
    out = world["dir"] / "base-crash"
    assert (out / "sequence.yaml").is_file() and not (out / "continual.json").exists()
    monkeypatch.setattr(Evaluator, "base_row", real)
    assert run_continual(path, quiet=True, report=False)["complete"]


def test_a_sequence_is_scored_where_its_steps_train(world, monkeypatch):
    """The evaluator follows the recipe's train.device (auto: the GPU when there is one), the base and every step
    loaded there; asking for CUDA where there is none is a clear error before anything trains."""
    import forgetless.continual.evaluate as ev

    asked, loaded = [], []
    real_device, real_load = ev.eval_device, ev.load_for_eval
    monkeypatch.setattr(ev, "eval_device", lambda setting: asked.append(setting) or real_device(setting))
    monkeypatch.setattr(ev, "load_for_eval", lambda name, device: loaded.append(str(device)) or real_load(name, device))
    spec = _sequence(world, "device", tasks=("copy",), retention_suite=None)
    spec["tasks"][0]["set"] = {"optim.max_steps": 3, "train.device": "cpu"}
    assert run_continual(_write(world, spec), quiet=True, report=False)["complete"]
    assert asked == ["cpu"] and loaded and set(loaded) == {"cpu"}
    if not torch.cuda.is_available():
        spec = _sequence(world, "device-cuda", tasks=("copy",), retention_suite=None)
        spec["tasks"][0]["set"] = {"optim.max_steps": 3, "train.device": "cuda"}
        with pytest.raises(ForgetlessError, match="no CUDA device"):
            run_continual(_write(world, spec), quiet=True, report=False)
        assert not (world["dir"] / "device-cuda" / "steps").exists()


def test_changed_sequence_or_foreign_directory_is_refused(plain, world):
    spec = yaml.safe_load(plain["path"].read_text())
    spec["tasks"][1]["set"] = {"optim.lr": 1e-3}
    changed = world["dir"] / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(ForgetlessError, match="changed"):
        run_continual(changed, quiet=True)
    foreign = world["dir"] / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    spec["output_dir"] = str(foreign)
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(ForgetlessError, match="not a continual directory"):
        run_continual(changed, quiet=True)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def replay(world):
    return run_continual(ContinualConfig.model_validate(_sequence(
        world, "replay", {"replay": {"policy": "quota", "per_task": 32, "ratio": 0.25}})), quiet=True, report=False)


@pytest.fixture(scope="module")
def ewc(world):
    return run_continual(ContinualConfig.model_validate(_sequence(
        world, "ewc", {"ewc": {"weight": 1000, "samples": 64}})), quiet=True, report=False)


@pytest.mark.slow  # two 3-task sequences on the organism (~31 s); make test keeps the wiring and resume tests
@pytest.mark.parametrize("name", ["replay", "ewc"])
def test_carried_mitigation_reduces_forgetting_and_still_learns(name, plain, request):
    s = request.getfixturevalue(name)
    base_bwt, bwt = _bwt(plain["state"]), _bwt(s)
    assert bwt["ci"][0] > base_bwt["ci"][1], f"{name}: BWT {bwt} vs plain {base_bwt}"  # intervals apart
    assert bwt["value"] > 0.4 * base_bwt["value"], f"{name}: BWT {bwt['value']:.3f} vs plain {base_bwt['value']:.3f}"
    plain_gains, gains = _gains(plain["state"]), _gains(s)
    assert all(g >= 0.5 * p for g, p in zip(gains, plain_gains, strict=True)), (gains, plain_gains)
    assert s["matrix"]["score"][1] == plain["state"]["matrix"]["score"][1]  # step 1 carries nothing: identical


@pytest.mark.slow  # two carried sequences (~29 s of the default run); make test-slow
def test_replay_buffer_and_online_ewc_are_wired(replay, ewc, world):
    steps = {e["task"]: e for e in replay["steps"]}
    assert steps["copy"]["replay_buffer"] == {} and steps["rev"]["replay_buffer"] == {"copy": 32}
    assert steps["last"]["replay_buffer"] == {"copy": 32, "rev": 32}
    rep = next(m for m in steps["last"]["mitigations"] if m["name"] == "replay")
    assert rep["replay_examples"] == round(0.25 / 0.75 * 256)
    buf = Path(replay["dir"]) / "replay" / "step-3" / "1-copy.jsonl"
    copy_train = Path(world["copy"]["train"]).read_text().splitlines()
    assert set(buf.read_text().splitlines()) <= set(copy_train)
    # online EWC: step 3 adds the Fisher of task 2 to step 2's (task 1's) Fisher
    from safetensors.torch import load_file

    f2 = load_file(str(Path(ewc["dir"]) / "steps" / "2-rev" / "ewc_state.safetensors"))
    f3 = load_file(str(Path(ewc["dir"]) / "steps" / "3-last" / "ewc_state.safetensors"))
    keys = [k for k in f2 if k.startswith("fisher.")]
    assert keys and all(bool((f3[k] >= f2[k] - 1e-12).all()) for k in keys)
    assert sum(float((f3[k] - f2[k]).sum()) for k in keys) > 0
    assert not (Path(ewc["dir"]) / "steps" / "1-copy" / "ewc_state.safetensors").exists()  # nothing to protect yet


@pytest.fixture(scope="module")
def lora_runs(plain, world) -> dict:
    """Two LoRA steps (rev, then last) from a model that knows task 1: plain, O-LoRA, and SI carried over."""
    start = str(plain["out"] / "steps" / "1-copy" / "final")
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    runs = {}
    for name, carry in (("lora-plain", {}), ("lora-olora", {"olora": {"weight": 10}}),
                        ("lora-si", {"si": {"weight": 1.0}})):
        cfg = ContinualConfig.model_validate(_sequence(world, name, carry, tasks=("rev", "last"), method=lora,
                                                       model=start, retention_suite=None, limit=16))
        runs[name] = run_continual(cfg, quiet=True, report=False)
    return runs


def _overlap(state) -> float:
    steps = Path(state["dir"]) / "steps"
    return subspace_overlap(lora_a_matrices(steps / "2-last"), [lora_a_matrices(steps / "1-rev")])


def test_olora_keeps_adapters_orthogonal_and_forgets_less_than_plain_lora(lora_runs):
    for s in lora_runs.values():
        steps = Path(s["dir"]) / "steps"
        assert (steps / "1-rev" / "final" / "adapter_model.safetensors").is_file()  # each task's adapter kept
        assert (steps / "2-last" / "merged" / "model.safetensors").is_file()
        rec = yaml.safe_load((steps / "2-last" / "recipe.yaml").read_text())
        assert rec["model"]["name"] == str((steps / "1-rev" / "merged").resolve())  # the adapter stack, merged
    plain, olora = lora_runs["lora-plain"], lora_runs["lora-olora"]
    assert _overlap(olora) < 0.3 * _overlap(plain), (_overlap(olora), _overlap(plain))
    note = next(m for m in olora["steps"][1]["mitigations"] if m["name"] == "olora")
    assert note["constrained_modules"] == 14 and note["overlap_end"] < 0.3 * note["overlap_start"]
    # orthogonal input subspaces alone interfere less, though on a 64-wide toy model only modestly: BWT -1.011
    # against plain LoRA's -1.077 on an AVX2-only CPU (fp32 kernels), more than 0.1 apart on an AVX512 one; the
    # intervals overlap, so only the direction is asserted (the subspace overlap above is the mechanism's test)
    assert _bwt(olora)["value"] > _bwt(plain)["value"], (_bwt(olora), _bwt(plain))
    assert _gains(olora)[1] >= 0.7 * _gains(plain)[1]  # the new task is still learned


def test_si_importance_carried_to_a_fresh_adapter_reduces_forgetting(lora_runs):
    plain, si = lora_runs["lora-plain"], lora_runs["lora-si"]
    assert _bwt(si)["ci"][0] > _bwt(plain)["ci"][1], (_bwt(si), _bwt(plain))
    assert _gains(si)[1] >= 0.7 * _gains(plain)[1]
    rec = yaml.safe_load((Path(si["dir"]) / "steps" / "2-last" / "recipe.yaml").read_text())
    (m,) = rec["mitigations"]
    assert m["name"] == "si" and m["anchor"] == "start" and m["previous"] == str(Path(si["dir"]) / "steps" / "1-rev")


# ---------------------------------------------------------------- the plan and the sequence file


def test_plan_carries_si_ewc_kl_and_olora_between_steps(world, tmp_path):
    spec = _sequence(world, "wiring", {"si": {}, "kl": {"weight": 0.5}, "ewc": True, "olora": {}},
                     method={"name": "lora", "r": 4})
    steps = plan(ContinualConfig.model_validate(spec), tmp_path, tmp_path / "out")
    by = [{m.name: m for m in s.recipe.mitigations} for s in steps]
    assert set(by[0]) == {"si", "kl"}  # nothing earlier to protect or replay yet
    assert by[1]["si"].previous == str(steps[0].dir) and by[2]["si"].previous == str(steps[1].dir)
    assert by[1]["ewc"].reference.train == world["copy"]["train"] and by[1]["ewc"].previous == []
    assert by[2]["ewc"].reference.train == world["rev"]["train"] and by[2]["ewc"].previous == [str(steps[1].dir)]
    assert by[2]["olora"].previous == [str(steps[0].dir), str(steps[1].dir)]
    assert by[1]["kl"].weight == 0.5
    assert all(s.recipe.train.merge for s in steps)
    assert steps[1].recipe.model.name == str((steps[0].dir / "merged").resolve())


def _errors(tmp_path: Path, text: str) -> str:
    p = tmp_path / "seq.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_continual(p)
    return str(e.value)


def test_sequence_file_errors_name_file_key_and_line(tmp_path):
    msg = _errors(tmp_path, "base: {model: m}\ntasks:\n  - name: a\n    data: {train: a.jsonl}\n  - name: b\n"
                            "    data: {train: b.jsonl}\n    sett: {}\ncarry:\n"
                            "  - {name: replay, buffer: {polcy: quota}}\n")
    assert str(tmp_path / "seq.yaml") in msg
    assert "tasks.1.sett (line 7): unknown key" in msg and "carry.0.buffer.polcy (line 9): unknown key" in msg
    two = "base: {model: m}\ntasks:\n  - {name: a, data: {train: a.jsonl}}\n"
    # the older mapping form is read (entries numbered in file order)
    assert "carry.0.polcy: unknown key" in _errors(tmp_path, two + "carry:\n  replay: {polcy: quota}\n")
    assert "'freeze' cannot be carried from step to step (carried: l2sp, ewc, si, kl, replay, olora)" in _errors(
        tmp_path, two + "carry: [freeze]\n")
    assert "carry.0 (line 5): Value error, previous: filled in by the sequence for every step" in _errors(
        tmp_path, two + "carry:\n  - {name: ewc, previous: [x]}\n")
    msg = _errors(tmp_path, two + "carry:\n  - kl\n  - {name: replay, ratio: 2}\n")
    assert msg.splitlines()[1:] == ["  carry.1.ratio (line 6): Input should be less than 1"]  # carried: no data needed
    msg = _errors(tmp_path,
                  "base: {model: m}\ntasks:\n  - {name: a, data: {train: a.jsonl}}\n  - {name: a, data: {trian: x}}\n")
    assert "unknown data key(s) trian" in msg and "tasks.1.data (line 4)" in msg
    msg = _errors(tmp_path,
                  "base: {model: m}\ntasks:\n  - {name: a, data: {train: a.jsonl}}\n  - {name: a, data: {train: b}}\n")
    assert "task names must be unique; repeated: a" in msg
    msg = _errors(tmp_path, "base: {model: m}\ntasks: []\n")
    assert "tasks (line 2)" in msg


def test_sequence_yaml_reads_back_equal_with_every_carried_mitigation():
    # what run_continual writes to sequence.yaml and compares on resume: every carried mitigation, both forms
    spec = {"name": "s", "base": {"model": "m"}, "tasks": [{"name": "a", "data": {"train": "a.jsonl"}}],
            "carry": ["ewc", {"name": "si", "weight": 2.0}, "kl", {"name": "replay", "buffer": {"per_task": 8}},
                      "olora", "l2sp"]}
    cfg = ContinualConfig.model_validate(spec)
    again = ContinualConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.dump(), sort_keys=False)))
    assert again.dump() == cfg.dump()
    assert [e["name"] for e in cfg.carried()] == ["ewc", "si", "kl", "replay", "olora", "l2sp"]
    assert next(e for e in cfg.carried() if e["name"] == "replay")["ratio"] == 0.2  # carried replay's default
    assert "previous" not in next(e for e in cfg.carried() if e["name"] == "ewc")  # what the sequence fills
    # the 0.1 mapping form, keys in any order, is handed on in 0.1's fixed order (ewc, si, kl, replay, olora)
    legacy = ContinualConfig.model_validate({**spec, "carry": {"replay": {"per_task": 8}, "kl": True, "ewc": {},
                                                               "si": None}})
    assert [e["name"] for e in legacy.carried()] == ["ewc", "kl", "replay"]
    with pytest.raises(ValueError, match="ewc: a mapping of options, true or null"):
        ContinualConfig.model_validate({**spec, "carry": {"ewc": 1}})


def test_plan_errors_before_anything_runs(world, tmp_path):
    def fails(match: str, **kw) -> None:
        spec = _sequence(world, "bad", **kw)
        with pytest.raises(ForgetlessError, match=match):
            plan(ContinualConfig.model_validate(spec), tmp_path, tmp_path / "out")

    fails(r"(?s)tasks\[1\] \(rev\).*mitigations.olora needs a LoRA-type method \(lora, dora, qlora\); method.name is "
          "'full'", carry={"olora": {}})
    fails("cannot be merged into the weights", method={"name": "prefix"})
    spec = _sequence(world, "bad", {"ewc": {}})
    spec["base"]["mitigations"] = [{"name": "ewc"}]
    with pytest.raises(RecipeError, match="carry.ewc and a ewc mitigation in the base recipe"):
        plan(ContinualConfig.model_validate(spec), tmp_path, tmp_path / "out")
    spec = _sequence(world, "bad")
    spec["tasks"][1]["set"] = {"optim.lr": -1}
    with pytest.raises(RecipeError, match=r"(?s)tasks\[1\] \(rev\).*optim.lr"):
        plan(ContinualConfig.model_validate(spec), tmp_path, tmp_path / "out")
    spec = _sequence(world, "nometric", tasks=("copy",), output_dir=str(tmp_path / "nm"))
    spec["tasks"][0]["metric"] = "accuracy"
    with pytest.raises(ForgetlessError, match="metric 'accuracy' is not reported.*valid: ce, bits_per_byte"):
        run_continual(ContinualConfig.model_validate(spec), quiet=True)
    assert not (tmp_path / "nm" / "steps").exists()  # failed before any training
    spec = _sequence(world, "noval", tasks=("copy",))
    del spec["tasks"][0]["data"]["validation"]
    with pytest.raises(ForgetlessError, match=r"tasks\[0\] \(copy\).eval: auto .*data.validation"):
        run_continual(ContinualConfig.model_validate(spec), quiet=True)
