"""Compute precision chosen by measurement: bf16 autocast only where it is really faster on this device.

torch supports bf16 on every CPU build, but only CPUs with native bf16 instructions (AVX512-BF16 or AMX on
x86, BF16 on recent ARM) run it fast; elsewhere torch's matmul takes a reference path that was measured 68x
slower than fp32 (AMD EPYC with AVX2 only: 1.2 against 81.6 GFLOP/s). So `auto` decides by:

- CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer run bf16 at full speed).
- CPU: where oneDNN finds no bf16 instructions (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), fp32 at
  once. Otherwise, and on Apple MPS, a short timed probe: a few matmuls at the model's own widths under bf16
  autocast against fp32, well under a second, timed in the probing thread's CPU time so that a busy machine
  cannot skew it; bf16 is chosen when it is at least `MIN_SPEEDUP` times faster (at tiny widths it is not). The
  result is cached in `$FORGETLESS_HOME/cache/precision.json` under a key of CPU model, a hash of the CPU
  flags (VMs can hide different flags behind one model name), torch version, thread count and widths.
  MPS is untested here: no Apple machine was at hand.

Master weights stay fp32 whatever is chosen: this only picks the compute dtype of autocast. An explicit
`bf16` where the probe measured it slower still runs, with one warning that gives the measured ratio.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .io import atomic_write_json, forgetless_home

PrecisionSetting = Literal["auto", "bf16", "fp32"]
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: autocast also pays for casting weights every step
PROBE_TOKENS = 64  # rows of the probe's matmuls: small, so an emulated bf16 path costs ~0.1 s, not seconds
PROBE_VERSION = 2  # 2: thread CPU time, fastest call (1 timed wall clock and read noise on a busy machine)
DEFAULT_WIDTHS = (576, 1536)  # smollm2-135m's hidden and MLP widths, for callers without a model
_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """The resolved compute precision and why. `dtype` is what autocast runs ("bf16") or "fp32"."""

    dtype: Literal["bf16", "fp32"]
    reason: str
    requested: str = "auto"
    device: str = "cpu"
    probe: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def line(self) -> str:
        """One line for the first line of progress output."""
        return f"precision: {self.dtype} compute ({self.reason})"


def device_keyed(key: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """`key` (a cache key's fields, changed in place and returned) with the device's type added where it is not
    the CPU: a GPU's scores and answers are its own (other kernels, other last digits), and a CPU key stays as it
    was before devices were keyed, so caches written then are still found."""
    kind = torch.device(device).type
    if kind != "cpu":
        key["device"] = kind
    return key


def normalize(setting: Any) -> str:
    """Accept auto | bf16 | fp32 and the booleans of the older `bf16: true/false` options."""
    if setting is True:
        return "bf16"
    if setting is False:
        return "fp32"
    s = str(setting).lower()
    if s in ("auto", "bf16", "fp32"):
        return s
    if s == "bfloat16":
        return "bf16"
    if s == "float32":
        return "fp32"
    raise ValueError(f"precision must be auto, bf16 or fp32 (got {setting!r})")


def combine(precision: Any, bf16_alias: bool | None) -> str:
    """A precision setting given with the older boolean alias beside it (`--bf16/--no-bf16`, `eval_bf16`)."""
    precision = normalize(precision)
    if bf16_alias is None:
        return precision
    alias = "bf16" if bf16_alias else "fp32"
    if precision not in ("auto", alias):
        raise ValueError(f"precision {precision} contradicts the bf16 alias ({bf16_alias})")
    return alias


def cpu_identity() -> dict[str, Any]:
    """What the CPU probe's result depends on: model name, flags (hashed), torch, threads, ISA level."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if (key in ("model name", "hardware", "cpu model")
                    and model in ("", platform.machine(), platform.processor())):
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = value.strip()
    except OSError:  # not Linux: macOS/Windows give the model name through platform
        pass
    if sys.platform == "darwin":
        model = platform.processor() or platform.machine()
    return {
        "cpu": model,
        "flags_sha": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
        "flags": flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "capability": _cpu_capability(),
        "mkldnn_bf16": _mkldnn_bf16(),
    }


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


def _mkldnn_bf16() -> bool | None:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # builds without oneDNN
        return None


def model_widths(model: Any) -> tuple[int, int]:
    """(hidden, MLP) widths from a model's config, for probing at the sizes the model runs."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or (4 * hidden if hidden else None)
    if isinstance(hidden, int) and isinstance(inter, int) and hidden > 0 and inter > 0:
        return hidden, inter
    return DEFAULT_WIDTHS


def config_widths(path: str | Path | None) -> tuple[int, int]:
    """(hidden, MLP) widths from a local model directory's config.json (defaults when there is none)."""
    if path is None:
        return DEFAULT_WIDTHS
    cfg = Path(path) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return DEFAULT_WIDTHS
    raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw  # multimodal configs
    hidden = raw.get("hidden_size") or raw.get("n_embd") or raw.get("d_model") or raw.get("dim")
    inter = (raw.get("intermediate_size") or raw.get("n_inner") or raw.get("hidden_dim")
             or (4 * hidden if hidden else None))
    if isinstance(hidden, int) and isinstance(inter, int) and hidden > 0 and inter > 0:
        return hidden, inter
    return DEFAULT_WIDTHS


def _sync(device: torch.device) -> None:
    if device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize()


def _block(device: torch.device, widths: tuple[int, int]):
    """The two matmul shapes a transformer block runs (hidden->MLP and back) on PROBE_TOKENS rows, fp32 inputs."""
    h, m = widths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, h, generator=g).to(device)
    w1 = torch.randn(h, m, generator=g).to(device)
    w2 = torch.randn(m, h, generator=g).to(device)
    return (lambda: (x @ w1) @ w2), 2 * PROBE_TOKENS * h * m * 2


def _call_s(fn, device: torch.device, bf16: bool) -> float:
    """Seconds of one call: on CPU the calling thread's CPU time (torch runs it on that one thread here), which
    a busy machine cannot inflate by descheduling the probe; wall time on an accelerator."""
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        t0 = clock()
        fn()
        _sync(device)
        return max(clock() - t0, 1e-9)


def measure(device: torch.device, widths: tuple[int, int] = DEFAULT_WIDTHS, budget_s: float = 0.3) -> dict[str, Any]:
    """The timed probe: fp32 and bf16-autocast GFLOP/s at `widths` (casts included, as a training or scoring
    step pays them), and their ratio. On one thread and in that thread's CPU time, the modes alternating call
    by call, each keeping its fastest call: on a busy machine wall time (or two threads waiting on each other)
    measures the scheduler, not the kernels (a bench under load 7 on 2 cores read anything from 0.5x to 5.7x
    in wall time). Runs until `budget_s` has passed and each mode had 5 calls (at most 200)."""
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn, flops = _block(device, widths)
        best = {False: float("inf"), True: float("inf")}
        for bf16 in (False, True):  # warm-up: kernel selection, oneDNN primitive creation
            _call_s(fn, device, bf16)
        calls = 0
        while calls < 5 or (time.perf_counter() - t0 < budget_s and calls < 200):
            for bf16 in (False, True):
                best[bf16] = min(best[bf16], _call_s(fn, device, bf16))
            calls += 1
    finally:
        torch.set_num_threads(threads)
    fp32, bf16 = flops / best[False] / 1e9, flops / best[True] / 1e9
    return {"fp32_gflops": round(fp32, 2), "bf16_gflops": round(bf16, 2), "bf16_speedup": round(bf16 / fp32, 3),
            "widths": list(widths), "calls": calls, "threads": 1, "probe_s": round(time.perf_counter() - t0, 3)}


# The probe, replaceable in tests (a stub that reports bf16 slower or faster).
probe = measure


def cache_path() -> Path:
    return forgetless_home() / "cache" / "precision.json"


def cache_key(device: torch.device, widths: tuple[int, int]) -> str:
    ident = cpu_identity()
    parts = [f"probe{PROBE_VERSION}", device.type, ident["cpu"], ident["flags_sha"], ident["torch"],
             f"threads={ident['threads']}", f"widths={widths[0]}x{widths[1]}"]
    return "|".join(parts)


def _cached_probe(device: torch.device, widths: tuple[int, int]) -> dict[str, Any]:
    path, key = cache_path(), cache_key(device, widths)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), dict) and "bf16_speedup" in cache[key]:
        return {**cache[key], "cached": True}
    result = probe(device, widths)
    cache[key] = result
    try:
        atomic_write_json(path, cache)
    except OSError:  # a read-only home still gets the measured answer, just not cached
        pass
    return {**result, "cached": False}


def resolve(setting: Any = "auto", device: torch.device | str = "cpu", model: Any = None,
            widths: tuple[int, int] | None = None, warn: bool = True) -> Precision:
    """Resolve auto | bf16 | fp32 (or True/False) for `device`; see the module docstring."""
    requested = normalize(setting)
    device = torch.device(device)
    widths = widths or (model_widths(model) if model is not None else DEFAULT_WIDTHS)
    if requested == "fp32":
        return Precision("fp32", "requested", requested, device.type)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if requested == "bf16":
            return Precision("bf16", "requested" + ("" if ok else "; this GPU emulates bf16"), requested, device.type)
        return Precision("bf16" if ok else "fp32",
                         "GPU supports bf16" if ok else "GPU without bf16 support", requested, device.type)
    if device.type not in ("cpu", "mps"):
        return Precision("bf16" if requested == "bf16" else "fp32", "requested" if requested == "bf16"
                         else f"no bf16 probe for {device.type}", requested, device.type)
    if device.type == "cpu" and requested == "auto" and _mkldnn_bf16() is False:
        # oneDNN finds no bf16 instructions: torch would take its reference path (68x slower measured)
        return Precision("fp32", "no native bf16 on this CPU (oneDNN); bf16 would be emulated", requested, device.type)
    p = _cached_probe(device, widths)
    fast = p["bf16_speedup"] >= MIN_SPEEDUP
    measured = f"bf16 {p['bf16_speedup']:.2f}x fp32 at widths {widths[0]}x{widths[1]}"
    if requested == "bf16":
        if not fast and warn:
            _warn_once(device, p)
        return Precision("bf16", f"requested; {measured}", requested, device.type, p)
    if fast:
        return Precision("bf16", f"measured: {measured}", requested, device.type, p)
    return Precision("fp32", f"measured: {measured} (native bf16 not fast here)", requested, device.type, p)


def _warn_once(device: torch.device, p: dict[str, Any]) -> None:
    key = f"{device.type}:{p.get('bf16_speedup')}"
    if key in _warned:
        return
    _warned.add(key)
    print(f"warning: bf16 compute was requested, but on this {device.type} it ran {1 / p['bf16_speedup']:.1f}x "
          f"slower than fp32 in a timed probe ({p['bf16_gflops']:.1f} vs {p['fp32_gflops']:.1f} GFLOP/s at widths "
          f"{p['widths'][0]}x{p['widths'][1]}; oneDNN reports native bf16: {_mkldnn_bf16()}). precision: auto (or "
          "fp32) would pick fp32.", file=sys.stderr)

