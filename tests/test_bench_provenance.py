"""Provenance of bench results (forgetless.provenance, issue 21): what collect() records, the check that refuses
to resume a bench on another CPU or precision path, and the bench scripts' use of both."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from forgetless import provenance
from forgetless.errors import ForgetlessError
from forgetless.precision import Precision

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# every bench script, a new one included (a module named _x is a helper the scripts share, not a bench)
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def _cpuinfo() -> tuple[str | None, str | None]:
    model = flags = None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = value.strip()
    return model, flags


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collect_records_commit_versions_cpu_and_precision():
    prec = Precision("bf16", "measured: bf16 2.10x fp32 at widths 576x1536")
    prov = provenance.collect(prec, device="cpu", argv=["bench/throughput.py", "--steps", "3"])
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        assert prov["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
        assert isinstance(prov["dirty"], bool)
    assert datetime.fromisoformat(prov["date"]).tzinfo is not None
    assert prov["command"].endswith("bench/throughput.py --steps 3")
    v = prov["versions"]
    import peft
    import transformers

    assert v["torch"] == torch.__version__ and v["python"] == platform.python_version()
    assert v["transformers"] == transformers.__version__ and v["peft"] == peft.__version__ and v["forgetless"]
    m = prov["machine"]
    model, flags = _cpuinfo()
    if model is not None:
        assert m["cpu"] == model
    if flags is not None:
        assert m["flags"] == flags
        assert m["flags_sha"] == hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    assert m["threads"] == torch.get_num_threads() and m["cpus"] == os.cpu_count() and m["device"] == "cpu"
    assert m["capability"] and "mkldnn_bf16" in m
    assert prov["precision"] == {"dtype": "bf16", "reason": prec.reason}
    assert "allocator" in prov and "loadavg_start" in prov
    done = provenance.finish(prov)
    assert (done["date"] == prov["date"]
            and datetime.fromisoformat(done["finished"]) >= datetime.fromisoformat(prov["date"]))
    assert "loadavg_end" in done
    line = provenance.machine_line(done)
    assert m["cpu"] in line and "precision bf16" in line and torch.__version__ in line
    assert f"flags {m['flags_sha']}" in line  # two CPUs of one model name are told apart


def test_collect_names_the_gpu_of_a_cuda_device(monkeypatch):
    """A result computed on a GPU names it (the host CPU alone would describe the wrong machine); a CPU run has none.
    The CUDA calls are stood in for (CI has no GPU); the values reach the record and the table's line unchanged."""
    class Props:
        total_memory, major, minor = 150_000_000_000, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    gpu = provenance.collect("bf16", device="cuda")["machine"]["gpu"]
    assert gpu == {"name": "NVIDIA H200", "memory_gib": 139.7, "capability": "9.0", "cuda": "13.0", "count": 1}
    line = provenance.machine_line(provenance.collect("bf16", device="cuda"))
    assert "device cuda (NVIDIA H200, 139.7 GiB, CUDA 13.0)" in line
    assert provenance.collect("bf16", device="cpu")["machine"]["gpu"] is None


def _prov(cpu: str = "AMD EPYC", flags_sha: str = "6a93d771884c", dtype: str = "bf16") -> dict:
    return {"commit": "0" * 40, "machine": {"cpu": cpu, "flags_sha": flags_sha, "threads": 2},
            "precision": {"dtype": dtype, "reason": "measured"}}


def test_check_same_machine_accepts_the_same_cpu_and_precision():
    assert provenance.check_same_machine(_prov(), _prov(), what="sweep runs/x") is True
    assert provenance.check_same_machine(None, _prov(), what="sweep runs/x") is True  # nothing saved: a fresh start


@pytest.mark.parametrize("other, words", [
    (_prov(flags_sha="0123456789ab"), ["6a93d771884c", "0123456789ab"]),  # same model name, other flags (a VM)
    (_prov(cpu="Intel Xeon"), ["AMD EPYC", "Intel Xeon"]),
    (_prov(dtype="fp32"), ["precision bf16 vs fp32"]),
    ({**_prov(), "machine": {**_prov()["machine"], "gpu": {"name": "NVIDIA H200"}}}, ["GPU none vs NVIDIA H200"]),
])
def test_check_same_machine_refuses_another_cpu_or_precision(other, words):
    with pytest.raises(ForgetlessError) as e:
        provenance.check_same_machine(_prov(), other, what="sweep runs/x")
    msg = str(e.value)
    assert "sweep runs/x" in msg and all(w in msg for w in words)
    assert provenance.check_same_machine(_prov(), other, what="sweep runs/x", allow_mixed=True) is False


def test_allow_other_cpu_lets_only_a_cpu_difference_through():
    """Another CPU (other flags or model) of the same device and precision path is reported as mixed (False), not
    refused; anything else that differs (the precision path, a GPU) is still refused, alone or beside the CPU."""
    for other in (_prov(flags_sha="0123456789ab"), _prov(cpu="Intel Xeon")):
        assert provenance.check_same_machine(_prov(), other, what="x", allow_other_cpu=True) is False
    assert provenance.check_same_machine(_prov(), _prov(), what="x", allow_other_cpu=True) is True
    gpu = {**_prov(), "machine": {**_prov()["machine"], "gpu": {"name": "NVIDIA H200"}}}
    for other, words in ((_prov(dtype="fp32"), "precision bf16 vs fp32"),
                         (_prov(flags_sha="0123456789ab", dtype="fp32"), "precision bf16 vs fp32"),
                         (gpu, "GPU none vs NVIDIA H200")):
        with pytest.raises(ForgetlessError, match=words):
            provenance.check_same_machine(_prov(), other, what="x", allow_other_cpu=True)


def test_on_a_gpu_the_gpu_and_precision_are_compared_not_the_host_cpu():
    def gpu(name: str, cpu: str = "Intel Xeon", dtype: str = "bf16") -> dict:
        p = _prov(cpu=cpu, flags_sha=cpu[:4], dtype=dtype)
        return {**p, "machine": {**p["machine"], "device": "cuda", "gpu": {"name": name}}}

    assert provenance.check_same_machine(gpu("NVIDIA H200"), gpu("NVIDIA H200", cpu="AMD EPYC"), what="x") is True
    for other, words in ((gpu("NVIDIA A100"), "GPU NVIDIA H200 vs NVIDIA A100"),
                         (gpu("NVIDIA H200", dtype="fp32"), "precision bf16 vs fp32")):
        with pytest.raises(ForgetlessError, match=words):
            provenance.check_same_machine(gpu("NVIDIA H200"), other, what="x")
    # a CPU run resumed on a GPU machine (or back) is compared as a CPU run: both differ
    cpu_run = _prov(cpu="Intel Xeon", flags_sha="Inte")
    with pytest.raises(ForgetlessError, match="GPU none vs NVIDIA H200"):
        provenance.check_same_machine(cpu_run, gpu("NVIDIA H200", cpu="AMD EPYC"), what="x")


def test_bench_resume_guard_saves_the_start_and_refuses_a_mixed_resume(tmp_path, capsys):
    fg = _bench_module("forgetting")
    path = tmp_path / "sweep.provenance.json"
    assert fg.resume_guard(path, _prov(), "sweep runs/x", resuming=False) is None  # a fresh start saves its own
    assert json.loads(path.read_text()) == _prov()
    assert fg.resume_guard(path, _prov(), "sweep runs/x", resuming=True) == _prov()
    for other in (_prov(flags_sha="0123456789ab"), _prov(dtype="fp32")):
        with pytest.raises(SystemExit) as e:
            fg.resume_guard(path, other, "sweep runs/x", resuming=True)
        assert "another machine or precision path" in str(e.value) and str(path) in str(e.value)
    assert json.loads(path.read_text()) == _prov()  # the start's provenance is kept
    # --allow-other-cpu: another CPU of the same precision path goes on, warned; another precision path does not
    other_cpu = _prov(flags_sha="0123456789ab")
    assert fg.resume_guard(path, other_cpu, "sweep runs/x", resuming=True, allow_other_cpu=True) == _prov()
    err = capsys.readouterr().err
    assert "another CPU of the same precision path" in err and "6a93d771884c" in err and "0123456789ab" in err
    with pytest.raises(SystemExit, match="precision bf16 vs fp32"):
        fg.resume_guard(path, _prov(dtype="fp32"), "sweep runs/x", resuming=True, allow_other_cpu=True)
    assert json.loads(path.read_text()) == _prov()
    path.unlink()  # a result started before provenance was recorded: warned, then this machine's is saved
    assert fg.resume_guard(path, _prov(dtype="fp32"), "sweep runs/x", resuming=True) is None
    assert ("no saved provenance" in capsys.readouterr().err
            and json.loads(path.read_text())["precision"]["dtype"] == "fp32")


def test_observed_precision_reads_summaries_and_eval_settings(tmp_path):
    fg = _bench_module("forgetting")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "summary.json").write_text(json.dumps({"precision": {"dtype": "bf16", "reason": "measured"}}))
    (a / "eval-task.json").write_text(json.dumps({"settings": {"precision": "bf16"}}))
    (b / "summary.json").write_text(json.dumps({"bf16_compute": False}))  # a summary from before `precision`
    (b / "eval-retention.json").write_text(json.dumps({"settings": {"bf16": False}}))
    assert fg.observed_precision([a, b, tmp_path / "missing"]) == {"train": {"bf16": 1, "fp32": 1},
                                                                   "eval": {"bf16": 1, "fp32": 1}}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_records_provenance(name):
    text = (BENCH / f"{name}.py").read_text()
    assert "provenance.collect(" in text and "provenance.finish(" in text, f"bench/{name}.py records no provenance"


@pytest.mark.parametrize("saved", sorted((BENCH / "results").glob("precision-*.json")), ids=lambda p: p.stem)
def test_precision_md_is_rendered_from_its_json(saved):
    mod = _bench_module("precision")
    assert mod.render_md(json.loads(saved.read_text())) == saved.with_suffix(".md").read_text()
