"""Configuration sections used below the recipe as well as in it: the model and data sections (mitigations
such as replay and EWC read data of their own), monitor and guard, the distributed engines' options (read by
`forgetless.distributed`), and the evaluation precision a sweep and a sequence share. `forgetless.recipe`
composes them with the mitigations' configs into the recipe, and is the public entry point; the strict base
class and YAML loading are in `forgetless.schema`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .errors import ForgetlessError
from .schema import Strict


def parse_budget(value: Any) -> float:
    """A forgetting budget: '1%' -> 0.01; '0.01' or 0.01 -> 0.01."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"{value!r}: write a budget as 1% or 0.01") from None
    return float(value)


class ModelConfig(Strict):
    name: str = Field(description="HF hub id, local HF directory, or a `forgetless models` alias.")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Storage dtype of frozen weights. Trainable weights are always fp32 (master weights), loaded "
        "from the checkpoint without rounding. auto: fp32 on CPU; on a GPU that supports bf16, bf16 for the frozen "
        "base of adapter methods (LoRA and the like), fp32 for full and freeze (their saved model holds every "
        "weight). bf16: frozen weights in bf16 everywhere (freeze then saves its frozen layers rounded).",
    )
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code.")
    allow_pickle: bool = Field(False, description="Allow loading pickle (.bin) weights. Off: safetensors only.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id: the run loads "
                                 "that revision's local snapshot and records its path, which every later load uses.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class EvalPrecisionOptions(Strict):
    """The evaluation-precision options a sweep and a continual sequence share."""

    eval_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Evaluation compute: auto (bf16 where a timed probe finds it faster on this device, "
        "else fp32), bf16, or fp32 (reproduces lm-eval exactly).")
    eval_bf16: bool | None = Field(None, description="Older spelling: true = eval_precision bf16, false = fp32.")

    def eval_setting(self) -> str:
        """eval_precision with the older eval_bf16 folded in."""
        from .precision import combine  # (precision imports torch: not at the import of every config)

        try:
            return combine(self.eval_precision, self.eval_bf16)
        except ValueError as e:
            raise ForgetlessError(f"{getattr(self, 'name', '')}: eval_precision / eval_bf16: {e}") from None


# ---------------------------------------------------------------- data

DataFormat = Literal["chat", "instruction", "prompt_completion", "text"]

#: The fields each format reads, by canonical name. `data.fields` maps a canonical name to the file's own.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"input", "role", "content", "system"}


#: The request the model answers when it rewrites a training response in its own words (data.self_distill).
SELF_DISTILL_TEMPLATE = (
    "Below is a request and a reference answer to it. Write your own answer to the request, using the reference "
    "answer: keep every fact, number and the final answer exactly as the reference has them, and keep its "
    "format (a final line such as '#### 42' or an option letter stays as it is). Do not mention the reference."
    "\n\n### Request\n{prompt}\n\n### Reference answer\n{answer}\n\n### Your answer\n"
)


class SelfDistillAccept(Strict):
    """When a rewrite replaces the reference answer; otherwise the original is kept."""

    kind: Literal["rouge_l", "answer", "regex"] = Field(
        "rouge_l", description="rouge_l: ROUGE-L F1 against the reference at least `min`; answer: `pattern`'s first "
        "group is found in both and equal (a final answer such as GSM8K's '#### N' or an option letter); regex: the "
        "rewrite matches `pattern`.")
    min: float = Field(0.35, ge=0, le=1, description="rouge_l: the least ROUGE-L F1 against the reference.")
    pattern: str | None = Field(None, description="answer: a regex with a group, the answer (default "
                                "'####\\s*(\\S+)', GSM8K's; option letters need a pattern of their own; with "
                                "alternatives, the first group that matched); regex: what the rewrite must contain.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        """`accept: answer`, `accept: rouge_l` or `accept: rouge_l >= 0.5` for the mapping forms."""
        if not isinstance(v, str):
            return v
        m = re.fullmatch(r"\s*(answer|rouge_l)\s*(?:>=\s*([0-9.]+)\s*)?", v)
        if not m or (m.group(1) == "answer" and m.group(2)):
            raise ValueError(f"accept: {v!r} is not one of: answer, rouge_l, rouge_l >= <min> (or a mapping such "
                             "as {kind: regex, pattern: ...})")
        return {"kind": m.group(1), **({"min": float(m.group(2))} if m.group(2) else {})}

    @model_validator(mode="after")
    def _pattern(self) -> SelfDistillAccept:
        if self.kind == "regex" and not self.pattern:
            raise ValueError("accept.kind regex needs accept.pattern")
        if self.pattern:
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"accept.pattern is not a valid regex: {e}") from None
            if self.kind == "answer" and compiled.groups < 1:
                raise ValueError("accept.pattern for kind answer needs a group: the answer, e.g. '####\\s*(\\S+)'")
        return self


#: data.self_distill options that only one mode reads (a recipe setting the other mode's is refused).
OFFLINE_ONLY = ("accept", "batch_size")
ON_POLICY_ONLY = ("teacher", "ema_rate", "temperature")


class SelfDistillConfig(Strict):
    """Self-distilled targets. offline: rewrite every training response in the model's own words before training
    (SDFT, Yang et al. 2024). on_policy: no rewrite; at every step the model samples its own response to each
    training prompt and learns toward itself shown the reference answer (Shenfeld et al. 2026)."""

    mode: Literal["offline", "on_policy"] = Field(
        "offline", description="offline: rewrite the responses once, before training, and train on them. on_policy: "
        "sample a response to each training prompt at every step; the loss is the per-token KL from the model to "
        "the teacher (the same model given `template`, with the reference answer) over the sampled tokens.")
    template: str = Field(SELF_DISTILL_TEMPLATE, description="The rewrite request (offline), the teacher's prompt "
                          "(on_policy): {prompt} and {answer} (both required) are replaced by the training prompt and "
                          "its reference answer; write any other brace doubled ({{ and }}).")
    accept: SelfDistillAccept = Field(default_factory=SelfDistillAccept, description="offline: when a rewrite "
                                      "replaces the reference.")
    max_new_tokens: int = Field(256, gt=0, description="Longest rewrite (offline: one that reaches it is truncated "
                                "and rejected) or sampled response (on_policy: cut there, and scored as far as it "
                                "goes).")
    batch_size: int = Field(16, gt=0, description="offline: rewrites generated at once (greedy).")
    teacher: Literal["ema", "base", "live"] = Field(
        "ema", description="on_policy: the teacher's weights. ema: an exponential moving average of the trained "
        "weights (the paper's); base: the weights before training; live: the weights being trained (no gradient).")
    ema_rate: float = Field(0.05, gt=0, le=1, description="on_policy, teacher ema: after each optimizer step the "
                            "teacher moves this share of the way to the trained weights.")
    temperature: float = Field(1.0, gt=0, description="on_policy: sampling temperature of the model's responses.")

    @model_validator(mode="after")
    def _placeholders(self) -> SelfDistillConfig:
        # the other mode's options set to anything but their defaults (a written-out recipe holds every default)
        other = OFFLINE_ONLY if self.mode == "on_policy" else ON_POLICY_ONLY
        fresh = SelfDistillConfig.model_construct()
        given = [k for k in other if k in self.model_fields_set and getattr(self, k) != getattr(fresh, k)]
        if given:
            raise ValueError(f"{given[0]}: not read in mode {self.mode} (mode "
                             f"{'offline' if self.mode == 'on_policy' else 'on_policy'} only)")
        for key in ("{prompt}", "{answer}"):
            if key not in self.template:
                raise ValueError(f"template needs {key}")
        try:
            self.template.format(prompt="", answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template: only {{prompt}} and {{answer}} may stand in braces (write {{{{ and }}}} for "
                             f"literal ones): {e!r}") from None
        return self


class DataConfig(Strict):
    train: str | list[str] = Field(description="JSONL/JSON file(s), or an HF dataset id (`hf:owner/name`).")
    validation: str | list[str] | None = Field(None, description="Validation file(s); else see validation_fraction.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this share of train for validation when no file is given."
    )
    format: DataFormat = Field("instruction", description="chat | instruction | prompt_completion | text.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names (messages, role, content, instruction, input, output, prompt, "
        "completion, text) to the names used in the file.",
    )
    chat_template: bool | None = Field(
        None,
        description="Render examples with the tokenizer's chat template. None: always for chat, and for "
        "instruction/prompt_completion when the tokenizer has a template.",
    )
    system_prompt: str | None = Field(None, description="System message added to every rendered conversation.")
    max_length: int = Field(1024, gt=0, description="Maximum tokens per example (or per packed block).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples over max_length; the count is always reported."
    )
    loss_on: Literal["auto", "completion", "all"] = Field(
        "auto", description="auto: completions only for chat/instruction/prompt_completion, all tokens for text."
    )
    packing: bool = Field(False, description="Concatenate examples into max_length blocks (labels kept).")
    limit: int | None = Field(None, gt=0, description="Use only the first N training examples.")
    split: str = Field("train", description="Split name for HF dataset ids.")
    shuffle_seed: int | None = Field(None, description="Seed of the validation_fraction split (default train.seed).")
    check: Literal["off", "warn", "strict"] = Field(
        "warn", description="Cheap data checks before training (schema, empty/degenerate answers, exact duplicates, "
        "truncation): warn reports them, strict makes them errors."
    )
    self_distill: SelfDistillConfig | None = Field(
        None, description="Training data only: self-distilled targets (SDFT). offline: before training, the model "
        "rewrites each response in its own words (chat: each assistant turn, given its context); accepted rewrites "
        "replace the references. on_policy: the model learns from its own sampled responses toward itself shown "
        "the reference.")

    @model_validator(mode="after")
    def _check_fields(self) -> DataConfig:
        known = {f for fs in FORMAT_FIELDS.values() for f in fs} | OPTIONAL_FIELDS
        for key in self.fields:
            if key not in known:
                raise ValueError(f"fields: unknown canonical field {key!r}; valid: {', '.join(sorted(known))}")
        if self.format == "text" and self.chat_template:
            raise ValueError("chat_template: true needs conversations; format text is plain text (remove "
                             "chat_template, or use format chat / instruction / prompt_completion)")
        if self.format == "chat" and self.chat_template is False:
            raise ValueError("chat_template: false with format chat: conversations are always rendered with the "
                             "tokenizer's chat template (remove chat_template, or use format prompt_completion)")
        if self.self_distill is not None and self.format == "text":
            raise ValueError("self_distill needs prompt/answer data (format chat, instruction or prompt_completion), "
                             "not format text: plain text has no response to rewrite or to learn toward")
        return self

    @property
    def completion_only(self) -> bool:
        if self.loss_on == "auto":
            return self.format != "text"
        return self.loss_on == "completion"

    def field(self, canonical: str) -> str:
        return self.fields.get(canonical, canonical)




class MonitorConfig(Strict):
    suite: str = Field("auto", description="Probe suite: auto (general-probe, a mirror of general on other items, "
                                           "when its data files are under data_root; else self), a built-in name "
                                           "or a suite YAML file.")
    tasks: list[str] | None = Field(None, description="Only these tasks of the suite.")
    limit: int | None = Field(None, gt=0, description="Items per task (default: the suite's own counts; 50 "
                                                      "prompts for self).")
    every: int | Literal["auto"] = Field(
        "auto", description="Probe every N optimizer steps; auto: as often as keeps the probes' time under "
                            "max_share of the training time (from the measured probe and step times, re-estimated "
                            "after every probe).")
    max_share: float = Field(0.1, gt=0, lt=1, description="every: auto: the largest share of the training time the "
                                                          "probes between the step-0 reference and the final probe "
                                                          "may take (those two are not capped: a run too short for "
                                                          "its suite is warned at the first placement, with their "
                                                          "share of the steps left; a resumed run's restored "
                                                          "reference is not counted).")
    data_root: str | None = None
    max_new_tokens: int | None = Field(64, gt=0, description="Self-reference answer length (shorter is faster).")


GuardAction = Literal["lower_lr", "more_replay", "rollback", "stop"]


def _default_guard_actions() -> list[GuardAction]:
    return ["lower_lr", "rollback", "stop"]


class GuardConfig(Strict):
    budget: float = Field(0.01, gt=0, lt=1, description="Largest relative drop of the retention score (0.01 = 1%).")
    per_task: dict[str, float] = Field(default_factory=dict, description="Budgets for single tasks' relative change.")
    require_significant: bool = Field(True, description="Act only on drops the paired test marks significant.")
    actions: list[GuardAction] = Field(
        default_factory=_default_guard_actions, description="Taken in order, one per breach."
    )
    lr_factor: float = Field(0.5, gt=0, lt=1, description="lower_lr multiplies the learning rate by this.")
    replay_factor: float = Field(2.0, gt=1, description="more_replay multiplies the replay ratio by this.")
    select: Literal["best_within_budget", "last"] = Field(
        "best_within_budget", description="Final model: the best validation loss within budget, or the last state."
    )

    @model_validator(mode="after")
    def _actions(self) -> GuardConfig:
        if not self.actions:
            raise ValueError("guard.actions needs at least one action")
        return self


# ---------------------------------------------------------------- distributed engines' options


class FsdpOptions(Strict):
    """FSDP2 through the Trainer's own `fsdp` / `fsdp_config` options (CUDA GPUs, or CPUs over gloo). Checkpoints
    are saved sharded (each process its shard: SHARDED_STATE_DICT, torch.distributed.checkpoint); the final model
    is gathered and saved whole, as an HF model or adapter like a single-process run."""

    version: Literal[2] = Field(2, description="FSDP2 (fully_shard); FSDP1 is deprecated in transformers.")
    reshard_after_forward: bool = Field(
        True, description="true: full shard (parameters too, like ZeRO-3); false: gradients and optimizer state only "
        "(like ZeRO-2)."
    )
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: list[str] | None = Field(
        None,
        description="Block classes sharded one by one (e.g. [LlamaDecoderLayer]). None: the model's _no_split_modules."
    )
    min_num_params: int = Field(0, ge=0,
                                description="SIZE_BASED_WRAP: wrap modules with at least this many parameters.")
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory.")
    activation_checkpointing: bool = Field(False, description="FSDP's activation checkpointing (prefer it to "
                                                              "train.gradient_checkpointing).")

    @model_validator(mode="after")
    def _policy(self) -> FsdpOptions:
        if self.transformer_layer_cls_to_wrap and self.auto_wrap_policy != "TRANSFORMER_BASED_WRAP":
            raise ValueError("transformer_layer_cls_to_wrap needs auto_wrap_policy: TRANSFORMER_BASED_WRAP")
        if self.auto_wrap_policy == "SIZE_BASED_WRAP" and self.min_num_params == 0:
            raise ValueError("auto_wrap_policy: SIZE_BASED_WRAP needs min_num_params > 0")
        if self.min_num_params and self.auto_wrap_policy != "SIZE_BASED_WRAP":
            raise ValueError("min_num_params needs auto_wrap_policy: SIZE_BASED_WRAP")
        return self

    def trainer_config(self) -> dict[str, Any]:
        """TrainingArguments.fsdp_config."""
        out: dict[str, Any] = {
            "version": self.version,
            "reshard_after_forward": self.reshard_after_forward,
            "auto_wrap_policy": self.auto_wrap_policy,
            "cpu_offload": self.cpu_offload,
            "activation_checkpointing": self.activation_checkpointing,
            "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints; the final model is gathered whole
        }
        if self.transformer_layer_cls_to_wrap:
            out["transformer_layer_cls_to_wrap"] = list(self.transformer_layer_cls_to_wrap)
        if self.min_num_params:
            out["min_num_params"] = self.min_num_params
        return out


class DeepSpeedOptions(Strict):
    """DeepSpeed ZeRO through the Trainer's own `deepspeed` option (GPUs, or CPUs over gloo; `pip install
    'forgetless[deepspeed]'`). Batch size, accumulation, clipping and precision come from the recipe (the
    config's "auto" values)."""

    stage: Literal[2, 3] = Field(2,
                                 description="ZeRO-2 shards optimizer state and gradients; ZeRO-3 also the parameters.")
    offload_optimizer: bool = Field(False, description="Optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters in CPU memory.")
    config: str | None = Field(None, description="A DeepSpeed JSON file used as is instead of the options above.")

    @model_validator(mode="after")
    def _options(self) -> DeepSpeedOptions:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3 (ZeRO-2 does not shard parameters)")
        if self.config is not None:
            others = sorted(self.model_fields_set - {"config"})
            if others:
                raise ValueError(f"config: a DeepSpeed JSON file replaces {', '.join(others)}; set one or the other")
            path = Path(self.config)
            if not path.is_file():
                raise ValueError(f"config: DeepSpeed config file {path} not found")
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"config: {path} is not valid JSON: {e}") from None
        return self

    def trainer_config(self) -> dict[str, Any] | str:
        """TrainingArguments.deepspeed: the JSON file, or a ZeRO config whose "auto" values the Trainer fills."""
        if self.config is not None:
            return self.config
        zero: dict[str, Any] = {"stage": self.stage, "overlap_comm": True, "contiguous_gradients": True}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ holds whole weights
            if self.offload_params:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {
            "zero_optimization": zero,
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,  # the Trainer's own AdamW
        }
