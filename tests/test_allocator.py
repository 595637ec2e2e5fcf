"""The `forgetless` command restarts itself under a caching allocator (forgetless.allocator): what it finds,
that the restart happens once and only for the command itself, and the page faults it exists to remove."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_recipe

from forgetless import allocator

FOUND = allocator.choose("auto")
needs_allocator = pytest.mark.skipif(
    FOUND is None or not sys.platform.startswith("linux"),
    reason="no caching allocator installed (apt-get install libtcmalloc-minimal4, or pip install cmeel-mimalloc)",
)


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator._REEXEC)}
    return {**env, **kw}


def test_unknown_setting_is_named():
    with pytest.raises(ValueError,
                       match="FORGETLESS_MALLOC: unknown allocator 'tcmaloc'.*tcmalloc, mimalloc, jemalloc, system"):
        allocator.choose("tcmaloc")
    assert allocator.choose("system") is None
    out = subprocess.run([sys.executable, "-m", "forgetless.allocator"], env=_env(FORGETLESS_MALLOC="tcmaloc"),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown allocator 'tcmaloc'" in out.stderr


def test_preload_env_keeps_the_users_settings():
    env = allocator.preload_env("tcmalloc", "/x/libtcmalloc.so",
                                {"LD_PRELOAD": "/y/liba.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "7"})
    assert env["LD_PRELOAD"] == "/x/libtcmalloc.so:/y/liba.so" and env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "7"
    assert allocator.preload_env("mimalloc", "/x/libmimalloc.so", {})["MIMALLOC_PURGE_DELAY"] == "-1"


@needs_allocator
def test_a_rewritten_argv_is_never_reexecuted(monkeypatch):
    """A harness that sets sys.argv and calls main() (the distributed tests' workers do) must not be replaced
    by a re-run of its own original command line."""
    monkeypatch.setattr(sys, "argv", ["forgetless", "train", "some.yaml"])
    monkeypatch.delenv(allocator._REEXEC, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"re-executed {a[1]}"))
    allocator.reexec()


@needs_allocator
@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_train_command_runs_under_the_allocator_and_system_opts_out(tiny_model, toy_data, tmp_path):
    name, _lib = FOUND
    for setting, expected in (("auto", name), ("system", "glibc")):
        out = tmp_path / setting
        path = tmp_path / f"{setting}.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tiny_model, toy_data, out, optim__max_steps=4, train__report=False)))
        res = subprocess.run([sys.executable, "-m", "forgetless", "train", str(path), "--json", "--quiet"],
                             env=_env(FORGETLESS_MALLOC=setting), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        summary = json.loads(res.stdout)
        assert summary["allocator"] == expected and summary["steps"] == 4
        assert json.loads((out / "summary.json").read_text())["allocator"] == expected


FAULTS = """
import resource, torch
from forgetless.allocator import loaded_allocator
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(loaded_allocator(), *faults)
"""


@pytest.mark.parametrize("name", allocator.ORDER)
def test_the_allocator_stops_refaulting_freed_blocks(name):
    """A 64 MiB tensor allocated, filled and freed ten times: under glibc every round maps and faults in its
    16,384 pages again (the cost the allocator exists to remove); under the preloaded allocator the later
    rounds reuse the pages."""
    lib = allocator.find(name) if sys.platform.startswith("linux") else None
    if lib is None:
        pytest.skip(f"{name} is not installed")

    def run(env: dict[str, str]) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
        loaded, *faults = out.stdout.split()
        return loaded, [int(f) for f in faults]

    pages = 64 * 2**20 // 4096
    loaded, system = run(_env())
    assert loaded == "glibc" and min(system) > 0.9 * pages
    loaded, cached = run(allocator.preload_env(name, lib, _env()))
    assert loaded == name and max(cached[-5:]) < 0.02 * pages


PEAK = """
import torch
from forgetless.allocator import loaded_allocator
from forgetless.train.run import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
reset_peak_memory(cpu)
x = torch.ones(2**27)  # 512 MiB, touched
high = peak_memory_mb(cpu)
del x  # the caching allocator keeps its pages; glibc returns them
reset_peak_memory(cpu)  # what the next run in this process does first
print(loaded_allocator(), high, peak_memory_mb(cpu))
"""


@pytest.mark.slow  # a fresh process per allocator (~12 s each): make test-slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("name", ["system", *allocator.ORDER])
def test_each_run_in_one_process_reports_its_own_peak_memory(name):
    """Runs trained one after another in one process (sweep, continual, benches) each report their own peak:
    a 512 MiB block freed before the next run starts is neither in its high-water mark nor kept as the caching
    allocator's free pages."""
    lib = allocator.find(name) if name != "system" else None
    if name != "system" and lib is None:
        pytest.skip(f"{name} is not installed")
    if name == "mimalloc":
        pytest.skip("mimalloc under MIMALLOC_PURGE_DELAY=-1 keeps its free pages even through mi_collect(true): "
                    "there a run's peak includes what the run before it freed")
    env = allocator.preload_env(name, lib, _env()) if lib else _env()
    loaded, high, after = subprocess.run([sys.executable, "-c", PEAK], env=env, capture_output=True, text=True,
                                         check=True).stdout.split()
    assert loaded == (name if lib else "glibc")
    assert float(after) < float(high) - 400, (high, after)
