"""`forgetless demo`: the main job end to end on the embedded default, with no ../shared and no hub.

It pulls smollm2-135m-instruct through the offline pack, builds a small knowledge-injection task of its
own (capitals of invented countries, which the base model cannot know), and runs a sweep of three recipes
(full fine-tuning at a high learning rate, LoRA, and the same full fine-tuning with self-replay and KL):
what each learned on held-out questions against what it lost (the `self` retention suite, plus the
`general` suite at a reduced size when its data files are found), with paired confidence intervals, a
recommended recipe within a 5% budget, and report.html. `--tiny` runs the same code path on a tiny
locally built model in seconds (used by the test suite).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

from .errors import ForgetlessError
from .models import resolve_model
from .retention.tasks import resolve_data_root
from .sweep import SweepConfig, Variant, run_sweep
from .tiny import build_tiny_llama

SYLLABLES = ["zor", "va", "nia", "quel", "port", "tam", "bri", "ka", "lun", "dor", "mes", "ti", "ra", "sel", "gon",
             "fi"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def capitals_task(n: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    """Chat examples: questions about the capitals of invented countries, in a few phrasings."""
    rng = random.Random(seed)
    seen: set[str] = set()
    facts: list[tuple[str, str]] = []
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


def task_suite_yaml(heldout: Path) -> str:
    """The demo's target task: held-out capitals, scored by answer likelihood (first: the sweep's task gain)
    and by whether greedy answers contain the right capital."""
    return yaml.safe_dump({
        "name": "capitals",
        "description": "capitals of invented countries, held out from training",
        "tasks": [
            {"name": "capitals_ce", "kind": "reference_likelihood", "data": {"path": str(heldout.resolve())},
             "prompt": "{{question}}", "reference": "{{answer}}", "chat": "auto", "sample": "first"},
            {"name": "capitals_answer", "kind": "generate", "data": {"path": str(heldout.resolve())},
             "prompt": "{{question}}", "answers": "capital", "scorer": "qa", "main_metric": "contains", "chat": "auto",
             "max_new_tokens": 24, "sample": "first"},
        ],
    }, sort_keys=False)


def demo_sweep(model: str, train_file: Path, val_file: Path, task_suite: Path, out_dir: Path, tiny: bool,
               general: bool) -> SweepConfig:
    """Three recipes: full fine-tuning at a high learning rate (the plain recipe), LoRA, and the same full
    fine-tuning with forgetless's self-replay (a quarter of each batch is the base model's own answers to
    instructions it invented, generated once before training) and KL to the base model on those answers."""
    steps = 20 if tiny else 32  # 32 x 8 = 2 epochs of the 128 training examples (the time: README, "The demo")
    lr_full, lr_lora = (3e-3, 1e-2) if tiny else (1e-4, 5e-4)
    budget = 0.05
    base = {
        "model": model,
        "data": {"train": str(train_file), "validation": str(val_file), "format": "chat", "max_length": 128},
        "optim": {"max_steps": steps, "batch_size": 8, "warmup_ratio": 0.05, "schedule": "cosine", "lr": lr_full},
        "train": {"save_steps": None, "logging_steps": 5, "seed": 0},
    }
    # (--tiny: a random tiny model writes empty answers that self-replay rightly drops, so KL alone there)
    defended = {"mitigations": [{"name": "kl", "weight": 1.0}] if tiny else [
        {"name": "self_replay", "n": 64, "ratio": 0.25, "max_new_tokens": 64},
        {"name": "kl", "weight": 1.0, "on": "replay"},
    ]}
    return SweepConfig(
        name="demo", base=base, budget=budget, task_suite=str(task_suite),
        retention_suite="general" if general else "self",
        limit=8 if tiny else 40, output_dir=str(out_dir),
        runs=[
            Variant(name="full-high-lr", set={"method": "full"}),
            Variant(name="lora", set={"method": {"name": "lora", "r": 16}, "optim.lr": lr_lora}),
            Variant(name="full-high-lr+self-replay+kl", set=defended),
        ],
    )


def run_demo(out_dir: str | Path = "runs/demo", tiny: bool = False, overwrite: bool = False,
             quiet: bool = False) -> dict:
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ForgetlessError(f"{out_dir} exists; pass --overwrite or choose another --out")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if tiny:
        model = str(build_tiny_llama(out_dir / "tiny-model"))
    else:
        console.print("[bold]1/3[/bold] model: smollm2-135m-instruct (offline pack; pulled once into the cache)")
        model = resolve_model("smollm2-135m-instruct").path
    data = capitals_task(64 if tiny else 160)
    n_val = len(data) // 5
    files = {k: out_dir / f"capitals_{k}.jsonl" for k in ("train", "val", "heldout")}
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in data[n_val:]))
    files["val"].write_text("".join(json.dumps(r) + "\n" for r in data[:n_val]))
    files["heldout"].write_text("".join(json.dumps(_qa(r)) + "\n" for r in data[:n_val]))
    suite = out_dir / "capitals_suite.yaml"
    suite.write_text(task_suite_yaml(files["heldout"]))
    root = resolve_data_root(None)
    general = not tiny and root is not None and (root / "commonsense_mc" / "arc_easy_test.jsonl").is_file()
    console.print(f"[bold]2/3[/bold] task: capitals of {len(data)} invented countries ({len(data) - n_val} train / "
                  f"{n_val} held out); retention suite: "
                  f"{'general (data found in ' + str(root) + ')' if general else 'self (no data files needed)'}")
    cfg = demo_sweep(model, files["train"], files["val"], suite, out_dir / "sweep", tiny, general)
    console.print("[bold]3/3[/bold] sweep: full FT at a high learning rate, LoRA, and full FT with self-replay + KL to "
                  "the base")
    return run_sweep(cfg, folder=out_dir, quiet=quiet)


def headline(state: dict[str, Any], plain: str = "full-high-lr") -> str:
    """The demo's one-line verdict: the forgetless recipe (not the plain one) with the largest task gain whose
    retention drop is within the budget, as a share of the plain recipe's gain, both with their intervals;
    'within the budget' is said with 95% confidence only when the interval's lower end is inside it too."""
    runs = {r["run"]: r for r in state["runs"]}
    base = runs.get(plain)
    budget = state.get("budget")
    if base is None or budget is None:
        return "no plain run or no budget to compare with"
    p_gain, p_ret = base["task"]["gain"], base["retention"]
    inside = [r for r in state["runs"] if r["run"] != plain and -r["retention"]["change"] <= budget]
    plain_txt = (f"plain {plain}: gain {p_gain:+.2f} [{base['task']['ci'][0]:+.2f}, {base['task']['ci'][1]:+.2f}] "
                 f"at {100 * p_ret['change']:+.1f}% [{100 * p_ret['ci'][0]:+.1f}, {100 * p_ret['ci'][1]:+.1f}]")
    if not inside:
        return f"no forgetless recipe stayed within the {100 * budget:.3g}% budget ({plain_txt})"
    best = max(inside, key=lambda r: r["task"]["gain"])
    g, ret = best["task"], best["retention"]
    share = g["gain"] / p_gain if p_gain > 0 else float("nan")
    sure = ret["ci"][0] >= -budget
    return (f"{best['run']} kept {100 * share:.0f}% of the plain recipe's task gain ({g['gain']:+.2f} "
            f"[{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}]) at {100 * ret['change']:+.1f}% retention "
            f"[{100 * ret['ci'][0]:+.1f}, {100 * ret['ci'][1]:+.1f}], "
            + (f"within the {100 * budget:.3g}% budget with 95% confidence" if sure else
               f"within the {100 * budget:.3g}% budget (point estimate; its interval reaches past it)")
            + f"; {plain_txt}")


def _qa(record: dict[str, Any]) -> dict[str, Any]:
    question, answer = (m["content"] for m in record["messages"])
    return {"question": question, "answer": answer, "capital": answer.rsplit(" is ", 1)[1].rstrip(".")}
