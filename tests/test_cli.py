"""The `forgetless` command as a user types it: train with overrides, errors with exit code 2, demo --tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import cli_out, tiny_recipe


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True, text=True, timeout=timeout)


def test_train_with_overrides_and_json_summary(tiny_model, toy_data, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe(tiny_model, toy_data, tmp_path / "ignored")))
    out = tmp_path / "run"
    res = _run("train", str(p), "--set", "optim.max_steps=3", "--set", "method=lora", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == 3 and summary["method"] == "lora"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"]["max_steps"] == 3
    assert (out / "report.html").is_file()  # the CLI renders the report (train.report, on by default)


# The error cases run the command's main() in this process (cli_out: exit code and outputs as the command
# gives them; a traceback fails the test), which saves each the ~12 s start of a fresh process.


def test_bad_recipe_exits_2_with_the_key_and_line(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: m\ndata:\n  train: t.jsonl\noptim:\n  lr: -1\n")
    code, _, err = cli_out(capsys, "train", str(p))
    assert code == 2 and "optim.lr (line 5)" in err, err


def test_malformed_data_exits_2_naming_file_and_line(capsys, tiny_model, toy_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe(tiny_model, toy_data, tmp_path / "run", data__train=str(bad))))
    code, _, err = cli_out(capsys, "train", str(p))
    assert code == 2 and f"{bad}:2: malformed JSON line" in err, err


def test_missing_recipe_file(capsys, tmp_path):
    code, _, err = cli_out(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "recipe file not found" in err, err


def test_demo_tiny_runs_end_to_end(capsys, tmp_path):
    code, out, err = cli_out(capsys, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--json")  # main(), in-process
    assert code == 0, err
    state = json.loads(out)
    assert [r["run"] for r in state["runs"]] == ["full-high-lr", "lora", "full-high-lr+self-replay+kl"]
    for r in state["runs"]:
        assert r["val_loss_after"] < r["val_loss_before"]
        assert r["task"]["task"] == "capitals_ce" and r["task"]["gain"] > 0  # held-out answers became likelier
        assert len(r["retention"]["ci"]) == 2 and "self_reference" in r["retention"]["tasks"]
    rec = state["recommended"]
    assert rec is None or -next(r for r in state["runs"] if r["run"] == rec)["retention"]["change"] <= state["budget"]
    assert Path(state["report"]).is_file() and "forgetting frontier" in Path(state["report"]).read_text().lower()
    # the demo never overwrites a previous demo without being told to
    code, _, err = cli_out(capsys, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--quiet")
    assert code == 2 and "--overwrite" in err, err


def test_json_mode_keeps_stdout_for_the_json_alone(capsys):
    """With --json, what a library prints to stdout meanwhile (DeepSpeed's logger, once transformers imports it)
    goes to stderr: stdout parses as the command's JSON."""
    from forgetless.output import json_mode, print_json

    with json_mode(True):
        print("[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.")
        print_json({"steps": 3})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"steps": 3} and "Setting accelerator to CPU" in err
    with json_mode(False):
        print("plain")
    assert capsys.readouterr().out == "plain\n"


def test_version_flag_and_command_print_the_installed_version(capsys):
    from importlib.metadata import version

    for args in (["--version"], ["version"]):
        code, out, _ = cli_out(capsys, *args)
        assert code == 0 and out.strip() == version("forgetless"), args
