"""self_replay: self-synthesized rehearsal, for when no general data exists (Huang et al. 2024, SSR).

Before training, the base model writes its own replay data: it either invents instructions
(`source: generate`, sampled with a fixed seed) or takes seed prompts from a file (`source: seeds`), then
answers each greedily. Pairs are filtered (too short, empty, repetitive, duplicated, or equal to one of
the built-in self-reference probe prompts, which must stay held out), cached by model fingerprint and
options, and mixed into training like `replay`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import DataConfig
from ..data import build_examples
from ..data.examples import text_field, to_messages
from ..data.loading import Record, load_records, read_file
from ..errors import ForgetlessError
from ..io import atomic_write_text
from ..progress import bar
from ..retention.kinds.self_reference import BUILTIN_PROMPTS
from ..retention.lm import greedy_generate, seeded
from ..schema import Strict
from .base import TrainContext, register
from .replay import Replay

INSTRUCTION_REQUEST = (
    "Write one new, self-contained question or task that a user might ask a helpful assistant. "
    "Reply with the question only."
)
PLAIN_SEED = "Here is a question that a user asked a helpful assistant:\n"
# Rows per generate() call. A small model's decoding step is bound more by reading its weights than by the
# rows: smollm2-135m in fp32 on 2 AVX2 cores decodes 44 tok/s at 8 rows, 61 at 16, 93 at 32 and 93 at 64.
GEN_BATCH = 32


class SelfReplayConfig(Strict):
    name: Literal["self_replay"] = "self_replay"
    source: Literal["generate", "seeds"] = "generate"
    seeds: DataConfig | None = Field(None, description="source: seeds: prompts to answer (format "
                                                       "prompt_completion/instruction/text; only the prompt is used).")
    n: int = Field(200, gt=0, description="Pairs to generate (before filtering).")
    ratio: float = Field(0.05, gt=0, lt=1, description="Replay share of the training stream.")
    by: Literal["examples", "tokens"] = "examples"
    max_new_tokens: int = Field(128, gt=0)
    min_answer_words: int = Field(3, ge=0)
    min_distinct_ratio: float = Field(0.3, ge=0, le=1,
                                      description="Minimum share of distinct words in an answer (repetition filter).")
    seed: int = 0

    @model_validator(mode="after")
    def _seeds(self) -> SelfReplayConfig:
        if self.source == "seeds" and self.seeds is None:
            raise ValueError("source: seeds needs seeds: {train: FILE, format: ...}")
        return self


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def keep_pair(prompt: str, answer: str, cfg: SelfReplayConfig, banned: set[str]) -> str | None:
    """Why a generated pair is dropped, or None to keep it."""
    words = answer.split()
    if not prompt.strip() or not answer.strip():
        return "empty"
    if len(words) < cfg.min_answer_words:
        return "short"
    if len(set(words)) / len(words) < cfg.min_distinct_ratio:
        return "repetitive"
    if _norm(prompt) in banned:
        return "probe prompt"
    return None


@register(SelfReplayConfig)
class SelfReplay(Replay):
    name = "self_replay"
    carry_fills = ()
    carry_defaults = {}

    @classmethod
    def carryable(cls) -> bool:
        return False  # not offered in sequences (each step would generate its own pairs: put it in the base recipe)

    chat = False

    def _prompt_ids(self, tok, text: str) -> list[int]:
        """The prompt exactly as training will render it (chat template, or the plain prompt)."""
        if self.chat:
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return list(tok(text, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def _invent(self, model, tok, n: int, progress=None) -> list[str]:
        device = next(model.parameters()).device
        with seeded(self.config.seed, device):  # training's random state is left as it was
            return self._sample_prompts(model, tok, n, device, progress)

    def _sample_prompts(self, model, tok, n: int, device, progress) -> list[str]:
        ids = self._prompt_ids(tok, INSTRUCTION_REQUEST if self.chat else PLAIN_SEED)
        out: list[str] = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for s in range(0, n, GEN_BATCH):
            b = min(GEN_BATCH, n - s)
            batch = torch.tensor([ids] * b, device=device)  # the same prompt in every row: no padding to mask
            gen = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True, top_p=0.95,
                                 temperature=1.0, max_new_tokens=48, pad_token_id=pad)
            out += [tok.decode(g[len(ids):], skip_special_tokens=True).strip().split("\n")[0].strip() for g in gen]
            if progress is not None:
                progress(b)
        return out

    def _seed_prompts(self, ctx: TrainContext) -> list[str]:
        """The seed file's prompts as its format and `fields` say (instruction: with its input; chat: the first
        user message), from its `split`, at most `limit` records, then at most n."""
        cfg = self.config.seeds
        assert cfg is not None  # SelfReplayConfig requires it with source: seeds
        records = load_records(cfg.train, cfg.split)
        if cfg.limit:
            records = records[: cfg.limit]
        prompts = []
        for r in records[: self.config.n]:
            if cfg.format == "chat":
                v = next((m["content"] for m in to_messages(r, cfg) if m["role"] == "user"), None)
                if v is None:
                    raise ForgetlessError(f"{r.where}: mitigations.self_replay.seeds: the conversation has no user "
                                          "message to answer")
            elif cfg.format == "instruction":
                inp = text_field(r, cfg, "input", required=False)
                v = text_field(r, cfg, "instruction") + (f"\n\n{inp}" if inp.strip() else "")
            else:
                v = text_field(r, cfg, "prompt" if cfg.format == "prompt_completion" else "text")
            prompts.append(v)
        return prompts

    def _generate_pairs(self, ctx: TrainContext) -> tuple[list[dict], dict[str, int]]:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        model, tok = ctx.model, ctx.tokenizer
        ctx_mgr = (model.disable_adapter()  # type: ignore[operator]  # a PeftModel
                   if hasattr(model, "disable_adapter") else torch.no_grad())
        was_training = model.training
        model.eval()
        quiet = not getattr(ctx.recipe.train, "progress", True)
        prog = bar(TextColumn("[bold]self_replay[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), label="self_replay", transient=True, disable=quiet)
        with ctx_mgr, torch.no_grad(), prog:
            if self.config.source == "generate":
                tid = prog.add_task("inventing instructions", total=self.config.n)
                prompts = self._invent(model, tok, self.config.n, progress=lambda k: prog.advance(tid, k))
            else:
                prompts = self._seed_prompts(ctx)
            tid = prog.add_task("answering them", total=len(prompts))
            answers = greedy_generate(model, tok, [self._prompt_ids(tok, p) for p in prompts],
                                      max_new_tokens=self.config.max_new_tokens, bf16=ctx.bf16, batch_size=GEN_BATCH,
                                      progress=lambda k: prog.advance(tid, k))
        model.train(was_training)
        banned = {_norm(r.data["instruction"]) for r in read_file(BUILTIN_PROMPTS)}
        seen: set[str] = set()
        pairs: list[dict] = []
        dropped: dict[str, int] = {}
        for p, a in zip(prompts, answers, strict=True):
            text = tok.decode(a, skip_special_tokens=True).strip()
            why = keep_pair(p, text, self.config, banned) or ("duplicate" if _norm(p) in seen else None)
            if why:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            seen.add(_norm(p))
            pairs.append({"prompt": p, "completion": text})
        return pairs, dropped

    def setup(self, ctx: TrainContext) -> None:
        # the pairs are rendered like the task's prompt/completion examples: with the chat template unless
        # the recipe turned it off or the tokenizer has none
        self.chat = ctx.recipe.data.chat_template is not False and bool(getattr(ctx.tokenizer, "chat_template", None))
        spec = {**self.config.model_dump(exclude={"ratio", "by"}, mode="json"), "chat": self.chat}
        if self.config.source == "seeds":  # the prompts themselves: an edited seed file is another pool
            spec["prompts"] = hashlib.sha256(json.dumps(self._seed_prompts(ctx)).encode()).hexdigest()
        key = hashlib.sha256(json.dumps({"model": ctx.fingerprint(), **spec}, sort_keys=True).encode()).hexdigest()[:24]
        cache = ctx.cache_dir / "self_replay" / f"{key}.jsonl"
        if cache.is_file():
            pairs = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()]
            self.notes["cached"] = True
        else:
            pairs, dropped = self._generate_pairs(ctx)
            atomic_write_text(cache, "".join(json.dumps(p) + "\n" for p in pairs))
            self.notes.update({"cached": False, "dropped": dropped})
        if not pairs:
            raise ForgetlessError(
                f"mitigations.self_replay: every generated pair was filtered out ({self.notes.get('dropped')}); "
                "raise n or relax the filters (min_answer_words, min_distinct_ratio)"
            )
        records = [Record(p, str(cache), i + 1) for i, p in enumerate(pairs)]
        cfg = DataConfig(train=str(cache), format="prompt_completion", max_length=ctx.recipe.data.max_length,
                         chat_template=self.chat)
        examples, _ = build_examples(records, cfg, ctx.tokenizer)
        self.pool = [{**e, "replay": True} for e in examples]
        self.notes.update({"pairs": len(pairs), "cache": str(cache)})
