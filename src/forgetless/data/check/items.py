"""The per-record view every section reads: prompt, answer, words, token count, where it came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...config import DataConfig
from ..examples import prompt_completion, text_field, to_messages
from ..loading import Record
from .common import WORD
from .near_dup import Vocab
from .text import degenerate_reason, normalize


@dataclass
class Item:
    rec: Record
    prompt: str  # "" for format text
    answer: str  # the text learnt from (last assistant turn for chat, the text for format text)
    example_key: str  # normalised whole example: the exact-duplicate key
    first_word: str
    degenerate: str | None
    pw: np.ndarray  # word ids of the prompt
    aw: np.ndarray  # word ids of the answer
    n_tokens: int | None = None


def _first_word(text: str) -> str:
    m = WORD.search(text[:200].lower())
    return m.group(0) if m else ""


def view(rec: Record, cfg: DataConfig, vocab: Vocab) -> Item:
    """Parse a record with the training code's own rules; raises DataError naming file:line."""
    degenerate = None
    if cfg.format == "text":
        prompt, answer = "", text_field(rec, cfg, "text")
        key = normalize(answer)
        degenerate = degenerate_reason(answer)
        return Item(rec, "", answer, key, _first_word(answer), degenerate, vocab.encode(""), vocab.encode(answer))
    if cfg.format == "chat":
        msgs = to_messages(rec, cfg)
        if cfg.system_prompt and msgs and msgs[0]["role"] == "system" and msgs[0]["content"] == cfg.system_prompt:
            msgs = msgs[1:]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
        answer = msgs[last]["content"]
        key = "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in msgs)
        for m in msgs:
            if m["role"] == "assistant" and (degenerate := degenerate_reason(m["content"])):
                break
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if degenerate is None and not any(u.strip() for u in users):
            degenerate = "empty_prompt"
        first = next((u for u in users if u.strip()), "")
        pw = vocab.encode("\n".join(m["content"] for m in msgs[:last]))
        return Item(rec, prompt, answer, key, _first_word(first), degenerate, pw, vocab.encode(answer))
    prompt, answer = prompt_completion(rec, cfg)
    key = normalize(prompt) + "\x1f" + normalize(answer)
    degenerate = degenerate_reason(answer)
    if degenerate is None and not prompt.strip():
        degenerate = "empty_prompt"
    return Item(rec, prompt, answer, key, _first_word(prompt), degenerate, vocab.encode(prompt), vocab.encode(answer))


def strip_where(msg: str, where: str) -> str:
    return msg[len(where) + 2 :] if msg.startswith(where + ": ") else msg
