"""Compute precision on this CPU: fp32 against bf16 at the matmul widths the models run, a real training step
in each, what `precision: auto` picks and why, and the fallback on a CPU whose bf16 is emulated.

For every distinct (in, out) width pair of the linear layers of smollm2-135m-instruct (attention q/k/v/o, MLP
gate/up/down, the tied vocabulary head) and of the tiny test model (forgetless.testing.build_tiny_llama), the
GFLOP/s of `F.linear` at a few token counts in three modes, measured side by side (the modes alternate within
each round, the best of the rounds is kept: other work on the machine only ever slows a measurement down):

  fp32      fp32 inputs and weights
  bf16      plain bf16 tensors (inputs and weights cast beforehand)
  autocast  fp32 inputs and weights under torch.autocast(bfloat16): what a training or scoring step pays,
            the casts of the weights included (this is what forgetless runs when it picks bf16)

Then the forward+backward time (and the AdamW step, fp32 master weights either way) of a smollm2 training
step in fp32 and under bf16 autocast, alternating (ABBA): 1 x 64 and 8 x 256 tokens where bf16 is native; where
it is emulated only 1 x 64 (a full 8 x 256 step would take about half an hour). Then
`forgetless.precision.resolve("auto", "cpu", widths=...)` for each model with a fresh probe (a private cache, so
the answer is measured now, not read from an older run), and, with the probe replaced by a test double that
reports bf16 68x slower than fp32 (measured on an AMD EPYC with AVX2 only: 1.2 against 81.6 GFLOP/s), what
`auto` and an explicit `bf16` do there: auto falls back to fp32, explicit bf16 runs and warns.

Writes bench/results/precision-<ISA level>.json (avx2, avx512, ...: one file per kind of CPU, with the provenance
block: commit, versions, CPU model and flags, precision, allocator) and the .md beside it, rendered from the JSON
alone (`--render` re-renders saved JSONs). A few minutes on 2 cores.

    python bench/precision.py                          # everything, ~5 min on 2 busy cores
    python bench/precision.py --no-step                # matmuls, chooser and fallback only (~1 min)
    python bench/precision.py --render                 # every bench/results/precision-*.md from its JSON
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fp32", "bf16", "autocast")
TOKENS = (64, 256, 2048)
# measured on an AMD EPYC with AVX2 and no AVX512/bf16 (issue 21): 1024x576 @ 576x1536, torch 2.13.0, 2 threads
SLOW_FP32, SLOW_BF16 = 81.6, 1.2
MAX_CALL_S = 15.0  # a matmul whose estimated time per call exceeds this is skipped (emulated bf16 at the vocab head)
SLOW_CALL_S = 1.0  # calls estimated slower than this get 2 rounds, not --rounds (one call each is precise enough)
# CPU flags that decide the bf16 path (x86: AVX512-BF16, AMX; ARM: bf16 / sve)
BF16_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_tile", "amx_int8", "bf16", "sve", "sve2", "asimd")


# ---------------------------------------------------------------- widths


def linear_shapes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct (in, out) widths of a Llama-style model's linear layers, with the layers that share them."""
    h = cfg["hidden_size"]
    m = cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    layers = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, m),
              ("up_proj", h, m), ("down_proj", m, h), ("lm_head", h, cfg["vocab_size"])]
    out: dict[tuple[int, int], list[str]] = {}
    for name, i, o in layers:
        out.setdefault((i, o), []).append(name)
    return [{"in": i, "out": o, "layers": names} for (i, o), names in out.items()]


# ---------------------------------------------------------------- matmuls


def _per_call_s(tokens: int, k: int, n: int, mode: str, budget_s: float) -> tuple[float, float]:
    """Seconds per `F.linear(x[tokens, k], w[n, k])` call in `mode`: the fastest single call and the mean, over
    the calls made in budget_s after one warm-up call. On a shared machine a call that loses one of its two
    threads to other work takes several times longer; the fastest call is what this CPU does undisturbed."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g) * 0.1
    w = torch.randn(n, k, generator=g) * 0.05
    if mode == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        F.linear(x, w)  # warm-up: oneDNN primitive creation, kernel choice
        calls, fastest, t0 = 0, float("inf"), time.perf_counter()
        while True:
            c0 = time.perf_counter()
            F.linear(x, w)
            c1 = time.perf_counter()
            calls += 1
            fastest = min(fastest, c1 - c0)
            if c1 - t0 >= budget_s:
                return fastest, (c1 - t0) / calls


def matmul_rows(model: str, shapes: list[dict[str, Any]], tokens: tuple[int, ...], rounds: int,
                budget_s: float) -> list[dict[str, Any]]:
    rows = []
    for s in shapes:
        k, n = s["in"], s["out"]
        est: dict[str, float] = {}  # GFLOP/s at the previous token count, to skip calls that would take too long
        for t in tokens:
            flops = 2 * t * k * n
            modes = [m for m in MODES if m not in est or flops / (est[m] * 1e9) <= MAX_CALL_S]
            skipped = {m: f"estimated {flops / (est[m] * 1e9):.0f} s per call" for m in MODES if m not in modes}
            per: dict[str, list[float]] = {m: [] for m in modes}
            mean: dict[str, list[float]] = {m: [] for m in modes}
            slow = any(flops / (est[m] * 1e9) > SLOW_CALL_S for m in modes if m in est)
            for r in range(min(rounds, 2) if slow else rounds):
                order = modes[r % len(modes):] + modes[: r % len(modes)]  # each mode leads a round in turn
                for m in order:
                    fastest, avg = _per_call_s(t, k, n, m, budget_s)
                    per[m].append(flops / fastest / 1e9)
                    mean[m].append(flops / avg / 1e9)
            best = {m: round(max(v), 2) for m, v in per.items()}
            for m, v in best.items():
                est[m] = v
            row = {"model": model, "layers": s["layers"], "in": k, "out": n, "tokens": t, "gflops": best,
                   "gflops_rounds": {m: [round(x, 2) for x in v] for m, v in per.items()},
                   "gflops_mean_rounds": {m: [round(x, 2) for x in v] for m, v in mean.items()},
                   "bf16_over_fp32": (round(best["bf16"] / best["fp32"], 3)
                                      if "bf16" in best and "fp32" in best else None),
                   "autocast_over_fp32": (round(best["autocast"] / best["fp32"], 3)
                                          if "autocast" in best and "fp32" in best else None),
                   "skipped": skipped}
            rows.append(row)
            print(f"  {model:<22} {'+'.join(s['layers']):<28} {k:>5}x{n:<6} {t:>5} tokens: "
                  + "  ".join(f"{m} {best[m]:7.1f}" for m in modes) + " GFLOP/s"
                  + (f"  (skipped {', '.join(skipped)})" if skipped else ""), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- training step


def step_times(path: str, sizes: list[tuple[int, int]], reps: int, thread_counts: list[int]) -> list[dict[str, Any]]:
    """fwd+bwd and optimizer seconds of a smollm2 training step, fp32 against bf16 autocast (fp32 master
    weights), alternating fp32, bf16, bf16, fp32, ... after one untimed warm-up step of each at batch 1; at each
    torch thread count in turn."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)  # lr 0: both modes time the same weights
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def step(ids: torch.Tensor, bf16: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return {"fwd_bwd_s": round(t1 - t0, 3), "optimizer_s": round(t2 - t1, 3), "loss": round(loss.item(), 4)}

    out = []
    default_threads = torch.get_num_threads()
    for threads, (batch, seq) in ((t, bs) for t in thread_counts for bs in sizes):
        torch.set_num_threads(threads)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        warm = ids[:1]
        for bf16 in (False, True):
            step(warm, bf16)
        runs: dict[str, list[dict[str, float]]] = {"fp32": [], "bf16_autocast": []}
        order = []
        for r in range(reps):
            order += [False, True] if r % 2 == 0 else [True, False]
        for bf16 in order:
            res = step(ids, bf16)
            runs["bf16_autocast" if bf16 else "fp32"].append(res)
            print(f"  step {batch} x {seq}, {threads} thread(s): {'bf16 autocast' if bf16 else 'fp32':<13} fwd+bwd "
                  f"{res['fwd_bwd_s']:7.2f} s, optimizer {res['optimizer_s']:.2f} s", file=sys.stderr, flush=True)
        med = {k: {"fwd_bwd_s": round(statistics.median(x["fwd_bwd_s"] for x in v), 3),
                   "optimizer_s": round(statistics.median(x["optimizer_s"] for x in v), 3)} for k, v in runs.items()}
        out.append({"batch": batch, "seq": seq, "threads": threads, "tokens": batch * seq,
                    "order": ["bf16" if b else "fp32" for b in order], "median": med, "runs": runs,
                    "fwd_bwd_bf16_speedup": round(med["fp32"]["fwd_bwd_s"] / med["bf16_autocast"]["fwd_bwd_s"], 3),
                    "tokens_per_s": {k: round(batch * seq / (v["fwd_bwd_s"] + v["optimizer_s"]), 1)
                                     for k, v in med.items()}})
    torch.set_num_threads(default_threads)
    return out


# ---------------------------------------------------------------- the chooser


@contextlib.contextmanager
def private_cache(probe: Any = None):
    """forgetless.precision with its cache in a temp dir (and optionally its probe replaced): measured now,
    and nothing written to the user's cache (a test double's answer must never reach real runs)."""
    from forgetless import precision as P

    saved = (P.cache_path, P.probe, set(P._warned))
    with tempfile.TemporaryDirectory(prefix="fl-precision-bench-") as d:
        P.cache_path = lambda: Path(d) / "precision.json"
        if probe is not None:
            P.probe = probe
        P._warned.clear()
        try:
            yield P
        finally:
            P.cache_path, P.probe = saved[0], saved[1]
            P._warned.clear()
            P._warned.update(saved[2])


def resolve_fresh(setting: str, widths: tuple[int, int], probe: Any = None) -> dict[str, Any]:
    """precision.resolve(setting, "cpu", widths) with a fresh probe; the warning it prints, if any, captured."""
    err = io.StringIO()
    with private_cache(probe) as P, contextlib.redirect_stderr(err):
        got = P.resolve(setting, "cpu", widths=widths)
    return {"setting": setting, "widths": list(widths), **got.as_dict(), "warning": err.getvalue().strip() or None}


def slow_bf16_double(device: Any, widths: tuple[int, int]) -> dict[str, Any]:
    """The test double: what the probe measured on an AVX2-only EPYC (bf16 emulated, 68x slower)."""
    return {"fp32_gflops": SLOW_FP32, "bf16_gflops": SLOW_BF16, "bf16_speedup": round(SLOW_BF16 / SLOW_FP32, 4),
            "widths": list(widths), "probe_s": 0.0, "double": "AMD EPYC, AVX2 only, torch 2.13.0, 2 threads (issue 21)"}


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from forgetless import precision as P
    from forgetless import provenance
    from forgetless.models import resolve_model
    from forgetless.testing import build_tiny_llama
    from forgetless.train.run import setup_torch

    setup_torch(args.threads)
    t_all = time.perf_counter()
    smol_path = resolve_model(args.model).path
    tiny_dir = Path(tempfile.mkdtemp(prefix="fl-precision-tiny-"))
    tiny_path = build_tiny_llama(tiny_dir / "model")
    models = {args.model: Path(smol_path), "tiny test model": Path(tiny_path)}
    configs = {k: json.loads((p / "config.json").read_text()) for k, p in models.items()}

    # what auto picks for each model, measured now (private cache), before the long timings
    auto = {k: resolve_fresh("auto", P.config_widths(p)) for k, p in models.items()}
    for k, p in models.items():  # what runs on this machine read from the user's cache (measured earlier), if any
        with contextlib.suppress(OSError, ValueError):
            auto[k]["user_cache"] = json.loads(P.cache_path().read_text()).get(P.cache_key(torch.device("cpu"),
                                                                                           P.config_widths(p)))
    explicit = {k: resolve_fresh("bf16", P.config_widths(p)) for k, p in models.items()}
    head = auto[args.model]
    prov = provenance.collect({"dtype": head["dtype"], "reason": f"auto for {args.model}: {head['reason']}; "
                               "the bench itself times fp32, bf16 and bf16 autocast side by side"}, device="cpu")
    ident = P.cpu_identity()
    flags = set(ident["flags"].split())
    native = bool(ident["mkldnn_bf16"]) and head["probe"]["bf16_speedup"] >= 0.5
    print(f"{ident['cpu']}: {ident['capability']}, native bf16 {ident['mkldnn_bf16']}, {ident['threads']} threads; "
          f"auto -> {head['dtype']} ({head['reason']})", file=sys.stderr, flush=True)

    loadavg = {"start": list(os.getloadavg())}
    matmuls = []
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys(args.matmul_threads or [1, default_threads]))
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, cfg in configs.items():
            print(f"matmuls, {name}, {threads} thread(s)", file=sys.stderr, flush=True)
            rows = matmul_rows(name, linear_shapes(cfg), tuple(args.tokens), args.rounds, args.budget)
            matmuls += [{**r, "threads": threads} for r in rows]
    torch.set_num_threads(default_threads)
    loadavg["after_matmuls"] = list(os.getloadavg())

    steps: list[dict[str, Any]] = []
    step_note = None
    if not args.no_step:
        sizes = [(1, 64), (8, 256)] if native else [(1, 64)]
        if not native:
            step_note = "bf16 is emulated on this CPU: the step is timed at 1 x 64 tokens only (8 x 256 takes ~30 min)"
        print(f"training step, {args.model}: {', '.join(f'{b} x {s}' for b, s in sizes)} tokens", file=sys.stderr,
              flush=True)
        steps = step_times(smol_path, sizes, args.reps, thread_counts)
        loadavg["after_steps"] = list(os.getloadavg())

    # the chooser again, a few fresh probes in a row: how stable its answer is on this machine as loaded now
    repeats = []
    for _ in range(args.probe_repeats):
        r = resolve_fresh("auto", P.config_widths(smol_path))
        if "probe" not in r:  # decided by the capability check (no native bf16): no probe to repeat
            break
        repeats.append({"bf16_speedup": r["probe"]["bf16_speedup"], "fp32_gflops": r["probe"]["fp32_gflops"],
                        "bf16_gflops": r["probe"]["bf16_gflops"], "dtype": r["dtype"],
                        "loadavg_1m": os.getloadavg()[0]})
    fallback = {
        "double": slow_bf16_double(None, P.config_widths(smol_path)),
        "auto": resolve_fresh("auto", P.config_widths(smol_path), slow_bf16_double),
        "bf16": resolve_fresh("bf16", P.config_widths(smol_path), slow_bf16_double),
        "fp32": resolve_fresh("fp32", P.config_widths(smol_path), slow_bf16_double),
    }
    for v in (*auto.values(), *explicit.values(), *fallback.values()):
        if isinstance(v, dict) and "probe" in v:
            v["probe"].pop("cached", None)  # always False here (private cache)
    return {
        "bench": "precision",
        "model": args.model,
        "model_path": smol_path,
        "provenance": provenance.finish(prov),
        "cpu": {"model": ident["cpu"], "capability": ident["capability"], "mkldnn_bf16": ident["mkldnn_bf16"],
                "threads": ident["threads"], "torch": torch.__version__, "flags_sha": ident["flags_sha"],
                "bf16_relevant_flags": {f: f in flags for f in BF16_FLAGS}, "native_bf16": native},
        "loadavg": loadavg,
        "settings": {"tokens": list(args.tokens), "matmul_threads": thread_counts, "training_threads": default_threads,
                     "rounds": args.rounds, "budget_s": args.budget, "max_call_s": MAX_CALL_S,
                     "slow_call_s": SLOW_CALL_S,
                     "step_sizes": list(dict.fromkeys((s["batch"], s["seq"]) for s in steps)), "step_reps": args.reps,
                     "min_speedup": P.MIN_SPEEDUP, "probe_tokens": P.PROBE_TOKENS},
        "widths": {k: {"config": {x: c.get(x) for x in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim", "vocab_size",
                                                        "num_hidden_layers")},
                       "probe_widths": list(P.config_widths(models[k])), "linear_shapes": linear_shapes(c)}
                   for k, c in configs.items()},
        "matmuls": matmuls,
        "steps": steps,
        "step_note": step_note,
        "auto": auto,
        "explicit_bf16": explicit,
        "auto_repeats": repeats,
        "fallback_demo": fallback,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _load(x: list[float] | None) -> str:
    return "n/a" if not x else "/".join(f"{v:.1f}" for v in x)


def summary(res: dict[str, Any]) -> list[str]:
    """The headline numbers, computed from the JSON."""
    out = []
    for threads in res["settings"].get("matmul_threads") or [None]:
        rows = [r for r in res["matmuls"] if r["model"] == res["model"] and r.get("threads") == threads]
        ac = sorted(r["autocast_over_fp32"] for r in rows if r["autocast_over_fp32"] is not None)
        bf = sorted(r["bf16_over_fp32"] for r in rows if r["bf16_over_fp32"] is not None)
        if ac and bf:
            out.append(f"- matmuls at {res['model']}'s widths, {threads} "
                       f"thread{'s' if threads and threads > 1 else ''}: bf16 autocast / fp32 median "
                       f"{statistics.median(ac):.2f}x (range {ac[0]:.2f}-{ac[-1]:.2f}x), plain bf16 / fp32 median "
                       f"{statistics.median(bf):.2f}x (range {bf[0]:.2f}-{bf[-1]:.2f}x) over {len(rows)} shape and "
                       "token-count pairs")
    for st in res["steps"]:
        out.append(f"- training step {st['batch']} x {st['seq']} tokens, {st.get('threads', '?')} thread(s): "
                   f"fwd+bwd fp32 {st['median']['fp32']['fwd_bwd_s']:.1f} s, bf16 autocast "
                   f"{st['median']['bf16_autocast']['fwd_bwd_s']:.1f} s: bf16 {_speed(st['fwd_bwd_bf16_speedup'])}")
    picks = ", ".join(f"{k}: {v['dtype']} ({v['probe']['bf16_speedup']:.2f}x in its probe)" if v.get("probe")
                      else f"{k}: {v['dtype']} ({v['reason']}, no probe)" for k, v in res["auto"].items())
    out.append(f"- `auto` picked {picks}")
    reps = res.get("auto_repeats") or []
    if reps:
        n_bf16 = sum(r["dtype"] == "bf16" for r in reps)
        out.append(f"- {len(reps)} more fresh probes at {res['model']}'s widths: bf16 {n_bf16} times, fp32 "
                   f"{len(reps) - n_bf16} times (ratios "
                   f"{min(r['bf16_speedup'] for r in reps):.2f}-{max(r['bf16_speedup'] for r in reps):.2f}x)")
        if 0 < n_bf16 < len(reps):
            out.append("- so on a machine this busy the probe's answer is not stable (its 64-token matmuls at the "
                       "training's thread count wait on the scheduler, see the 2-thread tables), and a run keeps "
                       "whatever the first, cached probe measured")
    fb = res["fallback_demo"]
    out.append(f"- bf16 emulated (probe double, 68x slower): auto -> **{fb['auto']['dtype']}**; explicit bf16 -> "
               f"{fb['bf16']['dtype']}, {'with' if fb['bf16'].get('warning') else 'without'} a warning")
    return out


def _load_note(res: dict[str, Any], prov: dict[str, Any]) -> str:
    """Whether other work shared the cores, read from the recorded 1-minute load averages (above half the cores
    at any reading: shared)."""
    cpus = prov["machine"].get("cpus") or 1
    loads = [v[0] for v in (res.get("loadavg") or {}).values() if v] + [
        v[0] for v in (prov.get("loadavg_start"), prov.get("loadavg_end")) if v]
    if loads and max(loads) > 0.5 * cpus + 1:
        return (f"The {cpus} cores were shared with other work (1-minute load up to {max(loads):.1f}): compare the "
                "ratios, measured side by side, not the absolute numbers.")
    return (f"The machine ran nothing else of note (1-minute load at most {max(loads or [0]):.1f} on {cpus} cores, "
            "the bench's own threads included).")


def _speed(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_md(res: dict[str, Any]) -> str:
    """The markdown report, from the JSON result alone."""
    from forgetless.provenance import machine_line

    cpu, prov = res["cpu"], res["provenance"]
    on = [f for f, v in cpu["bf16_relevant_flags"].items() if v]
    off = [f for f, v in cpu["bf16_relevant_flags"].items() if not v]
    s = res["settings"]
    lines = [f"# precision: fp32 against bf16 on {cpu['model']}", "",
             f"Machine: {machine_line(prov)}. Whole bench {res['wall_s'] / 60:.1f} min.", "",
             "Load average (1, 5, 15 min): " + ", ".join(f"{k.replace('_', ' ')} {_load(v)}" for k, v in
                                                        (res.get("loadavg")
                                                         or {"start": prov.get("loadavg_start")}).items())
             + f", end {_load(prov.get('loadavg_end'))}. " + _load_note(res, prov)
             + " The matmuls are timed at 1 thread (other work only time-slices a single thread, so its fastest "
             "call is clean) and at the training's thread count (a call then needs all its threads scheduled at once: "
             "on a busy machine the small shapes measure the scheduler more than the CPU).", "",
             f"CPU: **{cpu['model']}**, ISA level `{cpu['capability']}`, oneDNN native bf16 "
             f"(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`): **{cpu['mkldnn_bf16']}**, {cpu['threads']} torch "
             f"threads, torch {cpu['torch']}, flags hash {cpu['flags_sha']}.", "",
             f"- bf16-relevant flags present: {', '.join(f'`{f}`' for f in on) or 'none'}",
             f"- absent: {', '.join(f'`{f}`' for f in off) or 'none'}",
             "- full flag list: `provenance.machine.flags` in the JSON beside this file", ""]

    lines += ["## summary", "", *summary(res), ""]
    lines += ["## what `precision: auto` picked", "",
              "`forgetless.precision.resolve(\"auto\", \"cpu\", widths=...)` with a fresh probe (private cache), "
              f"at each model's (hidden, MLP) widths; bf16 is chosen where bf16 autocast is >= {s['min_speedup']}x "
              f"fp32 in the probe ({s['probe_tokens']} tokens).", "",
              "| model | widths | probe fp32 GFLOP/s | probe bf16 autocast GFLOP/s | bf16 / fp32 | auto picked | "
              "reason | user cache (earlier probe) |", "|---|---|---|---|---|---|---|---|"]
    for k, v in res["auto"].items():
        p, uc = v.get("probe") or {}, v.get("user_cache")
        cached = "none" if not uc else (f"bf16 {uc['bf16_speedup']:.2f}x fp32 -> "
                                        f"{'bf16' if uc['bf16_speedup'] >= s['min_speedup'] else 'fp32'}")
        lines.append(f"| {k} | {v['widths'][0]}x{v['widths'][1]} | {_g(p.get('fp32_gflops'))} | "
                     f"{_g(p.get('bf16_gflops'))} | {p.get('bf16_speedup', '-')} | **{v['dtype']}** | {v['reason']} | "
                     f"{cached} |")
    reps = res.get("auto_repeats") or []
    if reps:
        picks = [r["dtype"] for r in reps]
        ratios = ", ".join(f"{r['bf16_speedup']:.2f}" for r in reps)
        lines += ["", f"The chooser's probe again, {len(reps)} fresh probes in a row at the end of the bench "
                  f"({res['model']} widths): bf16 / fp32 = {ratios} -> "
                  f"bf16 {picks.count('bf16')} times, fp32 {picks.count('fp32')} times (1-min load average "
                  f"{min(r['loadavg_1m'] for r in reps):.1f}-{max(r['loadavg_1m'] for r in reps):.1f})."]
    warned = [k for k, v in res["explicit_bf16"].items() if v.get("warning")]
    lines += ["", "Explicit `bf16: true` here: " + ("runs bf16 with no warning (bf16 is fast on this CPU)."
                                                    if not warned
                                                   else f"warns for {', '.join(warned)}."), ""]

    lines += ["## matmul GFLOP/s (`F.linear`, x[tokens, in] @ W[out, in]^T)", "",
              f"The fastest single call over {s['rounds']} rounds of {s['budget_s']} s per mode (at least one call "
              f"after a warm-up call; 2 rounds for calls estimated over {s.get('slow_call_s', SLOW_CALL_S)} s), the "
              "modes alternating within each round: on a shared machine a call that loses a thread to other work runs "
              "several times slower, so the fastest call is what the CPU does undisturbed (the JSON also keeps each "
              "round's mean). fp32: fp32 tensors. bf16: plain bf16 tensors. autocast: fp32 tensors under bf16 autocast "
              "(weights cast every call: what a training step pays). A ratio above 1 means bf16 is faster.", ""]
    for model, threads in dict.fromkeys((r["model"], r.get("threads")) for r in res["matmuls"]):
        lines += [f"### {model}" + ("" if threads is None else f", {threads} thread{'s' if threads > 1 else ''}"), "",
                  "| layers | in x out | tokens | fp32 | bf16 | autocast | bf16 / fp32 | autocast / fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in res["matmuls"] if r["model"] == model and r.get("threads") == threads):
            g = r["gflops"]
            lines.append(f"| {', '.join(r['layers'])} | {r['in']} x {r['out']} | {r['tokens']} | {_g(g.get('fp32'))} | "
                         f"{_g(g.get('bf16'))} | {_g(g.get('autocast'))} | {ratio(r['bf16_over_fp32'])} | "
                         f"{ratio(r['autocast_over_fp32'])} |" + (f" skipped: {r['skipped']}" if r["skipped"] else ""))
        lines.append("")

    lines += [f"## training step, {res['model']} (fp32 master weights, AdamW)", ""]
    if res["steps"]:
        lines += ["Forward + backward (loss on the batch's own tokens) and the optimizer step, seconds, median of "
                  f"{s['step_reps']} per mode, alternating fp32 / bf16 (ABBA) after one untimed warm-up step of "
                  "each; at 1 thread (clean on a shared machine) and at the training's thread count (what a run here "
                  "pays, other work included).", "",
                  "| batch x seq | threads | fp32 fwd+bwd s | bf16 autocast fwd+bwd s | bf16 speed-up | fp32 "
                  "optimizer s | bf16 optimizer s | fp32 tokens/s | bf16 tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for st in res["steps"]:
            m, tps = st["median"], st["tokens_per_s"]
            lines.append(f"| {st['batch']} x {st['seq']} | {st.get('threads', '-')} | {m['fp32']['fwd_bwd_s']:.2f} | "
                         f"{m['bf16_autocast']['fwd_bwd_s']:.2f} | **{st['fwd_bwd_bf16_speedup']:.2f}x** | "
                         f"{m['fp32']['optimizer_s']:.2f} | {m['bf16_autocast']['optimizer_s']:.2f} | "
                         f"{tps['fp32']:.0f} | {tps['bf16_autocast']:.0f} |")
        if res.get("step_note"):
            lines += ["", res["step_note"]]
    else:
        lines.append("Not run (--no-step).")
    lines.append("")

    fb = res["fallback_demo"]
    d = fb["double"]
    lines += ["## fallback where bf16 is emulated (the probe replaced by a test double)", "",
              ("This CPU has native bf16, so the slow path is shown" if res["cpu"]["mkldnn_bf16"] else
               "The same check as on a native-bf16 CPU (where it is the only way to see the slow path), for "
               "comparison with the real path above: the probe's answer shown")
              + " with `forgetless.precision.probe` replaced by "
              f"a double that reports what the probe measured on {d['double']}: fp32 {d['fp32_gflops']} GFLOP/s, bf16 "
              f"autocast {d['bf16_gflops']} GFLOP/s ({1 / d['bf16_speedup']:.0f}x slower). Private cache: the double's "
              "answer never reaches a real run.", "",
              "| setting | resolved | reason | warning |", "|---|---|---|---|"]
    for k in ("auto", "bf16", "fp32"):
        v = fb[k]
        lines.append(f"| `{k}` | **{v['dtype']}** | {v['reason']} | {v.get('warning') or '-'} |")
    lines += ["",
              "Training, evaluation, the monitor, merge, sweep and continual resolve their precision through the same "
              "`precision.resolve`: on such a CPU `auto` trains and scores in fp32, and `bf16: true` still runs "
              "bf16 but says once how much slower it measured.", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out: Path) -> None:
    from forgetless.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    md = render_md(res)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts (rows) of the matmuls")
    ap.add_argument("--matmul-threads", type=int, nargs="+", default=None,
                    help="torch thread counts for the matmuls (default: 1 and the training count)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per matmul (the modes alternate within a round)")
    ap.add_argument("--budget", type=float, default=0.1, help="seconds per mode per round (at least one call)")
    ap.add_argument("--probe-repeats", type=int, default=8, help="fresh probes of the chooser in a row, at the end")
    ap.add_argument("--reps", type=int, default=2, help="timed training steps per mode and size")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step timings")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default bench/results/precision-<ISA level>.json, e.g. precision-avx2.json)")
    ap.add_argument("--render", nargs="*", type=Path, default=None,
                    help="re-render the markdown of saved JSONs (default: every bench/results/precision-*.json) "
                    "and exit")
    args = ap.parse_args()
    if args.render is not None:
        from _saved_result import rerender

        for path in args.render or sorted(RESULTS.glob("precision-*.json")):
            print(rerender(path, render_md).read_text())
        return
    if args.out is None:
        from forgetless.precision import cpu_identity

        args.out = RESULTS / f"precision-{str(cpu_identity()['capability']).lower()}.json"
    write(run(args), args.out)


if __name__ == "__main__":
    if "--render" not in sys.argv:
        from forgetless.allocator import reexec

        reexec()  # the training step under the caching allocator, as the forgetless command runs it
    main()
