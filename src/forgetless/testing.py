"""Tiny models and toy tasks built locally in seconds: for tests and benches.

Nothing here downloads anything. The tiny model itself (forgetless.tiny, re-exported here) has a byte-level BPE
tokenizer trained on the toy corpus, with a ChatML chat template, so every data format (chat included) can be
exercised end to end. Above it: toy tasks, a model organism of forgetting, and a forked `forgetless` CLI for the
fault-injection tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .cli import main as cli_main
from .tiny import CHATML, SPECIALS, WORDS, build_tiny_llama, build_tokenizer, toy_corpus

__all__ = ["CHATML", "SPECIALS", "WORDS", "ForkedCli", "build_organism", "build_tiny_llama", "build_tokenizer",
           "copy_pc", "copy_task", "reverse_task", "task_loss", "toy_corpus", "write_jsonl"]


def copy_task(n: int = 64, seed: int = 0, fmt: str = "instruction") -> list[dict[str, Any]]:
    """A learnable toy task: repeat the given words. Records in the requested data format."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        if fmt == "instruction":
            out.append({"instruction": "copy:", "input": words, "output": words})
        elif fmt == "prompt_completion":
            out.append({"prompt": f"copy: {words}\n", "completion": words})
        elif fmt == "chat":
            out.append({"messages": [{"role": "user", "content": f"copy: {words}"},
                                     {"role": "assistant", "content": words}]})
        elif fmt == "text":
            out.append({"text": f"copy: {words} => {words}"})
        else:
            raise ValueError(fmt)
    return out


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- a model organism of forgetting


def reverse_task(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Task B of the organism: reverse the given words (a different prompt, so it need not conflict with A)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        out.append({"prompt": f"rev: {' '.join(words)}\n", "completion": " ".join(reversed(words))})
    return out


def copy_pc(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    return copy_task(n, seed, fmt="prompt_completion")


def task_loss(model: Any, tokenizer: Any, path: str | Path, fmt: str = "prompt_completion", batch: int = 32) -> float:
    """Token-weighted cross-entropy on the completions of a data file (what 'knowing a task' means here)."""
    import torch

    from .config import DataConfig
    from .data import build_examples, read_file

    cfg = DataConfig(train=str(path), format=fmt, chat_template=None if fmt == "chat" else False, max_length=128)
    examples, _ = build_examples(read_file(path), cfg, tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(examples), batch):
            chunk = examples[s : s + batch]
            n = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), n), -100)
            attn = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
                attn[i, : len(e["input_ids"])] = 1
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            tgt = labels[:, 1:]
            mask = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum").item()
            count += int(mask.sum())
    return total / count


def build_organism(out_dir: str | Path, steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """A tiny Llama that has really learned task A (copy), plus task B (reverse) data to fine-tune it on.

    Returns paths: model (the A-trained model), run (its run directory, with si_state for SI), a_train,
    a_val, b_train, b_val."""
    from .recipe import recipe_from_dict
    from .train import train

    out_dir = Path(out_dir)
    raw = build_tiny_llama(out_dir / "init", seed=seed)
    paths = {
        "a_train": write_jsonl(out_dir / "a_train.jsonl", copy_pc(256, seed=1)),
        "a_val": write_jsonl(out_dir / "a_val.jsonl", copy_pc(64, seed=2)),
        "b_train": write_jsonl(out_dir / "b_train.jsonl", reverse_task(256, seed=3)),
        "b_val": write_jsonl(out_dir / "b_val.jsonl", reverse_task(64, seed=4)),
    }
    recipe = recipe_from_dict({
        "name": "organism-a",
        "model": str(raw),
        "data": {"train": str(paths["a_train"]), "format": "prompt_completion", "chat_template": False,
                 "max_length": 64},
        "method": "full",
        "optim": {"lr": 3e-3, "max_steps": steps, "batch_size": 16, "warmup_steps": 10, "schedule": "cosine"},
        "train": {"output_dir": str(out_dir / "run-a"), "save_steps": None, "progress": False, "seed": seed,
                  "logging_steps": 50, "bf16": False},  # fp32 pinned: the organism is the same on every CPU
        "mitigations": [{"name": "si"}],  # records the importance of A's weights for the SI test
    })
    train(recipe, overwrite=True, quiet=True)
    return {**paths, "model": out_dir / "run-a" / "final", "run": out_dir / "run-a"}


class ForkedCli:
    """Runs `forgetless ARGS` in processes forked from a server that imported forgetless once (multiprocessing's
    forkserver): each run is a process of its own, which a fault can SIGKILL, without the ~10 s import of
    torch, transformers and peft a fresh `python -m forgetless` pays. For the fault-injection tests."""

    def __init__(self) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["forgetless.cli", "forgetless.train.run"])

    def run(self, *args: str, env: dict[str, str] | None = None, out: str | Path,
            timeout: float = 300) -> tuple[int, str]:
        """(exit code, stdout and stderr); the exit code is -9 for a process killed with SIGKILL."""
        import os

        p = self.ctx.Process(target=_cli_child, args=(list(args), dict(os.environ if env is None else env), str(out)))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise TimeoutError(f"forgetless {' '.join(args)} ran over {timeout} s")
        return p.exitcode, Path(out).read_text(errors="replace")


def _cli_child(argv: list[str], env: dict[str, str], out: str) -> None:
    import os
    import sys

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["forgetless-forked", *argv]  # not "forgetless": no re-exec under another allocator
    cli_main()
