"""`forgetless train`: one run, top to bottom, in three parts (as a torchtune recipe reads):

- set-up (`set_up`, `make_trainer`): processes and device, the run directory (locked; created, replaced or
  resumed), precision, tokenizer, data (checked; self-distilled), the model with its method, the mitigations, and
  the Trainer with forgetless's callbacks;
- the loop (`train_loop`): the step-0 validation loss, the Trainer's loop, and what a divergence leaves;
- finish (`finish`): mitigations' state files, the guard's final probe and choice of weights (`probe`,
  `select_final`, called here, not from a callback), the final model and summary.json, then the report (the
  caller passes the renderer: training never imports the reports).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from .. import distributed as dist
from .. import faults
from .. import precision as precisions
from ..allocator import loaded_allocator, release_free_memory
from ..data import build_examples, calibration_examples, load_datasets
from ..data.check import cheap_checks, report_problems
from ..data.self_distill import on_policy_examples, self_distill, weights_tag
from ..errors import DataError, ForgetlessError
from ..fingerprint import fingerprint_path
from ..guard import MonitorCallback
from ..io import atomic_dir, atomic_write_json, atomic_write_text, plain_modes, save_safetensors
from ..lock import DirLock
from ..mitigations import TrainContext
from ..mitigations import build as build_mitigations
from ..mitigations.base import load_states
from ..models import resolve_model
from ..models.catalog import cache_dir as models_cache_dir
from ..recipe import DEFAULT_WARMUP_RATIO, Recipe, dump_recipe, load_recipe
from .callbacks import (
    METRICS_LINES,
    CheckpointMarker,
    DivergenceGuard,
    EarlyStopping,
    FaultPoints,
    MetricsLogger,
    RichProgress,
    checkpoint_step,
    first_logged_loss,
    latest_complete_checkpoint,
    train_seconds_before,
)
from .model import (
    INITIAL_ADAPTER,
    count_parameters,
    load_model,
    load_tokenizer,
    merge_for_export,
    pick_device,
    prepare_model,
    save_trained,
)
from .on_policy import OnPolicyDistill


def setup_torch(threads: int | None = None) -> None:
    """fp32 math stalls on denormals on many CPUs (3-7x slower): flush them to zero. Also silence the
    Hugging Face libraries' own tqdm bars; forgetless shows rich progress instead."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def home_dir() -> Path:
    """$FORGETLESS_HOME (default ~/.cache/forgetless): model cache, Fisher and self-replay caches."""
    return models_cache_dir().parent


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count, so that runs trained one after another in one process (a sweep, a
    continual sequence, a bench) each report their own peak rather than the process's so far. CPU (Linux): the
    allocator's cached free pages go back to the kernel, then writing 5 to /proc/self/clear_refs resets the
    resident-set high-water mark (VmHWM) to the current size."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    release_free_memory()  # what a caching allocator kept from the run before is not this run's
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's (ru_maxrss)
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: CUDA allocated bytes, or on CPU the resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_lock(recipe: Recipe, break_lock: bool = False) -> DirLock:
    return DirLock(recipe.output_dir, "run directory", break_lock=break_lock)


def prepare_run_dir(recipe: Recipe, overwrite: bool, resume: bool, lock: Callable[[], Any] | None = None) -> Path:
    """Lock (`lock()`), then check, create or replace the run directory. With several processes only rank 0
    touches it (and holds the lock), and every rank gets its answer (or raises its error)."""
    def main() -> Path:
        if lock is not None:
            lock()
        return _prepare_run_dir(recipe, overwrite, resume)

    return dist.on_main(main)


#: what a run directory holds from its first moments on: --overwrite deletes only a directory with one of them
RUN_MARKERS = ("recipe.yaml", "summary.json", "metrics.jsonl", "checkpoints", "final")


def _prepare_run_dir(recipe: Recipe, overwrite: bool, resume: bool) -> Path:
    run_dir = recipe.output_dir
    if resume:
        for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.old-*")]:  # of a process killed mid-write
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if not (run_dir / "recipe.yaml").is_file():
            raise ForgetlessError(f"--resume: {run_dir} holds no run to resume (no recipe.yaml)")
        saved = load_recipe(run_dir / "recipe.yaml")
        if saved.resolved() != recipe.resolved():
            raise ForgetlessError(
                f"--resume: the recipe differs from the one {run_dir} was started with ({run_dir / 'recipe.yaml'}); "
                "resume with the same recipe, or start a new run (--overwrite replaces this one)"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ForgetlessError(
                f"run directory {run_dir} already exists; pass --overwrite to replace it, --resume to continue it, "
                "or set train.output_dir"
            )
        if not any((run_dir / m).exists() for m in RUN_MARKERS):  # `output_dir: .`, a mistyped project path
            raise ForgetlessError(
                f"--overwrite: {run_dir} is not a run directory (none of {', '.join(RUN_MARKERS)}), so it is not "
                "deleted; choose another train.output_dir, or empty it yourself"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def training_args(recipe: Recipe, ckpt_dir: Path, device: torch.device, bf16: bool, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    o, t = recipe.optim, recipe.train
    warmup = o.warmup_steps if o.warmup_steps is not None else (
        o.warmup_ratio if o.warmup_ratio is not None else DEFAULT_WARMUP_RATIO)
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.eval_batch_size or o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=recipe.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        optim="adamw_torch",
        lr_scheduler_type=o.schedule,
        warmup_steps=warmup,
        max_grad_norm=o.max_grad_norm or 0.0,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps or -1,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (and stops the run: DivergenceGuard)
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **dist.trainer_options(recipe),  # train.distributed: fsdp / deepspeed / ddp_* (nothing when absent)
    )


def _trim_metrics(path: Path, checkpoint: Path | None) -> None:
    """On resume, drop metric lines logged after the checkpoint we restart from (None: all of them): the first
    N lines, N as the checkpoint recorded it (METRICS_LINES), so the final evaluation and probe of a run killed
    after its last checkpoint are not logged twice; else (older checkpoints) the lines of later steps."""
    if not path.is_file():
        return
    import json

    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    count = checkpoint / METRICS_LINES if checkpoint is not None else None
    if count is not None and count.is_file():
        keep = lines[: int(count.read_text())]
    else:
        step = checkpoint_step(checkpoint) if checkpoint is not None else None
        up_to_step = step if step is not None else -1
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= up_to_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


@dataclass
class TrainResult:
    """What `train` returns: the summary (as in summary.json), the trained model in memory, its tokenizer."""

    summary: dict[str, Any]
    model: Any
    tokenizer: Any
    run_dir: Path


def _logged_initial_loss(metrics_path: Path) -> float | None:
    import json

    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") == 0 and "eval_loss" in rec:
                return rec["eval_loss"]
    return None


def _initial_validation_loss(trainer: Any, metrics_path: Path, resuming: bool) -> float | None:
    """The validation loss before any update (step 0), logged once and reused on resume. Every rank evaluates
    (the Trainer shards the validation set and gathers the losses); rank 0 logs."""
    logged = dist.on_main(lambda: _logged_initial_loss(metrics_path)) if resuming else None
    if logged is not None:
        return logged
    return trainer.evaluate()["eval_loss"]  # the metrics logger writes it (step 0) from the Trainer's log event


class StepZeroValidation(TrainerCallback):
    """With several processes, the step-0 validation runs at the start of `train()`, once the Trainer has
    wrapped the model in DDP: a `Trainer.evaluate()` before `train()` marks the bare model as prepared, and the
    Trainer would then train it without DDP, i.e. without averaging gradients across processes."""

    def __init__(self, measure: Callable[[], float | None]) -> None:
        self.measure = measure
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.loss = self.measure()


def _digest_examples(examples: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e["input_ids"], e.get("labels"), bool(e.get("replay")))).encode())
    return h.hexdigest()[:16]


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    break_lock: bool = False,
    report: Callable[[Path], Any] | None = None,
) -> TrainResult:
    """Fine-tune per `recipe`. The summary is also written to <run>/summary.json.

    report: renders the run's report once summary.json is written (rank 0, the run still locked) when the recipe's
    train.report is true; `forgetless train`, sweeps and sequences pass forgetless.report.write_report. Training
    itself never imports the reports (they sit above it).

    The run directory is locked for the whole run (forgetless.lock): a second writer is refused."""
    with contextlib.ExitStack() as locks:
        return _train(recipe, overwrite=overwrite, resume=resume, quiet=quiet, break_lock=break_lock, locks=locks,
                      report=report)


def _train(recipe: Recipe, *, overwrite: bool, resume: bool, quiet: bool, break_lock: bool,
           locks: contextlib.ExitStack, report: Callable[[Path], Any] | None) -> TrainResult:
    started = time.perf_counter()
    run = set_up(recipe, overwrite=overwrite, resume=resume, quiet=quiet,
                 lock=lambda: locks.enter_context(run_lock(recipe, break_lock)))
    trainer, watch = make_trainer(run)
    loop = train_loop(run, trainer, watch)
    return finish(run, trainer, watch, loop, report, started)


# ---------------------------------------------------------------- set-up


@dataclass
class Run:
    """Everything set up before the first step: where the run lives, what it trains and on what."""

    recipe: Recipe
    quiet: bool
    engine: str  # ddp (one process included), fsdp or deepspeed
    device: torch.device
    main: bool  # rank 0 (writes the run directory)
    dir: Path
    resume_from: Path | None  # the newest complete checkpoint, when resuming
    model_path: str
    provenance: Any
    precision: Any  # precision.Precision
    tokenizer: Any
    data: Any  # data.Datasets
    model: Any
    mitigations: list[Any]
    context: TrainContext
    trainable: int
    total: int

    @property
    def bf16(self) -> bool:
        return self.precision.bf16

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"


def set_up(recipe: Recipe, *, overwrite: bool, resume: bool, quiet: bool, lock: Callable[[], Any]) -> Run:
    """Device and processes, the run directory, precision, tokenizer, data, model and mitigations. Everything
    that can fail on bad input fails here, before training starts."""
    from transformers import set_seed

    setup_torch(recipe.train.threads)
    engine = dist.check_recipe(recipe)  # what FSDP / DeepSpeed cannot run fails here, naming the recipe key
    device = pick_device(recipe.train.device)
    if device.type == "cpu":  # what DeepSpeed (when installed) detects anyway, without its warning on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if engine == "fsdp" and device.type == "cpu":
        dist.fsdp_on_cpu()  # accelerate would fall back to DDP on CPUs without a word
    # under torchrun / accelerate launch: start the process group now (rank 0 alone writes the run directory)
    dist.init(cpu=device.type == "cpu", use_deepspeed=engine == "deepspeed")
    # a ZeRO-3 run earlier in this process leaves transformers' global DeepSpeed config alive, and the next model
    # would load partitioned (zero.Init), where a fresh process loads it whole and the engine partitions it after the
    # method wrapped it (EVA's calibration forward needs whole weights): every run loads as a fresh process does
    unset_hf_deepspeed_config()
    device = dist.device(device)
    reset_peak_memory(device)
    main = dist.is_main()
    run_dir = prepare_run_dir(recipe, overwrite, resume, lock)
    resume_from = latest_complete_checkpoint(run_dir / "checkpoints") if resume else None
    set_seed(recipe.train.seed)

    # Model reference: aliases from `forgetless models` resolve to a local directory.
    resolved = resolve_model(recipe.model.name, revision=recipe.model.revision,
                             allow_pickle=recipe.model.allow_pickle)
    model_path = resolved.path
    # bf16 compute only where it is measurably faster here (precision.py): emulated bf16 runs 50x+ slower
    prec = precisions.resolve(recipe.train.bf16, device, widths=precisions.config_widths(model_path))
    bf16 = prec.bf16
    if main and not quiet:
        from rich.console import Console

        Console(stderr=True).print(prec.line(), highlight=False)

    tokenizer = load_tokenizer(model_path, recipe.model)
    data = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    data_problems = check_training_data(recipe, data)
    if recipe.train.early_stopping and not data.validation:
        raise ForgetlessError("train.early_stopping needs validation data (data.validation or "
                              "data.validation_fraction)")
    model = prepare_model(
        model_path,
        recipe.model,
        recipe.method,
        device,
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        tokenizer=tokenizer,
        calibration=lambda cfg, n: calibration_examples(cfg, n, data.train, tokenizer, recipe.train.seed),
    )
    on_policy = recipe.data.self_distill is not None and recipe.data.self_distill.mode == "on_policy"
    if on_policy:
        if dist.world_size() > 1:
            raise ForgetlessError("data.self_distill mode on_policy runs in one process (it samples a response per "
                                  "prompt at every step; not made to work under DDP, FSDP or DeepSpeed yet)")
        # (an example with a target token has a prompt within data.max_length: load_datasets kept at least one)
        data.train, data.self_distill = on_policy_examples(data.train_records, recipe.data, tokenizer)
    elif recipe.data.self_distill is not None:
        # the model as it is before training rewrites the responses; rank 0 first (it fills the cache the others read)
        with dist.main_first():
            records, data.self_distill = self_distill(data.train_records, recipe.data, model, tokenizer,
                                                      home_dir() / "cache", bf16, quiet=quiet or not main,
                                                      model_key=fingerprint_path(model_path) + weights_tag(model))
        data.train, data.train_stats = build_examples(records, recipe.data, tokenizer)
        data.train_records = records
        if not data.train:
            raise DataError(f"data.train ({recipe.data.train}): no usable examples after data.self_distill")
    if recipe.method.moves_base and main:
        _save_initial_adapter(model, run_dir)
    mitigations = build_mitigations(recipe.mitigations)
    if on_policy:
        mitigations.insert(0, OnPolicyDistill(recipe.data.self_distill))
    mctx = TrainContext(recipe=recipe, model=model, tokenizer=tokenizer, run_dir=run_dir, device=device,
                        base_model_path=model_path, bf16=bf16, data=data, cache_dir=home_dir() / "cache")
    for m in mitigations:
        t0 = time.perf_counter()
        # Rank 0 first (it fills the on-disk caches the others then read), unless the set-up shares work
        # across ranks through collectives (EWC's Fisher), which needs every rank at once.
        with contextlib.nullcontext() if m.collective_setup else dist.main_first():
            m.setup(mctx)
            data.train = m.prepare_data(mctx, data.train)
        m.setup_s = time.perf_counter() - t0
    if resume_from is not None:  # state a mitigation keeps beside the weights (an EMA teacher)
        load_states(mitigations, resume_from)
    if dist.world_size() > 1:
        # Every rank must build the same mixed stream (task + replay): the sampler then gives each example to one rank.
        dist.check_same(_digest_examples(data.train), "the training data (after mitigations)")
    trainable, total = count_parameters(model)

    if main:
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        atomic_write_json(run_dir / "data_stats.json", {**data.summary(), "check": data_problems})
        if resume:  # killed before its first complete checkpoint: the run starts again, so do its metric lines
            _trim_metrics(run_dir / "metrics.jsonl", resume_from)
        if not quiet:
            _report_data(data, data_problems)
            _report_distributed(recipe, engine, len(data.train))
    return Run(recipe, quiet, engine, device, main, run_dir, resume_from, model_path, resolved.provenance, prec,
               tokenizer, data, model, mitigations, mctx, trainable, total)


def _save_initial_adapter(model: Any, run_dir: Path) -> None:
    """The adapter as initialised (part of the base moved into it): the final adapter is saved as its difference
    from this, a standard LoRA against the original base. init_lora_weights True in the saved copy, so that
    loading it does not decompose the (residual) base again."""
    peft_model = cast(Any, model)  # a PeftModel (moves_base: a LoRA init)
    live = peft_model.peft_config["default"]
    init, live.init_lora_weights = live.init_lora_weights, True
    try:
        with atomic_dir(run_dir / INITIAL_ADAPTER, overwrite=True) as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
    finally:  # checkpoints keep saying what they are: an adapter against the residual base
        live.init_lora_weights = init


@dataclass
class Watch:
    """The callbacks `train_loop` and `finish` read after training."""

    metrics: MetricsLogger
    divergence: DivergenceGuard
    monitor: MonitorCallback | None
    early: EarlyStopping | None


def make_trainer(run: Run) -> tuple[Any, Watch]:
    """The Trainer with forgetless's callbacks: metrics log, progress, checkpoint marks, fault points, the
    divergence guard, the retention monitor / guard and early stopping."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback

    from .trainer import ForgetlessTrainer, ReplayAwareCollator

    recipe, data = run.recipe, run.data
    metrics = MetricsLogger(run.metrics_path)
    progress = RichProgress(metrics, enabled=recipe.train.progress and not run.quiet and run.main)
    callbacks: list[Any] = [metrics, progress, CheckpointMarker(), FaultPoints()]
    divergence = DivergenceGuard(recipe.train.divergence_factor,
                                 (dist.on_main(lambda: first_logged_loss(run.metrics_path)) if run.resume_from
                                  else None))
    callbacks.append(divergence)
    monitor = None
    if recipe.monitor is not None:
        monitor = MonitorCallback(recipe.monitor, recipe.guard, run.tokenizer, metrics, run.metrics_path, run.bf16,
                                  run.mitigations, data.validation is not None)
        callbacks.append(monitor)
    early = None
    if recipe.train.early_stopping:
        early = EarlyStopping(recipe.train.early_stopping.patience, recipe.train.early_stopping.min_delta)
        if run.resume_from is not None:
            early.restore(run.resume_from)
        callbacks.append(early)

    trainer = ForgetlessTrainer(
        model=run.model,
        args=training_args(recipe, run.checkpoints, run.device, run.bf16, data.validation is not None),
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=ReplayAwareCollator(DataCollatorForSeq2Seq(run.tokenizer, label_pad_token_id=-100,
                                                                 padding=True)),
        processing_class=run.tokenizer,
        callbacks=callbacks,
        mitigations=run.mitigations,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.metrics_path = run.metrics_path  # each checkpoint records how many lines it had (METRICS_LINES)
    divergence.trainer = trainer
    if monitor is not None:
        monitor.trainer = trainer
        monitor.resume_from, monitor.checkpoints = run.resume_from, run.checkpoints
        trainer.monitor = monitor
    return trainer, Watch(metrics, divergence, monitor, early)


# ---------------------------------------------------------------- the loop


@dataclass
class Loop:
    """What training produced: the Trainer's output, its time, the step-0 validation loss, a divergence."""

    output: Any
    seconds: float
    initial_loss: float | None
    diverged: dict[str, Any] | None
    #: the training seconds over every session of the run (`seconds` plus those before the checkpoint it resumed
    #: from); None where that checkpoint does not record them
    total_seconds: float | None = None


def train_loop(run: Run, trainer: Any, watch: Watch) -> Loop:
    """The step-0 validation loss, the Trainer's loop (resumed from the newest complete checkpoint), and what a
    divergence leaves: with a guard the weights roll back to the last probe within budget, else the run stops."""
    initial_loss = None
    step_zero = None
    resuming = run.resume_from is not None
    if run.data.validation and dist.world_size() == 1:
        initial_loss = _initial_validation_loss(trainer, run.metrics_path, resuming)
    elif run.data.validation:
        step_zero = StepZeroValidation(lambda: _initial_validation_loss(trainer, run.metrics_path, resuming))
        trainer.add_callback(step_zero)
    before = dist.on_main(lambda: train_seconds_before(run.resume_from))
    t0 = time.perf_counter()
    if before is not None:  # each checkpoint records the training seconds up to it, over every session
        trainer.train_clock = lambda: before + time.perf_counter() - t0
    out = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    seconds = time.perf_counter() - t0
    if step_zero is not None:
        initial_loss = step_zero.loss
    diverged = watch.divergence.event
    if diverged is not None:  # the weights in memory are diverged: never the final model
        watch.divergence.invalidate(run.checkpoints)
        last_good = dist.on_main(lambda: latest_complete_checkpoint(run.checkpoints))
        diverged["last_good_checkpoint"] = str(last_good) if last_good else None
        if watch.monitor is None or run.recipe.guard is None:
            _stop_diverged(run.recipe, run.dir, diverged, trainer.state, watch.metrics.last, run.resume_from)
        diverged["rolled_back_to_step"] = watch.monitor.rollback_before(diverged["step"] - 1)
    return Loop(out, seconds, initial_loss, diverged, before + seconds if before is not None else None)


# ---------------------------------------------------------------- finish


def finish(run: Run, trainer: Any, watch: Watch, loop: Loop, report: Callable[[Path], Any] | None,
           started: float) -> TrainResult:
    """Mitigations' state files, the guard's final probe and choice of weights, the final validation loss, the
    final model, summary.json and the report. `started`: when train() began (perf_counter), for `run_time_s`."""
    recipe, monitor = run.recipe, watch.monitor
    for m in run.mitigations:  # every rank (sharded state is gathered); rank 0 writes ewc_state, si_state
        m.finish(run.context)
    selection = None
    if monitor is not None:
        monitor.probe(trainer.model, trainer.state, final=True)  # the final weights, unless this step was probed
        selection = monitor.select_final(trainer.state.global_step)
        if selection.get("warning") and not run.quiet and run.main:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]guard: {selection['why']}")
    final_eval = trainer.evaluate() if run.data.validation is not None else {}  # logged by the Trainer's log event

    if run.engine == "ddp":  # every rank holds the whole model: rank 0 saves it
        kind = dist.on_main(lambda: _save_final(recipe, trainer, run.tokenizer, run.dir, run.model_path, run.bf16))
    else:  # sharded: every rank takes part in gathering the weights, rank 0 writes them
        kind = _save_final_sharded(recipe, trainer, run.tokenizer, run.dir)

    summary = _summary(run, trainer, watch, loop, final_eval, kind, selection)
    # the whole of this session's run: set-up, training, the final probe and evaluation, the save (not the report)
    summary["run_time_s"] = round(time.perf_counter() - started, 2)
    if run.main:
        faults.point("summary")
        atomic_write_json(run.dir / "summary.json", summary)
        if recipe.train.report and report is not None:
            report(run.dir)
    dist.barrier()  # every rank returns once the run directory is complete
    diverged = loop.diverged
    if diverged is not None:
        raise ForgetlessError(
            f"training diverged at step {diverged['step']}: {diverged['why']}. The guard rolled the weights back to "
            f"step {diverged['rolled_back_to_step']} and stopped; the final model ({run.dir / 'final'}) is that "
            f"state. Details in {run.dir / 'summary.json'}. {_DIVERGED_HINT}"
        )
    # accelerate patched forward() with bf16 autocast for training; hand back the plain model
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrainResult(summary, model, run.tokenizer, run.dir)


def _session_mean_loss(trainer: Any, loop: Loop, watch: Watch) -> float | None:
    """The mean training loss over the steps this session ran (None if it ran none). transformers 5.25 averages the
    Trainer's `training_loss` over them; 5.17 (no `_initial_global_step`) over every step since the run began,
    which a resumed run's share of the steps would shrink: scaled back here."""
    step, start = trainer.state.global_step, watch.metrics.start_step
    if step <= start:
        return None
    loss = loop.output.training_loss
    return loss if hasattr(trainer, "_initial_global_step") else loss * step / (step - start)


def _summary(run: Run, trainer: Any, watch: Watch, loop: Loop, final_eval: dict[str, Any], kind: str,
             selection: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json: what was trained, how long and how fast, the losses, the mitigations, monitor and guard."""
    recipe, state, monitor, train_time = run.recipe, trainer.state, watch.monitor, loop.seconds
    summary = {
        "name": recipe.name,
        "method": recipe.method.name,
        "model": {"name": recipe.model.name, "path": run.model_path, "provenance": run.provenance},
        "trainable_parameters": run.trainable,
        "total_parameters": run.total,
        "trainable_share": run.trainable / run.total if run.total else 0.0,
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": state.num_input_tokens_seen,
        "wall_time_s": round(train_time, 2),
        # a resumed run's wall_time_s is its last session's: this is all its sessions' (None: unknown)
        "train_time_total_s": round(loop.total_seconds, 2) if loop.total_seconds is not None else None,
        "tokens_per_s": round((state.num_input_tokens_seen - watch.metrics.start_tokens) / train_time, 1)
        if train_time > 0
        else None,
        "peak_memory_mb": round(peak_memory_mb(run.device), 1),
        "device": run.device.type,
        "allocator": loaded_allocator(),
        "bf16_compute": run.bf16,
        "precision": run.precision.as_dict(),
        "lr": recipe.lr,
        "final_train_loss": watch.metrics.last.get("loss"),
        "mean_train_loss": _session_mean_loss(trainer, loop, watch),
        "initial_validation_loss": loop.initial_loss,
        "final_validation_loss": final_eval.get("eval_loss"),
        "early_stopped_at": watch.early.stopped_at if watch.early else None,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "status": "diverged" if loop.diverged else "complete",
        "diverged": loop.diverged,
        "data": run.data.summary(),
        "mitigations": [m.report(train_time) for m in run.mitigations],
        "monitor": {
            "probes": monitor.state.probes,
            "probe_s": round(monitor.state.probe_s, 2),
            "probe_share": round(monitor.state.probe_s / train_time, 4) if train_time else None,
            "every": recipe.monitor.every if recipe.monitor else None,
            **({"intervals": monitor.state.intervals} if monitor.state.intervals else {}),
            # a resumed run's probes measure forgetting since this step, not since the base model
            "resumed_at": monitor.state.resumed_at,
        } if monitor else None,
        "guard": {"events": monitor.state.events, "selection": selection} if monitor and recipe.guard else None,
        "output": {"final": str(run.dir / "final"), "kind": kind,
                   "merged": str(run.dir / "merged") if recipe.train.merge and kind != "model" else None},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pid": os.getpid(),
    }
    if dist.world_size() > 1:
        summary["distributed"] = {
            "engine": run.engine,
            "world_size": dist.world_size(),
            "backend": torch.distributed.get_backend(),
            "global_batch": recipe.optim.batch_size * recipe.optim.grad_accum * dist.world_size(),
            "epoch_padding": _epoch_padding(len(run.data.train), recipe.optim.batch_size),
        }
    return summary


_DIVERGED_HINT = "Lower optim.lr, set optim.max_grad_norm, or raise train.divergence_factor (docs/reliability.md)."


def _stop_diverged(recipe: Recipe, run_dir: Path, event: dict[str, Any], state: Any, last_log: dict[str, Any],
                   resume_from: Path | None) -> NoReturn:
    """No guard to roll back with: record what happened in summary.json and stop with exit code 2. No final
    model is written; the newest complete checkpoint is the last good one."""
    good = event["last_good_checkpoint"]
    if dist.is_main():
        atomic_write_json(run_dir / "summary.json", {
            "name": recipe.name,
            "method": recipe.method.name,
            "status": "diverged",
            "diverged": event,
            "steps": state.global_step,
            "final_train_loss": last_log.get("loss"),
            "resumed_from": str(resume_from) if resume_from else None,
            "output": {"final": None, "last_good_checkpoint": good},
            "pid": os.getpid(),
        })
    dist.barrier()
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint from before the divergence was written"
    raise ForgetlessError(
        f"training diverged at step {event['step']}: {event['why']}. The run stopped without a final model; {kept}. "
        f"Details in {run_dir / 'summary.json'}. {_DIVERGED_HINT}"
    )


def refuse_diverged(summary: dict[str, Any], path: Path, what: str) -> None:
    """A sweep or sequence meets a run whose summary.json says it diverged without a final model: an error, not
    a finished run to score."""
    if summary.get("status") == "diverged" and not (summary.get("output") or {}).get("final"):
        ev = summary.get("diverged") or {}
        raise ForgetlessError(f"{what} diverged at step {ev.get('step')} ({ev.get('why')}; see {path}); change its "
                              f"recipe and delete {path.parent} to train just this run again (--overwrite starts "
                              "everything again). " + _DIVERGED_HINT)


def _save_final(recipe: Recipe, trainer: Any, tokenizer: Any, run_dir: Path, model_path: str, bf16: bool) -> str:
    with atomic_dir(run_dir / "final", overwrite=True) as tmp:
        kind = save_trained(trainer.model, tokenizer, tmp, model_path,
                            run_dir / INITIAL_ADAPTER if recipe.method.moves_base else None)
        faults.point("final_save")
        recipe.method.export_files(tmp, bf16)
    if recipe.train.merge and kind != "model":
        _save_merged(trainer.model, recipe, tokenizer, run_dir)
    return kind


def _save_merged(model: Any, recipe: Recipe, tokenizer: Any, run_dir: Path) -> None:
    """train.merge: the adapter in `model` (or saved in final/) folded into the base, written to merged/."""
    with atomic_dir(run_dir / "merged", overwrite=True) as tmp:
        merged = merge_for_export(model, recipe.method, run_dir / "final")
        merged.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]  # a PreTrainedModel
        tokenizer.save_pretrained(tmp)


def _save_final_sharded(recipe: Recipe, trainer: Any, tokenizer: Any, run_dir: Path) -> str:
    """FSDP / DeepSpeed: the Trainer's save_model gathers the whole weights (FULL_STATE_DICT, or ZeRO-3's
    16-bit gather) from every rank and rank 0 writes an HF model or PEFT adapter; rank 0 then removes what the
    Trainer adds beside it (its pickled training_args.bin; a tied head's second copy of the embedding), moves it
    into place and, with train.merge, merges the saved adapter into the base it was trained on."""
    import tempfile

    tmp = Path(dist.on_main(lambda: tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=run_dir)))
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:  # checkpoints are sharded; the final model is gathered whole
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    dist.barrier()

    def publish() -> str:
        tokenizer.save_pretrained(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # safetensors only: no pickle in a model directory
        _drop_tied_head(tmp)
        plain_modes(tmp)
        final = run_dir / "final"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kind = "peft" if (final / "adapter_config.json").is_file() else "model"
        if recipe.train.merge and kind != "model":  # the sharded model is gone: merge the saved adapter
            _save_merged(load_model(final)[0], recipe, tokenizer, run_dir)
        return kind

    return dist.on_main(publish)


def _drop_tied_head(folder: Path) -> None:
    """The gathered state dict holds a tied head's weight beside the embedding it is tied to (one process saves
    it once): drop the copy, so the files are those a single-process run writes."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = folder / "config.json"
    if not cfg.is_file():
        return
    config = json.loads(cfg.read_text())
    if not (config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings")):
        return
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys = set(h.keys())
            meta = h.metadata()
        if "lm_head.weight" in keys and len(keys) > 1:
            state = load_file(str(f))
            del state["lm_head.weight"]
            save_safetensors(state, f, metadata=meta)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.get("weight_map", {}).pop("lm_head.weight", None)
        atomic_write_text(index, json.dumps(data, indent=2))


def _epoch_padding(examples: int, batch_size: int) -> int:
    """Examples accelerate repeats at the end of each epoch so every rank gets a full last batch (even_batches):
    0 when the training set is a multiple of batch_size x processes."""
    return -examples % (batch_size * dist.world_size())


def _report_distributed(recipe: Recipe, engine: str, examples: int) -> None:
    n = dist.world_size()
    if n == 1:
        return
    from rich.console import Console

    console = Console(stderr=True)
    o = recipe.optim
    console.print(f"distributed: {n} processes ({engine}, {torch.distributed.get_backend()}), global batch "
                  f"{o.batch_size} x {o.grad_accum} x {n} = {o.batch_size * o.grad_accum * n}")
    pad = _epoch_padding(examples, o.batch_size)
    if pad:
        console.print(f"[yellow]{examples} training examples are not a multiple of batch_size x processes "
                      f"({o.batch_size} x {n}): the last batch of each epoch repeats {pad} example(s) from its start")


def check_training_data(recipe: Recipe, data: Any) -> list[str]:
    """The cheap checks of `forgetless data check` on the training set; errors under data.check: strict."""
    if recipe.data.check == "off":
        return []
    problems = report_problems(cheap_checks(data.train_records, recipe.data))
    s = data.train_stats
    if s.truncated or s.dropped_overlong:
        problems.append(f"length: {s.truncated} truncated and {s.dropped_overlong} dropped over data.max_length "
                        f"{recipe.data.max_length}")
    if problems and recipe.data.check == "strict":
        raise DataError("data.check is strict and the training data has problems (see `forgetless data check`):\n  "
                        + "\n  ".join(problems))
    return problems


def _report_data(data: Any, problems: list[str]) -> None:
    from rich.console import Console

    s = data.train_stats
    console = Console(stderr=True)
    msg = f"data: {s.examples} training examples ({s.tokens} tokens, {s.target_tokens} in the loss)"
    if data.validation_stats:
        msg += f", {data.validation_stats.examples} validation"
    console.print(msg)
    for line in problems:
        if not line.startswith("length:"):
            console.print(f"[yellow]data check: {line}")
    if s.truncated:
        console.print(
            f"[yellow]{s.truncated} example(s) over data.max_length were truncated (first: "
            f"{', '.join(s.first_truncated)}); set data.overlong: drop to drop them instead"
        )
    if s.dropped_overlong:
        console.print(f"[yellow]{s.dropped_overlong} example(s) over data.max_length were dropped")
    if s.dropped_no_target:
        console.print(f"[yellow]{s.dropped_no_target} example(s) had no target tokens left after truncation and "
                      "were dropped")
    if s.empty_answers:
        console.print(f"[yellow]{s.empty_answers} of {s.records} training example(s) have an empty answer (first: "
                      f"{', '.join(s.first_empty[:3])}): they teach the model to answer nothing")
    v = data.validation_stats
    if v and (lost := v.losses()):  # the validation loss is measured on what is left
        console.print(f"[yellow]validation: {', '.join(lost)} of {v.records} example(s) at data.max_length")
    sd = data.self_distill
    if sd and sd.get("mode") == "on_policy":
        console.print(f"self_distill (on_policy): {sd['prompts']} prompts, a response sampled for each at every step "
                      f"(at most {sd['max_new_tokens']} tokens), teacher {sd['teacher']}")
        if sd["dropped_overlong_prompts"]:
            console.print(f"[yellow]self_distill: {sd['dropped_overlong_prompts']} prompt(s) over data.max_length "
                          f"were dropped (first: {', '.join(sd['first_dropped'][:3])})")
    elif sd:
        console.print(f"self_distill: {sd['accepted']} of {sd['responses']} responses rewritten by the model "
                      f"(kept the original: {sd['rejected'] or 'none'}; {sd['generated']} generated, "
                      f"{sd['from_cache']} from the cache, {sd['seconds']:.0f} s)")
