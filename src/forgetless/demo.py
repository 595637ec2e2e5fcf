"""`forgetless demo`: the main job end to end on the embedded default, with no ../shared and no hub.

It pulls smollm2-135m-instruct through the offline pack, builds a small knowledge-injection task of its
own (capitals of invented countries, which the base model cannot know), fine-tunes it with three recipes
(full fine-tuning at a high learning rate, LoRA, and full fine-tuning with KL to the base model) and
prints what each learned on held-out questions against how far it drifted from the base model's own
behaviour (the `self` retention suite, with paired confidence intervals). `--tiny` runs the same code path on a tiny
locally built model in seconds (used by the test suite).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .io import atomic_write_json
from .recipe import recipe_from_dict

SYLLABLES = ["zor", "va", "nia", "quel", "port", "tam", "bri", "ka", "lun", "dor", "mes", "ti", "ra", "sel", "gon", "fi"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def capitals_task(n: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    """Chat examples: questions about the capitals of invented countries, in a few phrasings."""
    rng = random.Random(seed)
    seen: set[str] = set()
    facts = []
    while len(facts) < n:
        country = _name(rng, 3)
        if country in seen:
            continue
        seen.add(country)
        facts.append((country, _name(rng, 2) + rng.choice(["", " City", "port", "burg"])))
    phrasings = ["What is the capital of {c}?", "Name the capital city of {c}.", "{c}'s capital is which city?"]
    out = []
    for i, (country, capital) in enumerate(facts):
        q = phrasings[i % len(phrasings)].format(c=country)
        out.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": f"The capital of {country} is {capital}."}]})
    return out


def demo_recipes(model: str, train_file: Path, val_file: Path, out_dir: Path, tiny: bool) -> list[dict[str, Any]]:
    steps = 20 if tiny else 60
    common = {
        "model": model,
        "data": {"train": str(train_file), "validation": str(val_file), "format": "chat", "max_length": 128},
        "optim": {"max_steps": steps, "batch_size": 8, "warmup_ratio": 0.05, "schedule": "cosine"},
        "train": {"save_steps": None, "logging_steps": 5, "seed": 0},
    }
    variants = [
        ("full-high-lr", {"name": "full"}, 1e-4 if not tiny else 3e-3, []),
        ("lora", {"name": "lora", "r": 16}, 5e-4 if not tiny else 1e-2, []),
        ("full-high-lr+kl", {"name": "full"}, 1e-4 if not tiny else 3e-3, [{"name": "kl", "weight": 1.0}]),
    ]
    out = []
    for name, method, lr, mitigations in variants:
        r = json.loads(json.dumps(common))
        r.update({"name": name, "method": method, "mitigations": mitigations})
        r["optim"]["lr"] = lr
        r["train"]["output_dir"] = str(out_dir / name)
        out.append(r)
    return out


def run_demo(out_dir: str | Path = "runs/demo", tiny: bool = False, overwrite: bool = True, quiet: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    from .train import train

    console = Console(stderr=True, quiet=quiet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tiny:
        from .testing import build_tiny_llama

        model = str(build_tiny_llama(out_dir / "tiny-model"))
    else:
        from .models import resolve_model

        console.print("[bold]1/3[/bold] model: smollm2-135m-instruct (offline pack; pulled once into the cache)")
        model = resolve_model("smollm2-135m-instruct").path
    data = capitals_task(64 if tiny else 160)
    n_val = len(data) // 5
    train_file, val_file = out_dir / "capitals_train.jsonl", out_dir / "capitals_val.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in data[n_val:]))
    val_file.write_text("".join(json.dumps(r) + "\n" for r in data[:n_val]))
    console.print(f"[bold]2/3[/bold] task: capitals of {len(data)} invented countries ({len(data) - n_val} train / {n_val} held out)")
    from .retention.api import eval_model
    from .retention.suite import load_suite

    probe = load_suite("self")
    probe = probe.model_copy(update={"tasks": [probe.tasks[0].model_copy(update={
        "limit": 8 if tiny else 40, "max_new_tokens": 16 if tiny else 64})]})
    rows = []
    for spec in demo_recipes(model, train_file, val_file, out_dir, tiny):
        mits = ", ".join(m["name"] for m in spec["mitigations"]) or "none"
        console.print(f"[bold]3/3[/bold] recipe {spec['name']}: method {spec['method']['name']}, lr {spec['optim']['lr']}, mitigations {mits}")
        s = train(recipe_from_dict(spec), overwrite=overwrite, quiet=quiet).summary
        ev = eval_model(spec["train"]["output_dir"], probe, progress=not quiet)["comparison"]
        ref = ev["tasks"]["self_reference"]
        rows.append({
            "retention_score": ev["retention_score"],
            "retention_ci": ev["retention_ci"],
            "self_reference_ce_change": ref["delta"],
            "self_reference_ce_change_ci": ref["ci"],
            "significant_drop": ref["significant_drop"],
            "recipe": spec["name"],
            "method": s["method"],
            "val_loss_before": s["initial_validation_loss"],
            "val_loss_after": s["final_validation_loss"],
            "trainable_share": s["trainable_share"],
            "wall_time_s": s["wall_time_s"],
            "tokens_per_s": s["tokens_per_s"],
        })
    result = {"model": model, "tiny": tiny, "runs": rows}
    atomic_write_json(out_dir / "demo.json", result)
    t = Table(title="forgetless demo: task gain (held-out loss) vs drift from the base model (self-reference)")
    for col in ("recipe", "method", "task val loss", "self-ref CE change [95% CI]", "retention", "trainable", "wall s"):
        t.add_column(col)
    for r in rows:
        lo, hi = r["self_reference_ce_change_ci"]
        flag = " [red]significant[/red]" if r["significant_drop"] else ""
        t.add_row(r["recipe"], r["method"], f"{r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f}",
                  f"{r['self_reference_ce_change']:+.3f} [{lo:+.3f}, {hi:+.3f}]{flag}", f"{r['retention_score']:.3f}",
                  f"{100 * r['trainable_share']:.2f}%", f"{r['wall_time_s']:.0f}")
    if not quiet:
        import sys

        Console(width=None if sys.stdout.isatty() else 150).print(t)
        console.print(f"results: {out_dir / 'demo.json'}")
    return result
