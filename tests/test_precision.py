"""Compute precision by measurement (forgetless.precision) and progress lines in logs (forgetless.progress)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe

from forgetless import precision as P
from forgetless.progress import PlainProgress, duration
from forgetless.recipe import recipe_from_dict
from forgetless.train import train


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own precision cache: a stubbed probe's answer must not reach other tests. oneDNN's
    capability check reports native bf16 (as on this machine), so the probe decides, on any CPU."""
    monkeypatch.setenv("FORGETLESS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(P, "_mkldnn_bf16", lambda: True)


def _stub(speedup: float, calls: list):
    def probe(device, widths):
        calls.append(tuple(widths))
        return {"fp32_gflops": 80.0, "bf16_gflops": 80.0 * speedup, "bf16_speedup": speedup, "widths": list(widths),
                "probe_s": 0.0}
    return probe


@pytest.mark.parametrize("speedup, expected", [(0.0147, "fp32"), (0.9, "fp32"), (1.1, "fp32"), (2.5, "bf16")])
def test_auto_picks_bf16_only_where_the_probe_measures_it_faster(monkeypatch, speedup, expected):
    calls: list = []
    monkeypatch.setattr(P, "probe", _stub(speedup, calls))
    got = P.resolve("auto", "cpu", widths=(576, 1536))
    assert got.dtype == expected and got.bf16 is (expected == "bf16")
    assert calls == [(576, 1536)]
    assert f"{speedup:.2f}x" in got.reason and got.reason.startswith("measured")
    assert P.resolve("fp32", "cpu").dtype == "fp32" and P.resolve(False, "cpu").reason == "requested"


def test_a_cpu_without_native_bf16_gets_fp32_without_a_probe_and_explicit_bf16_warns(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(P, "probe", _stub(1 / 68, calls))
    monkeypatch.setattr(P, "_mkldnn_bf16", lambda: False)
    monkeypatch.setattr(P, "_warned", set())
    got = P.resolve("auto", "cpu", widths=(576, 1536))
    assert got.dtype == "fp32" and "no native bf16" in got.reason and calls == []
    forced = P.resolve("bf16", "cpu", widths=(576, 1536))  # runs, but measured and warned about
    assert forced.dtype == "bf16" and calls == [(576, 1536)]
    err = capsys.readouterr().err
    assert "68.0x slower than fp32" in err and "native bf16: False" in err


def test_the_choice_is_cached_and_keyed_by_cpu_torch_threads_and_widths(monkeypatch):
    calls: list = []
    monkeypatch.setattr(P, "probe", _stub(3.0, calls))
    first = P.resolve("auto", "cpu", widths=(64, 128))
    again = P.resolve("auto", "cpu", widths=(64, 128))
    assert calls == [(64, 128)] and again.dtype == first.dtype == "bf16"
    assert again.probe["cached"] is True and first.probe["cached"] is False
    cache = json.loads(P.cache_path().read_text())
    (key,) = cache
    ident = P.cpu_identity()
    assert ident["cpu"] in key and ident["flags_sha"] in key and torch.__version__ in key and "widths=64x128" in key
    # another CPU (same model name, other flags, as VMs do), another torch, other threads or widths: measured anew
    real = P.cpu_identity
    for change in ({"flags_sha": "0" * 12}, {"torch": "9.9.9"}, {"threads": ident["threads"] + 7}):
        monkeypatch.setattr(P, "cpu_identity", lambda change=change: {**real(), **change})
        P.resolve("auto", "cpu", widths=(64, 128))
    monkeypatch.setattr(P, "cpu_identity", real)
    P.resolve("auto", "cpu", widths=(64, 256))
    assert len(calls) == 5 and len(json.loads(P.cache_path().read_text())) == 5


def test_explicit_bf16_where_it_is_slow_runs_but_warns_once_with_the_ratio(monkeypatch, capsys):
    monkeypatch.setattr(P, "probe", _stub(1 / 68, []))
    monkeypatch.setattr(P, "_warned", set())
    for _ in range(3):
        got = P.resolve("bf16", "cpu", widths=(576, 1536))
        assert got.dtype == "bf16" and got.reason.startswith("requested")
    err = capsys.readouterr().err
    assert err.count("warning: bf16 compute was requested") == 1 and "68.0x slower than fp32" in err


def test_device_keyed_adds_a_gpu_and_leaves_a_cpu_key_as_it_was():
    """Cache keys: a CPU key is byte-for-byte what it was before devices were keyed (old caches are still found);
    a GPU adds its device type (not its index: any CUDA device shares one cache)."""
    key = {"model": "abc", "bf16": True}
    assert P.device_keyed(dict(key), "cpu") == key and P.device_keyed(dict(key), torch.device("cpu")) == key
    assert P.device_keyed(dict(key), "cuda:1") == {**key, "device": "cuda"}
    assert json.dumps(P.device_keyed(dict(key), "cuda"), sort_keys=True) != json.dumps(key, sort_keys=True)


def test_the_real_probe_is_quick_and_sane():
    threads = torch.get_num_threads()
    res = P.measure(torch.device("cpu"), (64, 128), budget_s=0.02)
    assert res["fp32_gflops"] > 0 and res["bf16_gflops"] > 0 and res["probe_s"] < 1.0 and res["calls"] >= 5
    assert torch.get_num_threads() == threads  # the probe's one thread is given back
    assert res["bf16_speedup"] == pytest.approx(res["bf16_gflops"] / res["fp32_gflops"], rel=0.02, abs=0.002)  # rounded


def test_widths_come_from_the_model_config(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert P.config_widths(tiny_model) == (cfg["hidden_size"], cfg["intermediate_size"])
    assert P.config_widths(tiny_model / "missing") == P.DEFAULT_WIDTHS


def test_older_boolean_aliases_and_contradictions():
    assert (P.combine("auto", True) == "bf16" and P.combine("auto", False) == "fp32"
            and P.combine("fp32", None) == "fp32")
    with pytest.raises(ValueError, match="contradicts"):
        P.combine("bf16", False)
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        P.normalize("fp16")


def test_summary_records_the_precision_and_its_reason(tiny_model, toy_data, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(P, "probe", _stub(0.5, calls))
    r = recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=2, train__bf16="auto"))
    s = train(r, quiet=True).summary
    assert s["precision"]["dtype"] == "fp32" and s["bf16_compute"] is False
    assert s["precision"]["reason"].startswith("measured: bf16 0.50x fp32") and s["precision"]["requested"] == "auto"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["precision"]["dtype"] == "fp32"
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert calls == [(cfg["hidden_size"], cfg["intermediate_size"])]  # probed at the model's own widths


def test_plain_progress_prints_at_most_every_interval_with_eta(monkeypatch):
    import io

    import forgetless.progress as prog

    now = [1000.0]
    monkeypatch.setattr(prog.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    p = PlainProgress("train", interval=30, stream=out)
    t = p.add_task("train", total=100, info="")
    for step in range(1, 101):
        now[0] += 1.0  # one second a step
        p.update(t, completed=step, info=f"loss {5 - step / 50:.4f}")
    p.stop()
    lines = out.getvalue().splitlines()
    # started, then one line per 30 s (steps 30, 60, 90), then done: never more often than the interval
    assert [ln.split()[2] for ln in lines] == ["0/100", "30/100", "60/100", "90/100", "100/100"]
    assert lines[0].endswith("started") and lines[-1].endswith("done")
    assert "loss 4.4000" in lines[1] and "ETA 1m10s" in lines[1] and "elapsed 30s" in lines[1]
    assert duration(4000) == "1h06m" and duration(59) == "59s"


def test_a_run_logging_to_a_file_writes_plain_progress_lines(tiny_model, toy_data, tmp_path):
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=6, train__progress=True)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "FORGETLESS_PROGRESS_INTERVAL": "0", "FORGETLESS_MALLOC": "system"}
    with open(tmp_path / "log.txt", "w") as log:  # stderr is a file: not a terminal
        subprocess.run([sys.executable, "-m", "forgetless", "train", str(tmp_path / "r.yaml")], stderr=log,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=True, env=env, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert "\x1b[" not in text, "no ANSI codes in a log file"
    lines = text.splitlines()
    assert lines[0].startswith("precision: fp32 compute (requested")
    steps = [ln for ln in lines if "] train " in ln]
    assert steps[0].endswith("0/6 (0%)  started") and steps[-1].split()[2] == "6/6" and "done" in steps[-1]
    assert any("loss " in ln and "tok/s" in ln and "ETA" in ln for ln in steps)


def test_heartbeat_in_a_log_says_when_a_long_step_starts_and_that_it_still_runs():
    import io
    import time

    from forgetless.progress import heartbeat

    out = io.StringIO()
    with heartbeat("converting the GGUF", interval=0.05, stream=out):
        time.sleep(0.18)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("converting the GGUF ...")
    assert 2 <= len(lines) - 1 <= 4 and all("still running, elapsed" in ln for ln in lines[1:])
