"""`forgetless eval` as a function: load a candidate (model, alias or run directory), score a suite,
compare with the baseline (the run's base model by default), and write a JSON report."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ForgetlessError
from ..fingerprint import fingerprint_path
from ..io import atomic_write_json, atomic_write_text
from ..methods.bottleneck import adapter_modules, merge_adapters
from ..models import resolve_model
from ..precision import Precision, config_widths, device_keyed
from ..precision import resolve as resolve_precision
from ..recipe import load_recipe
from ..train.model import load_model, pick_device
from .evaluate import SuiteResult, compare, evaluate, evaluate_cached, save_items
from .suite import Suite, load_suite
from .tasks import resolve_data_root


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "recipe.yaml").is_file() and (p / "final").is_dir()


def run_base_model(run_dir: Path) -> str:
    """The base model a run started from (its resolved path)."""
    s = run_dir / "summary.json"
    if s.is_file():
        return json.loads(s.read_text())["model"]["path"]

    m = load_recipe(run_dir / "recipe.yaml").model
    return resolve_model(m.name, revision=m.revision, allow_pickle=m.allow_pickle).path


def merge_for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA-type adapters into the weights in memory: unmerged adapters made evaluation 30-45% slower."""
    if hasattr(model, "peft_config"):
        cfg = next(iter(model.peft_config.values()))  # type: ignore[operator]  # a PeftModel
        if not getattr(cfg, "is_prompt_learning", False) and not getattr(model, "is_loaded_in_4bit", False):
            return model.merge_and_unload()  # type: ignore[operator]  # a PeftModel
        return model
    mods = adapter_modules(model)
    if mods and all(m.activation == "identity" for m in mods.values()):
        return merge_adapters(model)
    return model


def eval_device(setting: str = "auto") -> torch.device:
    """Where evaluation runs: `auto` is the GPU when CUDA has one, else the CPU; `cpu`, `cuda` or `mps` as asked
    (MPS only when asked: no Apple machine was at hand to test it). Models load there in fp32; `precision` decides
    the autocast."""
    if setting not in ("auto", "cpu", "cuda", "mps"):
        raise ForgetlessError(f"evaluation device {setting!r}: use auto, cpu, cuda or mps")
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ForgetlessError("evaluation device cuda: no CUDA device is available (--device auto or cpu)")
    return pick_device(setting)


def load_for_eval(name: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, directory) for a run directory, a model directory or a catalog alias / hub id."""
    if is_run_dir(name):
        model, tok = load_model(Path(name), device=str(device))
        return merge_for_eval(model).eval(), tok, str(Path(name) / "final")

    path = resolve_model(name).path
    model, tok = load_model(path, device=str(device))
    return merge_for_eval(model).eval(), tok, path


def _base_loader(base_path: str | None,
                 device: torch.device | str = "cpu") -> Callable[[], tuple[torch.nn.Module, Any]]:
    """Load the base model once, on first use."""
    cache: dict[str, Any] = {}

    def load_base():
        if "m" not in cache:
            m, t = load_model(base_path, device=str(device))
            cache["m"] = (m.eval(), t)
        return cache["m"]

    return load_base


def baseline_result(
    base_path: str, suite: Suite, data_root: Path | None, *, bf16: bool, max_length: int | None = None,
    progress: bool = True, refresh: bool = False, loader: Callable[[], tuple[torch.nn.Module, Any]] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[SuiteResult, bool]:
    """The base model's results on `suite`, from the cache (keyed by model fingerprint, suite hash and settings)
    or evaluated once and cached. Returns (result, was_cached). `bf16` is a resolved choice (see
    `eval_precision`), never "auto": a cached bf16 baseline is never compared with an fp32 candidate. `device`:
    where it is scored (the loader's device); a baseline scored on a GPU is cached apart from a CPU's (other
    kernels, other last digits), so a candidate is compared with a base scored where it is."""
    load_base = loader or _base_loader(base_path, device)
    ref_fp = fingerprint_path(base_path)
    settings = device_keyed({"bf16": bf16, "max_length": max_length, "suite": suite.fingerprint(data_root)}, device)
    return evaluate_cached(
        {"model": ref_fp, **settings},
        suite,
        lambda: evaluate(*load_base(), suite, data_root=data_root, bf16=bf16, max_length=max_length,
                         reference=load_base, reference_fingerprint=ref_fp, progress=progress, model_name=base_path),
        refresh=refresh,
    )


def eval_precision(setting: Any, model_path: str | None = None, device: torch.device | str = "cpu") -> Precision:
    """Resolve an evaluation precision (auto | bf16 | fp32, or the older True/False) for scoring on `device` at the
    widths of the model at `model_path` (a model directory or run directory). An already resolved `Precision`
    (a sweep resolves once for all its runs) is returned as it is, its reason kept, when it was resolved for this
    device type; one resolved for another device is resolved again from what it requested."""
    if isinstance(setting, Precision):
        if setting.device == torch.device(device).type:
            return setting
        setting = setting.requested
    widths = None
    if model_path is not None:
        p = Path(model_path)
        if is_run_dir(p):  # a saved adapter has no config.json of its own: its base model's widths
            p = p / "final" if (p / "final" / "config.json").is_file() else Path(run_base_model(p))
        elif p.name == "final" and is_run_dir(p.parent) and not (p / "config.json").is_file():
            p = Path(run_base_model(p.parent))
        widths = config_widths(p)
    return resolve_precision(setting, device, widths=widths)


def eval_model(
    model: str,
    suite: str | Suite = "general",
    *,
    baseline: str | None = "auto",
    limit: int | None = None,
    tasks: list[str] | None = None,
    data_root: str | Path | None = None,
    precision: Any = "auto",
    max_length: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    refresh_baseline: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate `model` on `suite`; with a baseline, report changes with paired intervals and significance.

    baseline: "auto" (a run directory's base model, else none), "base" (must be a run directory),
    "none", or a model path / alias. precision: auto (bf16 where measured faster, precision.py; on a GPU, bf16
    where it supports it), bf16, fp32; True / False are read as bf16 / fp32. device: auto (the GPU when there is
    one, else the CPU), cpu, cuda, mps: candidate and base are scored there."""
    torch.set_flush_denormal(True)
    s = load_suite(suite)
    s = s.only(tasks).with_limit(limit)
    root = resolve_data_root(data_root)
    base_path: str | None = None
    if baseline in ("auto", "base"):
        if is_run_dir(model):
            base_path = run_base_model(Path(model))
        elif baseline == "base":
            raise ForgetlessError(f"--baseline base needs a run directory; {model} is not one (pass a model path "
                                  "instead)")
    elif baseline and baseline != "none":
        base_path = resolve_model(baseline).path

    dev = eval_device(device)
    cand_model, tok, cand_path = load_for_eval(model, dev)
    prec = eval_precision(precision, cand_path, dev)
    bf16 = prec.bf16
    if progress:
        print(prec.line() + ("" if dev.type == "cpu" else f" on {dev.type}"), file=sys.stderr, flush=True)
    load_base = _base_loader(base_path, dev)
    ref_fp = fingerprint_path(base_path) if base_path else None
    base_res: SuiteResult | None = None
    cached = False
    if base_path:
        base_res, cached = baseline_result(base_path, s, root, bf16=bf16, max_length=max_length, progress=progress,
                                           refresh=refresh_baseline, loader=load_base, device=dev)
    cand_res = evaluate(
        cand_model, tok, s, data_root=root, bf16=bf16, max_length=max_length,
        reference=load_base if base_path else None, reference_fingerprint=ref_fp or fingerprint_path(cand_path),
        progress=progress, model_name=cand_path,
    )
    report: dict[str, Any] = {
        "model": model,
        "model_path": cand_path,
        "baseline": base_path,
        "baseline_cached": cached,
        "suite": s.name,
        "data_root": str(root) if root else None,
        "settings": {"bf16": bf16, "precision": prec.dtype, "precision_reason": prec.reason,
                     "max_length": max_length, "limit": limit, "device": dev.type},
        "candidate": cand_res.summary(),
        "base": base_res.summary() if base_res else None,
        "comparison": compare(base_res, cand_res, {t.name: t.weight for t in s.tasks}) if base_res else None,
    }
    if out:
        out = Path(out)
        atomic_write_json(out, report)
        save_items(out.with_suffix(".items.json"), cand_res, base_res)
        if report["comparison"]:
            flips = [
                {"task": name, **ex}
                for name, t in report["comparison"]["tasks"].items()
                for ex in t["flipped_examples"]
            ]
            atomic_write_text(out.with_suffix(".flips.jsonl"), "".join(json.dumps(f) + "\n" for f in flips))
    return report
