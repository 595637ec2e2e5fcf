"""`forgetless continual`: fine-tune on a sequence of tasks, one after another, and measure what each step
cost every earlier task and the base model's abilities.

A sequence file is a base recipe plus an ordered list of tasks:

    name: support-abc
    base: recipe.yaml              # a recipe file (relative to this file) or an inline mapping
    tasks:
      - name: product-a
        data: {train: a_train.jsonl, validation: a_val.jsonl}     # over the base recipe's data: options
      - name: product-b
        data: {train: b_train.jsonl, validation: b_val.jsonl}
        set: {optim.lr: 1.0e-4}    # per-step recipe overrides (dotted keys, as with --set)
        eval: auto                 # auto: reference likelihood of data.validation; or a suite (file or built-in)
    retention_suite: self          # the base abilities, evaluated after every step (null: none)
    limit: 200                     # items per evaluation task
    carry:                         # mitigations handed from step to step: ordinary mitigation configs
      - {name: ewc, weight: 1000, samples: 200, gamma: 1.0}   # online EWC: each finished task's Fisher, accumulated
      - {name: si, weight: 1.0}                               # Synaptic Intelligence importance, accumulated
      - {name: replay, ratio: 0.2, buffer: {policy: quota, per_task: 50}}   # earlier tasks' kept examples
      - {name: kl, weight: 1.0}                               # KL to the previous step's model
      - {name: olora, weight: 0.5}                            # LoRA: new adapter orthogonal to earlier ones
    (the older mapping form, `carry: {ewc: {weight: 1000}, replay: true}`, is read too)

Step i trains task i starting from step i-1's model (full weights; a LoRA-type adapter is merged into the
weights the next step starts from, its own adapter kept in the step's final/). After every step the model
is scored on every task's held-out evaluation and on the retention suite. The score R[i][j] of task j after
step i is the evaluation task's main metric oriented so that higher is better: minus the held-out answer
cross-entropy (nats per token) for `eval: auto`, the accuracy for a multiple-choice task. Row 0 is the base
model (zero-shot). From R: average accuracy (mean of the last row), backward transfer
BWT = mean over j < T of (R[T][j] - R[j][j]), forward transfer FWT = mean over j >= 2 of (R[j-1][j] - R[0][j])
and forgetting (mean over j < T of the largest earlier score minus the last), each with a 95% bootstrap
interval over the evaluation items (resampled per task, paired across steps).

Layout of the sequence directory:

    continual/<name>/
      sequence.yaml         the sequence as run
      continual.json        matrix, metrics with intervals, retention trajectory (rewritten after every step)
      matrix.png            heat-map of R (colour: change from the base model)
      trajectory.png        every task's score and the retention score after each step
      report.html           all of it in one page, with each step's training curves and retention tables
      base/                 the base model's evaluation (row 0)
      steps/<i>-<task>/     a normal run directory, plus eval-task.json (+ .items.json) and eval-retention.json
      replay/step-<i>/      the replay buffer step i trained with (one JSONL per earlier task)

Re-running the same command resumes: finished steps are skipped, an interrupted step continues from its
newest complete checkpoint.
"""

from .matrix import N_BOOT, score_matrix, sequence_metrics, summarize
from .plan import Step, plan, select_buffer
from .run import continual_table, run_continual
from .sequence import ContinualConfig, TaskSpec, load_continual

__all__ = [
    "N_BOOT", "ContinualConfig", "Step", "TaskSpec", "continual_table", "load_continual", "plan", "run_continual",
    "score_matrix", "select_buffer", "sequence_metrics", "summarize",
]
