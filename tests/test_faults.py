"""Faults and bad inputs, through the CLI: kills at every boundary of a run resume to bit-identical weights, one
writer per directory, divergence stops the run, every bad input is a clear error (exit 2, no traceback).

Kills are real SIGKILLs of a `forgetless train` subprocess at a named point ($FORGETLESS_FAULT, see
forgetless.faults); everything that needs no kill runs the CLI in this process (`main()` as the command runs
it), which saves each case the ~10 s import of a fresh process."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from forgetless.lock import lock_path
from forgetless.testing import ForkedCli
from forgetless.train.callbacks import COMPLETE_MARKER


def _recipe(tmp_path: Path, name: str, tiny_model, toy_data, **over) -> Path:
    r = tiny_recipe(tiny_model, toy_data, tmp_path / name, optim__max_steps=10, train__save_steps=5,
                    train__save_total_limit=None, train__threads=1, **over)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def forked():
    """`forgetless` processes forked from one that imported it once (forgetless.testing.ForkedCli)."""
    return ForkedCli()


def _train_proc(forked: ForkedCli, recipe: Path, *extra: str, fault: str | None = None) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FORGETLESS_FAULT", None)
    if fault:
        env["FORGETLESS_FAULT"] = fault
    return forked.run("train", str(recipe), "--quiet", *extra, env=env, out=recipe.with_suffix(".log"))


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `forgetless ARGS` in this process as the command does; returns (exit code, stderr)."""
    from forgetless.cli import main

    argv = sys.argv
    sys.argv = ["forgetless-test", *args]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, " ".join(err.split())  # rich wraps long lines


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no weights in {run_dir / 'final'}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# ---------------------------------------------------------------- exact resume at every boundary


def test_killed_at_every_boundary_resumes_to_identical_weights(forked, tiny_model, toy_data, tmp_path):
    """max_steps 10, a checkpoint every 5 steps (8 steps per epoch, so the last step is mid-epoch). One run is
    SIGKILLed at each boundary in turn and resumed from where the previous kill left it; every resume must
    continue exactly, so the final weights equal the uninterrupted run's bit for bit."""
    ref = _recipe(tmp_path, "ref", tiny_model, toy_data)
    code, out = _train_proc(forked, ref)
    assert code == 0, out

    run = _recipe(tmp_path, "run", tiny_model, toy_data)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    def killed_at(point: str, *extra: str) -> None:
        code, out = _train_proc(forked, run, *extra, fault=f"kill:{point}")
        assert code == -signal.SIGKILL, (point, code, out[-2000:])

    killed_at("step@3")  # before the first checkpoint
    assert not ckpts.exists() or not list(ckpts.glob("checkpoint-*"))
    killed_at("checkpoint@5", "--resume")  # right after a checkpoint (resumed from none: the run starts again)
    assert (ckpts / "checkpoint-5" / COMPLETE_MARKER).is_file()
    killed_at("step@7", "--resume")  # between checkpoints
    killed_at("checkpoint@10", "--resume")  # after the last checkpoint, during the final evaluation
    assert not (run_dir / "summary.json").exists()
    killed_at("final_save", "--resume")  # nothing left to train: no step 11, straight to the final save
    assert max(json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()) == 10
    assert list(run_dir.glob(".final.*.tmp")), "the kill left the half-written final model in its temporary dir"
    killed_at("report", "--resume")  # the summary is written, the report is not
    assert (run_dir / "summary.json").is_file() and not (run_dir / "report.html").exists()

    code, out = _train_proc(forked, run, "--resume")
    assert code == 0, out
    assert "taking over the stale lock" in out  # the SIGKILLed process could not release it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["resumed_from"].endswith("checkpoint-10")
    assert (run_dir / "report.html").is_file()
    assert not list(run_dir.glob(".*.tmp")) and not lock_path(run_dir).exists()
    steps = _steps(run_dir)
    assert steps == sorted(set(steps)) and max(steps) == 10
    _assert_same_weights(run_dir, tmp_path / "ref")
