"""Loading a causal LM safely and wrapping it for the recipe's method (full, PEFT, adapters, freeze)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ForgetlessError
from ..methods import WrapContext
from ..methods.bottleneck import (
    adapter_config,
    adapter_modules,
    is_adapter_dir,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from ..methods.qlora import QUANT_FILE
from ..recipe import ModelConfig


def pick_device(device: str = "auto") -> torch.device:
    """auto: CUDA, else Apple's MPS (untested here: no Apple machine at hand), else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ForgetlessError("train.device is cuda but no CUDA device is available")
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" or (device == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise ForgetlessError("train.device is mps but this torch build or machine has no MPS device")
        return torch.device("mps")
    return torch.device("cpu")


def storage_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_tokenizer(path: str, cfg: ModelConfig | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(cfg and cfg.trust_remote_code), revision=cfg.revision if cfg else None
        )
    except OSError as e:
        raise ForgetlessError(f"model.name {path!r}: cannot load the tokenizer: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


@contextlib.contextmanager
def _loaded_whole() -> Iterator[None]:
    """`from_pretrained` as in a fresh process: while a ZeRO-3 Trainer lives in this process (a run saving its merged
    model), transformers keeps its DeepSpeed config, under which a load is partitioned by zero.Init, a collective
    that rank 0 alone hangs in. The config is put back after, for the Trainer. (A new run instead drops the last
    run's config for good before it loads its model: train/run.py.)"""
    import transformers.integrations.deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_base_model(
    path: str, cfg: ModelConfig, device: torch.device, quantization_config: Any = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load weights from safetensors only (pickle only if the recipe allows it), remote code off by default.
    `dtype`: load in this dtype rather than the recipe's storage dtype (`model.dtype`)."""
    from transformers import AutoModelForCausalLM

    local = Path(path)
    if local.is_dir() and not cfg.allow_pickle:
        has_st = any(local.glob("*.safetensors"))
        has_pickle = any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth"))
        if has_pickle and not has_st:
            raise ForgetlessError(
                f"{path}: only pickle weights (.bin/.pt) found; pickle files can run code when loaded. Convert "
                "them to safetensors, or set model.allow_pickle: true if you trust this file."
            )
    kwargs: dict[str, Any] = {
        "dtype": dtype or storage_dtype(cfg.dtype, device),
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
    }
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ForgetlessError(f"model.name {path!r}: cannot load the model: {e}") from None
    if quantization_config is None:
        model.to(device)
    return model


def prepare_model(
    path: str,
    cfg: ModelConfig,
    method: Any,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    tokenizer: Any = None,
    calibration: Any = None,
) -> nn.Module:
    """Load the base model and wrap it for `method` (its plugin in forgetless.methods). Trainable weights are
    always fp32. `calibration`: tokenized examples for data-driven inits (see methods.base.WrapContext)."""
    quant = method.quantization(compute_dtype)
    # full and freeze train the base's own weights and save them all: loaded in fp32, so training starts from the
    # checkpoint's values, not from their bf16 rounding (which moved 79% of SmolLM2's weights), and the layers that
    # freeze leaves alone are saved as they were; `model.dtype: bf16` still stores the frozen ones in bf16
    exact = not method.peft and quant is None
    model = load_base_model(path, cfg, device, quant, torch.float32 if exact else None)
    model = method.wrap(model, WrapContext(path, device, gradient_checkpointing, tokenizer, calibration))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        elif exact and cfg.dtype == "bf16" and not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_trained(model: nn.Module, tokenizer: Any, out_dir: Path, base_path: str,
                 initial_adapter: Path | None = None) -> str:
    """Save a full model, a PEFT adapter or a bottleneck adapter (safetensors) with the tokenizer. Returns the kind.

    `initial_adapter`: the adapter as initialised by an init that moved part of the base into it (PiSSA, OLoRA,
    MiLoRA); the saved adapter is then converted to a standard LoRA against the original base (PEFT: rank 2r)."""
    if adapter_modules(model):
        save_adapters(model, out_dir, base_path)
        kind = "adapter"
    elif hasattr(model, "peft_config"):
        kw = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
        model.save_pretrained(out_dir, safe_serialization=True, **kw)  # type: ignore[operator]  # a PeftModel
        kind = "peft"
    else:
        model.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]  # a PreTrainedModel
        kind = "model"
    tokenizer.save_pretrained(out_dir)
    return kind


#: the run's adapter as initialised by an init that moved part of the base into it (written by the run, read here)
INITIAL_ADAPTER = "initial_adapter"


def moved_base_initial_adapter(path: Path) -> Path | None:
    """For a checkpoint (`<run>/checkpoints/checkpoint-N`) of a run whose LoRA init moved part of the base into the
    adapter (pissa, orthonormal, milora, corda): the run's `initial_adapter/`. Such a checkpoint's adapter is
    relative to the residual base, not the original one (the final adapter is saved converted; checkpoints are not,
    so that a resume continues exactly)."""
    initial = path.parent.parent / INITIAL_ADAPTER
    if path.parent.name == "checkpoints" and (initial / "adapter_config.json").is_file():
        return initial
    return None


def _checkpoint_against_base(base: nn.Module, path: Path, initial: Path) -> nn.Module:
    """The checkpoint's adapter (A, B, against W_res = W - s B0 A0) as a standard LoRA of rank 2r against the
    original base W: W_res + s B A = W + s [B | -B0] [A ; A0] (PEFT's conversion of the final adapter, done here on
    the saved tensors)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("peft_type") != "LORA":
        raise ForgetlessError(f"{path}: a checkpoint of a moved-base init must be a plain LoRA adapter")
    now, init = load_file(path / "adapter_model.safetensors"), load_file(initial / "adapter_model.safetensors")
    if set(now) != set(init):
        raise ForgetlessError(f"{path}: its adapter's tensors differ from {initial}'s: not the same run's adapter")
    tensors = {k: torch.cat([v, init[k]], 0) if "lora_A" in k else torch.cat([v, -init[k]], 1) if "lora_B" in k
               else v for k, v in now.items()}
    cfg["init_lora_weights"], cfg["r"] = True, 2 * cfg["r"]
    cfg["lora_alpha"] *= 2 ** 0.5 if cfg.get("use_rslora") else 2  # the same scale at rank 2r
    for key in ("rank_pattern", "alpha_pattern"):
        cfg[key] = {k: 2 * v for k, v in (cfg.get(key) or {}).items()}
    drop = ("corda_config", "eva_config", "loftq_config")  # the init's own settings: the LoRA is a plain one now
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name not in drop}
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in known})
    model = get_peft_model(base, config)
    unexpected = list(getattr(set_peft_model_state_dict(model, tensors), "unexpected_keys", None) or [])
    if unexpected:
        raise ForgetlessError(f"{path}: adapter tensors that fit no layer: {unexpected[:3]}")
    return model


def merge_for_export(model: nn.Module, method: Any, adapter_dir: Path | None = None) -> nn.Module:
    """A plain HF model with the adapter folded in (LoRA, DoRA, IA3, identity bottleneck adapters).

    QLoRA adapters are merged into the base loaded in full precision (from `adapter_dir`), not into the
    4-bit weights, which would round the merged result back to 4 bits.
    """
    if not method.can_merge():
        raise ForgetlessError(f"method {method.name!r} cannot be merged into the base weights; keep the adapter")
    if adapter_modules(model):
        return merge_adapters(model)
    if method.merge_full_precision:
        if adapter_dir is None:
            raise ForgetlessError(f"{method.name}: merging needs the saved adapter directory")
        full, _ = load_model(adapter_dir, full_precision_base=True)
        return full.merge_and_unload()  # type: ignore[operator]  # a PeftModel
    return model.merge_and_unload()  # type: ignore[operator]  # a PeftModel



def load_model(
    path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, full_precision_base: bool = False
) -> tuple[nn.Module, Any]:
    """Load what `forgetless train` wrote: a run directory, a full model, a PEFT or a bottleneck adapter, whole (in
    one process, whatever DeepSpeed run is alive in this one).

    A QLoRA adapter is put back on the 4-bit base it was trained on, unless `full_precision_base`.
    """
    with _loaded_whole():
        return _load_model(Path(path), device, dtype, full_precision_base)


def _load_model(path: Path, device: str, dtype: torch.dtype, full_precision_base: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (path / "summary.json").is_file() or (path / "recipe.yaml").is_file():
        path = path / "final"
    if not path.is_dir():
        if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
            raise ForgetlessError(f"{path}: no such model directory")
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)  # hub id
        return model.to(device).eval(), load_tokenizer(str(path))
    tokenizer = load_tokenizer(str(path))
    if is_adapter_dir(path):
        base = adapter_config(path)["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
        load_adapters(model, path)
    elif (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        kw: dict[str, Any] = {}
        if (path / QUANT_FILE).is_file() and not full_precision_base:
            q = json.loads((path / QUANT_FILE).read_text())
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q["quant_type"],
                bnb_4bit_use_double_quant=q["double_quant"],
                bnb_4bit_compute_dtype=getattr(torch, q.get("compute_dtype", "float32")),
            )
            kw["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True, **kw)
        initial = moved_base_initial_adapter(path)
        if initial is not None:  # a checkpoint of a run whose init moved part of the base into the adapter
            model = _checkpoint_against_base(model, path, initial)
        else:
            model = PeftModel.from_pretrained(model, str(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    if not getattr(model, "is_loaded_in_4bit", False):
        model = model.to(device)  # type: ignore[arg-type]  # transformers' typing of PreTrainedModel.to
    return model.eval(), tokenizer
