"""Multi-process training on CPU: two processes over gloo, launched as users launch them (torchrun).

The end-to-end test trains the tiny Llama twice on the same recipe: with DDP over 2 processes (batch 4 each)
and in one process (batch 8), the same global batch. EWC (data labels), replay and a guard are on, so one
run checks them all across processes: the loss curve, the all-reduced Fisher, replay coverage, the guard's
action on both ranks at the same step, and that only rank 0 writes the run directory.

This file is also the worker torchrun starts (`python tests/test_distributed.py worker RECIPE OUT`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# Tolerances, measured on this recipe (fp32, 10 steps, EWC + replay + guard; gloo on CPU):
# - the loss curve: DDP vs one process differs by at most 1e-7 relative (about one fp32 ulp: the gradient
#   all-reduce adds two half-batch sums where one process sums the whole batch). 100x that is allowed; a
#   gradient-sync bug shows at once (DDP that skipped the all-reduce: 5.5315 vs 5.5030 at step 2, 5e-3).
# - the final weights, every parameter (102,720): 99.9% within 1.7e-7, 6 elements beyond 1e-6, the largest 7.4e-6
#   (Adam normalises each element's update: where a gradient is a rounding error from zero, the two summation
#   orders can move it by a visible fraction of the learning rate). Allowed: every element within 1e-4 and at most
#   0.1% beyond 1e-6; a gradient-sync bug moves most elements by about the learning rate (3e-3).
# - the Fisher: each rank sums half the samples' squared gradients, then the sums are added; at most 3.2e-7
#   relative per element; 1e-5 allowed. Across ranks it is identical (bitwise).
LOSS_RTOL = 1e-5
WEIGHTS_ATOL = 1e-4
WEIGHTS_CLOSE, WEIGHTS_FAR_SHARE = 1e-6, 1e-3
FISHER_RTOL = 1e-5


# ---------------------------------------------------------------- the worker (runs in each process)


def _ids(row: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(int(t) for t in (row[mask.bool()] if mask is not None else row))


def run_instrumented(go, out: Path, lock_file: Path | None = None) -> dict:
    """Call `go()` (a training run) and record, for this process: the examples each training step saw, the
    learning rate of each step, the Fisher, the files written, the guard's events, the final weights, and
    (`lock_file`) the run directory's lock as this process sees it at its first training step."""
    import forgetless.train as ft
    from forgetless import distributed as dist
    from forgetless import guard
    from forgetless.mitigations.ewc import EWC
    from forgetless.train import callbacks
    from forgetless.train.trainer import ForgetlessTrainer

    rec: dict = {"seen": [], "lrs": {}, "writes": [], "fisher": None}
    box: dict = {}
    real_step, real_setup, real_train = ForgetlessTrainer.training_step, EWC.setup, ft.train
    real_replace = os.replace

    def training_step(self, model, inputs, *a, **k):
        box["trainer"] = self
        step = self.state.global_step + 1
        if lock_file is not None and "lock" not in rec:
            rec["lock"] = json.loads(lock_file.read_text()) if lock_file.is_file() else None
        rec["lrs"][step] = self.optimizer.param_groups[0]["lr"]
        mask, replay = inputs.get("attention_mask"), inputs.get("replay_mask")
        for i, row in enumerate(inputs["input_ids"]):
            rec["seen"].append([step, list(_ids(row, mask[i] if mask is not None else None)),
                                bool(replay[i]) if replay is not None else False])
        return real_step(self, model, inputs, *a, **k)

    def ewc_setup(self, ctx):
        real_setup(self, ctx)
        rec["fisher"] = {n: f.detach().cpu().tolist() for n, f in zip(self.names, self.weights, strict=True)}

    def replace(src, dst, *a, **k):
        rec["writes"].append(str(dst))
        return real_replace(src, dst, *a, **k)

    def appender(real):
        def append(path, record):
            rec["writes"].append(str(path))
            return real(path, record)
        return append

    def train(*a, **k):
        box["result"] = real_train(*a, **k)
        return box["result"]

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ForgetlessTrainer, "training_step", training_step))
        stack.enter_context(mock.patch.object(EWC, "setup", ewc_setup))
        stack.enter_context(mock.patch.object(ft, "train", train))
        stack.enter_context(mock.patch("os.replace", replace))
        for mod in (callbacks, guard):  # every metrics.jsonl writer (run.py logs through the callbacks)
            stack.enter_context(mock.patch.object(mod, "append_jsonl", appender(mod.append_jsonl)))
        go()
    res = box["result"]
    weights = torch.cat([p.detach().float().flatten() for p in res.model.parameters()])
    rec.update({
        "rank": dist.rank(),
        "world": dist.world_size(),
        "pid": os.getpid(),
        "stream": [[list(e["input_ids"]), bool(e.get("replay"))] for e in box["trainer"].train_dataset],
        "events": (res.summary["guard"] or {}).get("events", []),
        "steps": res.summary["steps"],
        "weights_sha": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "weights_file": str(out.with_suffix(".weights.safetensors")),
        "summary": res.summary,
    })
    from safetensors.torch import save_file

    save_file({"weights": weights.contiguous()}, rec["weights_file"])  # every parameter, compared in full
    out.write_text(json.dumps(rec))
    return rec


def _worker(recipe: str, out_dir: str) -> None:
    from forgetless.cli import main
    from forgetless.lock import lock_path

    rank = int(os.environ.get("RANK", "0"))
    sys.argv = ["forgetless", "train", recipe, "--quiet"]

    def go():
        with contextlib.suppress(SystemExit):
            main()

    run_dir = Path(yaml.safe_load(Path(recipe).read_text())["train"]["output_dir"])
    run_instrumented(go, Path(out_dir) / f"rank{rank}.json", lock_path(run_dir))


# ---------------------------------------------------------------- helpers


def _probe_suite(d: Path) -> Path:
    """Perplexity on text the toy tasks never contain (upper case, digits): it only gets worse with training,
    so the guard breaches at the first probe, in one process and in two alike."""
    import random

    rng = random.Random(0)
    rows = ["".join(rng.choice("QXZJKVW0123456789 ") for _ in range(40)) for _ in range(12)]
    (d / "rare.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    suite = d / "probe.yaml"
    suite.write_text(yaml.safe_dump({"name": "probe", "tasks": [
        {"name": "rare", "kind": "perplexity", "data": {"path": str(d / "rare.jsonl")}, "text": "{{text}}"}]}))
    return suite


def _recipe(model: Path, data: dict[str, Path], out: Path, batch: int, probe: Path) -> dict:
    """Full fine-tuning with EWC (data labels), 20% replay, a guard that breaches at once (lower_lr, then stop)."""
    return {
        "name": out.name,
        "model": str(model),
        "data": {"train": str(data["chat"]), "validation": str(data["chat_val"]), "format": "chat", "max_length": 64},
        "method": "full",
        # 64 task + 16 replay = 80 examples = 10 global batches of 8
        "optim": {"lr": 3e-3, "epochs": 1, "batch_size": batch, "eval_batch_size": batch, "warmup_steps": 0,
                  "schedule": "constant"},
        "train": {"output_dir": str(out), "save_steps": None, "logging_steps": 1, "progress": False, "seed": 0,
                  "bf16": False, "report": False},
        "mitigations": [
            {"name": "ewc", "weight": 100.0, "samples": 9, "labels": "data",
             "reference": {"train": str(data["instruction_val"]), "format": "instruction"}},
            {"name": "replay", "ratio": 0.2, "data": {"train": str(data["instruction"]), "format": "instruction"}},
        ],
        "monitor": {"suite": str(probe), "every": 3, "limit": None},
        "guard": {"budget": 0.001, "require_significant": False, "actions": ["lower_lr", "lower_lr"], "select": "last"},
    }


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "FORGETLESS_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args: list[str], home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    steps = [r["step"] for r in train]
    assert len(steps) == len(set(steps)), f"a training step was logged twice (more than one writer?): {steps}"
    return {r["step"]: r["loss"] for r in train}


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ddp_vs_single(tiny_model, toy_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    ddp_dir, single_dir, rank_out = base / "ddp", base / "single", base / "ranks"
    rank_out.mkdir()
    recipe = base / "ddp.yaml"
    probe = _probe_suite(base)
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model, toy_data, ddp_dir, batch=4, probe=probe)))
    _torchrun([str(Path(__file__)), "worker", str(recipe), str(rank_out)], base / "home_ddp")
    ranks = [json.loads((rank_out / f"rank{r}.json").read_text()) for r in (0, 1)]

    import forgetless.train as ft
    from forgetless.recipe import recipe_from_dict

    spec = _recipe(tiny_model, toy_data, single_dir, batch=8, probe=probe)
    with mock.patch.dict(os.environ, {"FORGETLESS_HOME": str(base / "home_single")}):  # no Fisher cache shared
        single = run_instrumented(lambda: ft.train(recipe_from_dict(spec), quiet=True), base / "single.json")
    return {"ranks": ranks, "single": single, "ddp_dir": ddp_dir, "single_dir": single_dir}


@pytest.mark.slow  # torchrun (the DDP run and its one-process twin): about 30 s of the default run; make test-slow
def test_ddp_reaches_the_single_process_loss_curve_with_the_same_global_batch(ddp_vs_single):
    r = ddp_vs_single
    ddp, single = _losses(r["ddp_dir"]), _losses(r["single_dir"])
    # every step's training loss, the probe steps (every 3, with their validation) included
    assert sorted(ddp) == sorted(single) == list(range(1, 11))
    worst = max(abs(ddp[s] - single[s]) / abs(single[s]) for s in single)
    assert worst < LOSS_RTOL, (worst, ddp, single)
    s0, s1 = (x["summary"] for x in r["ranks"])
    assert s0["distributed"] == {"engine": "ddp", "world_size": 2, "backend": "gloo", "global_batch": 8,
                                 "epoch_padding": 0}
    assert "distributed" not in r["single"]["summary"]
    # validation: the Trainer shards it and averages over the global eval batch, as one process with batch 8
    assert s0["initial_validation_loss"] == pytest.approx(r["single"]["summary"]["initial_validation_loss"], rel=1e-6)
    assert s0["final_validation_loss"] == pytest.approx(r["single"]["summary"]["final_validation_loss"], rel=LOSS_RTOL)
    # both ranks end with the same weights (DDP), and close to the single-process ones
    a, b = r["ranks"]
    assert a["weights_sha"] == b["weights_sha"]
    from safetensors.torch import load_file

    wa, ws = (load_file(x["weights_file"])["weights"] for x in (a, r["single"]))
    assert wa.numel() == ws.numel() == r["single"]["summary"]["total_parameters"]  # every parameter
    diff = (wa - ws).abs()
    assert float(diff.max()) <= WEIGHTS_ATOL, float(diff.max())
    assert int((diff > WEIGHTS_CLOSE).sum()) <= WEIGHTS_FAR_SHARE * diff.numel(), int((diff > WEIGHTS_CLOSE).sum())


@pytest.mark.slow  # torchrun (the DDP run and its one-process twin): about 30 s of the default run; make test-slow
def test_ewc_fisher_is_all_reduced_and_equals_the_single_process_estimate(ddp_vs_single):
    a, b = ddp_vs_single["ranks"]
    single = ddp_vs_single["single"]["fisher"]
    assert a["fisher"] == b["fisher"], "ranks hold different Fishers"
    assert set(a["fisher"]) == set(single)
    for name in single:
        fa, fs = torch.tensor(a["fisher"][name]), torch.tensor(single[name])
        assert torch.allclose(fa, fs, rtol=FISHER_RTOL, atol=1e-12), name
    m0 = next(m for m in a["summary"]["mitigations"] if m["name"] == "ewc")
    assert m0["fisher_cached"] is False and m0["samples"] == 9 and m0["fisher_samples_per_rank"] == 5  # 5 + 4


@pytest.mark.slow  # torchrun (the DDP run and its one-process twin): about 30 s of the default run; make test-slow
def test_replay_stream_is_covered_exactly_once_per_epoch_across_ranks(ddp_vs_single):
    a, b = ddp_vs_single["ranks"]
    assert a["stream"] == b["stream"] == ddp_vs_single["single"]["stream"]
    stream = collections.Counter((tuple(ids), replay) for ids, replay in a["stream"])
    assert sum(replay for _, replay in a["stream"]) == 16 and len(a["stream"]) == 80
    seen = [collections.Counter((tuple(ids), replay) for _, ids, replay in r["seen"]) for r in (a, b)]
    assert sum(seen[0].values()) == sum(seen[1].values()) == 40  # 10 steps x 4 per rank
    assert seen[0] + seen[1] == stream  # every example of the mixed stream once, none twice, none lost
    # and step by step the two ranks together see what the single process saw in its batch of 8
    for step in range(1, 11):
        together = collections.Counter(
            (tuple(ids), rp) for r in (a, b) for s, ids, rp in r["seen"] if s == step)
        alone = collections.Counter(
            (tuple(ids), rp) for s, ids, rp in ddp_vs_single["single"]["seen"] if s == step)
        assert together == alone, step


@pytest.mark.slow  # torchrun (the DDP run and its one-process twin): about 30 s of the default run; make test-slow
def test_guard_acts_on_both_ranks_at_the_same_step_and_only_rank_0_writes(ddp_vs_single):
    a, b = ddp_vs_single["ranks"]
    assert a["events"] == b["events"]
    kinds = [(e["step"], e["guard"]) for e in a["events"]]
    acted = [e["step"] for e in a["events"] if e["guard"] == "lower_lr"]
    assert acted and acted[0] < 10, f"the guard should act before the last step: {kinds}"
    assert all((s, "breach") in kinds for s in acted)
    assert [(e["step"], e["guard"]) for e in ddp_vs_single["single"]["events"]] == kinds
    assert a["steps"] == b["steps"] == 10
    for r in (a, b):  # the lowered learning rate is in force on every rank from the next step on
        lrs = {int(k): v for k, v in r["lrs"].items()}
        for step in range(1, 11):
            assert lrs[step] == pytest.approx(3e-3 * 0.5 ** sum(s < step for s in acted)), (r["rank"], step, lrs)
    run_dir = ddp_vs_single["ddp_dir"]
    assert b["writes"] == [], f"rank 1 wrote {b['writes']}"
    written = {Path(w).name for w in a["writes"]}
    assert {"recipe.yaml", "data_stats.json", "metrics.jsonl", "summary.json", "final",
            "ewc_state.safetensors"} <= written
    for name in ("recipe.yaml", "data_stats.json", "summary.json", "ewc_state.safetensors", "final/model.safetensors"):
        assert (run_dir / name).is_file(), name
    guard_lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"guard"' in x]
    assert [(e["step"], e["guard"]) for e in guard_lines] == kinds  # once each, not once per rank


@pytest.mark.slow  # torchrun (the DDP run and its one-process twin): about 30 s of the default run; make test-slow
def test_rank_0_alone_holds_the_run_directory_lock_and_releases_it(ddp_vs_single):
    """One writer per run: under torchrun the lock beside the run directory names rank 0's process, both ranks
    see that while they train, and it is gone when the run ends."""
    from forgetless.lock import lock_path

    a, b = ddp_vs_single["ranks"]
    assert a["lock"] is not None and a["lock"] == b["lock"], (a["lock"], b["lock"])
    assert a["lock"]["pid"] == a["pid"] != b["pid"]
    assert not lock_path(ddp_vs_single["ddp_dir"]).exists()


def _no_forgetless_traceback(stderr: str) -> bool:
    """torchrun reports a failed worker with a traceback of its own; the workers' errors must be clear ones
    (exit 2), with no frame of forgetless in them."""
    assert f'File "{REPO / "src"}' not in stderr, stderr[-4000:]
    return True


def _torchrun_cli(args: list[str], home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 forgetless ARGS`, as a user types it; the exit code is not checked."""
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()), "--no-python",
           str(Path(sys.executable).with_name("forgetless")), *args]
    return subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_torchrun_refuses_a_second_writer_and_stops_every_rank_at_the_same_diverged_step(tiny_model, toy_data,
                                                                                         tmp_path):
    """Two processes: a directory another live process holds is refused by every rank (nothing touched), and a
    run that diverges stops on both ranks at one step (one all-reduced flag per step), exit 2, the last good
    checkpoint kept, one summary saying so, no final model."""
    from conftest import tiny_recipe

    from forgetless.lock import lock_path
    from forgetless.train.callbacks import COMPLETE_MARKER

    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=10, optim__lr=3.0,
                       optim__schedule="constant_with_warmup", optim__warmup_steps=8, optim__batch_size=4,
                       train__save_steps=2, train__logging_steps=1, train__save_total_limit=None, train__bf16=False,
                       train__report=False, train__progress=False)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("the first run's")  # a run directory: --overwrite may replace it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from forgetless.lock import DirLock; lock = DirLock(sys.argv[2], 'run directory', "
                               "quiet=True); lock.__enter__(); print('held', flush=True); time.sleep(600)",
                               str(REPO / "src"), str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _torchrun_cli(["train", str(recipe), "--quiet", "--overwrite"], tmp_path / "home")
        err = " ".join(proc.stderr.split())
        assert proc.returncode != 0 and f"is in use by another forgetless process: pid {holder.pid}" in err, err
        assert _no_forgetless_traceback(proc.stderr)
        assert (run_dir / "metrics.jsonl").read_text() == "the first run's"
    finally:
        holder.kill()
        holder.wait()

    proc = _torchrun_cli(["train", str(recipe), "--quiet", "--overwrite"], tmp_path / "home")
    err = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and "training diverged at step" in err, err[-3000:]
    assert _no_forgetless_traceback(proc.stderr)
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["diverged"]
    assert summary["status"] == "diverged" and not (run_dir / "final").exists()
    # one metrics.jsonl writer: every step once, the last the diverged one, before the 10th
    steps = list(_losses(run_dir))
    assert steps == list(range(1, ev["step"] + 1)) and ev["step"] < 10, (steps, ev)
    # both ranks stopped there: each printed its error with the same step, none hung until the timeout
    assert err.count(f"training diverged at step {ev['step']}") == 2, err[-3000:]
    complete = sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("*/" + COMPLETE_MARKER))
    assert ev["last_good_checkpoint"] is None or all(st < ev["step"] - 1 for st in complete)
    assert not lock_path(run_dir).exists()


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_accelerate_launch_runs_lora_with_kl_data_parallel(tiny_model, toy_data, tmp_path):
    """`accelerate launch -m forgetless train` (2 CPU processes): PEFT under DDP, and KL to the base through
    the adapters switched off inside the DDP-wrapped model."""
    out = tmp_path / "run"
    spec = {
        "name": "acc", "model": str(tiny_model),
        "data": {"train": str(toy_data["chat"]), "validation": str(toy_data["chat_val"]), "format": "chat",
                 "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "optim": {"max_steps": 4, "batch_size": 4, "warmup_steps": 0},
        "mitigations": [{"name": "kl", "weight": 1.0}],
        "train": {"output_dir": str(out), "save_steps": 2, "logging_steps": 1, "progress": False, "report": False,
                  "distributed": {"engine": "ddp", "backend": "gloo", "timeout_s": 300}},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "forgetless", "train", str(recipe), "--quiet"]
    env = {**_env(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["distributed"]["world_size"] == 2 and s["steps"] == 4 and s["output"]["kind"] == "peft"
    assert s["final_validation_loss"] < s["initial_validation_loss"]
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all((out / "checkpoints" / c / "FORGETLESS_COMPLETE").is_file() for c in ("checkpoint-2", "checkpoint-4"))


# ---------------------------------------------------------------- the recipe's train.distributed


def test_distributed_recipe_options_are_validated_with_the_key_named(tmp_path):
    from forgetless.errors import RecipeError
    from forgetless.recipe import recipe_from_dict

    def recipe(dist, **extra):
        return recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"}, "train": {"distributed": dist}, **extra})

    assert recipe("zero3").train.distributed.deepspeed.stage == 3
    assert recipe({"fsdp": {"reshard_after_forward": False}}).train.distributed.engine == "fsdp"
    bad = [
        ({"engine": "ddp", "fsdp": {}}, "train.distributed", "set engine: fsdp"),
        ({"deepspeed": {"stage": 2, "offload_params": True}}, "train.distributed.deepspeed",
         "offload_params needs stage: 3"),
        ({"fsdp": {"min_num_params": 10}}, "train.distributed.fsdp", "SIZE_BASED_WRAP"),
        ({"fsdp": {"version": 1}}, "train.distributed.fsdp.version", ""),
        ({"engine": "megatron"}, "train.distributed.engine", ""),
        ("zero1", "train.distributed", "zero2"),
        ({"deepspeed": {"config": str(tmp_path / "missing.json")}}, "train.distributed.deepspeed", "not found"),
        ({"accelerate_config": str(tmp_path / "nope.yaml")}, "train.distributed", "not found"),
    ]
    for dist, key, words in bad:
        with pytest.raises(RecipeError) as e:
            recipe(dist)
        assert key in str(e.value) and words in str(e.value), (dist, str(e.value))


def test_accelerate_config_file_selects_the_engine_and_its_options(tmp_path):
    from forgetless import distributed as dist
    from forgetless.errors import RecipeError
    from forgetless.recipe import recipe_from_dict

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "mixed_precision": "bf16",
        "num_processes": 8, "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                            "fsdp_reshard_after_forward": True, "fsdp_offload_params": False,
                                            "fsdp_state_dict_type": "FULL_STATE_DICT"}}))
    r = recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"}, "train": {"distributed": str(fsdp)}})
    assert dist.engine(r) == "fsdp"
    opts = dist.trainer_options(r)
    assert opts["fsdp"] is True and opts["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]

    zero = tmp_path / "zero.yaml"
    zero.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                    "mixed_precision": "bf16", "deepspeed_config": {
                                        "zero_stage": 3, "offload_optimizer_device": "cpu",
                                        "offload_param_device": "none"}}))
    r = recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"},
                          "train": {"distributed": {"accelerate_config": str(zero)}}})
    ds = dist.trainer_options(r)["deepspeed"]["zero_optimization"]
    assert ds["stage"] == 3 and ds["offload_optimizer"]["device"] == "cpu" and "offload_param" not in ds

    # forgetless checkpoints sharded and saves the final model whole, whichever the file names
    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(fsdp.read_text().replace("FULL_STATE_DICT", "SHARDED_STATE_DICT"))
    r = recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"}, "train": {"distributed": str(sharded)}})
    assert dist.trainer_options(r)["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    local = tmp_path / "local.yaml"
    local.write_text(fsdp.read_text().replace("FULL_STATE_DICT", "LOCAL_STATE_DICT"))
    with pytest.raises(RecipeError, match="train.distributed.*LOCAL_STATE_DICT"):
        recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"}, "train": {"distributed": str(local)}})
    with pytest.raises(RecipeError, match="accelerate_config decides"):
        recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"},
                          "train": {"distributed": {"accelerate_config": str(fsdp), "engine": "ddp"}}})


def test_fsdp_gpu_recipe_is_valid_and_maps_to_the_trainers_own_options(tmp_path):
    from transformers import TrainingArguments

    from forgetless import distributed as dist
    from forgetless.recipe import load_recipe

    r = load_recipe(REPO / "examples" / "fsdp-full-7b.yaml")
    assert dist.check_recipe(r) == "fsdp"
    opts = dist.trainer_options(r)
    # transformers accepts them (the FSDP plugin itself is built on GPUs, by the Trainer)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **opts)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"  # checkpoints; the final model whole


def test_sharded_engines_refuse_what_they_cannot_run_naming_the_key():
    from forgetless import distributed as dist
    from forgetless.errors import RecipeError
    from forgetless.recipe import recipe_from_dict

    def check(**over):
        spec = {"model": "m", "data": {"train": "t.jsonl"}, "train": {"distributed": "fsdp", "device": "cuda"}}
        for k, v in over.items():
            spec[k] = v
        return dist.check_recipe(recipe_from_dict(spec))

    assert check(mitigations=[{"name": "freeze", "embeddings": True}]) == "fsdp"
    # every penalty, KL, replay and merging run sharded (tests/test_fsdp.py), on GPUs and on CPUs
    for m in ("l2sp", "ewc", "si", "kl", "replay"):
        spec = {"name": m, "data": {"train": "r.jsonl"}} if m == "replay" else {"name": m}
        assert check(mitigations=[spec]) == "fsdp"
        assert check(mitigations=[spec], train={"distributed": "fsdp", "device": "cpu"}) == "fsdp"
    assert check(method="lora", train={"distributed": "fsdp", "merge": True}) == "fsdp"
    assert check(monitor={"suite": "self"}, guard={"budget": 0.01}) == "fsdp"  # probes on every rank (test_fsdp.py)
    assert check(train={"distributed": "zero3", "device": "cpu"}) == "deepspeed"  # its CPU accelerator (test_deepspeed)
    cases = [
        ({"mitigations": [{"name": "olora"}], "method": "lora"}, "mitigations.olora"),
        ({"mitigations": [{"name": "ewc"}], "train": {"distributed": "zero2", "device": "cuda"}}, "mitigations.ewc"),
        ({"mitigations": [{"name": "kl"}], "train": {"distributed": "zero3", "device": "cuda"}}, "mitigations.kl"),
        ({"guard": {"budget": 0.01}, "train": {"distributed": "zero3", "device": "cuda"}}, "guard"),
        ({"method": "qlora"}, "method.name"),
        ({"method": {"name": "lora", "init": "pissa"}}, "method.init: pissa"),
    ]
    assert check(method={"name": "lora", "init": "gaussian"}) == "fsdp"
    assert check(method={"name": "lora", "init": "eva"}) == "fsdp"  # calibrated alike in every process (test_fsdp.py)
    for over, words in cases:
        with pytest.raises(RecipeError, match=words.replace(".", r"\.")):
            check(**over)
    # DDP runs every mitigation, the monitor and the guard
    assert dist.check_recipe(recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"},
                                               "train": {"distributed": "ddp"},
                                               "mitigations": [{"name": "ewc"}, {"name": "kl"}], "guard": {}})) == "ddp"


# ---------------------------------------------------------------- helpers, unit level (2 processes, gloo)


def _helpers_worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from forgetless import distributed as dist
    from forgetless.errors import DataError
    from forgetless.mitigations.ewc import fisher_diag

    res: dict = {"rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main()}
    res["bcast"] = dist.broadcast_object({"r": dist.rank()})
    res["shard"] = dist.shard(list(range(7)))

    def fail():
        raise DataError("mitigations.replay.data: empty")

    try:
        dist.on_main(fail)
    except DataError as e:  # the same type and message on every rank
        res["error"] = str(e)
    try:
        dist.check_same(f"value-{dist.rank()}", "the training data")
    except Exception as e:
        res["differs"] = str(e)
    # the Fisher of a toy quadratic model: each rank its share, all-reduced
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    xs = [torch.tensor([float(i), 1.0]) for i in range(5)]
    mine = dist.shard(list(range(5)))
    f = fisher_diag([w], [lambda x=xs[i]: (w * x).sum() ** 2 for i in mine], all_reduce=True)
    res["fisher"] = f[0].tolist()
    # EWC's own estimate on a small Llama, both label modes (data: shared out + all-reduced; sampled: rank 0 +
    # broadcast)
    model, examples = _small_lm()
    for labels in ("data", "sampled"):
        res[f"ewc_{labels}"] = _ewc_estimate(model, examples, labels)
    Path(out, f"{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def _small_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(7):
        ids = torch.randint(0, 40, (9,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return model, examples


def _ewc_estimate(model, examples, labels: str) -> list[float]:
    from types import SimpleNamespace

    from forgetless.mitigations.ewc import EWC, EWCConfig

    ewc = EWC(EWCConfig(labels=labels, samples=len(examples)))
    ewc.params = [p for p in model.parameters() if p.requires_grad]
    fisher = ewc._estimate(SimpleNamespace(model=model, bf16=False), examples)
    return torch.cat([f.flatten() for f in fisher]).tolist()


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_helpers_agree_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    from forgetless.mitigations.ewc import fisher_diag

    mp.spawn(_helpers_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["main"]) for r in res] == [(0, 2, True), (1, 2, False)]
    assert res[0]["bcast"] == res[1]["bcast"] == {"r": 0}
    assert res[0]["shard"] + res[1]["shard"] == [0, 2, 4, 6, 1, 3, 5]
    assert res[0]["error"] == res[1]["error"] == "mitigations.replay.data: empty"
    assert "the training data differs between processes" in res[0]["differs"] == res[1]["differs"]
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    xs = [torch.tensor([float(i), 1.0]) for i in range(5)]
    single = fisher_diag([w], [lambda x=x: (w * x).sum() ** 2 for x in xs])[0].tolist()
    assert res[0]["fisher"] == res[1]["fisher"] == pytest.approx(single, rel=1e-6)
    model, examples = _small_lm()
    for labels in ("data", "sampled"):
        alone = torch.tensor(_ewc_estimate(model, examples, labels))
        assert res[0][f"ewc_{labels}"] == res[1][f"ewc_{labels}"], labels
        got = torch.tensor(res[0][f"ewc_{labels}"])
        if labels == "sampled":  # one random stream, drawn by rank 0 as one process draws it: bitwise equal
            assert torch.equal(got, alone)
        else:
            assert (torch.allclose(got, alone, rtol=FISHER_RTOL, atol=1e-12)
                    and not torch.equal(got, torch.zeros_like(got)))
    # and in one process every helper is the identity / a no-op
    from forgetless import distributed as dist

    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.shard([1, 2])) == (0, 1, True, [1, 2])
    assert dist.broadcast_object(3) == 3 and dist.all_reduce_sum_([], 4) == 4 and dist.on_main(lambda: 5) == 5


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
