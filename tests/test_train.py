"""`forgetless train` end to end on a tiny model: every method learns, outputs load back, runs are safe."""

from __future__ import annotations

import json
import os
import platform
import time

import pytest
import torch
from conftest import tiny_recipe

from forgetless.errors import DataError, ForgetlessError
from forgetless.recipe import recipe_from_dict
from forgetless.train import load_model, train

METHOD_OPTIONS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 8},
    "dora": {"name": "dora", "r": 8},
    "qlora": {"name": "qlora", "r": 8},
    "ia3": {"name": "ia3"},
    "prefix": {"name": "prefix", "num_virtual_tokens": 8},
    "prompt": {"name": "prompt", "num_virtual_tokens": 8},
    "adapter": {"name": "adapter", "bottleneck": 16},
    "freeze": {"name": "freeze", "top_k_blocks": 1, "train_lm_head": True},
}
METHOD_LR = {"full": 3e-3, "ia3": 3e-2, "prefix": 3e-2, "prompt": 3e-2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_method_learns_and_reloads_with_same_logits(method, tiny_model, toy_data, tmp_path):
    r = recipe_from_dict(
        tiny_recipe(tiny_model, toy_data, tmp_path / "run", method=METHOD_OPTIONS[method],
                    optim__lr=METHOD_LR.get(method, 1e-2))
    )
    res = train(r)
    s = res.summary
    assert s["final_validation_loss"] < s["initial_validation_loss"] - 0.05, s
    assert 0 < s["trainable_parameters"] <= s["total_parameters"]
    if method != "full":
        assert s["trainable_parameters"] < s["total_parameters"]
    # trainable weights are fp32 master weights whatever the storage dtype
    assert all(p.dtype == torch.float32 for p in res.model.parameters() if p.requires_grad)
    # what was saved loads back and computes the same function
    ids = torch.tensor([res.tokenizer("copy: red cat")["input_ids"]])
    res.model.eval()
    reloaded, _ = load_model(res.run_dir)
    # qlora: the 4-bit base is quantized again on load and its double-quantized scales differ slightly
    atol = 5e-3 if method == "qlora" else 1e-4
    assert torch.allclose(_logits(res.model, ids), _logits(reloaded, ids), atol=atol), method
    files = {p.name for p in (res.run_dir / "final").iterdir()}
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    assert any(f.endswith(".safetensors") for f in files)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_merged_export_matches_the_adapter(method, tiny_model, toy_data, tmp_path):
    opts = {"name": "lora", "r": 8} if method == "lora" else {"name": "adapter", "bottleneck": 16,
                                                              "activation": "identity"}
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", method=opts, optim__max_steps=10,
                                     train__merge=True))
    res = train(r)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(res.run_dir / "merged").eval()
    adapter, _ = load_model(res.run_dir)
    ids = torch.tensor([res.tokenizer("copy: blue dog")["input_ids"]])
    assert torch.allclose(_logits(adapter, ids), _logits(merged, ids), atol=1e-4)


def test_one_step_at_lr_1e5_changes_the_weights(tiny_model, toy_data, tmp_path):
    """bf16 compute, fp32 master weights: a 1e-5 update is not rounded away (it would be in pure bf16)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__lr=1e-5, optim__max_steps=1,
                                     train__bf16=True))
    res = train(r)
    assert res.summary["bf16_compute"] is True
    changed = total = 0
    for (name, p0), p1 in zip(base.named_parameters(), res.model.parameters(), strict=True):
        assert p1.dtype == torch.float32, name
        changed += (p0.detach() != p1.detach()).sum().item()
        total += p0.numel()
    assert changed / total > 0.5, f"only {changed}/{total} weights changed"
    # the same update applied to bf16 weights would vanish for most entries: the reason for fp32 masters
    w = next(base.parameters()).detach()
    assert ((w.bfloat16() + 1e-5).float() == w.bfloat16().float()).float().mean() > 0.5


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_trainable_weights_start_from_the_checkpoint_not_its_bf16_rounding(method, tiny_model, toy_data, tmp_path):
    """Frozen weights stored in bf16 (model.dtype: bf16, which `auto` means for adapter methods on a GPU): the
    weights full and freeze train still start from the checkpoint's fp32 values (upcast after a bf16 load they were
    rounded: the run then started from another model, and EWC anchored to it); freeze's frozen layers and LoRA's
    frozen base are bf16 as asked. Checked against the checkpoint itself, weight by weight."""
    from safetensors.torch import load_file

    from forgetless.train.model import pick_device, prepare_model

    d = tiny_recipe(tiny_model, toy_data, tmp_path / "run", method=METHOD_OPTIONS[method])
    d["model"] = {"name": str(tiny_model), "dtype": "bf16"}
    r = recipe_from_dict(d)
    ckpt = load_file(str(tiny_model / "model.safetensors"))
    rounded = sum((w != w.bfloat16().float()).sum().item() for w in ckpt.values() if w.is_floating_point())
    assert rounded > 0  # the check below can fail: bf16 rounding moves some of this model's weights
    model = prepare_model(str(tiny_model), r.model, r.method, pick_device("cpu"))
    seen = 0
    for name, p in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key not in ckpt:  # an adapter's own weights
            assert p.requires_grad and p.dtype == torch.float32, name
            continue
        seen += 1
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), ckpt[key]), name
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), ckpt[key].bfloat16()), name
    assert seen >= len(ckpt) - 1  # every checkpoint tensor was compared (a tied lm_head is the embedding's)


def test_run_directory_contents(tiny_model, toy_data, tmp_path, monkeypatch):
    import forgetless.train.run as run_mod

    save = run_mod._save_final

    def slow_save(*a, **kw):  # the final save runs after the training loop: in run_time_s, not in wall_time_s
        time.sleep(1.0)
        return save(*a, **kw)

    monkeypatch.setattr(run_mod, "_save_final", slow_save)
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", train__save_steps=10, optim__max_steps=20))
    t0 = time.perf_counter()
    res = train(r)
    elapsed = time.perf_counter() - t0
    d = res.run_dir
    assert {"recipe.yaml", "metrics.jsonl", "summary.json", "final", "checkpoints",
            "data_stats.json"} <= {p.name for p in d.iterdir()}
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert train_lines and all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(x) for x in train_lines[1:])
    s = json.loads((d / "summary.json").read_text())
    for key in ("method", "trainable_parameters", "total_parameters", "tokens_seen", "wall_time_s", "peak_memory_mb",
                "final_train_loss", "final_validation_loss"):
        assert s[key] is not None, key
    assert s["tokens_seen"] > 0 and s["steps"] == 20
    # summary.json rounds both to 0.01 s: each rounding moves a value by at most 0.005 s
    assert s["wall_time_s"] + 1.0 <= s["run_time_s"] + 0.01 and s["run_time_s"] <= elapsed + 0.005
    assert s["allocator"] == ("glibc" if platform.libc_ver()[0] == "glibc" else "system")  # in-process: no re-exec
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    # what the run publishes has the modes plain open() / mkdir give here (atomic writes are not private)
    (tmp_path / "plain-file").write_text("")
    (tmp_path / "plain-dir").mkdir()
    modes = {True: (tmp_path / "plain-dir").stat().st_mode & 0o777,
             False: (tmp_path / "plain-file").stat().st_mode & 0o777}
    wrong = {str(p.relative_to(d)): oct(p.stat().st_mode & 0o777) for p in [d, *d.rglob("*")]
             if p.stat().st_mode & 0o777 != modes[p.is_dir()]}
    assert not wrong, f"expected {oct(modes[True])} / {oct(modes[False])}: {wrong}"


def test_written_files_and_folders_follow_the_umask_not_mkstemp_or_safetensors(tmp_path):
    from safetensors.torch import save_file

    from forgetless.io import atomic_dir, atomic_write_text, save_safetensors

    old = os.umask(0o027)
    try:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        atomic_write_text(tmp_path / "y.json", "{}")
        with atomic_dir(tmp_path / "d") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors alone: 0600
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert modes == {"x.safetensors": "0o640", "y.json": "0o640", "d": "0o750", "w.safetensors": "0o640",
                     "sub": "0o750"}


def test_existing_run_is_never_overwritten_without_the_flag(tiny_model, toy_data, tmp_path):
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=2))
    train(r)
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(ForgetlessError, match="already exists; pass --overwrite"):
        train(r)
    assert (tmp_path / "run" / "summary.json").read_text() == before
    train(r, overwrite=True)


def test_the_report_is_rendered_by_the_callable_its_caller_passes(tiny_model, toy_data, tmp_path):
    """train() never imports the reports (they sit above training): `forgetless train`, sweeps and sequences hand it
    forgetless.report.write_report, which it calls once summary.json is written, if train.report is true."""
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=2))
    rendered = []
    res = train(r, report=lambda d: rendered.append((d, (d / "summary.json").is_file())))
    assert rendered == [(res.run_dir, True)]
    train(r, overwrite=True)
    assert not (res.run_dir / "report.html").exists()  # a bare train() leaves the report to its caller
    off = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=2, train__report=False))
    train(off, overwrite=True, report=lambda d: rendered.append((d, None)))
    assert len(rendered) == 1


def test_bad_data_fails_before_training(tiny_model, toy_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", data__train=str(bad)))
    with pytest.raises(DataError, match=rf"{bad}:1: field 'messages' must be a non-empty list"):
        train(r)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_early_stopping_stops_on_a_flat_validation_loss(tiny_model, toy_data, tmp_path):
    r = recipe_from_dict(tiny_recipe(
        tiny_model, toy_data, tmp_path / "run", optim__lr=1e-9, optim__max_steps=40,
        train__eval_steps=2, train__early_stopping={"patience": 2, "min_delta": 0.01},
    ))
    s = train(r).summary
    assert s["early_stopped_at"] is not None and s["steps"] < 40


def test_early_stopping_counter_survives_a_resume(tiny_model, toy_data, tmp_path):
    import shutil

    r = recipe_from_dict(tiny_recipe(
        tiny_model, toy_data, tmp_path / "run", optim__lr=1e-9, optim__max_steps=40, train__eval_steps=2,
        train__save_steps=2, train__early_stopping={"patience": 3, "min_delta": 0.01},
    ))
    first = train(r).summary  # flat loss: best at step 0 (the initial validation), no improvement at 2, 4, 6
    assert first["early_stopped_at"] == 6
    # as if the run had been killed right after checkpoint-4 (two evaluations without improvement so far)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-6")
    (tmp_path / "run" / "summary.json").unlink()
    again = train(r, resume=True).summary
    assert again["resumed_from"].endswith("checkpoint-4")
    assert again["early_stopped_at"] == 6  # a fresh counter would only stop at 12
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["step"] == 0 and "eval_loss" in x) == 1  # step 0's validation loss, logged once


def test_early_stopping_is_kept_by_a_resume_from_the_checkpoint_at_the_stop(tiny_model, toy_data, tmp_path):
    """Killed after the checkpoint written at the step where early stopping stopped the run (before the final
    save): the resumed run stops there too, it does not train on to max_steps."""
    import shutil

    r = recipe_from_dict(tiny_recipe(
        tiny_model, toy_data, tmp_path / "run", optim__lr=1e-9, optim__max_steps=40, train__eval_steps=2,
        train__save_steps=2, train__early_stopping={"patience": 3, "min_delta": 0.01},
    ))
    first = train(r)
    assert first.summary["early_stopped_at"] == 6 and first.summary["steps"] == 6
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "summary.json").unlink()
    again = train(r, resume=True).summary
    assert again["resumed_from"].endswith("checkpoint-6")
    assert again["steps"] == 6 and again["early_stopped_at"] == 6


def test_early_stopping_counts_only_the_scheduled_evaluations(tiny_model, toy_data, tmp_path):
    """patience 1 with a falling validation loss: the final evaluation (the same weights as the last scheduled
    one, at max_steps) is not a second evaluation without improvement, nor are the monitor's probes."""
    r = recipe_from_dict(tiny_recipe(
        tiny_model, toy_data, tmp_path / "run", optim__max_steps=12, train__eval_steps=4,
        train__early_stopping={"patience": 1, "min_delta": 0.0},
        monitor={"suite": "self", "limit": 4, "every": 2, "max_new_tokens": 8},
    ))
    s = train(r).summary
    by_step = {x["step"]: x["eval_loss"] for x in map(json.loads,
                                                      (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if "eval_loss" in x}
    losses = [by_step[k] for k in (0, 4, 8, 12)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # improving at every scheduled one
    assert s["early_stopped_at"] is None and s["steps"] == 12


def test_resume_before_the_first_checkpoint_starts_the_metric_lines_again(tiny_model, toy_data, tmp_path):
    import shutil

    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=6,
                                     train__save_steps=None))
    train(r)
    # as if the run had been killed before any checkpoint: recipe.yaml and metrics.jsonl written, nothing to restart
    # from
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "summary.json").unlink()
    again = train(r, resume=True).summary
    assert again["resumed_from"] is None and again["steps"] == 6
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x["step"] for x in lines if "eval_loss" in x]
    assert evals == [0, 6]  # step 0 and the final validation, each once (not again from the killed attempt)
    assert len([x for x in lines if "loss" in x]) == len({x["step"] for x in lines if "loss" in x})


def test_pickle_only_model_is_refused(tiny_model, toy_data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    r = recipe_from_dict(tiny_recipe(d, toy_data, tmp_path / "run"))
    with pytest.raises(ForgetlessError, match="only pickle weights"):
        train(r)


def test_train_runs_the_cheap_data_checks_and_strict_makes_them_errors(tiny_model, toy_data, tmp_path):
    rows = [json.loads(x) for x in toy_data["chat"].read_text().splitlines()][:20]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "warn", data__train=str(dup), optim__max_steps=2))
    train(r)
    stats = json.loads((tmp_path / "warn" / "data_stats.json").read_text())
    assert any("duplicate" in line for line in stats["check"])
    strict = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "strict", data__train=str(dup),
                                          data__check="strict"))
    with pytest.raises(DataError, match="data.check is strict"):
        train(strict)
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_progress_bar_names_the_step_of_a_stale_validation_loss(tmp_path):
    from types import SimpleNamespace

    from forgetless.train.callbacks import MetricsLogger, progress_info

    log = MetricsLogger(tmp_path / "metrics.jsonl")
    state = SimpleNamespace(global_step=0, epoch=0.0, num_input_tokens_seen=0)
    log.on_train_begin(None, state, None)
    log.on_log(None, state, None, logs={"eval_loss": 1.5})
    assert progress_info(log.last, log.eval_step, 0) == "val 1.5000"  # measured at this step: no label
    state.global_step, state.num_input_tokens_seen = 10, 800
    log.on_log(None, state, None, logs={"loss": 0.75, "learning_rate": 1e-4, "grad_norm": 1.0})
    info = progress_info(log.last, log.eval_step, 10)
    assert info.startswith("loss 0.7500  ") and info.endswith("tok/s  val 1.5000 (step 0)")
    log.on_log(None, state, None, logs={"eval_loss": 0.5})
    assert progress_info(log.last, log.eval_step, 10).endswith("val 0.5000")
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 10, 10]


def test_truncated_validation_examples_are_reported(tiny_model, toy_data, tmp_path, capsys):
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=1,
                                     data__max_length=36))
    res = train(r)
    v = json.loads((res.run_dir / "data_stats.json").read_text())["validation"]
    assert v["truncated"] > 0, v
    err = " ".join(capsys.readouterr().err.split())
    assert f"validation: {v['truncated']} truncated" in err and f"of {v['records']} example(s)" in err, err
