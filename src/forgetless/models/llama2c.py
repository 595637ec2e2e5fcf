"""Import a llama2.c checkpoint (legacy version-0 `.bin`) and its SentencePiece tokenizer as an HF Llama dir.

The `.bin` is a 7-int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means the classifier is not shared with the embedding) followed by fp32 tensors in
llama2.c's order. llama2.c applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...; HF Llama rotates the
two halves of each head, so wq and wk rows are permuted the way HF's `convert_llama_weights_to_hf.py` does.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_dir
from forgetless.models.catalog import sha256_file, write_provenance

if TYPE_CHECKING:
    import torch


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs to HF's first-half/second-half rotary layout."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _read_checkpoint(bin_path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    raw = bin_path.read_bytes()
    if len(raw) < 28:
        raise ForgetlessError(f"{bin_path}: too short for a llama2.c checkpoint (no 28-byte header)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ForgetlessError(f"{bin_path}: implausible llama2.c header {struct.unpack('7i', raw[:28])}")
    head = dim // n_heads
    kv_dim = n_kv * head
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, head // 2)),
        ("freq_cis_imag", (seq_len, head // 2)),
    ]
    if not shared:
        shapes.append(("output", (vocab, dim)))
    expected = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != expected:
        raise ForgetlessError(
            f"{bin_path}: {len(raw)} bytes, expected {expected} for a version-0 llama2.c checkpoint with "
            f"header dim={dim} hidden_dim={hidden} n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv} "
            f"vocab_size={vocab} seq_len={seq_len} (versioned exports from export.py --version 1/2 are not supported)"
        )
    import torch

    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    tensors, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        tensors[name] = torch.from_numpy(flat[pos : pos + n].copy()).view(shape)
        pos += n
    header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=vocab, seq_len=seq_len, shared_classifier=shared)
    return header, tensors


def _hf_state_dict(h: dict[str, int], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["attention_norm"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rotary(t["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _permute_rotary(t["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["ffn_norm"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["tok_embeddings"] if h["shared_classifier"] else t["output"]
    return {k: v.contiguous() for k, v in sd.items()}


def sentencepiece_tokenizer(model_path: str | os.PathLike):
    """A tokenizers-backed HF tokenizer that encodes like `SentencePieceProcessor.encode` plus a leading BOS.

    transformers builds the `tokenizers` pipeline from the .model proto's own settings (whitespace handling,
    dummy prefix, byte fallback, merges ranked by score); `legacy=True` prefixes the dummy space the way
    SentencePiece does. The class is the generic `TokenizersBackend`, so reloading keeps exactly this pipeline.
    """
    from tokenizers import models, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(model_path))
    spec = extractor.proto.trainer_spec
    if spec.model_type != 2:  # 2 = BPE, what llama2.c's trainer and run.c use
        raise ForgetlessError(f"{model_path}: SentencePiece model type {spec.model_type} is not BPE")
    vocab = extractor.extract(models.BPE)["vocab"]  # type: ignore[call-overload]  # a dict in transformers 5
    import inspect

    if "legacy" not in inspect.signature(SpmConverter.build_tokenizer_from_spm_proto).parameters:
        import transformers

        # without it the tokenizer splits text unlike SentencePiece (seen on transformers 5.17; 5.25 has it)
        raise ForgetlessError(f"importing a llama2.c tokenizer needs a transformers whose SpmConverter takes `legacy`"
                              f" (5.25 does; this is {transformers.__version__}): pip install -U transformers")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=extractor.proto, vocab=vocab, legacy=True)
    bos, eos, unk = spec.bos_piece or "<s>", spec.eos_piece or "</s>", spec.unk_piece or "<unk>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk)


def convert_llama2c(bin_path: Path, tok_path: Path, dest: Path) -> dict:
    """Write the HF model, tokenizer and generation config into the existing dir `dest`; return provenance."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    for p in (bin_path, tok_path):
        if not p.is_file():
            raise ForgetlessError(f"{p}: no such file")
    h, tensors = _read_checkpoint(bin_path)
    tokenizer = sentencepiece_tokenizer(tok_path)
    if len(tokenizer) != h["vocab_size"]:
        raise ForgetlessError(f"{tok_path} has {len(tokenizer)} pieces but {bin_path} has vocab_size {h['vocab_size']}")
    config = LlamaConfig(
        vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"], num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"], rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h["shared_classifier"],  # type: ignore[arg-type]  # the header's 0 / 1, as written
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(_hf_state_dict(h, tensors), strict=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    shutil.copyfile(tok_path, dest / "tokenizer.model")
    return {
        "checkpoint": str(bin_path.resolve()),
        "checkpoint_sha256": sha256_file(bin_path),
        "tokenizer_model": str(tok_path.resolve()),
        "tokenizer_model_sha256": sha256_file(tok_path),
        "header": h,
    }


def import_llama2c(
    bin_path: str | os.PathLike,
    tokenizer_model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c `.bin` + SentencePiece `.model` into an HF LlamaForCausalLM dir; return `out_dir`.

    The dir is built beside `out_dir` and renamed into place, so an interrupted import leaves nothing behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ForgetlessError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        info = convert_llama2c(Path(bin_path), Path(tokenizer_model_path), tmp)
        write_provenance(tmp, {"source": "llama2c", **info})
    return out_dir
