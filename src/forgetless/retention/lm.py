"""The scoring engine: batched log-likelihoods, rolling perplexity windows and greedy generation.

Speed on CPU comes from three things: length-sorted batches under a token budget, bf16 autocast, and
scoring all choices of a multiple-choice item in ONE sequence: the context once, then each choice as a
branch that attends to the context and to itself only (a tree attention mask with per-branch position
ids). The LM head runs only on the positions that are scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..errors import DataError


@dataclass
class Request:
    """One item: a context and the continuations to score after it (the choices)."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    logprob: float  # sum of log p(continuation tokens | context)
    n_tokens: int
    greedy: bool  # every continuation token was the argmax


@dataclass
class EngineStats:
    items: int = 0
    tokens: int = 0
    left_truncated: int = 0


def autocast(model: nn.Module, enabled: bool = True):
    device = next(model.parameters()).device
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def context_window(model: nn.Module, default: int = 2048) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _lm_parts(model: nn.Module):
    """(decoder, head, softcap): run the decoder for hidden states, the head only where needed.
    None where that is not possible (prompt-learning PEFT models add virtual tokens)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if (getattr(model, "active_peft_config", None) is not None
                and model.active_peft_config.is_prompt_learning):  # type: ignore[union-attr]  # a PeftModel
            return None
        model = model.get_base_model()  # type: ignore[operator]  # a PeftModel
    decoder = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    if decoder is None or head is None or not isinstance(head, nn.Module):
        return None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return decoder, head, softcap


def _supports_tree_mask(model: nn.Module) -> bool:
    impl = getattr(model.config, "_attn_implementation", None)
    return (impl in ("sdpa", "eager") and _lm_parts(model) is not None and not _fsdp_sharded(model)
            and not _mask_or_head_differs(model))


def _mask_or_head_differs(model: nn.Module) -> bool:
    """Models the shared-context path would score wrongly: sliding-window attention layers (Gemma-3, Mistral-
    style; a custom 4-D mask reaches every layer as it is, so a sliding layer would see the whole row) and heads
    that scale logits beyond final_logit_softcapping (Granite's logits_scaling, Cohere's logit_scale). They are
    scored through the plain causal path (each choice its own row: slower, exact)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg  # multimodal configs hold the text model's
    sliding = ("sliding_attention" in (getattr(cfg, "layer_types", None) or [])
               or (getattr(cfg, "sliding_window", None) is not None
                   and getattr(cfg, "use_sliding_window", True) is not False))
    scaled = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logits_scaling", "logit_scale"))
    return sliding or scaled


def _fsdp_sharded(model: nn.Module) -> bool:
    """FSDP2-sharded parameters (DTensors): the forward must enter through the root module (it gathers the
    slices), so the shared-context path, which calls the body and the head separately, is not taken."""
    from torch.distributed.tensor import DTensor

    return isinstance(next(model.parameters(), None), DTensor)


def _tree(req: Request,
          max_len: int) -> tuple[list[int], list[int], list[int], list[tuple[list[int], list[int]]], bool]:
    """Pack one item: tokens, position ids, segment ids (-1 = context) and per-choice (pred_index, targets)."""
    longest = max(len(c) for c in req.continuations)
    total = sum(len(c) for c in req.continuations)
    ctx = req.context
    truncated = False
    # the context must leave room for the longest branch, and the packed row must fit a batch sensibly
    room = max_len - longest
    if room < 1:  # no context token left to predict the first continuation token from: it would be scored wrongly
        raise DataError(f"a continuation of {longest} tokens does not fit the {max_len}-token window with any "
                        "context before it; cap it (reference_likelihood: max_reference_tokens) or raise max_length")
    if len(ctx) > room:
        ctx, truncated = ctx[len(ctx) - room :], True
    tokens = list(ctx)
    pos = list(range(len(ctx)))
    seg = [-1] * len(ctx)
    picks = []
    for k, cont in enumerate(req.continuations):
        start = len(tokens)
        tokens += cont
        pos += list(range(len(ctx), len(ctx) + len(cont)))
        seg += [k] * len(cont)
        pred = [len(ctx) - 1] + [start + i for i in range(len(cont) - 1)]
        picks.append((pred, cont))
    assert len(tokens) == len(ctx) + total
    return tokens, pos, seg, picks, truncated


def _tree_mask(segs: list[list[int]], length: int, device: torch.device) -> torch.Tensor:
    """[B, 1, L, L] boolean: causal, and a branch token sees the context and its own branch only."""
    b = len(segs)
    seg = torch.full((b, length), -2, dtype=torch.long)
    for i, s in enumerate(segs):
        seg[i, : len(s)] = torch.tensor(s)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    visible = (k == -1) | (k == q)
    valid = (k != -2) & (q != -2)
    mask = causal[None] & visible & valid
    mask |= torch.eye(length, dtype=torch.bool)[None]  # padded rows attend to themselves (no NaN)
    return mask[:, None].to(device)


def _batches(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Indices sorted by length, longest first, grouped so that rows x max length <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def score_requests(
    model: nn.Module,
    requests: Sequence[Request],
    *,
    batch_tokens: int = 4096,
    bf16: bool = True,
    share_context: bool | None = None,
    max_len: int | None = None,
    stats: EngineStats | None = None,
    progress=None,
    row_hook=None,
) -> list[list[Score]]:
    """Log-likelihood of every continuation of every request. Contexts longer than the window are cut from
    the left (counted in `stats.left_truncated`). `row_hook(request_index, choice_index, logprob_rows)`, if
    given, sees the full-vocabulary log-probabilities [n_tokens, vocab] of each continuation."""
    stats = stats if stats is not None else EngineStats()
    max_len = max_len or context_window(model)
    device = next(model.parameters()).device
    if share_context is None:
        share_context = _supports_tree_mask(model)
    if not share_context:
        flat = [Request(r.context, [c]) for r in requests for c in r.continuations]
        flat_owner = [(i, k) for i, r in enumerate(requests) for k in range(len(r.continuations))]
        hook = (lambda j, _k, rows: row_hook(*flat_owner[j], rows)) if row_hook else None
        scores = _score_tree(model, flat, batch_tokens, bf16, max_len, device, stats, progress, False, hook)
        out, it = [], iter(scores)
        for r in requests:
            out.append([next(it)[0] for _ in r.continuations])
        return out
    return _score_tree(model, requests, batch_tokens, bf16, max_len, device, stats, progress, True, row_hook)


def _score_tree(model, requests, batch_tokens, bf16, max_len, device, stats, progress, tree,
                row_hook) -> list[list[Score]]:
    packed = [_tree(r, max_len) for r in requests]
    stats.items += len(requests)
    stats.left_truncated += sum(p[4] for p in packed)
    results: list[list[Score] | None] = [None] * len(requests)
    parts = _lm_parts(model)
    pad = 0
    # one autocast region for every batch: autocast caches its bf16 copy of each weight (a leaf that requires
    # grad) until the region ends, so the weights are cast once per call instead of once per batch; the same
    # casts, so the same numbers
    with autocast(model, bf16):
        _score_batches(model, packed, batch_tokens, device, stats, progress, tree, row_hook, parts, pad, results)
    return results  # type: ignore[return-value]


def _score_batches(model, packed, batch_tokens, device, stats, progress, tree, row_hook, parts, pad,
                   results) -> None:
    for batch in _batches([len(p[0]) for p in packed], batch_tokens):
        length = len(packed[batch[0]][0])
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        pos = torch.zeros((len(batch), length), dtype=torch.long)
        attn2d = torch.zeros((len(batch), length), dtype=torch.long)
        for row, i in enumerate(batch):
            toks, p, _, _, _ = packed[i]
            ids[row, : len(toks)] = torch.tensor(toks)
            pos[row, : len(toks)] = torch.tensor(p)
            attn2d[row, : len(toks)] = 1
        stats.tokens += int(attn2d.sum())
        ids, pos = ids.to(device), pos.to(device)
        # gather the scored positions: (row, pred index) pairs for every branch of every item
        rows, cols = [], []
        for row, i in enumerate(batch):
            for pred, _ in packed[i][3]:
                rows += [row] * len(pred)
                cols += pred
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        if tree:
            mask = _tree_mask([packed[i][2] for i in batch], length, device)
            if getattr(model.config, "_attn_implementation", None) == "eager":
                mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
            hidden = parts[0](input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            logits = parts[1](hidden[rows_t, cols_t])
            if parts[2]:
                logits = torch.tanh(logits / parts[2]) * parts[2]
        else:
            out = model(input_ids=ids, attention_mask=attn2d.to(device))
            shift = out.logits.shape[1] - ids.shape[1]  # prompt tuning prepends virtual tokens
            logits = out.logits[rows_t, cols_t + shift]
        with torch.autocast(device.type, enabled=False):  # fp32 from here (row hooks too); the cache stays
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            argmax = logprobs.argmax(-1)  # once per batch, not once per choice
            offset = 0
            for i in batch:
                item = []
                for k, (pred, targets) in enumerate(packed[i][3]):
                    n = len(pred)
                    lp = logprobs[offset : offset + n]
                    if row_hook is not None:
                        row_hook(i, k, lp)
                    tgt = torch.tensor(targets, device=device)
                    item.append(Score(float(lp.gather(1, tgt[:, None]).sum()), n,
                                      bool((argmax[offset : offset + n] == tgt).all())))
                    offset += n
                results[i] = item
        if progress is not None:
            progress(len(batch))


def rolling_windows(tokens: list[int], max_len: int, prefix_token: int | None) -> list[Request]:
    """Disjoint windows covering every token once (lm-eval's rolling log-likelihood with context length 1):
    the first window is predicted from `prefix_token` (BOS/EOS), later ones from the previous token."""
    out = []
    step = max_len - 1
    for start in range(0, len(tokens), step):
        window = tokens[start : start + step]
        ctx = [prefix_token] if start == 0 else [tokens[start - 1]]
        if start == 0 and prefix_token is None:
            ctx, window = window[:1], window[1:]
            if not window:
                continue
        out.append(Request(cast("list[int]", ctx), [window]))  # prefix_token is not None where it is the context
    return out


@torch.no_grad()
@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Sampling from a fixed seed without touching the caller's random state: the CPU generator (and `device`'s,
    on a GPU) is seeded inside and put back afterwards, so whether a cache was hit never changes what training
    draws next."""
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    bf16: bool = True,
    progress=None,
    temperature: float | None = None,
    keep_eos: bool = False,
) -> list[list[int]]:
    """Greedy continuations (token ids, stop sequence and EOS removed), batched with left padding. `temperature`:
    sampled instead, from the whole distribution (no top-k, top-p or penalty of the model's generation_config).
    `keep_eos`: a continuation that ended with EOS keeps that token (it was generated, and can be scored)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        length = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), length), dtype=torch.long)
        for row, i in enumerate(batch):
            p = prompts[i]
            ids[row, length - len(p) :] = torch.tensor(p)
            attn[row, length - len(p) :] = 1
        kw: dict = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
        if temperature is None:
            kw.update(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        else:
            from transformers import GenerationConfig

            kw["generation_config"] = GenerationConfig(
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        with autocast(model, bf16):
            gen = model.generate(  # type: ignore[operator]  # a PreTrainedModel
                input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
        for row, i in enumerate(batch):
            new = gen[row, length:].tolist()
            outputs[i] = _cut(new, tokenizer, stop, keep_eos)
        if progress is not None:
            progress(len(batch))
    return outputs  # type: ignore[return-value]


def _cut(ids: list[int], tokenizer, stop: Sequence[str], keep_eos: bool = False) -> list[int]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    for j, t in enumerate(ids):
        if t == eos or (pad is not None and t == pad and pad != eos):
            ids = ids[: j + 1] if keep_eos and t == eos else ids[:j]
            break
    if stop:
        text = tokenizer.decode(ids)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            # keep the tokens whose text lies before the stop sequence
            while ids and len(tokenizer.decode(ids)) > cut:
                ids = ids[:-1]
    return ids
