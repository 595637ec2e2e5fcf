"""FSDP2 on CPU: two processes over gloo (torchrun), each holding half of every parameter, against one process
with the same global batch. Every mitigation that touches parameters (l2sp, ewc, si, kl on full fine-tuning and
on LoRA) and replay train sharded and match one process; the checkpoints are sharded and a run killed mid-way
resumes to bit-identical weights; the final model is one HF model (or adapter, and merged) that loads in one
process with the same logits; the retention monitor and guard probe, roll back and select on the sharded model.

freeze runs sharded as in one process too, and self_replay on the model organism (a tiny Llama that learned a
task, so it has answers to generate: a random one generates nothing).

This file is also the worker torchrun starts (`python tests/test_fsdp.py worker RECIPE...`): it trains the
recipes one after another in the same process group, so one launch covers them all.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slow  # torchrun launches: minutes; CI runs them (make test-slow)

# Tolerances (the issue's: 1e-5 relative on the loss curve and on the final weights), measured on these recipes
# (fp32, 6 steps at lr 3e-3; gloo on this 2-core CPU): the loss curves differ by at most 2.5e-7 relative, the
# final weights by at most 7.9e-6 relative (Frobenius norm of the difference over the tensor's, worst tensor;
# 1.1e-6 over all weights), the Fisher and SI importance by at most 3e-7 relative. A sharded penalty that lost
# its anchor slices, a KL averaged per rank (before its counts were all-reduced: 3e-4 on the weights) or a
# gradient missing from the reduce-scatter shows at once.
RTOL = 1e-5
STEPS = 6


def _worker(recipes: list[str]) -> None:
    from forgetless.recipe import load_recipe
    from forgetless.train import train

    for r in recipes:
        train(load_recipe(r), quiet=True, overwrite=True)


# ---------------------------------------------------------------- helpers


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "FORGETLESS_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src"), **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], home: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, env=_env(home, **env), capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(_rel(a[k], b[k]) for k in b)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _recipe(name: str, model: Path, data: dict[str, Path], out: Path, sharded: bool, mitigations: list,
            method: dict | None = None, **train) -> dict:
    batch = 4 if sharded else 8  # per process: the same global batch of 8
    r = {
        "name": name, "model": str(model),
        "data": {"train": str(data["chat"]), "validation": str(data["chat_val"]), "format": "chat", "max_length": 64},
        "method": method or {"name": "full"},
        "optim": {"lr": 3e-3, "max_steps": STEPS, "batch_size": batch, "eval_batch_size": batch, "warmup_steps": 0,
                  "schedule": "constant"},
        "train": {"output_dir": str(out / name), "save_steps": 3, "logging_steps": 1, "progress": False, "seed": 0,
                  "bf16": False, "report": False, **train},
        "mitigations": mitigations,
    }
    if sharded:
        r["train"]["distributed"] = "fsdp"
    return r


def _assert_as_one_process(a: Path, b: Path, weights: str = "model.safetensors") -> None:
    """Run `a` (sharded) against `b` (one process): the same steps, losses and final weights within RTOL."""
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert max(abs(la[s] - lb[s]) / abs(lb[s]) for s in lb) < RTOL, (la, lb)
    assert _worst(_load(a / "final" / weights), _load(b / "final" / weights)) < RTOL


def _train_both(specs: dict[str, dict], tmp_path: Path) -> tuple[Path, Path]:
    """specs["fsdp"] under torchrun, specs["one"] in this process; both agree; returns their run directories."""
    import forgetless.train as ft
    from forgetless.recipe import recipe_from_dict

    recipe = tmp_path / f"{specs['fsdp']['name']}.yaml"
    recipe.write_text(yaml.safe_dump(specs["fsdp"]))
    _torchrun([str(Path(__file__)), "worker", str(recipe)], tmp_path / "home2")
    with mock.patch.dict(os.environ, {"FORGETLESS_HOME": str(tmp_path / "home1")}):
        ft.train(recipe_from_dict(specs["one"]), quiet=True)
    a, b = (Path(specs[w]["train"]["output_dir"]) for w in ("fsdp", "one"))
    _assert_as_one_process(a, b)
    return a, b


# ---------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(tiny_model, toy_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    instr = {"train": str(toy_data["instruction"]), "format": "instruction"}
    # SI regularised by an earlier run's importance (saved by one process), so its penalty acts here
    import forgetless.train as ft
    from forgetless.recipe import recipe_from_dict

    with mock.patch.dict(os.environ, {"FORGETLESS_HOME": str(base / "home1")}):
        ft.train(recipe_from_dict(_recipe("si-first", tiny_model, toy_data, base / "one", False,
                                          [{"name": "si", "weight": 1.0}])), quiet=True)
    si_prev = str(base / "one" / "si-first")
    kinds: dict[str, tuple[list, dict | None, dict]] = {
        "plain": ([], None, {}),
        "l2sp": ([{"name": "l2sp", "weight": 1.0}], None, {}),
        "ewc": ([{"name": "ewc", "weight": 100.0, "samples": 8, "labels": "data", "reference": instr}], None, {}),
        "si": ([{"name": "si", "weight": 10.0, "previous": si_prev}], None, {}),
        "kl": ([{"name": "kl", "weight": 1.0}], None, {}),
        "replay": ([{"name": "replay", "ratio": 0.2, "data": instr}], None, {}),
        "freeze": ([{"name": "freeze", "embeddings": True, "bottom_k_blocks": 1}], None, {}),
        # LoRA (dropout off: each process would draw its own masks), KL through the sharded model's disabled
        # adapters, merged at the end
        "lora-kl": ([{"name": "kl", "weight": 1.0}], {"name": "lora", "r": 4, "dropout": 0.0}, {"merge": True}),
        # EVA's data-driven init: every process calibrates on the same examples before sharding
        "lora-eva": ([], {"name": "lora", "r": 4, "dropout": 0.0, "init": "eva", "init_samples": 16}, {}),
    }
    files = []

    def add(kind: str, spec: dict, sharded: bool) -> None:
        """A sharded recipe is written for the one torchrun launch below; its one-process twin trains here."""
        if sharded:
            path = base / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(spec))
            files.append(str(path))
        else:
            with mock.patch.dict(os.environ, {"FORGETLESS_HOME": str(base / "home1")}):
                ft.train(recipe_from_dict(spec), quiet=True)

    # the retention monitor and guard (EWC + replay + a probe every 3 steps that breaches at once: lower_lr; and one
    # that rolls back, with its optimizer state, to the last state within budget and stops), as in the DDP test
    from test_distributed import _probe_suite
    from test_distributed import _recipe as guard_recipe

    probe = _probe_suite(base)
    for kind, guard in (("guard", {}), ("rollback", {"budget": 0.01, "actions": ["rollback", "stop"],
                                                      "select": "best_within_budget"})):
        for sharded, where in ((True, "fsdp"), (False, "one")):
            spec = guard_recipe(tiny_model, toy_data, base / where / kind, batch=4 if sharded else 8, probe=probe)
            spec["name"] = kind
            spec["guard"].update(guard)
            spec["monitor"]["every"] = 2 if kind == "rollback" else 3
            if sharded:
                spec["train"]["distributed"] = "fsdp"
            add(kind, spec, sharded)
    for kind, (mit, method, train) in kinds.items():
        for sharded, where in ((True, "fsdp"), (False, "one")):
            add(kind, _recipe(kind, tiny_model, toy_data, base / where, sharded, mit, method, **train), sharded)
    _torchrun([str(Path(__file__)), "worker", *files], base / "home2")
    return {"base": base, "kinds": list(kinds), "fsdp": base / "fsdp", "one": base / "one",
            "plain_yaml": next(f for f in files if f.endswith("plain.yaml"))}


@pytest.mark.parametrize("kind", ["plain", "l2sp", "ewc", "si", "kl", "replay", "freeze", "lora-kl", "lora-eva"])
def test_a_sharded_run_matches_one_process_with_the_same_global_batch(runs, kind):
    a, b = runs["fsdp"] / kind, runs["one"] / kind
    _assert_as_one_process(a, b, "adapter_model.safetensors" if kind.startswith("lora") else "model.safetensors")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["distributed"]["engine"] == "fsdp" and sa["distributed"]["world_size"] == 2
    assert sa["final_validation_loss"] == pytest.approx(sb["final_validation_loss"], rel=RTOL)
    assert not (a / "final" / "training_args.bin").exists()  # no pickle beside the model
    # checkpoints are sharded: each process wrote its part (torch.distributed.checkpoint)
    ckpt = a / "checkpoints" / "checkpoint-3"
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    if kind == "lora-kl":
        assert _worst(_load(a / "merged" / "model.safetensors"), _load(b / "merged" / "model.safetensors")) < RTOL


def test_sharded_penalties_keep_a_slice_of_their_state_and_save_it_whole(runs):
    """EWC's Fisher and SI's importance, gathered from the shards, equal one process's; the anchors a penalty keeps
    per process are half of one process's (each holds its slice), and the penalty acts (it moves the weights)."""
    fsdp, one = runs["fsdp"], runs["one"]
    for kind, state in (("ewc", "ewc_state.safetensors"), ("si", "si_state.safetensors")):
        sa, sb = _load(fsdp / kind / state), _load(one / kind / state)
        stored = "fisher." if kind == "ewc" else "importance."
        assert _worst({k: v for k, v in sa.items() if k.startswith(stored)},
                      {k: v for k, v in sb.items() if k.startswith(stored)}) < RTOL
    for kind in ("l2sp", "ewc"):
        ma, mb = (json.loads((d / kind / "summary.json").read_text())["mitigations"][0]["extra_memory_mb"]
                  for d in (fsdp, one))
        assert ma == pytest.approx(mb / 2, rel=0.05), (ma, mb)
        plain, regular = _load(one / "plain" / "final" / "model.safetensors"), _load(fsdp / kind / "final" /
                                                                                    "model.safetensors")
        assert _worst(regular, plain) > 1e-3  # the penalty changed the result (far beyond the tolerance)


def test_the_final_model_loads_in_one_process_with_the_same_logits(runs, tiny_model):
    from forgetless.train.model import load_model

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    for kind in ("plain", "lora-kl"):
        logits = []
        for where in ("fsdp", "one"):
            model, _ = load_model(runs[where] / kind)
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        assert _rel(logits[0], logits[1]) < RTOL
    # the files are those one process writes: the tied head is not saved twice
    assert sorted(_load(runs["fsdp"] / "plain" / "final" / "model.safetensors")) == sorted(
        _load(runs["one"] / "plain" / "final" / "model.safetensors"))


@pytest.mark.parametrize("kind", ["guard", "rollback"])
def test_the_monitor_and_guard_act_on_a_sharded_model_as_on_one_process(runs, kind):
    """Every process runs the probe (the sharded forward is a collective); rank 0's verdict is acted on by all at
    the same step: lower_lr; a rollback into every process's slices with their optimizer state; the selection of
    the state within budget. Probes, events, losses and the final weights as in one process."""
    a, b = runs["fsdp"] / kind, runs["one"] / kind
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    events = [[(x["step"], x["guard"], x.get("to_step")) for x in lines if "guard" in x] for lines in (la, lb)]
    assert events[0] == events[1] and events[0], events  # each logged once: rank 0 alone writes
    probes = [{x["step"]: x["fl_retention"] for x in lines if "fl_retention" in x} for lines in (la, lb)]
    assert sorted(probes[0]) == sorted(probes[1]) and len(probes[0]) >= 2
    assert all(abs(probes[0][s] - probes[1][s]) < RTOL for s in probes[1])
    losses = [{x["step"]: x["loss"] for x in lines if "loss" in x} for lines in (la, lb)]
    assert sorted(losses[0]) == sorted(losses[1])
    assert max(abs(losses[0][s] - losses[1][s]) / abs(losses[1][s]) for s in losses[1]) < RTOL
    assert _worst(_load(a / "final" / "model.safetensors"), _load(b / "final" / "model.safetensors")) < RTOL
    full = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    # the validation loss after the chosen state was restored: the restored slices, not stale gathered weights
    assert full[0]["final_validation_loss"] == pytest.approx(full[1]["final_validation_loss"], rel=RTOL)
    sa, sb = (x["guard"]["selection"] for x in full)
    assert sa["chosen_step"] == sb["chosen_step"]
    if kind == "rollback":
        assert ("rollback" in {e[1] for e in events[0]}) and sa["chosen_step"] < max(losses[0])


def kill_and_resume(recipe: Path, home: Path, point: str, from_ckpt: str) -> dict:
    """Train `recipe` under torchrun until FORGETLESS_FAULT=kill:`point` SIGKILLs both processes, then `--resume`
    it; the run must not have finished before, and must resume from `from_ckpt`. Returns its summary."""
    run_dir = Path(yaml.safe_load(recipe.read_text())["train"]["output_dir"])
    args = ["-m", "forgetless", "train", str(recipe), "--quiet"]
    proc = _torchrun([*args, "--overwrite"], home, check=False, FORGETLESS_FAULT=f"kill:{point}")
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists()
    assert from_ckpt in {p.name for p in (run_dir / "checkpoints").iterdir()}
    _torchrun([*args, "--resume"], home)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(from_ckpt)
    return summary


def test_a_sharded_run_killed_mid_way_resumes_to_bit_identical_weights(runs):
    base = runs["base"]
    spec = yaml.safe_load(Path(runs["plain_yaml"]).read_text())
    spec["name"], spec["train"]["output_dir"] = "killed", str(base / "killed")
    recipe = base / "killed.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    summary = kill_and_resume(recipe, base / "home3", "step@4", "checkpoint-3")
    assert summary["steps"] == STEPS
    assert sorted(p.name for p in (base / "killed" / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    a, b = _load(base / "killed" / "final" / "model.safetensors"), _load(runs["fsdp"] / "plain" / "final" /
                                                                          "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    la, lb = _losses(base / "killed"), _losses(runs["fsdp"] / "plain")
    assert la == lb


def test_ewc_kl_and_a_guard_sharded_resume_after_sigkill_to_the_uninterrupted_weights(runs, tiny_model, toy_data):
    """The issue's run: 2 processes, FSDP, EWC + KL + replay + a monitor and guard, killed after step 5 and resumed
    from its sharded checkpoint-4: the same weights, bit for bit, as the run that was not interrupted, saved as one
    model that loads in one process. (The guard's budget is not breached here: on resume the probe's reference is
    the resume point, as in one process, so a guard that acts would act on other numbers.)"""
    from test_distributed import _recipe as guard_recipe

    from forgetless.train.model import load_model

    base = runs["base"]
    paths = {}
    for name in ("whole", "killed"):
        spec = guard_recipe(tiny_model, toy_data, base / "combo" / name, batch=4, probe=Path(base / "probe.yaml"))
        spec["name"] = name
        spec["mitigations"].append({"name": "kl", "weight": 1.0})
        spec["guard"].update({"budget": 0.5})
        spec["train"].update({"distributed": "fsdp", "save_steps": 2})
        paths[name] = base / f"combo-{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    _torchrun(["-m", "forgetless", "train", str(paths["whole"]), "--quiet"], base / "home4")
    summary = kill_and_resume(paths["killed"], base / "home4", "step@5", "checkpoint-4")
    whole, killed = base / "combo" / "whole", base / "combo" / "killed"
    assert [m["name"] for m in summary["mitigations"]] == ["ewc", "replay", "kl"] and summary["guard"] is not None
    a, b = _load(killed / "final" / "model.safetensors"), _load(whole / "final" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    model, _ = load_model(killed)
    assert sum(p.numel() for p in model.parameters()) == summary["total_parameters"]


def test_self_replay_generates_before_sharding_and_trains_as_in_one_process(organism, tmp_path):
    """The organism (it learned task A) fine-tuned on task B with self_replay of its own answers to A's prompts:
    the pairs are generated before sharding (rank 0 first, the others read its cache), then mixed as replay."""
    data_a = {"train": str(organism["a_train"]), "format": "prompt_completion", "chat_template": False}
    specs = {}
    for where in ("fsdp", "one"):
        spec = _recipe("self-replay", organism["model"], {"chat": organism["b_train"], "chat_val": organism["b_val"]},
                       tmp_path / where, where == "fsdp",
                       [{"name": "self_replay", "source": "seeds", "seeds": data_a, "n": 32, "ratio": 0.2,
                         "max_new_tokens": 12, "min_answer_words": 1}])
        spec["data"] = {"train": str(organism["b_train"]), "validation": str(organism["b_val"]),
                        "format": "prompt_completion", "chat_template": False, "max_length": 64}
        specs[where] = spec
    a, b = _train_both(specs, tmp_path)
    sa, sb = (json.loads((d / "data_stats.json").read_text()) for d in (a, b))
    assert sa == sb  # the same generated pairs mixed in


def test_the_real_stories260k_trains_sharded_as_in_one_process(toy_data, tmp_path):
    """llama2.c's stories260K (5 layers; imported from ../shared) with EWC: FSDP in 2 processes vs one process."""
    from conftest import STORIES

    from forgetless.models.llama2c import import_llama2c

    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"../shared is absent ({STORIES} not found): the stories260K run is skipped")
    model = import_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.model", tmp_path / "stories260k")
    # plain text (its tokenizer has no chat template)
    text = {"train": str(toy_data["text"]), "validation": str(toy_data["text_val"]), "format": "text", "max_length": 64}
    mit = [{"name": "ewc", "weight": 100.0, "samples": 8, "labels": "data",
            "reference": {"train": str(toy_data["text_val"]), "format": "text"}}]
    specs = {where: {**_recipe("stories", model, toy_data, tmp_path / where, where == "fsdp", mit), "data": text}
             for where in ("fsdp", "one")}
    _train_both(specs, tmp_path)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker(sys.argv[2:])
