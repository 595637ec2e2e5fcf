"""data.self_distill mode on_policy: the model learns from its own responses toward itself shown the reference.

On-policy self-distillation fine-tuning (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning"):
supervised fine-tuning trains on someone else's tokens (off-policy) and drifts the model's own distribution; here
the model (the student) samples its own response y to each training prompt x, and the loss pulls it toward the
same model shown the demonstration in its context (the teacher: `template` with the prompt and the reference
answer, as the offline rewrite's request):

    loss = mean over the sampled tokens y_t of  KL( p_student(. | x, y_<t) || p_teacher(. | template(x, ref), y_<t) )

over the whole vocabulary at each position (the reverse KL, mode-seeking; the gradient flows through the student's
distribution only; the sampled tokens are fixed). A response is cut at EOS (the EOS token is scored) or at
`max_new_tokens`. The teacher's weights (`teacher`): `ema`, an exponential moving average of the trained weights,
moved `ema_rate` of the way after each optimizer step (the paper's choice); `base`, the weights before training;
`live`, the weights being trained, without gradient. The teacher is the same module run with other parameter values
(torch.func.functional_call): no second copy of the model, only of the trainable parameters (fp32).

The training examples are the prompts only (`data.self_distill` builds one per response, chat: per assistant turn
in its context); examples that a replay mitigation mixes in keep their ordinary loss. Each step samples every
prompt's response (greedy decoding is not used: the paper samples at temperature 1), so a step costs a generation
of up to `max_new_tokens` tokens plus a teacher forward more than a supervised step: summary.json reports the
seconds per step spent sampling and in the teacher, and the mean response length. The EMA teacher is saved with
every checkpoint and restored on resume. One process only (sampling under DDP or FSDP is not made to work here).
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch

from ..mitigations.base import Mitigation, TrainContext, tensor_bytes
from ..retention.lm import autocast, greedy_generate


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per position, KL(softmax(student) || softmax(teacher)) over the vocabulary (fp32): [N, V] -> [N]."""
    ls = torch.log_softmax(student_logits.float(), -1)
    lt = torch.log_softmax(teacher_logits.float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def _right_padded(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids.to(device), attn.to(device)


class OnPolicyDistill(Mitigation):
    """Not a recipe mitigation: the run builds it from data.self_distill (mode on_policy) and drives it through the
    mitigation hooks (setup, loss, observe_step, the checkpointed teacher state)."""

    name = "self_distill_on_policy"
    unsharded_why = "samples a response per prompt in one process"
    shardable = False

    def setup(self, ctx: TrainContext) -> None:
        self.model = ctx.model
        self.tokenizer = ctx.tokenizer
        self.bf16 = ctx.bf16
        self.params = ctx.trainable()
        self.teacher_params: dict[str, torch.Tensor] | None = None
        if self.config.teacher in ("ema", "base"):
            self.teacher_params = {n: p.detach().float().clone() for n, p in self.params}
            self.extra_bytes = tensor_bytes(list(self.teacher_params.values()))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        self.eos = self.tokenizer.eos_token_id
        self.steps = 0
        self.sample_s = 0.0
        self.teacher_s = 0.0
        self.responses = 0
        self.response_tokens = 0
        self.hit_max = 0

    # ------------------------------------------------------------ the teacher's weights

    @torch.no_grad()
    def observe_step(self, phase: str) -> None:
        if phase != "after":
            return
        self.steps += 1
        if self.config.teacher == "ema" and self.teacher_params is not None:
            ema = list(self.teacher_params.values())
            torch._foreach_lerp_(ema, [p.detach().float() for _, p in self.params], self.config.ema_rate)

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps to resume exactly: the EMA teacher (the base teacher is the starting weights,
        which a resumed run rebuilds; the live one is the model)."""
        if self.config.teacher != "ema" or self.teacher_params is None:
            return None
        return {n: t.contiguous() for n, t in self.teacher_params.items()}

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.teacher_params is None:
            return
        missing = sorted(set(self.teacher_params) - set(state))
        if missing:
            raise RuntimeError(f"{self.name}: the checkpoint's teacher has no weight {missing[0]} (saved by another "
                               "recipe?)")
        for n, t in self.teacher_params.items():
            t.copy_(state[n])

    # ------------------------------------------------------------ sampling and the loss

    def sample(self, model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
        """One sampled response per prompt (token ids, up to and including EOS, at most max_new_tokens)."""
        was_training = model.training
        model.eval()
        try:
            return greedy_generate(model, self.tokenizer, prompts, max_new_tokens=self.config.max_new_tokens,
                                batch_size=len(prompts), bf16=self.bf16, temperature=self.config.temperature,
                                keep_eos=True)
        finally:
            model.train(was_training)

    def _teacher_logits(self, model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
        ids, attn = _right_padded(seqs, self.pad, next(model.parameters()).device)
        was_training = model.training
        model.eval()  # the teacher's targets without dropout (the student's forward keeps the Trainer's mode)
        try:
            with torch.no_grad(), autocast(model, self.bf16):
                if self.teacher_params is None:  # live: the weights being trained
                    return model(input_ids=ids, attention_mask=attn).logits
                return torch.func.functional_call(model, self.teacher_params, (),
                                                  {"input_ids": ids, "attention_mask": attn}).logits
        finally:
            model.train(was_training)

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        teacher_prompts = inputs.get("teacher_ids")
        if not teacher_prompts:
            return None
        rows = [i for i, t in enumerate(teacher_prompts) if t is not None]  # replay examples carry none
        if not rows:
            return None
        unwrapped = cast(torch.nn.Module, model.module if hasattr(model, "module") else model)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        prompts = [ids[i][mask[i].bool()].tolist() if mask is not None else ids[i].tolist() for i in rows]
        t0 = time.perf_counter()
        responses = self.sample(unwrapped, prompts)
        t1 = time.perf_counter()
        teacher_seqs = [list(teacher_prompts[i]) + r for i, r in zip(rows, responses, strict=True)]
        t_logits = self._teacher_logits(unwrapped, teacher_seqs)
        self.sample_s += t1 - t0
        self.teacher_s += time.perf_counter() - t1
        self.responses += len(responses)
        self.response_tokens += sum(len(r) for r in responses)
        self.hit_max += sum(1 for r in responses if len(r) >= self.config.max_new_tokens and r[-1] != self.eos)
        # the student, with gradient, through the model as the Trainer runs it
        s_ids, s_attn = _right_padded([p + r for p, r in zip(prompts, responses, strict=True)], self.pad, ids.device)
        logits = model(input_ids=s_ids, attention_mask=s_attn).logits
        logits = logits[:, logits.shape[1] - s_ids.shape[1]:]  # prompt tuning prepends virtual tokens
        t_logits = t_logits[:, t_logits.shape[1] - max(len(s) for s in teacher_seqs):]
        # position j predicts token j + 1: a response's tokens are predicted from len(prompt) - 1 on
        s_pos = [(k, len(p) - 1 + j) for k, (p, r) in enumerate(zip(prompts, responses, strict=True))
                 for j in range(len(r))]
        t_pos = [(k, len(teacher_seqs[k]) - len(r) - 1 + j) for k, r in enumerate(responses) for j in range(len(r))]
        if not s_pos:
            return None
        si, sj = zip(*s_pos, strict=True)
        ti, tj = zip(*t_pos, strict=True)
        student = logits[list(si), list(sj)]
        teacher = t_logits[list(ti), list(tj)].to(student.device)
        return reverse_kl(student, teacher).mean()

    def report(self, train_s: float) -> dict[str, Any]:
        steps = max(self.steps, 1)
        self.notes = {
            "mode": "on_policy", "teacher": self.config.teacher,
            **({"ema_rate": self.config.ema_rate} if self.config.teacher == "ema" else {}),
            "responses": self.responses,
            "mean_response_tokens": round(self.response_tokens / self.responses, 1) if self.responses else None,
            "responses_at_max_new_tokens": self.hit_max,
            "sample_s_per_step": round(self.sample_s / steps, 3),
            "teacher_s_per_step": round(self.teacher_s / steps, 3),
        }
        return super().report(train_s)

