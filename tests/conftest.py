"""Shared fixtures: a tiny Llama and toy data built locally (no download), and ../shared when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from forgetless.testing import build_organism, build_tiny_llama, copy_task, task_loss, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FORGETLESS_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"

needs_shared = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file(),
    reason=f"../shared is absent ({STORIES} not found): tests on the real stories260K model are skipped",
)


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """The same for module- and session-scoped fixtures, which run before the per-test one below: without it
    they read the user's ~/.cache (a precision probe cached there once made two sequences score differently)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGETLESS_HOME", str(tmp_path_factory.getbasetemp() / "forgetless_home"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _forgetless_home(tmp_path_factory, monkeypatch):
    """Keep every test's model cache away from the user's ~/.cache."""
    monkeypatch.setenv("FORGETLESS_HOME", str(tmp_path_factory.getbasetemp() / "forgetless_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with a byte-level BPE tokenizer and a chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """The copy task in every data format, train and validation."""
    d = tmp_path_factory.mktemp("data")
    out = {}
    for fmt in ("instruction", "prompt_completion", "chat", "text"):
        out[fmt] = write_jsonl(d / f"{fmt}_train.jsonl", copy_task(64, seed=0, fmt=fmt))
        out[f"{fmt}_val"] = write_jsonl(d / f"{fmt}_val.jsonl", copy_task(16, seed=1, fmt=fmt))
    return out


def tiny_recipe(model: Path, data: dict[str, Path], out: Path, fmt: str = "chat", **over) -> dict:
    """A recipe dict for a quick run on the tiny model; `over` keys are dotted paths."""
    r = {
        "name": "tiny",
        "model": str(model),
        "data": {"train": str(data[fmt]), "validation": str(data[f"{fmt}_val"]), "format": fmt, "max_length": 64},
        "method": {"name": "full"},
        "optim": {"lr": 3e-3, "max_steps": 20, "batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
        "train": {"output_dir": str(out), "save_steps": None, "logging_steps": 5, "progress": False, "seed": 0,
                  "bf16": False},  # fp32 pinned: results must not depend on this CPU's precision path
    }
    for key, value in over.items():
        node = r
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return r


@pytest.fixture(scope="session")
def organism(tmp_path_factory):
    """A tiny Llama that really learned task A (copy), with task B (reverse) data: see forgetless.testing."""
    from forgetless.train import load_model

    org = build_organism(tmp_path_factory.mktemp("organism"))
    model, tok = load_model(org["model"])
    org["a0"] = task_loss(model, tok, org["a_val"])
    org["b0"] = task_loss(model, tok, org["b_val"])
    return org


def cli_out(capsys, *args: str) -> tuple[int, str, str]:
    """Run `forgetless ARGS` in this process as the command does; returns (exit code, stdout, stderr), the
    outputs with whitespace runs joined (rich wraps long lines). A traceback fails the test."""
    import torch

    from forgetless.cli import main

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["forgetless-test", *args]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # the recipes' train.threads: 1 must not slow the rest of the session
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, " ".join(out.split()), " ".join(err.split())
