"""Where a measurement came from: commit, date, command, library versions, CPU, precision path, allocator.

Every bench script records `collect()` in its JSON and calls `check_same_machine()` before it resumes a
result started earlier, so one table never mixes CPUs or precision paths silently: a resume on another CPU
(flags differ) or another precision path is refused, naming both, unless the caller marks the new rows
(`allow_mixed=True`; each row then carries its own `machine` key).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ForgetlessError
from .precision import Precision, cpu_identity

LIBRARIES = ("forgetless", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "lm-eval")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(where: str | Path | None = None) -> dict[str, Any]:
    """HEAD of the repository holding `where` (default: this package's checkout), and whether it is dirty."""
    cwd = Path(where) if where else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def accelerator(device: str) -> dict[str, Any] | None:
    """The GPU a `cuda` device means (name, memory, CUDA and driver-visible capability), else None: a result from a
    GPU names it beside the host CPU."""
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    return {"name": torch.cuda.get_device_name(i), "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "count": torch.cuda.device_count()}


def collect(precision: Precision | dict[str, Any] | str | None = None, *, device: str = "cpu",
            argv: list[str] | None = None, repo: str | Path | None = None) -> dict[str, Any]:
    """The provenance block of a bench result. `precision`: the resolved compute path the bench ran on."""
    from .allocator import loaded_allocator

    ident = cpu_identity()
    if isinstance(precision, Precision):
        prec: dict[str, Any] | None = {"dtype": precision.dtype, "reason": precision.reason}
    elif isinstance(precision, str):
        prec = {"dtype": precision, "reason": "set by the bench"}
    else:
        prec = precision
    return {
        **git_commit(repo),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        "versions": {"python": platform.python_version(), **{n: _version(n) for n in LIBRARIES}},
        "machine": {
            "cpu": ident["cpu"], "flags": ident["flags"], "flags_sha": ident["flags_sha"],
            "capability": ident["capability"], "mkldnn_bf16": ident["mkldnn_bf16"], "threads": ident["threads"],
            "cpus": os.cpu_count(), "platform": platform.platform(), "device": device,
            "gpu": accelerator(device),
        },
        "precision": prec,
        "allocator": loaded_allocator(),
        "loadavg_start": _loadavg(),
    }


def finish(prov: dict[str, Any]) -> dict[str, Any]:
    """The same block with the end date and load average (call when the bench is done)."""
    return {**prov, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg_end": _loadavg()}


def machine_line(prov: dict[str, Any]) -> str:
    """One line for a results table: CPU, ISA level, flags hash, threads, precision, allocator, commit."""
    m, p = prov.get("machine", {}), prov.get("precision") or {}
    commit = (prov.get("commit") or "unknown")[:10] + ("+dirty" if prov.get("dirty") else "")
    gpu = m.get("gpu")
    dev = f"device {m.get('device')}"
    if gpu:
        dev += f" ({gpu['name']}, {gpu['memory_gib']:g} GiB, CUDA {gpu['cuda']})"
    flags = f", flags {m['flags_sha']}" if m.get("flags_sha") else ""
    return (f"{m.get('cpu')} ({m.get('capability')}, native bf16: {m.get('mkldnn_bf16')}{flags}), {m.get('threads')} "
            f"threads, {dev}, precision {p.get('dtype', 'n/a')}, allocator {prov.get('allocator')}, "
            f"torch {prov.get('versions', {}).get('torch')}, commit {commit}, {prov.get('date')}")


def compute_of(result: dict[str, Any]) -> str:
    """A bench result's compute precision for its markdown ("bf16 compute"), or that it was not recorded."""
    dtype = ((result.get("provenance") or {}).get("precision") or {}).get("dtype")
    return f"{dtype} compute" if dtype else "compute precision not recorded"


def provenance_line(result: dict[str, Any]) -> str:
    """The "Provenance: ..." line of a bench's markdown, from its JSON result alone; a result saved before
    provenance was recorded says so instead of inventing a machine."""
    prov = result.get("provenance")
    if not prov:
        return ("Provenance: not recorded (this result predates provenance recording: its commit, CPU flags and "
                "precision path are unknown; rerun the bench for them).")
    return f"Provenance: {machine_line(prov)}."


def cpu_label(machine: dict[str, Any]) -> str:
    """A machine record's CPU as the guards name it: model and flags hash (two CPUs of one model name differ)."""
    return f"{machine.get('cpu')} [flags {machine.get('flags_sha')}]"


def check_same_machine(saved: dict[str, Any] | None, current: dict[str, Any], *, what: str,
                       allow_mixed: bool = False, allow_other_cpu: bool = False) -> bool:
    """Before resuming `what` (a result file or bench directory) recorded under `saved`: True when the CPU
    (model and flags) and the precision path match; else raise, naming both, or with `allow_mixed` return False
    (the caller marks the new rows with their own machine). `allow_other_cpu` is narrower: it returns False where
    only the CPU differs (another CPU of the same device and precision path, checked by the caller to reproduce the
    saved runs) and still raises for another precision path or GPU. Where both computed on a GPU, the GPU model
    and the precision path are the arithmetic; the host CPU that fed it is not compared."""
    if not saved:
        return True
    sm, cm = saved.get("machine", {}), current.get("machine", {})
    sp, cp = (saved.get("precision") or {}).get("dtype"), (current.get("precision") or {}).get("dtype")
    differences = []
    on_gpu = all(m.get("device") == "cuda" and m.get("gpu") for m in (sm, cm))
    cpu_differs = not on_gpu and (sm.get("cpu"), sm.get("flags_sha")) != (cm.get("cpu"), cm.get("flags_sha"))
    if cpu_differs:
        differences.append(f"CPU {cpu_label(sm)} vs {cpu_label(cm)}")
    sg, cg = (sm.get("gpu") or {}).get("name"), (cm.get("gpu") or {}).get("name")
    if sg != cg:
        differences.append(f"GPU {sg or 'none'} vs {cg or 'none'}")
    if sp != cp:
        differences.append(f"precision {sp} vs {cp}")
    if not differences:
        return True
    if allow_mixed or (allow_other_cpu and cpu_differs and len(differences) == 1):
        return False
    raise ForgetlessError(f"{what} was started on another machine or precision path ({'; '.join(differences)}): "
                          "resuming would mix them in one table; start it afresh (--overwrite) or rerun it there")
