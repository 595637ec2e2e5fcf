"""Golden runs for refactors that must not change behaviour (issue 22): train the tiny Llama at pinned fp32 with
every method, every mitigation, the guard and a continual sequence, and print one JSON line per run: a hash of
the final weights (or adapter) and the run's logged losses. Run it on two checkouts and compare:

    PYTHONPATH=/path/to/old/src python tools/golden_runs.py /tmp/golden-old > old.json
    python tools/golden_runs.py /tmp/golden-new > new.json && diff old.json new.json

Uses the sequence file's mapping form of carry: (older versions read only that form).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from safetensors.torch import load_file  # noqa: E402

from forgetless.testing import build_tiny_llama, copy_task, reverse_task, write_jsonl  # noqa: E402


def weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        state = load_file(str(f))
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [round(x["loss"], 6) for x in lines if "loss" in x and "step" in x]


def main() -> None:
    from forgetless.continual import ContinualConfig, run_continual
    from forgetless.recipe import recipe_from_dict
    from forgetless.train import train

    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    os.environ["FORGETLESS_HOME"] = str(root / "home")
    model = build_tiny_llama(root / "model")
    data = {"train": write_jsonl(root / "train.jsonl", copy_task(64, seed=0, fmt="chat")),
            "val": write_jsonl(root / "val.jsonl", copy_task(16, seed=1, fmt="chat")),
            "rev": write_jsonl(root / "rev.jsonl", reverse_task(48, seed=2)),
            "rev2": write_jsonl(root / "rev2.jsonl", reverse_task(48, seed=4)),
            "rev_val": write_jsonl(root / "rev_val.jsonl", reverse_task(12, seed=5)),
            "general": write_jsonl(root / "general.jsonl", copy_task(32, seed=3, fmt="instruction"))}
    general = {"train": str(data["general"]), "format": "instruction"}

    def recipe(name: str, method: dict, mitigations: list, **extra) -> dict:
        return {"name": name, "model": str(model),
                "data": {"train": str(data["train"]), "validation": str(data["val"]), "format": "chat",
                         "max_length": 64},
                "method": method, "mitigations": mitigations,
                "optim": {"lr": 3e-3, "max_steps": 12, "batch_size": 8, "warmup_steps": 0, "schedule": "constant",
                          **extra.pop("optim", {})},
                "train": {"output_dir": str(root / "runs" / name), "save_steps": None, "logging_steps": 2,
                          "progress": False, "seed": 0, "bf16": False}, **extra}

    runs = {
        "full": recipe("full", {"name": "full"}, []),
        "lora": recipe("lora", {"name": "lora", "r": 4}, []),
        "dora": recipe("dora", {"name": "dora", "r": 4}, []),
        "ia3": recipe("ia3", {"name": "ia3"}, []),
        "prefix": recipe("prefix", {"name": "prefix", "num_virtual_tokens": 4}, []),
        "prompt": recipe("prompt", {"name": "prompt", "num_virtual_tokens": 4}, []),
        "adapter": recipe("adapter", {"name": "adapter", "bottleneck": 8, "activation": "identity"}, [],
                          train={"output_dir": str(root / "runs" / "adapter"), "save_steps": None,
                                 "logging_steps": 2, "progress": False, "seed": 0, "bf16": False, "merge": True}),
        "freeze-method": recipe("freeze-method", {"name": "freeze", "top_k_blocks": 1}, []),
        "l2sp": recipe("l2sp", {"name": "full"}, [{"name": "l2sp", "weight": 0.5}]),
        "ewc": recipe("ewc", {"name": "full"}, [{"name": "ewc", "weight": 100, "samples": 16, "reference": "self"}]),
        "si": recipe("si", {"name": "full"}, [{"name": "si"}]),
        "kl": recipe("kl", {"name": "full"}, [{"name": "kl", "weight": 0.5}]),
        "kl-lora": recipe("kl-lora", {"name": "lora", "r": 4}, [{"name": "kl", "weight": 0.5}]),
        "replay-kl": recipe("replay-kl", {"name": "full"}, [{"name": "replay", "data": general, "ratio": 0.25},
                                                           {"name": "kl", "on": "replay"}]),
        "freeze": recipe("freeze", {"name": "full"}, [{"name": "freeze", "embeddings": True}]),
        "guard": recipe("guard", {"name": "full"}, [{"name": "replay", "data": general, "ratio": 0.1}],
                        monitor={"suite": "self", "limit": 8, "every": 4, "max_new_tokens": 8},
                        guard={"budget": 0.0001, "require_significant": False,
                               "actions": ["more_replay", "rollback", "lower_lr"]}),
    }
    for name, spec in runs.items():
        res = train(recipe_from_dict(spec), quiet=True)
        run = Path(res.run_dir)
        print(json.dumps({"run": name, "final": weights_hash(run / "final"),
                          "merged": weights_hash(run / "merged") if (run / "merged").is_dir() else None,
                          "losses": losses(run)}), flush=True)
    seq = {"name": "golden", "base": recipe("seq", {"name": "full"}, []), "output_dir": str(root / "continual"),
           "tasks": [{"name": "copy", "data": {"train": str(data["train"]), "validation": str(data["val"])}},
                     {"name": "rev", "data": {"train": str(data["rev"]), "validation": str(data["rev_val"]),
                                              "format": "prompt_completion"}},
                     {"name": "rev2", "data": {"train": str(data["rev2"]), "validation": str(data["rev_val"]),
                                               "format": "prompt_completion"}}],
           "carry": {"ewc": {"weight": 50, "samples": 16}, "si": {}, "replay": {"per_task": 8}, "kl": {"weight": 0.2}},
           "retention_suite": None, "limit": 8}
    seq["base"].pop("name")
    seq["base"]["train"].pop("output_dir")
    run_continual(ContinualConfig.model_validate(seq), quiet=True)
    for step in sorted((root / "continual" / "steps").iterdir()):
        print(json.dumps({"run": f"continual/{step.name}", "final": weights_hash(step / "final"),
                          "losses": losses(step)}), flush=True)
    print(json.dumps({"run": "continual.json", "matrix": json.loads(
        (root / "continual" / "continual.json").read_text())["matrix"]}), flush=True)


if __name__ == "__main__":
    main()
