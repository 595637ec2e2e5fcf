"""A run killed with SIGKILL mid-training and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import tiny_recipe

from forgetless.train.callbacks import (
    COMPLETE_MARKER,
    TRAIN_SECONDS,
    checkpoint_step,
    latest_complete_checkpoint,
    train_seconds_before,
)


def _cmd(recipe_path, *extra):
    return [sys.executable, "-m", "forgetless", "train", str(recipe_path), "--quiet", *extra]


def _write(tmp_path, name, tiny_model, toy_data):
    r = tiny_recipe(
        tiny_model, toy_data, tmp_path / name, optim__max_steps=120, optim__lr=2e-3,
        optim__schedule="cosine", optim__warmup_steps=5, train__save_steps=10, train__eval_steps=40,
        method={"name": "lora", "r": 8, "dropout": 0.1},  # dropout: the RNG state must be restored too
    )
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_the_latest_complete_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    # checkpoint-1000 sorts before checkpoint-990 as text; a stray checkpoint-old or an unmarked (half-written)
    # checkpoint is not picked
    for name, complete in [("checkpoint-990", True), ("checkpoint-1000", True), ("checkpoint-1100", False),
                           ("checkpoint-old", True), ("checkpoint-", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / COMPLETE_MARKER).write_text("")
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-1000"
    assert [checkpoint_step(tmp_path / n) for n in ("checkpoint-990", "checkpoint-old", "checkpoint-", "ckpt-3")] == [
        990, None, None, None]
    assert checkpoint_step("runs/a/checkpoints/checkpoint-550") == 550
    assert latest_complete_checkpoint(tmp_path / "absent") is None
    assert checkpoint_step("checkpoint-\u00b2") is None  # str.isdigit() takes a superscript 2; int() refuses it
    # the training seconds before a checkpoint: 0 for a fresh start, unknown for one written without them
    assert train_seconds_before(None) == 0.0 and train_seconds_before(tmp_path / "checkpoint-990") is None
    (tmp_path / "checkpoint-990" / TRAIN_SECONDS).write_text("123.456\n")
    assert train_seconds_before(tmp_path / "checkpoint-990") == 123.456


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model, toy_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = _write(tmp_path, "ref", tiny_model, toy_data)
    subprocess.run(_cmd(ref), check=True, env=env, timeout=300)
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())["final_validation_loss"]

    killed = _write(tmp_path, "killed", tiny_model, toy_data)
    proc = subprocess.Popen(_cmd(killed), env=env)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpts.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()] if ckpts.exists() else []
        if any(int(p.name.split("-")[1]) >= 30 for p in done):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed: make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "summary.json").exists()

    # without --resume the half-done run is protected
    again = subprocess.run(_cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr

    subprocess.run(_cmd(killed, "--resume"), check=True, env=env, timeout=300)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 120
    got = summary["final_validation_loss"]
    assert abs(got - expected) / expected < 1e-3, (got, expected)
    # metrics.jsonl has each step once: lines logged after the checkpoint were dropped on resume
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == sorted(set(steps))
