"""forgetless merge (WiSE-FT): the ends reproduce base and tuned exactly; auto-alpha meets the budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.merge import auto_alpha, merge
from forgetless.recipe import recipe_from_dict
from forgetless.retention.suite import Suite
from forgetless.train import load_model, train


def _finetune(org, out, method="full", lr=3e-3, steps=80):
    r = recipe_from_dict({
        "name": "b",
        "model": str(org["model"]),
        "data": {"train": str(org["b_train"]), "format": "prompt_completion", "chat_template": False, "max_length": 64},
        "method": method,
        "optim": {"lr": lr, "max_steps": steps, "batch_size": 16, "warmup_steps": 5, "schedule": "constant"},
        "train": {"output_dir": str(out), "save_steps": None, "progress": False, "seed": 0, "bf16": False},
    })
    return train(r, quiet=True).run_dir


@pytest.fixture(scope="module")
def tuned_full(organism, tmp_path_factory):
    return _finetune(organism, tmp_path_factory.mktemp("wise") / "full")


def _logits(path, ids):
    m, _ = load_model(path)
    with torch.no_grad():
        return m(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_alpha_0_is_the_base_and_alpha_1_the_tuned_model(method, organism, tuned_full, tmp_path):
    tuned = tuned_full if method == "full" else _finetune(organism, tmp_path / "lora", {"name": "lora", "r": 4},
                                                          lr=1e-2, steps=20)
    base = _logits(organism["model"], IDS)
    tuned_logits = _logits(tuned, IDS)
    assert not torch.allclose(base, tuned_logits, atol=1e-3)
    info0 = merge(str(organism["model"]), str(tuned), 0.0, tmp_path / "a0")
    info1 = merge(str(organism["model"]), str(tuned), 1.0, tmp_path / "a1")
    assert info0["kind"] == ("model" if method == "full" else "lora adapter (scaled)")
    assert (torch.equal(_logits(tmp_path / "a0", IDS), base) if method == "full"
            else torch.allclose(_logits(tmp_path / "a0", IDS), base, atol=1e-6))
    assert torch.allclose(_logits(tmp_path / "a1", IDS), tuned_logits, atol=1e-6)
    assert info1["alpha"] == 1.0


def _ppl_suite(name, path):
    """The likelihood of a task's answers after their prompts (what knowing the task means; the perplexity of
    whole texts also moves with the shared vocabulary, and left the outcome to the CPU's rounding)."""
    return Suite.model_validate({"name": name, "tasks": [
        {"name": name, "kind": "reference_likelihood", "data": {"path": str(path)}, "prompt": "{{prompt}}",
         "reference": "{{completion}}", "target_delimiter": ""}]})


def test_auto_alpha_meets_the_budget_and_picks_the_best_task_score(organism, tuned_full, tmp_path):
    budget = 0.05
    result = auto_alpha(str(organism["model"]), str(tuned_full), budget=budget,
                        task_suite=_ppl_suite("task_b", organism["b_val"]),
                        retention_suite=_ppl_suite("retain_a", organism["a_val"]),
                        alphas=[0.0, 0.25, 0.5, 0.75, 1.0], out=tmp_path / "auto", progress=False, precision="fp32")
    curve = {c["alpha"]: c for c in result["curve"]}
    assert curve[0.0]["retention"] == pytest.approx(1.0) and curve[0.0]["task_score"] == pytest.approx(1.0)
    assert not curve[1.0]["within_budget"], "plain fine-tuning should break a 5% budget on the organism"
    chosen = result["chosen"]
    assert chosen["retention_drop"] <= budget
    assert chosen["task_score"] == max(c["task_score"] for c in result["curve"] if c["within_budget"])
    assert chosen["task_score"] > 1.0  # it kept some of the gain
    assert (tmp_path / "auto" / "alpha_curve.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "auto" / "forgetless_merge.json").read_text())
    assert saved["alpha"] == chosen["alpha"]
    assert result["precision"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto: a GPU if any


def test_auto_alpha_scores_on_the_device_asked(organism, tuned_full, monkeypatch):
    """--device: the base's cached scores are asked for on that device; CUDA where there is none is a clear
    error before anything is scored."""
    import forgetless.merge as merge_mod

    asked = []
    real = merge_mod.baseline_result
    monkeypatch.setattr(merge_mod, "baseline_result", lambda *a, **k: asked.append(str(k["device"])) or real(*a, **k))
    suites = {"task_suite": _ppl_suite("task_b", organism["b_val"]),
              "retention_suite": _ppl_suite("retain_a", organism["a_val"])}
    res = auto_alpha(str(organism["model"]), str(tuned_full), budget=0.05, alphas=[0.0, 1.0], progress=False,
                     precision="fp32", device="cpu", **suites)
    assert asked == ["cpu", "cpu"] and res["precision"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ForgetlessError, match="no CUDA device"):
            auto_alpha(str(organism["model"]), str(tuned_full), budget=0.05, alphas=[0.0, 1.0], progress=False,
                       precision="fp32", device="cuda", **suites)
        assert len(asked) == 2


def test_descending_search_stops_at_the_largest_alpha_within_budget_and_reuses_the_cached_base(
        organism, tuned_full, tmp_path, monkeypatch):
    import forgetless.retention.api as api

    suites = {"task_suite": _ppl_suite("task_b", organism["b_val"]),
              "retention_suite": _ppl_suite("retain_a", organism["a_val"])}
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = auto_alpha(str(organism["model"]), str(tuned_full), budget=0.05, alphas=alphas, progress=False,
                      precision="fp32", **suites)
    base_evals = []
    real = api.evaluate
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: base_evals.append(1) or real(*a, **k))
    desc = auto_alpha(str(organism["model"]), str(tuned_full), budget=0.05, alphas=alphas, progress=False,
                      search="descending", precision="fp32", **suites)
    assert base_evals == [], "the base model's results should come from the cache the first call filled"
    largest_ok = max(c["alpha"] for c in grid["curve"] if c["within_budget"])
    assert largest_ok < 1.0 and desc["chosen"]["alpha"] == largest_ok
    # scored 1.0 down to it, no lower
    assert [c["alpha"] for c in desc["curve"]] == [a for a in alphas if a >= largest_ok]
    by_alpha = {c["alpha"]: c for c in grid["curve"]}
    for c in desc["curve"]:
        assert c["retention"] == pytest.approx(by_alpha[c["alpha"]]["retention"], abs=1e-9)
    with pytest.raises(ForgetlessError, match="search must be"):
        auto_alpha(str(organism["model"]), str(tuned_full), budget=0.05, alphas=alphas, search="bisect", **suites)


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_merge_cli_refuses_to_overwrite(organism, tuned_full, tmp_path):
    cmd = [sys.executable, "-m", "forgetless", "merge", "--base", str(organism["model"]), "--tuned", str(tuned_full),
           "--alpha", "0.5", "--out", str(tmp_path / "m")]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert (again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
            and "Traceback" not in again.stderr)


def test_auto_alpha_chooses_on_selection_suites_and_reports_on_others(organism, tuned_full, tmp_path):
    """The alpha is chosen on validation-like items (the first 32 of each file) and the choice is reported on the
    other 32: the reporting suites never move the choice, and their numbers are those of their own items."""
    def half(name, path, first):
        task = _ppl_suite(name, path).tasks[0].model_dump()
        pick = {"limit": 32, "sample": "first"} if first else {"exclude": {"limit": 32, "sample": "first"}}
        return Suite.model_validate({"name": name, "tasks": [{**task, **pick}]})

    # budget 8%: alpha 0.5 loses 4-5% here (1.0 about 10%), so the choice is a merged model, never the base
    kw = {"budget": 0.08, "alphas": [0.0, 0.5, 1.0], "progress": False, "precision": "fp32"}
    sel = {"task_suite": half("task_sel", organism["b_val"], True),
           "retention_suite": half("ret_sel", organism["a_val"], True)}
    alone = auto_alpha(str(organism["model"]), str(tuned_full), **sel, **kw)
    both = auto_alpha(str(organism["model"]), str(tuned_full), **sel, **kw,
                      report_task_suite=half("task_rep", organism["b_val"], False),
                      report_retention_suite=half("ret_rep", organism["a_val"], False))
    assert alone["chosen"]["alpha"] > 0, "the base chosen: nothing to report on other items (raise the budget)"
    assert both["chosen"] == alone["chosen"] and both["curve"] == alone["curve"]
    assert both["selection"]["comparison"] == alone["comparison"]
    assert both["reported_on"] == {"task_suite": "task_rep", "retention_suite": "ret_rep"}
    rep = both["comparison"]["retention"]
    # the reported retention is that of the merged model on the other items: scored independently here
    from forgetless.merge import interpolate, load_endpoints
    from forgetless.retention.evaluate import compare, evaluate

    ends = load_endpoints(str(organism["model"]), str(tuned_full))
    suite = half("ret_rep", organism["a_val"], False)
    base = evaluate(ends.base, ends.tokenizer, suite, bf16=False, progress=False)
    merged = interpolate(ends, both["chosen"]["alpha"])
    want = compare(base, evaluate(merged, ends.tokenizer, suite, bf16=False, progress=False))
    assert rep["retention_score"] == pytest.approx(want["retention_score"], abs=1e-9)
    assert rep["retention_score"] != pytest.approx(both["selection"]["comparison"]["retention"]["retention_score"],
                                                   abs=1e-9)


# ---- what merge writes is the interpolation it measured ----------------------------------------------------------


def _tiny_run(tiny_model, toy_data, out, method, **over):
    from conftest import tiny_recipe

    return train(recipe_from_dict(tiny_recipe(tiny_model, toy_data, out, method=method, optim__lr=1e-2, **over)),
                 quiet=True).run_dir


def _assert_saved_is_the_interpolation(base, tuned, out, alpha=0.5):
    """The written model (adapter or full) computes theta(alpha) as `interpolate` builds it from the endpoints."""
    from forgetless.merge import interpolate, load_endpoints

    info = merge(str(base), str(tuned), alpha, out)
    want = interpolate(load_endpoints(str(base), str(tuned)), alpha)
    with torch.no_grad():
        want_logits = want(input_ids=IDS).logits
    assert torch.allclose(_logits(out, IDS), want_logits, atol=1e-5), info
    return info


def test_a_lora_of_another_base_is_written_as_the_full_interpolated_model(tiny_model, toy_data, tmp_path):
    """A LoRA trained on top of a fine-tuned model, merged against the original base: base + alpha * BA would be
    the wrong model (the adapter is relative to its own base), so the full interpolation is written."""
    step1 = _tiny_run(tiny_model, toy_data, tmp_path / "s1", {"name": "full"}, optim__max_steps=10)
    step2 = _tiny_run(step1 / "final", toy_data, tmp_path / "s2", {"name": "lora", "r": 4}, optim__max_steps=10)
    info = _assert_saved_is_the_interpolation(tiny_model, step2, tmp_path / "m")
    assert info["kind"] == "model"
    # against its own base the scaled adapter is written, and it is the same interpolation
    own = _assert_saved_is_the_interpolation(step1 / "final", step2, tmp_path / "own")
    assert own["kind"] == "lora adapter (scaled)"


def test_a_moved_base_checkpoint_is_written_as_the_full_interpolated_model(tiny_model, toy_data, tmp_path):
    """A PiSSA run's checkpoint holds an adapter relative to the residual base: scaling its B would not give
    theta(alpha); load_model converts it, and merge writes the full model it measured."""
    run = _tiny_run(tiny_model, toy_data, tmp_path / "p", {"name": "lora", "r": 4, "init": "pissa", "dropout": 0.0},
                    optim__max_steps=10, train__save_steps=10)
    ckpt = run / "checkpoints" / "checkpoint-10"
    assert (ckpt / "adapter_config.json").is_file()
    assert _assert_saved_is_the_interpolation(tiny_model, ckpt, tmp_path / "m")["kind"] == "model"


def test_qlora_merges_into_the_full_precision_base(tiny_model, toy_data, tmp_path):
    run = _tiny_run(tiny_model, toy_data, tmp_path / "q", {"name": "qlora", "r": 4}, optim__max_steps=10)
    info = _assert_saved_is_the_interpolation(tiny_model, run, tmp_path / "m", alpha=1.0)
    assert info["kind"] == "model" and not (tmp_path / "m" / "forgetless_quantization.json").exists()
    full, _ = load_model(run, full_precision_base=True)
    with torch.no_grad():
        assert torch.allclose(_logits(tmp_path / "m", IDS), full(input_ids=IDS).logits, atol=1e-5)


def test_a_non_linear_bottleneck_adapter_is_refused_for_what_it_is(tiny_model, toy_data, tmp_path):
    run = _tiny_run(tiny_model, toy_data, tmp_path / "a", {"name": "adapter", "bottleneck": 8}, optim__max_steps=2)
    with pytest.raises(ForgetlessError, match="non-linear activation cannot be merged"):
        merge(str(tiny_model), str(run), 0.5, tmp_path / "m")


def test_merge_takes_a_catalog_alias_as_base(organism, tmp_path, monkeypatch):
    """The README's `merge --base smollm2-135m-instruct`: an alias is resolved to its cache entry (here the
    stories260k entry, built from a copy of the organism's base), for a full run and for a LoRA adapter."""
    import importlib
    import shutil

    pull_module = importlib.import_module("forgetless.models.pull")  # the package's `pull` is the function
    monkeypatch.setenv("FORGETLESS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(pull_module.BUILDERS, "llama2c",
                        lambda entry, out, ui: shutil.copytree(organism["model"], out, dirs_exist_ok=True) and {})
    lora = _finetune(organism, tmp_path / "lora", {"name": "lora", "r": 4}, lr=1e-2, steps=10)
    by_path = merge(str(organism["model"]), str(lora), 0.5, tmp_path / "by-path")
    by_alias = merge("stories260k", str(lora), 0.5, tmp_path / "by-alias")
    # the alias's entry is a copy of the adapter's own base: still the scaled adapter, the same model
    assert by_alias["kind"] == by_path["kind"] == "lora adapter (scaled)"
    assert torch.equal(_logits(tmp_path / "by-alias", IDS), _logits(tmp_path / "by-path", IDS))


def test_auto_alpha_refuses_an_existing_output_before_scoring_and_full_writes_a_model(organism, tmp_path, monkeypatch):
    import forgetless.merge as merge_mod
    from forgetless.errors import OutputExistsError

    lora = _finetune(organism, tmp_path / "lora", {"name": "lora", "r": 4}, lr=1e-2, steps=10)
    suites = {"task_suite": _ppl_suite("task_b", organism["b_val"]),
              "retention_suite": _ppl_suite("retain_a", organism["a_val"])}
    (tmp_path / "taken").mkdir()
    loads = []
    real = merge_mod.load_endpoints
    monkeypatch.setattr(merge_mod, "load_endpoints", lambda *a: loads.append(a) or real(*a))
    with pytest.raises(OutputExistsError, match="already exists"):
        auto_alpha(str(organism["model"]), str(lora), budget=0.5, alphas=[0.0, 1.0], out=tmp_path / "taken",
                   progress=False, precision="fp32", **suites)
    assert loads == [], "the existing output should be refused before anything is loaded or scored"
    res = auto_alpha(str(organism["model"]), str(lora), budget=0.5, alphas=[0.0, 1.0], out=tmp_path / "full",
                     progress=False, precision="fp32", full=True, **suites)
    assert res["saved"]["kind"] == "model" and (tmp_path / "full" / "model.safetensors").is_file()
