"""`forgetless merge`: interpolate between the base and the fine-tuned weights (WiSE-FT, Wortsman et al. 2022).

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_tuned. For a LoRA adapter this is the adapter
scaled by alpha (W + alpha * B A), written as a scaled adapter. With `alpha="auto"` the interpolation
curve is measured on a task suite and a retention suite, and the chosen alpha is the one with the best
task score whose retention drop stays within the budget: a forgetting budget met after training, at no
training cost, which is the bar every other mitigation must beat. Each alpha reports the budget on the
drop's point estimate and at 95% confidence (its upper bound); the choice acts on the point estimate unless
decide_on="confident" (`--decide-on confident`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ForgetlessError, OutputExistsError
from .fingerprint import fingerprint_dir, fingerprint_path
from .io import atomic_dir, atomic_write_json
from .methods.bottleneck import adapter_modules
from .models import resolve_model
from .retention.api import baseline_result, eval_device, eval_precision, is_run_dir, merge_for_eval
from .retention.evaluate import compare, evaluate
from .retention.metrics import budget_check
from .retention.suite import load_suite
from .retention.tasks import resolve_data_root
from .train.model import load_model


@dataclass
class Endpoints:
    """The two ends of the interpolation, as plain full models with identical parameter names."""

    base: nn.Module
    tuned: nn.Module
    tokenizer: Any
    lora_dir: Path | None  # set when a scaled LoRA adapter is the same interpolation (`scalable_lora`)


def _model_path(name: str) -> str:
    """A local directory, a catalog alias (its cache entry) or a hub id, as `from_pretrained` loads it."""
    return name if Path(name).expanduser().is_dir() else str(resolve_model(name).path)


def _same_model(a: str, b: str) -> bool:
    """The same weights: the same hub id, or model directories with the same weight files and config (a copy
    counts, such as a catalog alias's cache entry, which adds its provenance file)."""
    pa, pb = Path(a), Path(b)
    return a == b or (pa.is_dir() and pb.is_dir() and (pa.resolve() == pb.resolve()
                                                        or fingerprint_dir(pa, True) == fingerprint_dir(pb, True)))


def scalable_lora(tuned_path: Path, base_path: str) -> Path | None:
    """`tuned_path` when `base + alpha * (its adapter)` is exactly the interpolation the curve measures, so the
    adapter scaled by alpha can be saved instead of a full model; None otherwise (then a full model is written).
    That needs a plain LoRA (not DoRA, not on a 4-bit base) whose own base is `base_path`, whose trained weights
    are all in lora_A/lora_B (no trained biases, no modules_to_save), and which is not a checkpoint of a
    moved-base init (its adapter is relative to the residual base; the final adapter is saved converted)."""
    from .methods.qlora import QUANT_FILE
    from .train.model import moved_base_initial_adapter

    cfg_file = tuned_path / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    plain = (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora") and cfg.get("bias", "none") == "none"
             and not cfg.get("modules_to_save") and not (tuned_path / QUANT_FILE).is_file()
             and moved_base_initial_adapter(tuned_path) is None)
    own_base = str(cfg.get("base_model_name_or_path") or "")
    return tuned_path if plain and _same_model(own_base, base_path) else None


def load_endpoints(base: str, tuned: str) -> Endpoints:
    tuned_path = Path(tuned) / "final" if is_run_dir(tuned) else Path(tuned)
    base_path = _model_path(base)
    # a QLoRA adapter goes on a full-precision base: the merge is of full-precision weights
    t_model, tok = load_model(tuned_path, full_precision_base=True)
    t_model = merge_for_eval(t_model)
    if hasattr(t_model, "peft_config"):
        raise ForgetlessError(f"{tuned}: this adapter kind (prompt or prefix tuning) has no weights to interpolate")
    if adapter_modules(t_model):
        raise ForgetlessError(f"{tuned}: bottleneck adapters with a non-linear activation cannot be merged into the "
                              "weights, so there is nothing to interpolate (train them with `activation: identity`)")
    b_model, _ = load_model(base_path)
    b_state, t_state = b_model.state_dict(), t_model.state_dict()
    if set(b_state) != set(t_state) or any(b_state[k].shape != t_state[k].shape for k in b_state):
        raise ForgetlessError(f"{base} and {tuned} do not have the same parameters; merge needs the tuned model's "
                              "own base")
    return Endpoints(b_model.eval(), t_model.eval(), tok, scalable_lora(tuned_path, base_path))


@torch.no_grad()
def interpolate(ends: Endpoints, alpha: float, into: nn.Module | None = None) -> nn.Module:
    """A model with (1 - alpha) * base + alpha * tuned (floating tensors; others from the tuned model)."""
    import copy

    out = into if into is not None else copy.deepcopy(ends.tuned)
    b, t = ends.base.state_dict(), ends.tuned.state_dict()
    for name, tensor in out.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(torch.lerp(b[name].float(), t[name].float(), alpha).to(tensor.dtype))
        else:
            tensor.copy_(t[name])
    return out


def save_model(model: nn.Module, tokenizer: Any, out: Path, overwrite: bool) -> None:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]  # a PreTrainedModel
        tokenizer.save_pretrained(tmp)


def save_scaled_lora(lora_dir: Path, alpha: float, out: Path, overwrite: bool) -> None:
    """The adapter scaled by alpha: lora_B * alpha (so W + alpha * B A)."""
    import shutil

    from safetensors.torch import load_file, save_file

    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in lora_dir.iterdir():
            if f.is_file() and f.name != "adapter_model.safetensors":
                shutil.copy2(f, tmp / f.name)
        state = load_file(str(lora_dir / "adapter_model.safetensors"))
        save_file({k: (v * alpha if ".lora_B." in k else v) for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"))


def merge(base: str, tuned: str, alpha: float, out: str | Path, overwrite: bool = False,
          full: bool = False) -> dict[str, Any]:
    """Write theta(alpha). A LoRA adapter is written as a scaled adapter unless `full`."""
    if not 0.0 <= alpha <= 1.0:
        raise ForgetlessError(f"--alpha must be in [0, 1], got {alpha}")
    refuse_existing(out, overwrite)
    return write_merged(load_endpoints(base, tuned), base, tuned, alpha, out, overwrite, full)


def refuse_existing(out: str | Path | None, overwrite: bool) -> None:
    """Refuse an existing output directory before any loading or scoring (atomic_dir checks again on writing)."""
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")


def write_merged(ends: Endpoints, base: str, tuned: str, alpha: float, out: str | Path, overwrite: bool = False,
                 full: bool = False) -> dict[str, Any]:
    """`merge` from endpoints already loaded. A scaled adapter only where `ends.lora_dir` says it is the same
    interpolation; else (or with `full`) the full model."""
    out = Path(out)
    if ends.lora_dir is not None and not full:
        save_scaled_lora(ends.lora_dir, alpha, out, overwrite)
        kind = "lora adapter (scaled)"
    else:
        save_model(interpolate(ends, alpha), ends.tokenizer, out, overwrite)
        kind = "model"
    info = {"base": base, "tuned": tuned, "alpha": alpha, "output": str(out), "kind": kind}
    atomic_write_json(out / "forgetless_merge.json", info)
    return info


def auto_alpha(
    base: str,
    tuned: str,
    *,
    budget: float,
    task_suite: Any,
    retention_suite: Any,
    alphas: list[float] | None = None,
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    search: str = "grid",
    decide_on: str = "point",
    precision: Any = "auto",
    report_task_suite: Any = None,
    report_retention_suite: Any = None,
    full: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Measure the interpolation curve and keep the best task score whose retention drop is within `budget`
    (a fraction: 0.01 = 1%). Task score: the task suite's retention score against the base (>1 = gained).

    Selection apart from reporting: with `report_task_suite` and/or `report_retention_suite`, the curve and the
    choice use `task_suite` / `retention_suite` (validation items, a held-out probe), and the chosen alpha alone
    is then scored on the reporting suites (the items a result quotes): `comparison` holds those, `selection`
    the chosen alpha's comparisons on the selection suites, `reported_on` the suites' names. The reporting suites
    never influence the choice.

    Every alpha reports the budget both ways: `within_budget` (the drop's point estimate) and
    `within_budget_95` (the drop's 95% upper bound, 1 - the retention interval's lower end). The choice acts on
    the point estimate by default (decide_on="point"); decide_on="confident" keeps only alphas whose budget
    holds with 95% confidence. The curve's `eligible` says what the choice used. With `out`, the chosen alpha is
    written there as `merge` writes it (`full`: a full model even for a LoRA adapter).

    search: "grid" scores every alpha; "descending" scores them from the largest down and stops at the first
    within the budget (the largest alpha that meets it: right when retention falls as alpha grows, WiSE-FT's
    usual curve; the returned curve then holds only the alphas scored). The base model's results come from the
    evaluation cache, like `forgetless eval`'s baseline. precision: auto | bf16 | fp32 evaluation compute,
    resolved once (retention.api.eval_precision) so the base and every alpha are scored alike. device: where both
    endpoints, the interpolations and the base's scores are computed (auto: the GPU when there is one; as
    `forgetless eval --device`); the saved model is the same wherever it was chosen."""
    if search not in ("grid", "descending"):
        raise ForgetlessError(f"search must be 'grid' or 'descending', got {search!r}")
    if decide_on not in ("point", "confident"):
        raise ForgetlessError(f"decide_on must be 'point' or 'confident', got {decide_on!r}")
    refuse_existing(out, overwrite)
    ts, rs = load_suite(task_suite), load_suite(retention_suite)
    ends = load_endpoints(base, tuned)
    alphas = alphas or [round(0.1 * i, 2) for i in range(11)]
    if search == "descending":
        alphas = sorted(alphas, reverse=True)
    base_path = _model_path(base)
    ref_fp = fingerprint_path(base_path)
    root = resolve_data_root(data_root)
    dev = eval_device(device)
    prec = eval_precision(precision, base_path, dev)
    if dev.type != "cpu":  # the endpoints (fp32) where the alphas are scored: interpolation happens there too
        ends.base.to(dev)
        ends.tuned.to(dev)

    def reference():
        return ends.base, ends.tokenizer

    def run(model, suite):
        return evaluate(model, ends.tokenizer, suite, data_root=root, reference=reference, reference_fingerprint=ref_fp,
                        progress=progress, bf16=prec.bf16)

    base_task, base_ret = (baseline_result(base_path, s, root, progress=progress, loader=reference, bf16=prec.bf16,
                                           device=dev)[0] for s in (ts, rs))
    work = interpolate(ends, 0.0)
    curve: list[dict[str, Any]] = []
    comparisons: dict[float, dict[str, Any]] = {}
    for a in alphas:
        if search == "descending" and any(c["eligible"] for c in curve):
            break
        interpolate(ends, a, into=work)
        task_cmp = compare(base_task, run(work, ts))
        ret_cmp = compare(base_ret, run(work, rs))
        comparisons[a] = {"task": task_cmp, "retention": ret_cmp}
        curve.append(curve_point(a, task_cmp, ret_cmp, budget, decide_on))
    curve.sort(key=lambda c: c["alpha"])
    best = choose_alpha(curve, budget, decide_on)
    # the chosen alpha's full comparisons (every task's change with its interval), so no one re-scores it
    result: dict[str, Any] = {"base": base, "tuned": tuned, "budget": budget, "search": search, "decide_on": decide_on,
                              "curve": curve, "chosen": best, "comparison": comparisons[best["alpha"]],
                              "precision": {"dtype": prec.dtype, "reason": prec.reason, "device": dev.type}}
    if report_task_suite is not None or report_retention_suite is not None:
        rts = ts if report_task_suite is None else load_suite(report_task_suite)
        rrs = rs if report_retention_suite is None else load_suite(report_retention_suite)
        interpolate(ends, best["alpha"], into=work)
        reported = {}
        for key, sel_suite, suite in (("task", ts, rts), ("retention", rs, rrs)):
            if suite is sel_suite:  # not asked apart: the selection's own comparison
                reported[key] = comparisons[best["alpha"]][key]
                continue
            base_res = baseline_result(base_path, suite, root, progress=progress, loader=reference, bf16=prec.bf16,
                                       device=dev)[0]
            reported[key] = compare(base_res, run(work, suite))
        result["selection"] = {"task_suite": ts.name, "retention_suite": rs.name,
                               "comparison": comparisons[best["alpha"]]}
        result["comparison"] = reported
        result["reported_on"] = {"task_suite": rts.name, "retention_suite": rrs.name}
    if out is not None:
        out = Path(out)
        # the models loaded above
        result["saved"] = write_merged(ends, base, tuned, best["alpha"], out, overwrite=overwrite, full=full)
        atomic_write_json(out / "alpha_curve.json", result)
        plot_curve(curve, best, budget, out / "alpha_curve.png")
    return result


def curve_point(alpha: float, task_cmp: dict[str, Any], ret_cmp: dict[str, Any], budget: float,
                decide_on: str) -> dict[str, Any]:
    """One alpha of the curve from its two comparisons: scores, intervals, and the budget both ways."""
    check = budget_check(ret_cmp["retention_score"], ret_cmp["retention_ci"], budget)
    return {
        "alpha": alpha,
        "task_score": task_cmp["retention_score"],
        "task_ci": list(task_cmp["retention_ci"]),
        "retention": ret_cmp["retention_score"],
        "retention_ci": list(ret_cmp["retention_ci"]),
        "retention_drop": ret_cmp["retention_drop"],
        "retention_drop_upper": check["drop_upper"],
        "within_budget": check["within_budget"],
        "within_budget_95": check["within_budget_95"],
        "eligible": check["within_budget_95"] if decide_on == "confident" else check["within_budget"],
    }


def choose_alpha(curve: list[dict[str, Any]], budget: float, decide_on: str = "point") -> dict[str, Any]:
    """The best task score among the eligible alphas (ties: the smaller alpha)."""
    ok = [c for c in curve if c["eligible"]]
    if not ok:
        how = "with 95% confidence" if decide_on == "confident" else "on the point estimate"
        raise ForgetlessError(f"no alpha keeps the retention drop within {budget:.2%} {how}; not even alpha=0?")
    return max(ok, key=lambda c: (c["task_score"], -c["alpha"]))


def plot_curve(curve: list[dict[str, Any]], best: dict[str, Any], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [c["alpha"] for c in curve]
    fig, ax1 = plt.subplots(figsize=(6, 4), dpi=100)
    ax1.plot(a, [c["task_score"] for c in curve], "o-", color="tab:blue", label="task score (vs base)")
    ax1.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
    ax1.set_ylabel("task score", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(a, [c["retention"] for c in curve], "s-", color="tab:red", label="retention")
    ax2.axhline(1 - budget, color="tab:red", ls="--", lw=1, label=f"budget ({budget:.1%} drop)")
    ax2.set_ylabel("retention score", color="tab:red")
    ax1.axvline(best["alpha"], color="k", ls=":", lw=1)
    ax1.set_title(f"WiSE-FT interpolation: chosen alpha = {best['alpha']}")
    fig.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
