"""Run the `forgetless` command under a caching memory allocator (tcmalloc, mimalloc or jemalloc) when one is
installed: CPU training steps run 1.2-1.45x faster.

Why: a training step on CPU allocates and frees the same large tensors every step (logits and their gradient,
the embedding's gradient, bf16 copies of the weights). glibc's malloc serves every block above 32 MiB with a
fresh `mmap` and returns it with `munmap` when it is freed, so each step faults all of those pages in again
(about 450,000 page faults per step on smollm2-135m at 8 x 128 tokens). On a virtual machine whose memory
balloon reports freed pages to the host, each fault is dearer, and dearer the more the process holds: that
is what made L2-SP and EWC, which hold a copy of the weights, look 1.2-1.3x slower than plain fine-tuning
although their own work was under 3% of the step. Allocators that keep freed pages for reuse remove both
costs. Telling glibc itself to keep them (`mallopt(M_MMAP_MAX, 0)`) was tried and rejected: it was
1.2x faster but fragmented the heap (14 GB peak for a 5.5 GB run).

An allocator must be loaded before the program starts (`LD_PRELOAD`), so `forgetless` re-executes itself
once at start-up with the library preloaded, before torch is imported. `FORGETLESS_MALLOC` chooses:
`auto` (default: the first of tcmalloc, mimalloc, jemalloc that is found), one of those names, or
`system` (the C library's own malloc, no re-execution). `python -m forgetless.allocator` prints the
library and the environment to preload it yourself, e.g. for a notebook:

    eval "$(python -m forgetless.allocator --export)" && jupyter lab

Linux only; elsewhere (and where no library is found) nothing changes. summary.json records the allocator
a run trained under.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shlex
import sys
from pathlib import Path

ENV = "FORGETLESS_MALLOC"
_REEXEC = "FORGETLESS_MALLOC_REEXEC"  # set in the re-executed process: never loop
ORDER = ("tcmalloc", "mimalloc", "jemalloc")  # fastest first, as measured in bench/overhead.py
_NAMES = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "mimalloc": ("mimalloc",),
    "jemalloc": ("jemalloc",),
}
# Settings each one needs: tcmalloc warns on stderr about every block over 1 GB (a model's state is that
# big); mimalloc (after 10 ms) and jemalloc (at once, for blocks over 8 MB) hand freed pages back to the
# system by default, which is the very cost to avoid (tests/test_allocator.py counts the page faults).
_SETTINGS = {
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)},
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _candidates(name: str) -> list[Path]:
    """Where a library may be: the system's library folders, this environment's, and the `cmeel` wheels
    on sys.path (`pip install cmeel-mimalloc` ships libmimalloc.so inside site-packages)."""
    dirs = [Path(d) for d in _LIB_DIRS]
    dirs += [Path(sys.prefix) / "lib", *(Path(p) / "cmeel.prefix" / "lib" for p in sys.path if p)]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    out = []
    for d in dirs:
        for stem in _NAMES[name]:
            out += sorted(d.glob(f"lib{stem}.so*"), key=lambda p: len(p.name))
    return out


def find(name: str) -> str | None:
    """The path of an installed allocator library, or None."""
    if name not in _NAMES:
        raise ValueError(f"{ENV}: unknown allocator {name!r}; valid: auto, {', '.join(ORDER)}, system")
    for p in _candidates(name):
        if p.is_file():
            return str(p)
    for stem in _NAMES[name]:
        so = ctypes.util.find_library(stem)  # ldconfig's cache: a bare soname the loader resolves itself
        if so:
            return so
    return None


def choose(setting: str | None = None) -> tuple[str, str] | None:
    """(name, library) that `FORGETLESS_MALLOC` asks for, or None (system malloc, or nothing installed)."""
    setting = (setting if setting is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    for name in ORDER if setting == "auto" else (setting,):
        lib = find(name)
        if lib:
            return name, lib
    return None


def loaded_allocator() -> str:
    """Which allocator this process runs under: tcmalloc, mimalloc, jemalloc, or the C library's
    (glibc; `system` where that cannot be told)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ORDER:
        if any(f"lib{stem}." in maps for stem in _NAMES[name]):
            return name
    return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def release_free_memory() -> bool:
    """Hand the allocator's cached free pages back to the kernel; True when it was asked. Runs trained one after
    another in one process (a sweep, a continual sequence) call it at start, so that each one's peak memory is
    its own rather than inflated by what the caching allocator kept from the run before."""
    import gc

    gc.collect()
    name = loaded_allocator()
    try:
        libc = ctypes.CDLL(None)  # the preloaded allocator's symbols are in the global namespace
        if name == "tcmalloc":
            libc.MallocExtension_ReleaseFreeMemory()
        elif name == "jemalloc":  # MALLCTL_ARENAS_ALL = 4096
            libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        elif name == "glibc":
            libc.malloc_trim(ctypes.c_size_t(0))
        else:  # mimalloc with purge_delay -1 keeps its pages even through mi_collect(true) and option changes
            return False
    except (OSError, AttributeError):
        return False
    return True


def preload_env(name: str, lib: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that preloads `lib` (the user's own settings win)."""
    env = dict(os.environ if env is None else env)
    prior = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib}:{prior}" if prior else lib
    for k, v in _SETTINGS[name].items():
        env.setdefault(k, v)
    return env


def reexec() -> None:
    """Replace this process by the same command with the allocator preloaded, when one is asked for, found,
    and not loaded yet. Only for a process that is its own program (sys.argv is what it was started with):
    the `forgetless` command and scripts (bench/); a no-op everywhere else and on the second pass."""
    if os.environ.get(_REEXEC) or loaded_allocator() in ORDER:
        return
    orig = getattr(sys, "orig_argv", None)
    args = sys.argv[1:]
    if not orig or (args and orig[-len(args):] != args):
        return  # argv was rewritten (a test harness, a worker): re-running orig_argv would run something else
    try:
        chosen = choose()
    except ValueError as e:
        print(f"warning: {e}; using the system allocator", file=sys.stderr)
        return
    if chosen is None:
        return
    env = preload_env(*chosen)
    env[_REEXEC] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *orig[1:]], env)
    except OSError as e:  # exec refused: carry on as we are
        print(f"warning: could not restart under {chosen[0]} ({e}); using the system allocator", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m forgetless.allocator [--export]`: the library FORGETLESS_MALLOC selects, or how to preload it."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        chosen = choose()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if chosen is None:
        print("no caching allocator selected or found (install libtcmalloc-minimal4, or pip install cmeel-mimalloc)",
              file=sys.stderr)
        return 1
    name, lib = chosen
    if "--export" in argv:
        env = preload_env(name, lib)
        print("export " + " ".join(f"{k}={shlex.quote(env[k])}" for k in ("LD_PRELOAD", *_SETTINGS[name])))
    else:
        print(f"{name}\t{lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
