"""self_reference: drift from the base model's own behaviour, with no external data.

The reference (base) model answers a fixed prompt set greedily, once; the answers and the base model's
top-k next-token distributions along them are cached. A candidate is scored by its cross-entropy on those
answers (`ce`, lower is better; the base's own value is its baseline) and by its KL divergence from the
base's distributions (`kl`). The KL is computed on the top-k tokens plus one bucket for the rest of the
vocabulary: a coarsening of the full distributions, hence a lower bound of the full KL that is exactly 0
for the base model itself.

Prompts: the 300 built-in general instructions shipped with forgetless (default), any JSONL/JSON file,
or prompts the reference model writes itself (`prompts: generated`, sampled with a fixed seed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field
from safetensors.torch import load_file

from ...errors import DataError
from ...io import atomic_write_text, save_safetensors
from ...lock import DirLock
from ...precision import device_keyed
from ..lm import EngineStats, Request, greedy_generate, score_requests, seeded
from ..metrics import per_unit
from ..tasks import TaskBase, TaskResult, as_array, load_rows, render, sample_rows
from .base import EvalContext, encode

BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "self_prompts.jsonl"
GENERATE_SEED = "Here is a question that a user asked a helpful AI assistant:\n"


class SelfReferenceTask(TaskBase):
    kind: Literal["self_reference"] = "self_reference"
    prompts: Literal["builtin", "file", "generated"] = "builtin"
    prompt_field: str = Field("instruction", description="Field or template of the prompt (file prompts).")
    n_generated: int = Field(100, gt=0, description="How many prompts to generate (prompts: generated).")
    chat: bool | None = Field(None, description="Use the chat template (default: when the tokenizer has one).")
    max_new_tokens: int = Field(128, gt=0)
    topk: int = Field(32, gt=0, description="Base distribution kept per position for the KL.")
    batch_size: int = Field(32, gt=0, description="Prompts generated at once (larger is faster on CPU: per-step "
                                                  "overhead dominates).")
    main_metric: Literal["ce", "kl"] = "ce"


def _prompt_texts(task: SelfReferenceTask, ctx: EvalContext, model, tok) -> tuple[list[str], list[str]]:
    if task.prompts == "generated":
        seed_ids = encode(tok, GENERATE_SEED)
        texts = []
        with torch.no_grad(), seeded(task.seed, next(model.parameters()).device):
            out = model.generate(
                input_ids=torch.tensor([seed_ids] * task.n_generated, device=next(model.parameters()).device),
                do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=40,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        for row in out:
            t = tok.decode(row[len(seed_ids) :], skip_special_tokens=True).strip().split("\n")[0].strip()
            texts.append(t)
        keep = [t for t in texts if len(t.split()) >= 3]
        return keep, [f"gen-{i}" for i in range(len(keep))]
    if task.prompts == "builtin":
        from ...data.loading import read_file

        rows = sample_rows(task, read_file(BUILTIN_PROMPTS))
    else:
        rows = sample_rows(task, load_rows(task, ctx.data_root))
    texts = [str(render(task.prompt_field, r, task.name, "prompt_field")) for r in rows]
    ids = [str(r.data.get("id", r.where)) for r in rows]
    return texts, ids


def _prompt_ids(task: SelfReferenceTask, tok, text: str) -> list[int]:
    use_chat = task.chat if task.chat is not None else bool(getattr(tok, "chat_template", None))
    if use_chat:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    return encode(tok, f"Instruction: {text}\nResponse:")


def _cache_key(task: SelfReferenceTask, reference_fingerprint: str | None, bf16: bool,
               prompts: tuple[list[str], list[str]] | None, device: str = "cpu") -> str:
    """The reference's cache key: the task's settings, the reference model, the precision, the device type when
    not the CPU (a GPU's answers and distributions are its own; CPU keys as before devices were keyed) and, for
    file and built-in prompts, the prompts themselves (an edited prompt file at the same path is other prompts)."""
    spec = task.model_dump(exclude={"name", "weight", "main_metric", "batch_size"})
    spec["reference"] = reference_fingerprint
    spec["bf16"] = bf16
    device_keyed(spec, device)
    if prompts is not None:
        spec["prompts_sha256"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def reference_cache_entry(task: SelfReferenceTask, cache_dir: Path, reference_fingerprint: str, bf16: bool,
                          data_root: Path | None, device: str = "cpu") -> Path:
    """Where `build_reference` caches this task's reference for that reference model and precision: what a run's
    monitor keeps beside its checkpoints, so a resumed run scores against the same reference answers."""
    ctx = EvalContext(model=cast(Any, None), tokenizer=None, data_root=data_root, bf16=bf16)  # prompts only
    listed = None if task.prompts == "generated" else _prompt_texts(task, ctx, None, None)
    return cache_dir / "self_reference" / _cache_key(task, reference_fingerprint, bf16, listed, device)


def build_reference(task: SelfReferenceTask, ctx: EvalContext) -> dict:
    """The reference answers and the reference model's top-k distributions along them (cached on disk)."""
    # file and built-in prompts are read before the key (cheap, no model); generated ones are the model's own
    listed = None if task.prompts == "generated" else _prompt_texts(task, ctx, None, None)
    device = next(ctx.model.parameters()).device.type if ctx.model is not None else "cpu"
    cache = (ctx.cache_dir / "self_reference" / _cache_key(task, ctx.reference_fingerprint, ctx.bf16, listed, device)
             if ctx.cache_dir and ctx.reference_fingerprint else None)
    if cache and (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        tensors = load_file(str(cache / "topk.safetensors"))
        return {**meta, "topk_ids": tensors["ids"], "topk_logprobs": tensors["logprobs"], "lengths": tensors["lengths"]}
    model, tok = ctx.reference() if ctx.reference else (ctx.model, ctx.tokenizer)
    texts, ids = listed or _prompt_texts(task, ctx, model, tok)
    if not texts:
        raise DataError(f"task {task.name}: no prompts")
    prompts = [_prompt_ids(task, tok, t) for t in texts]
    answers = greedy_generate(
        model, tok, prompts, max_new_tokens=task.max_new_tokens, batch_size=task.batch_size, bf16=ctx.bf16,
        progress=ctx.track(f"{task.name}: reference answers", len(prompts)),
    )
    keep = [i for i, a in enumerate(answers) if a]
    prompts, answers, texts, ids = ([prompts[i] for i in keep], [answers[i] for i in keep], [texts[i] for i in keep],
                                    [ids[i] for i in keep])
    eos = tok.eos_token_id
    answers = [a + ([eos] if eos is not None else []) for a in answers]  # the base also decides when to stop
    n_max = max(len(a) for a in answers)
    topk_ids = torch.zeros((len(answers), n_max, task.topk), dtype=torch.int32)
    topk_lp = torch.full((len(answers), n_max, task.topk), -1e4, dtype=torch.float32)

    def hook(i: int, _k: int, rows: torch.Tensor) -> None:
        v, ix = rows.topk(task.topk, dim=-1)
        topk_ids[i, : len(ix)] = ix.to(torch.int32).cpu()
        topk_lp[i, : len(v)] = v.cpu()

    score_requests(model, [Request(p, [a]) for p, a in zip(prompts, answers, strict=True)],
                   batch_tokens=ctx.batch_tokens, bf16=ctx.bf16, row_hook=hook,
                   max_len=max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)) + 1)
    ref: dict[str, Any] = {
        "ids": ids,
        "texts": texts,
        "prompts": prompts,
        "answers": answers,
        "answer_texts": [tok.decode(a, skip_special_tokens=True) for a in answers],
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
        "lengths": torch.tensor([len(a) for a in answers]),
    }
    if cache:
        # one writer per entry (forgetless.lock); one that finds the entry written meanwhile leaves it as it is
        with DirLock(cache, "evaluation cache entry", wait=True):
            if not (cache / "meta.json").is_file():
                cache.mkdir(parents=True, exist_ok=True)
                save_safetensors({"ids": topk_ids, "logprobs": topk_lp, "lengths": ref["lengths"]},
                                 cache / "topk.safetensors")
                meta = {k: ref[k] for k in ("ids", "texts", "prompts", "answers", "answer_texts")}
                atomic_write_text(cache / "meta.json", json.dumps(meta))
    return ref


def coarse_kl(base_ids: torch.Tensor, base_lp: torch.Tensor, cand_rows: torch.Tensor) -> torch.Tensor:
    """KL(base || cand) per position over the base's top-k tokens plus one 'rest' bucket."""
    p = base_lp.exp()
    q_lp = cand_rows.gather(-1, base_ids.long())
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_lp.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (base_lp - q_lp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.clamp_min(0.0)


def metrics(cols, task=None) -> list:
    return [per_unit("nll", "tokens", "ce"), per_unit("kl_sum", "tokens", "kl")]


def run(task: SelfReferenceTask, ctx: EvalContext) -> TaskResult:
    ref = build_reference(task, ctx)
    answers, prompts = ref["answers"], ref["prompts"]
    kl_sum = [0.0] * len(answers)

    def hook(i: int, _k: int, rows: torch.Tensor) -> None:
        n = int(ref["lengths"][i])
        kl_sum[i] = float(coarse_kl(ref["topk_ids"][i, :n], ref["topk_logprobs"][i, :n], rows[:n].float().cpu()).sum())

    stats = EngineStats()
    scores = score_requests(
        ctx.model, [Request(p, [a]) for p, a in zip(prompts, answers, strict=True)], batch_tokens=ctx.batch_tokens,
        bf16=ctx.bf16, row_hook=hook, stats=stats,
        max_len=max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)) + 1,
        progress=ctx.track(task.name, len(answers)),
    )
    cols = {
        "nll": as_array([-s[0].logprob for s in scores]),
        "tokens": as_array([s[0].n_tokens for s in scores]),
        "kl_sum": as_array(kl_sum),
    }
    details = [
        {"id": i, "prompt": t, "reference": a, "ce": float(-s[0].logprob / max(1, s[0].n_tokens))}
        for i, t, a, s in zip(ref["ids"], ref["texts"], ref["answer_texts"], scores, strict=True)
    ]
    return TaskResult.of(task, cols, metrics(cols), list(ref["ids"]), details,
                         {"answers": len(answers), "answer_tokens": int(cols["tokens"].sum())})


