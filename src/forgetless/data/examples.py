"""From records to token ids and labels: the four formats, chat templates, completion-only loss,
truncation (always counted) and packing."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .loading import Record, load_records

IGNORE = -100
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    max_tokens: int = 0
    blocks: int | None = None
    first_truncated: list[str] = field(default_factory=list)
    empty_answers: int = 0  # records whose answer is blank (an error when all are)
    first_empty: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def losses(self) -> list[str]:
        """What max_length cost, as "N truncated" etc. (empty when nothing was lost)."""
        return [f"{n} {what}" for n, what in ((self.truncated, "truncated"), (self.dropped_overlong,
                                              "dropped as overlong"), (self.dropped_no_target,
                                                                       "dropped without a target")) if n]


def _get(rec: Record, cfg: DataConfig, canonical: str, required: bool = True) -> Any:
    key = cfg.field(canonical)
    if required and key in rec.data and rec.data[key] is None:
        raise DataError(f"{rec.where}: field {key!r} is null; give a string (\"\" for an empty one)")
    if key not in rec.data or rec.data[key] is None:
        if required:
            have = ", ".join(sorted(rec.data)) or "none"
            hint = f" (mapped from {canonical!r} by data.fields)" if key != canonical else ""
            raise DataError(f"{rec.where}: missing field {key!r}{hint}; fields present: {have}")
        return None
    return rec.data[key]


def text_field(rec: Record, cfg: DataConfig, canonical: str, required: bool = True) -> str:
    """The record's string field `canonical` (through data.fields); "" when absent and not required."""
    value = _get(rec, cfg, canonical, required)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{rec.where}: field {cfg.field(canonical)!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(rec: Record, cfg: DataConfig) -> list[dict[str, str]]:
    """The record as a conversation (chat; or instruction / prompt_completion rendered through a template)."""
    if cfg.format == "chat":
        raw = _get(rec, cfg, "messages")
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{rec.where}: field {cfg.field('messages')!r} must be a non-empty list of messages")
        role_key, content_key = cfg.field("role"), cfg.field("content")
        msgs = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or role_key not in m or content_key not in m:
                raise DataError(
                    f"{rec.where}: message {j} needs {role_key!r} and {content_key!r} keys (see "
                    "data.fields.role/content)"
                )
            role = ROLE_ALIASES.get(str(m[role_key]), str(m[role_key]))
            if role not in ("system", "user", "assistant", "tool"):
                raise DataError(f"{rec.where}: message {j} has unknown role {m[role_key]!r}")
            msgs.append({"role": role, "content": message_content(rec, j, role, m[content_key], content_key)})
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{rec.where}: conversation has no assistant message to learn from")
        first = next((j for j, m in enumerate(msgs) if m["role"] != "system"), None)
        if first is not None and msgs[first]["role"] == "assistant":
            raise DataError(f"{rec.where}: the conversation starts with an assistant message (message {first}); "
                            "an assistant turn answers a user message: start with a user (or system) message")
    else:
        prompt, completion = prompt_completion(rec, cfg)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if cfg.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    return msgs


def message_content(rec: Record, j: int, role: str, content: Any, key: str = "content") -> str:
    """A message's text: a string, or OpenAI content parts [{"type": "text", "text": ...}, ...] joined in order
    with nothing between them (as chat templates render parts). Anything else is an error naming the line: null,
    a part that is not text (image, audio: nothing to train a text model on), and a list of plain strings
    (ambiguous: joined with spaces, newlines or nothing? Write one string, or text parts)."""
    if isinstance(content, str):
        return content
    where = f"{rec.where}: message {j} ({role})"
    if content is None:
        raise DataError(f"{where} has {key!r} null; give a string (\"\" for an empty one)")
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                raise DataError(f"{where}: {key!r} is a list of strings; write one string, or OpenAI content parts "
                                '[{"type": "text", "text": ...}]')
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: content part {k} is of type {kind!r}; only text parts "
                                '({"type": "text", "text": ...}) can be trained on')
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: {key!r} must be a string or a list of content parts, got {type(content).__name__}")


def answer_is_empty(rec: Record, cfg: DataConfig) -> bool:
    """Whether the record's answer (every assistant message; the completion, output or text) is blank."""
    if cfg.format == "chat":
        return all(not m["content"].strip() for m in to_messages(rec, cfg) if m["role"] == "assistant")
    if cfg.format == "text":
        return not text_field(rec, cfg, "text").strip()
    return not prompt_completion(rec, cfg)[1].strip()


def prompt_completion(rec: Record, cfg: DataConfig, alpaca_template: bool = False) -> tuple[str, str]:
    if cfg.format == "instruction":
        instruction = text_field(rec, cfg, "instruction")
        inp = text_field(rec, cfg, "input", required=False)
        output = text_field(rec, cfg, "output")
        if alpaca_template:
            template = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
            return template.format(instruction=instruction, input=inp), output
        return (f"{instruction}\n\n{inp}" if inp.strip() else instruction), output
    if cfg.format == "prompt_completion":
        return text_field(rec, cfg, "prompt"), text_field(rec, cfg, "completion")
    raise AssertionError(cfg.format)


def uses_chat_template(cfg: DataConfig, tokenizer: Any) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.format == "chat" or cfg.chat_template:
        if not has:
            raise DataError(
                f"data.format is {cfg.format!r} with a chat template, but the tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '?')}) has no chat template. Use a chat model, set "
                "data.chat_template: false with format instruction/prompt_completion, or add a template to the "
                "tokenizer."
            )
        return True
    if cfg.format == "text":
        return False
    return has if cfg.chat_template is None else False


def _chat_ids(tokenizer: Any, msgs: list[dict[str, str]], **kw: Any) -> list[int]:
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode_chat(rec: Record, msgs: list[dict[str, str]], tokenizer: Any,
                completion_only: bool) -> tuple[list[int], list[int]]:
    try:
        return _encode_chat(rec, msgs, tokenizer, completion_only)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the template's own checks (roles must alternate, no system role ...)
        raise DataError(f"{rec.where}: the tokenizer's chat template failed on this conversation: "
                        f"{type(e).__name__}: {e}") from None


def _encode_chat(rec: Record, msgs: list[dict[str, str]], tokenizer: Any,
                 completion_only: bool) -> tuple[list[int], list[int]]:
    ids = _chat_ids(tokenizer, msgs)
    if not completion_only:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt_ids = _chat_ids(tokenizer, msgs[:i], add_generation_prompt=True)
        start = len(prompt_ids)
        end_ids = _chat_ids(tokenizer, msgs[: i + 1])
        end = len(end_ids)
        # the turn's loss starts where the generation prompt ends: only if the conversation begins with it
        if end_ids != ids[:end] or start > end or prompt_ids != ids[:start]:
            raise DataError(
                f"{rec.where}: the chat template does not render conversations prefix-consistently, so "
                "assistant turns cannot be located for completion-only loss; set data.loss_on: all"
            )
        labels[start:end] = ids[start:end]
    return ids, labels


def plain_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's tokens without a chat template, as training renders them (special tokens; a lone BOS if empty)."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not p and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True):
        p = [tokenizer.bos_token_id]
    return p


def encode_plain(tokenizer: Any, prompt: str, completion: str, completion_only: bool) -> tuple[list[int], list[int]]:
    p = plain_prompt_ids(tokenizer, prompt)
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    ids = p + c
    labels = ([IGNORE] * len(p) + c) if completion_only else list(ids)
    return ids, labels


def encode_record(rec: Record, cfg: DataConfig, tokenizer: Any, chat: bool) -> tuple[list[int], list[int]]:
    if chat:
        return encode_chat(rec, to_messages(rec, cfg), tokenizer, cfg.completion_only)
    if cfg.format == "text":
        return encode_plain(tokenizer, "", text_field(rec, cfg, "text"), completion_only=False)
    prompt, completion = prompt_completion(rec, cfg, alpaca_template=cfg.format == "instruction")
    return encode_plain(tokenizer, prompt, completion, cfg.completion_only)


_MEMO: OrderedDict[str, tuple[list[dict], DataStats]] = OrderedDict()
_MEMO_SIZE = 4  # a sweep's train and validation sets, and one more pair


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """What decides how a fast tokenizer encodes: its whole definition and chat template (None: not known)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([getattr(tokenizer, "chat_template", None), str(tokenizer.special_tokens_map),
                         getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)]).encode())
    return h.hexdigest()


def build_examples(records: list[Record], cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], DataStats]:
    """Tokenize records into {"input_ids", "labels"}; truncate or drop over-long ones, counting each.

    The last few results are kept in memory, keyed by the records (content and where they came from), the
    data settings and the tokenizer's definition: the runs of a sweep read the same data with the same
    tokenizer, and tokenizing it again cost each run ~10 s (7k GSM8K chats). Callers get their own copies."""
    tok_fp = _tokenizer_fingerprint(tokenizer)
    key = None
    if tok_fp is not None:
        h = hashlib.sha256(tok_fp.encode())
        h.update(cfg.model_dump_json().encode())
        h.update(json.dumps([(r.source, r.line, r.data) for r in records], sort_keys=True, default=str).encode())
        key = h.hexdigest()
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _copy(*_MEMO[key])
    examples, stats = _build_examples(records, cfg, tokenizer)
    if key is not None:
        _MEMO[key] = _copy(examples, stats)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return examples, stats


def _copy(examples: list[dict], stats: DataStats) -> tuple[list[dict], DataStats]:
    return [{k: list(v) for k, v in ex.items()} for ex in examples], copy.deepcopy(stats)


def _build_examples(records: list[Record], cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], DataStats]:
    stats = DataStats(records=len(records))
    chat = uses_chat_template(cfg, tokenizer)
    examples = []
    for rec in records:
        ids, labels = encode_record(rec, cfg, tokenizer, chat)
        if answer_is_empty(rec, cfg):
            stats.empty_answers += 1
            if len(stats.first_empty) < 5:
                stats.first_empty.append(rec.where)
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            if len(stats.first_truncated) < 5:
                stats.first_truncated.append(f"{rec.where} ({len(ids)} tokens)")
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        n_target = sum(1 for t in labels if t != IGNORE)
        if n_target == 0:
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(ids)
        stats.target_tokens += n_target
        stats.max_tokens = max(stats.max_tokens, len(ids))
        examples.append({"input_ids": ids, "labels": labels})
    stats.examples = len(examples)
    if cfg.packing:
        examples = pack(examples, cfg.max_length)
        stats.blocks = len(examples)
    return examples, stats


def pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate examples (labels kept as they are) and cut into blocks of `block` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
    out = []
    for s in range(0, len(ids), block):
        chunk_labels = labels[s : s + block]
        if any(t != IGNORE for t in chunk_labels):
            out.append({"input_ids": ids[s : s + block], "labels": chunk_labels})
    return out


@dataclass
class Datasets:
    train: list[dict]
    validation: list[dict] | None
    train_stats: DataStats
    validation_stats: DataStats | None
    train_records: list[Record] = field(default_factory=list)  # as read, for the data checks
    self_distill: dict[str, Any] | None = None  # data.self_distill's statistics, when it ran

    def summary(self) -> dict[str, Any]:
        out = {
            "train": self.train_stats.to_dict(),
            "validation": self.validation_stats.to_dict() if self.validation_stats else None,
        }
        if self.self_distill is not None:
            out["self_distill"] = self.self_distill
        return out


def calibration_examples(cfg: DataConfig | None, n: int, default: list[dict], tokenizer: Any,
                         seed: int) -> list[dict]:
    """n tokenized examples (a fixed-seed sample, in file order) of a data section, or of `default` (the run's
    training examples) when `cfg` is None: what a data-driven adapter init calibrates on."""
    if cfg is None:
        examples = default
    else:
        records = load_records(cfg.train, cfg.split)
        examples, _ = build_examples(records[: cfg.limit] if cfg.limit else records, cfg, tokenizer)
    if len(examples) <= n:
        return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [{"input_ids": list(examples[i]["input_ids"]), "labels": list(examples[i]["labels"])} for i in keep]


def load_datasets(cfg: DataConfig, tokenizer: Any, seed: int) -> Datasets:
    """Read, split, tokenize. Raises DataError before any training if something is wrong."""
    train_records = load_records(cfg.train, cfg.split)
    if not train_records:
        raise DataError(f"data.train ({cfg.train}): the training set is empty")
    if cfg.limit:
        train_records = train_records[: cfg.limit]
    val_records: list[Record] | None = None
    if cfg.validation:
        val_records = load_records(cfg.validation, "validation")
        if not val_records:
            raise DataError(f"data.validation ({cfg.validation}): the validation set is empty")
    elif cfg.validation_fraction > 0:
        rng = random.Random(cfg.shuffle_seed if cfg.shuffle_seed is not None else seed)
        order = list(range(len(train_records)))
        rng.shuffle(order)
        n_val = max(1, round(len(order) * cfg.validation_fraction))
        if n_val >= len(order):
            raise DataError(f"data.validation_fraction {cfg.validation_fraction} leaves no training examples")
        val_idx = set(order[:n_val])
        val_records = [r for i, r in enumerate(train_records) if i in val_idx]
        train_records = [r for i, r in enumerate(train_records) if i not in val_idx]
    train, train_stats = build_examples(train_records, cfg, tokenizer)
    if train_stats.empty_answers and train_stats.empty_answers == train_stats.records:
        raise DataError(
            f"data.train ({cfg.train}): all {train_stats.empty_answers} answers are empty (first: "
            f"{', '.join(train_stats.first_empty[:3])}): there is nothing to learn. Is the answer under another "
            "field name (data.fields) or another format (data.format)?"
        )
    if not train:
        raise DataError(
            f"data.train ({cfg.train}): no usable examples after tokenization "
            f"({train_stats.dropped_overlong} over max_length {cfg.max_length}, "
            f"{train_stats.dropped_no_target} with no target tokens left)"
        )
    val = val_stats = None
    if val_records is not None:
        val, val_stats = build_examples(val_records, cfg.model_copy(update={"packing": False}), tokenizer)
        if not val:
            raise DataError("data.validation: no usable examples after tokenization")
    return Datasets(train, val, train_stats, val_stats, train_records)
