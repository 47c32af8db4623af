"""The training loop, shared by SFT and on-policy distillation.

One step: make prompts → roll out (the student samples for OPD; dataset or teacher completions for SFT) →
the teacher scores the student's tokens (training/batches.py) → shape (objectives/shaping.py) → the
objective over micro-batches with one global token normaliser → clip, AdamW, schedule (training/step.py) →
log, evaluate, checkpoint. A variant is a config switch that selects a function, not a subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opdistill.config import Config, TrainConfig, save_config
from opdistill.data.rendering import use_chat_settings
from opdistill.data.tasks import Task, corpus_text, task_from_config
from opdistill.errors import UserError
from opdistill.models import check_context, load_model, load_student, save_model
from opdistill.objectives import shaping
from opdistill.objectives.registry import OBJECTIVES
from opdistill.observe import monitor
from opdistill.observe.evaluate import evaluate
from opdistill.observe.flops import FlopCounter, teacher_parameters
from opdistill.observe.progress import NullProgress, ProgressBar
from opdistill.observe.runlog import Board, Log
from opdistill.observe.timing import PHASES, timed
from opdistill.sampling.vllm_engine import VllmEngine
from opdistill.teachers.base import run_teachers
from opdistill.teachers.local import LocalTeacher, ema_update
from opdistill.training import batches, distributed
from opdistill.training.checkpoint import (
    latest_checkpoint,
    load_state,
    publish,
    save_checkpoint,
    truncate_jsonl,
)
from opdistill.training.coldstart import cold_start, disjoint
from opdistill.training.distributed import World
from opdistill.training.state import RunState
from opdistill.training.step import train_step
from opdistill.types import COUNTERS

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOGS = ("metrics.jsonl", "eval.jsonl", "alarms.jsonl")


def learning_rate(config: Config, step: int, elapsed_s: float, flops: float = 0.0) -> float:
    """Linear warmup, then cosine (or constant) over the run. With a time or FLOP budget, progress is
    whichever of steps, training seconds and FLOPs is furthest along: the decay ends when the budget does."""
    opt, train = config.optim, config.train
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    progress = (step - opt.warmup_steps) / max(1, train.steps - opt.warmup_steps)
    if train.time_budget_s > 0:
        progress = max(progress, elapsed_s / train.time_budget_s)
    if train.budget_flops > 0:
        progress = max(progress, flops / train.budget_flops)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * cosine)


def run(
    config: Config, *, resume: bool = False, stop_after: int | None = None, show_progress: bool = True
) -> dict:
    """Train per ``config``; returns a summary. ``stop_after`` ends this session after that many steps
    (checkpointed, resumable) — the same as an interruption, used to test resume. Under ``torchrun`` every
    rank runs this; rank 0 logs and checkpoints (distributed.py)."""
    world = distributed.init(config.train.prompts_per_step)
    finished = False
    try:
        with contextlib.ExitStack() as closing:  # a vLLM engine is closed before the process group goes
            summary = _run(config, world, resume, stop_after, show_progress and world.is_main, closing)
        finished = True
        return summary
    finally:
        distributed.shutdown(finished)


def _run(
    config: Config,
    world: World,
    resume: bool,
    stop_after: int | None,
    show_progress: bool,
    closing: contextlib.ExitStack,
) -> dict:
    run_dir, train = Path(config.train.out_dir), config.train
    lr_chosen_by_user = bool(config.optim.lr)
    distills = OBJECTIVES[config.objective.type].distills
    if train.threads:
        torch.set_num_threads(train.threads)
    task = task_from_config(config.data, train.seed)
    checkpoint, saved = _open_run_directory(config, run_dir, world, resume)
    resume = checkpoint is not None  # --resume before the first checkpoint is a fresh start
    state = RunState.from_dict(saved) if resume else RunState()

    # a fresh model gets a character tokenizer over the task's text (read only when one is built)
    corpus = () if config.student.path or checkpoint else corpus_text(task)
    student, tokenizer = load_student(config.student, config.lora, corpus, train.seed, checkpoint)
    check_context(student, config.rollout.max_new_tokens, "rollout.max_new_tokens")
    world.place(student).train()
    use_chat_settings(tokenizer, config.data.chat_template_kwargs, config.data.max_prompt_tokens)
    parameters = sum(p.numel() for p in student.parameters())
    config = dataclasses.replace(config, optim=config.optim.for_student(parameters, bool(config.lora.rank)))
    if not lr_chosen_by_user and parameters >= 10_000_000 and world.is_main:  # the tiny models keep 1e-3
        print(
            f"optim.lr={config.optim.lr:g}, chosen for a {parameters / 1e6:.1f}M-parameter student "
            "(set optim.lr to choose another)",
            file=sys.stderr,
        )

    def initial_student() -> LocalTeacher:  # the student as the run started, frozen (what a resume rebuilds)
        model, _ = load_model(config.student, () if config.student.path else corpus_text(task), train.seed)
        return LocalTeacher(world.place(model), chunk_tokens=train.chunk_tokens)

    teachers, ema_model = run_teachers(
        config, tokenizer, student, initial_student, saved.get("self_teacher"), world.device
    )
    flops = FlopCounter(parameters, teacher_parameters(teachers.values()))
    if train.budget_flops and flops.teacher_params is None:
        raise UserError(
            "train.budget_flops counts the teacher's FLOPs, and a teacher server's size is not known here: "
            "use train.steps or train.time_budget_s with teacher.url."
        )
    reference = initial_student() if config.objective.needs_reference else None  # StableOPD's, DPO's
    # the loss runs through `model` (DDP / FSDP2 under torchrun); sampling, scoring, evaluation use `student`
    model = distributed.wrap(student, world, train.parallel, train.precision)
    if config.cold_start.samples:  # SFT on teacher samples first; distillation then avoids their prompts
        seen, cost = cold_start(
            config,
            task,
            tokenizer,
            model,
            teachers[""],
            run_dir,
            world,
            resume=resume,
            show_progress=show_progress,
        )
        state.charge(cost)
        task = dataclasses.replace(task, train=disjoint(task.train, seen))
    engine = _rollout_engine(config, student, state.step, world)
    if engine is not None:
        closing.callback(engine.close)
    context, cost = batches.batch_context(
        config, task, tokenizer, student, teachers, run_dir, world, reference, engine
    )
    state.charge(cost)
    optimizer = distributed.adamw(model, config.optim.lr, config.optim.betas, config.optim.weight_decay)
    if resume:
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"])

    def save() -> dict | None:  # a checkpoint holds the EMA self-teacher too
        extra = {} if ema_model is None else {"self_teacher": ema_model.state_dict()}
        return _checkpoint(config, run_dir, model, tokenizer, optimizer, {**state.to_dict(), **extra}, world)

    # Ctrl-C or a scheduler's SIGTERM ends the run after the current step, with a checkpoint to resume from
    stop_requested = []
    previous_handlers = {
        sig: signal.signal(sig, lambda *_: stop_requested.append(True)) for sig in STOP_SIGNALS
    }
    last_eval = _logged_eval(run_dir, state.step) if resume else {}  # (a resume after the final one)
    session_steps = 0
    title = f"{'distill' if distills else 'sft'} {run_dir.name}"
    bar = ProgressBar(title, train.steps, state.step, *_budget(train)) if show_progress else NullProgress()
    periodic_eval = bool(task.test) and bool(train.eval_every or train.eval_every_s)
    if periodic_eval and state.step == 0:  # where the curves start: the model before training
        last_eval = _evaluate_and_log(config, student, tokenizer, task, run_dir, state, world)
    try:
        board = Board(run_dir, train.tensorboard and world.is_main, state.step + 1 if resume else None)
        with bar, board, Log(run_dir, world) as log:
            if last_eval:  # the step-0 evaluation, made before the loop
                board.log("eval", last_eval)
            while state.step < train.steps and not _budget_spent(train, state, flops):
                started = time.perf_counter()
                step = state.step
                # sampling depends on (seed, step) only, which is what makes resume exact
                torch.manual_seed(train.seed * 1_000_003 + step)
                lr = learning_rate(config, step, state.elapsed_s, flops.total(state.counters()))
                for group in optimizer.param_groups:
                    group["lr"] = lr

                batch = batches.next_batch(context, step)  # prompts → roll out → score
                if distills:
                    with timed(batch.metrics, "shaping"):
                        shaped = shaping.shape(config, student, batch, step, state.kat_ema)
                    batch.shaping, state.kat_ema = shaped
                if config.diagnostics_due(step):  # on the policy that sampled the batch, before the update
                    with timed(batch.metrics, "diagnostics"):
                        batch.metrics.update(monitor.diagnose(config, student, tokenizer, batch))
                metrics = train_step(config, model, optimizer, batch, world)  # objective → update
                if engine is not None and (step + 1) % config.rollout.sync_every == 0:
                    with timed(metrics, "sync"):
                        engine.push(student, step + 1)
                if ema_model is not None:
                    ema_update(ema_model, student, config.opsd.ema_decay)

                step_s = distributed.all_sum(time.perf_counter() - started, world) / world.size
                record = _account(state, batch.metrics, metrics, lr, step_s, world, flops)
                log.write("metrics", record)
                board.log("train", record)
                if state.bad_steps >= train.max_bad_steps:
                    raise UserError(
                        f"the loss or gradient was not finite for {state.bad_steps} steps in a row (steps "
                        f"{step + 2 - state.bad_steps}-{step + 1}, skipped); lower optim.lr or check the "
                        "teacher and data."
                    )

                evaluated = periodic_eval and _eval_due(config, state, step_s)
                if evaluated:
                    last_eval = _evaluate_and_log(config, student, tokenizer, task, run_dir, state, world)
                    board.log("eval", last_eval)
                accuracy = last_eval.get("greedy_acc") if evaluated else None  # for no_progress
                for message in monitor.alarms(record, state.alarms, evaluated, accuracy):  # each once, kept
                    bar.note(f"alarm at step {step + 1}: {message}")
                    log.write("alarms", {"step": step + 1, "alarm": message})
                bar.update(state.step, _spent(train, record), _bar_fields(record, last_eval))
                session_steps += 1
                final = state.step >= train.steps or _budget_spent(train, state, flops)
                if train.save_every and state.step % train.save_every == 0 and not final:
                    save()
                stop = distributed.all_sum(float(bool(stop_requested)), world) > 0  # any rank interrupted
                if not final and (stop or (stop_after is not None and session_steps >= stop_after)):
                    save()
                    return {"stopped_at": state.step, "out": str(run_dir), "complete": False}
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if task.test and last_eval.get("step") != state.step:
        last_eval = _evaluate_and_log(config, student, tokenizer, task, run_dir, state, world)
    model_state = save()
    if world.is_main:
        state_dict = model_state and dict(model_state)
        publish(run_dir / "final", lambda path: save_model(student, tokenizer, path, state_dict))
    world.barrier()
    return {
        "out": str(run_dir),
        "complete": True,
        "steps": state.step,
        "final_eval": last_eval,
        **state.to_dict(),
    }


def _rollout_engine(config: Config, student, step: int, world: World) -> VllmEngine | None:
    """With ``rollout.engine=vllm``, a vLLM engine started from ``student.path`` and given the student's
    current weights (a resumed run's are its checkpoint's); else None (the built-in sampler)."""
    if config.rollout.engine != "vllm":
        return None
    data, rollout = config.data, config.rollout
    max_len = data.max_prompt_tokens + rollout.max_new_tokens if data.max_prompt_tokens else None
    dtype = "bfloat16" if config.train.precision == "bf16" else "float32"
    engine = VllmEngine(
        config.student.path, max_len, dtype, config.train.seed, rollout.engine_memory, world.size
    )
    engine.push(student, step)
    return engine


def _open_run_directory(
    config: Config, run_dir: Path, world: World, resume: bool
) -> tuple[Path | None, dict]:
    """The checkpoint to resume from and what it saved (logs cut back to its step), or none for a new run or
    one resumed before its first checkpoint; a new run refuses a directory that already holds one. Writes the
    resolved config."""
    checkpoint, saved = None, {}
    started = (run_dir / "config.yaml").is_file()
    if resume and started and not (run_dir / "checkpoints" / "latest").is_file():
        if world.is_main:  # stopped before its first checkpoint: nothing to keep, so it starts again
            print(f"no checkpoint yet in {run_dir}: starting again from step 0.", file=sys.stderr)
            for name in LOGS:
                truncate_jsonl(run_dir / name, -1)  # the step-0 evaluation included
    elif resume:
        checkpoint = latest_checkpoint(run_dir)
        saved = load_state(checkpoint)
        for name in LOGS if world.is_main else ():
            truncate_jsonl(run_dir / name, saved["step"])
    elif (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume or choose another train.out_dir."
        )
    world.barrier()  # every rank has looked before rank 0 writes
    if world.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
        except OSError as err:
            raise UserError(f"cannot write the run directory {run_dir} ({err.strerror or err}).") from None
    return checkpoint, saved


def _account(
    state: RunState,
    batch_metrics: dict,
    metrics: dict,
    lr: float,
    step_s: float,
    world: World,
    flops: FlopCounter,
) -> dict[str, Any]:
    """Advance ``state`` past the step just taken and return its metrics record (token counters summed over
    ranks, the rest averaged; the run's FLOPs so far, from the counters)."""
    batch_metrics = distributed.reduce_metrics(batch_metrics, world, COUNTERS)
    finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    state.bad_steps = 0 if finite else state.bad_steps + 1  # a bad step was skipped
    state.step += 1
    state.elapsed_s += step_s
    for key in COUNTERS:
        setattr(state, key, getattr(state, key) + batch_metrics.pop(key, 0) + metrics.pop(key, 0))
    record = {"step": state.step, "lr": lr, **batch_metrics, **metrics, "step_s": step_s}
    record["tokens_per_s"] = record["loss_tokens"] / step_s
    record.update({"elapsed_s": state.elapsed_s, **state.counters(), **flops(state.counters())})
    return record


def _budget_spent(train: TrainConfig, state: RunState, flops: FlopCounter) -> bool:
    out_of_time = train.time_budget_s > 0 and state.elapsed_s >= train.time_budget_s
    return out_of_time or (train.budget_flops > 0 and flops.total(state.counters()) >= train.budget_flops)


def _budget(train: TrainConfig) -> tuple[float, str]:
    """What the progress bar measures: FLOPs or seconds of a budget, or (0, "") for steps."""
    if train.budget_flops:
        return train.budget_flops, "FLOPs"
    return (train.time_budget_s, "s") if train.time_budget_s else (0.0, "")


def _spent(train: TrainConfig, record: dict) -> float:
    return record["flops"] if train.budget_flops else record["elapsed_s"]


def _eval_due(config: Config, state: RunState, step_s: float) -> bool:
    train = config.train
    if train.eval_every and state.step % train.eval_every == 0:
        return True
    # time-based cadence: the step that crosses a multiple of eval_every_s
    return bool(train.eval_every_s) and (state.elapsed_s // train.eval_every_s) > (
        (state.elapsed_s - step_s) // train.eval_every_s
    )


def _logged_eval(run_dir: Path, step: int) -> dict:
    """The evaluation logged at ``step``, if any: a run resumed from its last checkpoint has its final one."""
    path = run_dir / "eval.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    return next((row for row in rows if row["step"] == step), {})


def _evaluate_and_log(
    config: Config, student, tokenizer, task: Task, run_dir: Path, state: RunState, world: World
) -> dict:
    """Every rank evaluates its share of the problems (evaluate.py gathers the results); rank 0 logs, with
    the evaluation's seconds as ``eval_s``."""
    started = time.perf_counter()
    result = evaluate(
        student,
        tokenizer,
        task.test[: config.train.eval_size],
        task.verify,
        max_new_tokens=config.rollout.max_new_tokens,
        n=config.train.eval_samples,
        temperature=config.rollout.temperature,
        seed=config.train.seed,
        batch_tokens=config.train.eval_batch_tokens,
        chunk_tokens=config.train.chunk_tokens,
        world=world,
        episodes=batches.episode_spec(config.env),
    )
    record = {"step": state.step, "elapsed_s": state.elapsed_s, **result}
    record["eval_s"] = time.perf_counter() - started
    if world.is_main:
        with (run_dir / "eval.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def _checkpoint(
    config: Config, run_dir: Path, model, tokenizer, optimizer, saved: dict, world: World
) -> dict | None:
    """Full model and optimizer state (gathered from the shards under FSDP2) into ``checkpoints/step_N`` by
    rank 0; returns the model's full state dict under FSDP2 (``save_pretrained`` consumes what it is
    given)."""
    model_state, optimizer_state = distributed.full_state(model, optimizer)
    if world.is_main:
        save_checkpoint(
            run_dir,
            saved["step"],
            distributed.unwrap(model),
            tokenizer,
            {**saved, "optimizer": optimizer_state},
            config.train.keep_checkpoints,
            model_state and dict(model_state),
        )
    world.barrier()
    return model_state


def _bar_fields(record: dict, last_eval: dict) -> dict[str, float]:
    """The progress line: loss, teacher KL, last accuracy, tokens/s, and the seconds of the step's phases
    that took at least a tenth of it (sampling, teacher, backward, ...)."""
    fields = {"loss": record["loss"]}
    if "teacher_kl" in record:
        fields["teacher_kl"] = record["teacher_kl"]
    if "greedy_acc" in last_eval:
        fields["acc"] = last_eval["greedy_acc"]
    fields["tok/s"] = record["tokens_per_s"]
    fields["s/step"] = record["step_s"]
    for phase in PHASES:
        seconds = record.get(f"time_{phase}_s", 0.0)
        if seconds >= 0.1 * record["step_s"]:
            fields[phase] = seconds
    return fields
