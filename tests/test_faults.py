"""Faults and bad inputs, through the CLI: kills at every boundary of a run resume to bit-identical weights, one
writer per directory, divergence stops the run, every bad input is a clear error (exit 2, no traceback).

Kills are real SIGKILLs of a `forgetless train` subprocess at a named point ($FORGETLESS_FAULT, see
forgetless.faults); everything that needs no kill runs the CLI in this process (`main()` as the command runs
it), which saves each case the ~10 s import of a fresh process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_out, tiny_recipe

from forgetless.errors import ForgetlessError
from forgetless.lock import DirLock, lock_path
from forgetless.testing import ForkedCli
from forgetless.train.callbacks import COMPLETE_MARKER, DIVERGED_MARKER, TRAIN_SECONDS


def _recipe(tmp_path: Path, name: str, tiny_model, toy_data, **over) -> Path:
    over = {"optim__max_steps": 10, "train__save_steps": 5, "train__save_total_limit": None, "train__threads": 1,
            **over}
    r = tiny_recipe(tiny_model, toy_data, tmp_path / name, **over)
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
    code, _, err = cli_out(capsys, *args)
    return code, err


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


@pytest.mark.slow  # a forked kill and resume at every boundary (~34 s); make test keeps the disk-full and lock cases
def test_killed_at_every_boundary_resumes_to_identical_weights(capsys, forked, tiny_model, toy_data, tmp_path):
    """max_steps 10, a checkpoint every 5 steps (8 steps per epoch, so the last step is mid-epoch). One run is
    SIGKILLed at each boundary in turn and resumed from where the previous kill left it; every resume must
    continue exactly, so the final weights equal the uninterrupted run's bit for bit."""
    ref = _recipe(tmp_path, "ref", tiny_model, toy_data)
    code, err = cli(capsys, "train", str(ref), "--quiet")  # uninterrupted, in this process (one thread, as they)
    assert code == 0, err

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
    # the final evaluation is logged once, as in the uninterrupted run (killed after it, it was logged again)
    def evals(d: Path) -> list[int]:
        return [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]

    assert evals(run_dir) == evals(tmp_path / "ref") and evals(run_dir).count(10) == 1, evals(run_dir)
    _assert_same_weights(run_dir, tmp_path / "ref")


@pytest.mark.slow  # forked kills (~30 s)
def test_save_total_limit_keeps_a_complete_checkpoint_until_the_next_is_complete(forked, capsys, tiny_model,
                                                                                 toy_data, tmp_path):
    """save_total_limit 1: the Trainer deleted the old checkpoint while writing the new one, before it was marked
    complete; killed in between, nothing was left to resume from. Now the old one goes once the new one is
    complete, and the resumed run ends as the uninterrupted one."""
    ref = _recipe(tmp_path, "ref", tiny_model, toy_data, train__save_total_limit=1)
    code, err = cli(capsys, "train", str(ref), "--quiet")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "ref" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-10"]
    run = _recipe(tmp_path, "run", tiny_model, toy_data, train__save_total_limit=1)
    code, out = _train_proc(forked, run, fault="kill:written@10")
    assert code == -signal.SIGKILL, out[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "checkpoint-5" / COMPLETE_MARKER).is_file()  # still there: checkpoint-10 is not complete
    assert not (ckpts / "checkpoint-10" / COMPLETE_MARKER).exists()
    code, out = _train_proc(forked, run, "--resume")
    assert code == 0, out[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from"].endswith("checkpoint-5")
    assert [p.name for p in ckpts.glob("checkpoint-*")] == ["checkpoint-10"]
    _assert_same_weights(tmp_path / "run", tmp_path / "ref")


def test_disk_full_during_the_final_save_names_the_path_and_keeps_the_run(capsys, tiny_model, toy_data, tmp_path,
                                                                         monkeypatch):
    r = _recipe(tmp_path, "run", tiny_model, toy_data)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("FORGETLESS_FAULT", "enospc:final")
    code, err = cli(capsys, "train", str(r), "--quiet")
    assert code == 2 and f"disk full while writing {run_dir / 'final'}" in err, err
    # the previous checkpoint and the run files are intact; no half-written final model is left behind
    assert (run_dir / "checkpoints" / "checkpoint-10" / COMPLETE_MARKER).is_file()
    assert (run_dir / "recipe.yaml").is_file() and json.loads((run_dir / "data_stats.json").read_text())
    assert max(_steps(run_dir)) == 10
    assert not (run_dir / "final").exists() and not list(run_dir.glob(".final*"))
    assert not lock_path(run_dir).exists()  # released on the error
    monkeypatch.delenv("FORGETLESS_FAULT")
    code, err = cli(capsys, "train", str(r), "--quiet", "--resume")  # space freed: --resume finishes the run
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10 and (run_dir / "final").is_dir()


def test_disk_full_inside_a_trainer_checkpoint_keeps_the_previous_one_and_resumes_exactly(capsys, tiny_model,
                                                                                          toy_data, tmp_path,
                                                                                          monkeypatch):
    """The Trainer writes checkpoint-10 itself (weights, then optimizer state): the disk fills after the weights.
    The error names the file; checkpoint-5 stays complete, the half-written checkpoint-10 is never marked
    complete, and --resume (space freed) continues from checkpoint-5 to the uninterrupted run's weights."""
    import errno

    import torch

    ref = _recipe(tmp_path, "ref", tiny_model, toy_data)
    assert cli(capsys, "train", str(ref), "--quiet")[0] == 0
    r = _recipe(tmp_path, "run", tiny_model, toy_data)
    run_dir = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and "checkpoint-10" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = cli(capsys, "train", str(r), "--quiet")
    half = run_dir / "checkpoints" / "checkpoint-10"
    assert code == 2 and f"disk full while writing {half}" in err, err
    assert "Traceback" not in err and not lock_path(run_dir).exists()
    assert list(half.glob("*.safetensors")) and not (half / COMPLETE_MARKER).exists()  # half written, unmarked
    assert (run_dir / "checkpoints" / "checkpoint-5" / COMPLETE_MARKER).is_file()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()
    monkeypatch.setattr(torch, "save", real_save)
    code, err = cli(capsys, "train", str(r), "--quiet", "--resume")
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["resumed_from"].endswith("checkpoint-5")
    _assert_same_weights(run_dir, tmp_path / "ref")
    # the whole run's training time: checkpoint-5 recorded the first session's seconds up to it, the summary adds
    # the second session's (wall_time_s); an uninterrupted run's total is its wall time
    before = float((run_dir / "checkpoints" / "checkpoint-5" / TRAIN_SECONDS).read_text())
    assert 0 < before and abs(summary["train_time_total_s"] - (before + summary["wall_time_s"])) <= 0.011
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert ref_summary["train_time_total_s"] == ref_summary["wall_time_s"]
    # each checkpoint's seconds are taken before the loop ends (wall_time_s is rounded to 0.01 s, so up to 0.005
    # below the loop's time)
    at5, at10 = (float((tmp_path / "ref" / "checkpoints" / f"checkpoint-{n}" / TRAIN_SECONDS).read_text())
                 for n in (5, 10))
    assert 0 < at5 < at10 <= ref_summary["wall_time_s"] + 0.005


# ---------------------------------------------------------------- divergence


def test_divergence_stops_with_exit_2_and_keeps_the_last_good_checkpoint(capsys, tiny_model, toy_data, tmp_path):
    """lr 3 after a warm-up: the loss climbs, then passes 10x the first logged loss; the run stops there."""
    r = _recipe(tmp_path, "run", tiny_model, toy_data, optim__lr=3.0, optim__schedule="constant_with_warmup",
                optim__warmup_steps=8, train__save_steps=2, train__logging_steps=1)
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "train", str(r), "--quiet")
    assert code == 2 and "training diverged at step" in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["diverged"]
    assert summary["status"] == "diverged" and summary["output"]["final"] is None
    assert not (run_dir / "final").exists() and not (run_dir / "report.html").exists()  # never a diverged model
    # measured: every step before it was under 10x the first logged loss, the diverged step above
    logged = {x["step"]: x["loss"] for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in x}
    limit = 10 * max(logged[1], 1.0)
    assert logged[ev["step"]] > limit and all(v <= limit for st, v in logged.items() if st < ev["step"]), logged
    assert max(logged) == ev["step"] < 10
    # checkpoints whose weights produced the divergence are unmarked; the newest before them is kept, named
    ckpts = {int(p.name.split("-")[1]): p for p in (run_dir / "checkpoints").glob("checkpoint-*")}
    complete = sorted(st for st, p in ckpts.items() if (p / COMPLETE_MARKER).is_file())
    assert complete and all(st < ev["step"] - 1 for st in complete)
    assert any((p / DIVERGED_MARKER).is_file() for p in ckpts.values())
    assert ev["last_good_checkpoint"] == str(ckpts[complete[-1]]) and ev["last_good_checkpoint"] in err


def test_divergence_with_a_guard_rolls_back_to_its_last_state_within_budget(capsys, tiny_model, toy_data, tmp_path):
    """The same divergence with a guard configured: the weights are rolled back to the guard's last state within
    budget from before the divergence, and that state (not the diverged one) is the final model."""
    r = _recipe(tmp_path, "run", tiny_model, toy_data, optim__lr=3.0, optim__schedule="constant_with_warmup",
                optim__warmup_steps=8, train__save_steps=2, train__logging_steps=1, train__report=False,
                monitor={"suite": "self", "every": 4, "limit": 4, "max_new_tokens": 4},
                guard={"budget": 0.99, "require_significant": False, "actions": ["stop"], "select": "last"})
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "train", str(r), "--quiet")
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["diverged"]
    assert code == 2 and f"rolled the weights back to step {ev['rolled_back_to_step']}" in err, err
    assert summary["status"] == "diverged" and 0 < ev["rolled_back_to_step"] < ev["step"] - 1
    assert {"step": ev["step"] - 1, "guard": "rollback", "to_step": ev["rolled_back_to_step"],
            "why": "divergence"} in summary["guard"]["events"]
    # the final model is the state of that step, bit for bit (its checkpoint holds the same weights)
    import torch
    from safetensors.torch import load_file

    final = _weights(run_dir)
    ckpt = load_file(run_dir / "checkpoints" / f"checkpoint-{ev['rolled_back_to_step']}" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_a_non_finite_gradient_stops_the_run_even_without_the_loss_factor(capsys, tiny_model, toy_data, tmp_path):
    """lr 1e30: after one step the weights are absurd and the next gradient is not finite (the loss, saturated,
    still is). train.divergence_factor null leaves only the non-finite check, which stops the run there."""
    r = _recipe(tmp_path, "run", tiny_model, toy_data, optim__lr=1e30, train__divergence_factor=None,
                train__save_steps=1, train__logging_steps=1)
    code, err = cli(capsys, "train", str(r), "--quiet")
    ev = json.loads((tmp_path / "run" / "summary.json").read_text())["diverged"]
    assert code == 2 and f"training diverged at step {ev['step']}: the gradient norm is nan" in err, err
    logged = [x for x in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert logged[-1]["step"] == ev["step"] and logged[-1]["grad_norm"] != logged[-1]["grad_norm"]  # NaN, as logged
    assert all(x["grad_norm"] == x["grad_norm"] for x in logged[:-1])
    assert not (tmp_path / "run" / "final").exists()


def test_a_sweep_stops_on_a_diverged_run_and_never_scores_it(capsys, tiny_model, toy_data, tmp_path):
    base = tiny_recipe(tiny_model, toy_data, tmp_path / "unused", optim__lr=30.0, optim__max_grad_norm=None,
                       optim__max_steps=5, train__report=False)
    base["train"].pop("output_dir")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": base, "output_dir": str(tmp_path / "sweep"),
                                    "runs": [{"name": "hot"}], "retention_suite": "self", "limit": 2}))
    code, err = cli(capsys, "sweep", str(spec), "--quiet")
    assert code == 2 and "training diverged at step" in err, err
    code, err = cli(capsys, "sweep", str(spec), "--quiet")  # run again: the diverged run is not a finished one
    assert code == 2 and "sweep run hot diverged at step" in err and "--overwrite" in err, err
    hot = tmp_path / "sweep" / "runs" / "hot"
    # rich wraps long lines, a long path too: compared without whitespace
    assert f"delete{hot}totrainjustthisrunagain" in "".join(err.split()), err
    assert not (hot / "final").exists()
    # its recipe changed, as the message asks: the diverged folder holds nothing to keep, and the error says so
    base["optim"]["lr"] = 1e-3
    spec.write_text(yaml.safe_dump({"name": "s", "base": base, "output_dir": str(tmp_path / "sweep"),
                                    "runs": [{"name": "hot"}], "retention_suite": "self", "limit": 2}))
    code, err = cli(capsys, "sweep", str(spec), "--quiet")
    assert code == 2 and "holds neither a finished run nor a complete checkpoint" in " ".join(err.split()), err


def test_divergence_factor_is_a_recipe_option(capsys, tiny_model, toy_data, tmp_path):
    """lr 0.3 without clipping: the loss rises for a few steps, under the default 10x, so the run completes;
    with train.divergence_factor 1.5 the same rise stops it."""
    over = {"optim__lr": 0.3, "optim__max_grad_norm": None, "train__save_steps": None, "train__logging_steps": 1,
            "train__report": False}
    code, err = cli(capsys, "train", str(_recipe(tmp_path, "default", tiny_model, toy_data, **over)), "--quiet")
    assert code == 0, err
    logged = [x["loss"] for x in map(json.loads, (tmp_path / "default" / "metrics.jsonl").read_text().splitlines())
              if "loss" in x]
    assert max(logged) > 1.5 * logged[0]
    r = _recipe(tmp_path, "strict", tiny_model, toy_data, train__divergence_factor=1.5, **over)
    code, err = cli(capsys, "train", str(r), "--quiet")
    ev = json.loads((tmp_path / "strict" / "summary.json").read_text())["diverged"]
    assert code == 2 and "train.divergence_factor" in err, err
    assert ev["factor"] == 1.5 and ev["loss"] > 1.5 * ev["first_logged_loss"]


# ---------------------------------------------------------------- one writer per directory


def _hold(target: Path, host: str | None = None, pid: int | None = None) -> subprocess.Popen | None:
    """A live holder (a process that took the lock and sleeps), or a lock file left by `pid` on `host`."""
    if host is None:
        code = ("import sys, time; from forgetless.lock import DirLock; DirLock(sys.argv[1]).acquire(); "
                "print('locked', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        return proc
    lock_path(target).parent.mkdir(parents=True, exist_ok=True)
    lock_path(target).write_text(json.dumps({"pid": pid, "host": host, "command": "forgetless train x.yaml"}))
    return None


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(capsys, tiny_model, toy_data, tmp_path):
    """`output_dir: .` or a mistyped project path with --overwrite: refused, nothing deleted."""
    r = _recipe(tmp_path, "project", tiny_model, toy_data, optim__max_steps=2, train__save_steps=None,
                train__report=False)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.md").write_text("mine")
    code, err = cli(capsys, "train", str(r), "--quiet", "--overwrite")
    assert code == 2 and "is not a run directory" in err and "not deleted" in err, err
    assert (tmp_path / "project" / "notes.md").read_text() == "mine"


def test_second_writer_is_refused_and_a_stale_lock_taken_over(capsys, tiny_model, toy_data, tmp_path):
    r = _recipe(tmp_path, "run", tiny_model, toy_data, optim__max_steps=2, train__save_steps=None,
                train__report=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("the first run's")  # a run directory: --overwrite may replace it
    holder = _hold(run_dir)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, err = cli(capsys, "train", str(r), "--quiet", *extra)
            assert code == 2 and f"run directory {run_dir} is in use by another forgetless process: pid {holder.pid}" \
                in err, (extra, err)
        assert (run_dir / "metrics.jsonl").read_text() == "the first run's"  # --overwrite did not touch it
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the lock is stale, taken over with a message
    code, err = cli(capsys, "train", str(r), "--quiet", "--overwrite")
    assert code == 0 and f"taking over the stale lock on {run_dir}: pid {holder.pid}" in err, err
    assert (run_dir / "summary.json").is_file() and not lock_path(run_dir).exists()


def test_lock_of_another_host_is_refused_with_the_command_that_breaks_it(capsys, tiny_model, toy_data, tmp_path):
    r = _recipe(tmp_path, "run", tiny_model, toy_data, optim__max_steps=2, train__save_steps=None,
                train__report=False)
    run_dir = tmp_path / "run"
    _hold(run_dir, host="gpu-node-7", pid=_dead_pid())
    code, err = cli(capsys, "train", str(r), "--quiet")
    assert code == 2 and "gpu-node-7" in err and "--break-lock" in err, err
    assert not run_dir.exists()
    code, err = cli(capsys, "train", str(r), "--quiet", "--break-lock")
    assert code == 0 and "taking over the stale lock" in err, err


def test_same_host_lock_of_a_dead_process_is_taken_over(tmp_path):
    target = tmp_path / "cache-entry"
    _hold(target, host=socket.gethostname(), pid=_dead_pid())
    with DirLock(target, quiet=True) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def test_sweep_continual_and_models_pull_refuse_a_second_writer(capsys, tiny_model, toy_data, tmp_path):
    from forgetless.models.catalog import entry_dir

    base = tiny_recipe(tiny_model, toy_data, tmp_path / "unused", fmt="prompt_completion", data__chat_template=False)
    base["train"].pop("output_dir")
    sweep_dir, seq_dir = tmp_path / "sweep", tmp_path / "seq"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "base": base, "output_dir": str(sweep_dir),
                                                     "runs": [{"name": "a"}]}))
    task = {"train": str(toy_data["prompt_completion"]), "validation": str(toy_data["prompt_completion_val"])}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "c", "base": base, "output_dir": str(seq_dir),
                                                     "tasks": [{"name": "copy", "data": task}],
                                                     "retention_suite": None}))
    holders = [_hold(sweep_dir), _hold(seq_dir), _hold(entry_dir("stories260k"))]
    try:
        code, err = cli(capsys, "sweep", str(tmp_path / "s.yaml"), "--overwrite")
        assert code == 2 and f"sweep directory {sweep_dir} is in use" in err, err
        code, err = cli(capsys, "continual", str(tmp_path / "c.yaml"), "--overwrite")
        assert code == 2 and f"continual directory {seq_dir} is in use" in err, err
        code, err = cli(capsys, "models", "pull", "stories260k")
        assert code == 2 and f"model cache entry {entry_dir('stories260k')} is in use" in err, err
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert not sweep_dir.exists() and not seq_dir.exists()


def test_evaluation_cache_entry_has_one_writer(tmp_path):
    """A process that finds another evaluating the same baseline waits for it, then reads its result."""
    import threading
    import time

    from forgetless.retention.evaluate import SuiteResult, evaluate_cached
    from forgetless.retention.suite import Suite

    suite = Suite.model_construct(name="s", tasks=[])
    evaluated = []

    def run():
        evaluated.append(True)
        return SuiteResult("s", {}, {}, "second")

    evaluate_cached({"model": "probe"}, suite, run, cache_dir=tmp_path)  # learn the entry's file name
    entry = next((tmp_path / "baselines").glob("*.json"))
    entry.unlink()
    evaluated.clear()
    holder = _hold(entry)  # the first writer, busy evaluating

    def first_writer_finishes():
        time.sleep(1.0)
        entry.write_text(json.dumps({"suite": "s", "model": "first", "seconds": {}, "tasks": {}}))
        holder.kill()

    t = threading.Thread(target=first_writer_finishes)
    t.start()
    t0 = time.perf_counter()
    res, was_cached = evaluate_cached({"model": "probe"}, suite, run, cache_dir=tmp_path)
    waited = time.perf_counter() - t0
    t.join()
    holder.wait()
    assert was_cached and res.model == "first" and not evaluated and waited >= 0.9


# ---------------------------------------------------------------- bad inputs: a clear error, or handled


def _chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def _jsonl(path: Path, records: list, bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _train_on(tmp_path: Path, tiny_model, toy_data, data: Path, name: str = "run") -> Path:
    return _recipe(tmp_path, name, tiny_model, toy_data, data__train=str(data), data__validation=None,
                   optim__max_steps=1, train__save_steps=None, train__report=False)


def test_bom_content_parts_and_a_json_array_in_jsonl_are_accepted(capsys, tiny_model, toy_data, tmp_path):
    from forgetless.data import build_examples, load_records
    from forgetless.recipe import DataConfig
    from forgetless.train import load_model

    plain = [_chat(("user", f"copy {w}"), ("assistant", f"{w} {w}")) for w in ("red cat", "blue dog", "sun")]
    parts = [_chat(("user", [{"type": "text", "text": "copy "}, {"type": "text", "text": w}]),
                   ("assistant", [{"type": "text", "text": f"{w} {w}"}])) for w in ("red cat", "blue dog", "sun")]
    files = {
        "bom": _jsonl(tmp_path / "bom.jsonl", plain, bom=True),  # as Windows tools write it
        "parts": _jsonl(tmp_path / "parts.jsonl", parts),  # OpenAI content parts
    }
    files["array"] = tmp_path / "array.jsonl"  # a JSON array saved under a .jsonl name
    files["array"].write_text(json.dumps(plain, indent=1))
    for name, path in files.items():
        code, err = cli(capsys, "train", str(_train_on(tmp_path, tiny_model, toy_data, path, name)), "--quiet")
        assert code == 0, (name, err)
        assert json.loads((tmp_path / name / "data_stats.json").read_text())["train"]["examples"] == 3
    # the same conversations, token for token: parts joined in order, the BOM dropped
    _, tok = load_model(tiny_model)
    cfg = DataConfig(train=str(files["bom"]), format="chat")
    ids = {name: [e["input_ids"] for e in build_examples(load_records(str(p)), cfg, tok)[0]]
           for name, p in files.items()}
    assert ids["bom"] == ids["parts"] == ids["array"]


@pytest.mark.parametrize("records, message", [
    ([_chat(("user", "a"), ("assistant", None))], ":1: message 1 (assistant) has 'content' null"),
    ([_chat(("user", "a"), ("assistant", "b")), _chat(("user", ["a"]), ("assistant", "b"))],
     ":2: message 0 (user): 'content' is a list of strings"),
    ([_chat(("user", [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x.png"}}]),
            ("assistant", "b"))], ":1: message 0 (user): content part 1 is of type 'image_url'"),
    ([_chat(("user", "a"), ("assistant", "b")), _chat(("system", "s"), ("assistant", "b"), ("user", "c"))],
     ":2: the conversation starts with an assistant message (message 1)"),
    ([_chat(("user", "a"), ("assistant", "")), _chat(("user", "b"), ("assistant", " "))],
     "all 2 answers are empty (first: {path}:1, {path}:2)"),
])
def test_bad_chat_records_are_errors_naming_the_line(capsys, tiny_model, toy_data, tmp_path, records, message):
    data = _jsonl(tmp_path / "bad.jsonl", records)
    code, err = cli(capsys, "train", str(_train_on(tmp_path, tiny_model, toy_data, data)), "--quiet")
    expected = message.format(path=data) if "{path}" in message else f"{data}{message}"
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_some_empty_answers_are_a_warning_with_the_count(capsys, tiny_model, toy_data, tmp_path):
    records = [_chat(("user", f"q{i}"), ("assistant", "" if i in (2, 5) else f"a{i}")) for i in range(8)]
    data = _jsonl(tmp_path / "some.jsonl", records)
    code, err = cli(capsys, "train", str(_train_on(tmp_path, tiny_model, toy_data, data)))
    assert code == 0, err
    assert f"2 of 8 training example(s) have an empty answer (first: {data}:3, {data}:6)" in err
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["train"]["empty_answers"] == 2


def test_empty_and_binary_files(capsys, tiny_model, toy_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)  # e.g. weights saved under the wrong name
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(_chat(("user", "a"), ("assistant", "b"))).encode() + b"\n"
                       + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    code, out, err = cli_out(capsys, "data", "check", str(empty), "--format", "chat")
    assert code == 0 and "no problems found" not in out and f"{empty}:1: the file is empty (no records)" in out, out
    code, out, err = cli_out(capsys, "data", "check", str(binary), "--format", "chat")
    assert code == 0 and f"{binary}:1: this is a binary file" in out, out
    code, out, err = cli_out(capsys, "data", "check", str(latin1), "--format", "chat")
    assert code == 0 and f"{latin1}:2: not UTF-8 text" in out, out
    for path in (binary, latin1):
        code, err = cli(capsys, "train", str(_train_on(tmp_path, tiny_model, toy_data, path)), "--quiet")
        assert code == 2 and str(path) in err and "UTF-8" in err, err
    code, err = cli(capsys, "train", str(_train_on(tmp_path, tiny_model, toy_data, empty)), "--quiet")
    assert code == 2 and "the training set is empty" in err, err


def test_eval_limit_below_one_is_an_error(capsys, tiny_model):
    code, err = cli(capsys, "eval", "--model", str(tiny_model), "--limit", "-3", "--baseline", "none")
    assert code == 2 and "--limit -3: the number of items per task must be a whole number of at least 1" in err, err


def test_overwrite_of_a_sweep_or_sequence_directory_needs_its_marker(tmp_path):
    from forgetless.orchestration import claim_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(ForgetlessError, match="is not a sweep directory .*not deleted"):
        claim_dir(foreign, ("sweep.json", "sweep.yaml"), "sweep", overwrite=True)
    assert (foreign / "notes.md").read_text() == "mine"
    (foreign / "sweep.yaml").write_text("name: x\n")
    assert claim_dir(foreign, ("sweep.json", "sweep.yaml"), "sweep", overwrite=True) is False
    assert list(foreign.iterdir()) == []  # replaced: an empty directory for the new sweep
