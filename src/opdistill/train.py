"""The training loop, shared by SFT and on-policy distillation.

One step: take prompts → get completions (student samples them for OPD; dataset or teacher for SFT)
→ the teacher scores the student's tokens → loss over micro-batches with one global token normaliser
→ clip, AdamW, schedule → log, evaluate, checkpoint. A variant is a config switch, not a subclass.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opdistill import losses, monitor, shaping, sources
from opdistill.checkpoint import latest_checkpoint, load_state, save_checkpoint, truncate_jsonl
from opdistill.config import Config, ModelSpec, save_config
from opdistill.errors import UserError
from opdistill.evaluate import evaluate
from opdistill.models import check_same_tokenizer, completion_logits, load_model, save_model
from opdistill.objectives import objective_loss
from opdistill.progress import NullProgress, ProgressBar
from opdistill.tasks import Task, corpus_text, task_from_config
from opdistill.teachers import LocalTeacher

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
COUNTERS = (
    "student_train_tokens",
    "student_sampled_tokens",
    "teacher_scored_tokens",
    "teacher_generated_tokens",
)


def learning_rate(config: Config, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine (or constant) over the run. With a time budget, progress is whichever
    of steps and training seconds is further along, so the decay ends when the budget does."""
    opt, train = config.optim, config.train
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    progress = (step - opt.warmup_steps) / max(1, train.steps - opt.warmup_steps)
    if train.time_budget_s > 0:
        progress = max(progress, elapsed_s / train.time_budget_s)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * cosine)


def run(
    config: Config, *, resume: bool = False, stop_after: int | None = None, show_progress: bool = True
) -> dict:
    """Train per ``config``; returns a summary. ``stop_after`` ends this session after that many steps
    (checkpointed, resumable) — the same as an interruption, used to test resume."""
    out = Path(config.train.out_dir)
    distill = config.objective.type != "sft"
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    task = task_from_config(config.data, config.train.seed)
    state = {"step": 0, "elapsed_s": 0.0, "bad_steps": 0, **dict.fromkeys(COUNTERS, 0)}
    student_spec = config.student
    if resume:
        checkpoint = latest_checkpoint(out)
        state = load_state(checkpoint)
        student_spec = ModelSpec(path=str(checkpoint), dtype=config.student.dtype)
        for log in ("metrics.jsonl", "eval.jsonl", "alarms.jsonl"):
            truncate_jsonl(out / log, state["step"])
    elif (out / "metrics.jsonl").exists():
        raise UserError(
            f"run directory {out} already holds a run; pass --resume or choose another train.out_dir."
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")

    # a fresh model gets a character tokenizer over the task's text (read only when one is built)
    corpus = () if student_spec.path else corpus_text(task)
    student, tokenizer = load_model(student_spec, corpus, config.train.seed)
    student.train()
    teacher = None
    if distill or config.data.completions != "dataset":
        if not config.teacher.path:
            raise UserError("this run needs a trained teacher: set teacher.path to its model directory.")
        teacher_model, teacher_tokenizer = load_model(config.teacher)
        check_same_tokenizer(tokenizer, teacher_tokenizer)
        teacher = LocalTeacher(teacher_model)
        widest, vocab = max(config.teacher_request.topk, config.objective.student_topk), len(tokenizer)
        if widest > vocab:
            raise UserError(
                f"a top-K of {widest} ids is more than the vocabulary ({vocab} ids): "
                "lower objective.topk / objective.baseline_topk."
            )
    reference = None
    if config.objective.ref_kl_coef:  # StableOPD's reference: the student as the run started, frozen
        reference_model, _ = load_model(
            config.student, () if config.student.path else corpus_text(task), config.train.seed
        )
        reference = LocalTeacher(reference_model)
    make_batch = sources.batch_source(config, task, tokenizer, student, teacher, out, state, reference)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=config.optim.lr,
        betas=config.optim.betas,
        weight_decay=config.optim.weight_decay,
    )
    if resume:
        optimizer.load_state_dict(state.pop("optimizer"))

    # Ctrl-C or a scheduler's SIGTERM ends the run after the current step, with a checkpoint to resume from
    stop_requested = []
    previous_handlers = {
        sig: signal.signal(sig, lambda *_: stop_requested.append(True)) for sig in STOP_SIGNALS
    }
    last_eval: dict[str, float] = {}
    session_steps = 0
    title = f"{'distill' if distill else 'sft'} {out.name}"
    bar = (
        ProgressBar(title, config.train.steps, state["step"], config.train.time_budget_s)
        if show_progress
        else NullProgress()
    )
    periodic_eval = bool(task.test) and (config.train.eval_every or config.train.eval_every_s)
    if periodic_eval and state["step"] == 0:  # where the curves start: the model before training
        last_eval = _evaluate_and_log(config, student, tokenizer, task, out, state)
    try:
        with (
            bar,
            Board(out, config.train.tensorboard) as board,
            (out / "metrics.jsonl").open("a") as metrics_file,
        ):
            if last_eval:  # the step-0 evaluation, made before the loop
                board.log("eval", last_eval)
            while state["step"] < config.train.steps and not _out_of_time(config, state):
                started = time.perf_counter()
                step = state["step"]
                # sampling depends on (seed, step) only, which is what makes resume exact
                torch.manual_seed(config.train.seed * 1_000_003 + step)
                lr = learning_rate(config, step, state["elapsed_s"])
                for group in optimizer.param_groups:
                    group["lr"] = lr

                batch = make_batch(step)
                if distill:
                    batch.shaping = shaping.shape(config, student, batch, step, state)
                if config.diagnostics_due(step):  # on the policy that sampled the batch, before the update
                    batch.metrics.update(monitor.diagnose(config, student, tokenizer, batch))
                metrics = train_step(config, student, optimizer, batch)
                batch_metrics = batch.metrics
                finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
                state["bad_steps"] = 0 if finite else state["bad_steps"] + 1  # a bad step was skipped

                step_s = time.perf_counter() - started
                state["step"] = step + 1
                state["elapsed_s"] += step_s
                for key in COUNTERS:
                    state[key] += batch_metrics.pop(key, 0) + metrics.pop(key, 0)
                record = {"step": step + 1, "lr": lr, **batch_metrics, **metrics, "step_s": step_s}
                record["tokens_per_s"] = record["loss_tokens"] / step_s
                record.update({k: state[k] for k in ("elapsed_s", *COUNTERS)})
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                board.log("train", record)
                if state["bad_steps"] >= config.train.max_bad_steps:
                    raise UserError(
                        f"the loss or gradient was not finite for {state['bad_steps']} steps in a row (steps "
                        f"{step + 2 - state['bad_steps']}-{step + 1}, skipped); lower optim.lr or check the teacher and data."
                    )

                evaluated = bool(periodic_eval) and _eval_due(config, state, step_s)
                if evaluated:
                    last_eval = _evaluate_and_log(config, student, tokenizer, task, out, state)
                    board.log("eval", last_eval)
                for message in monitor.alarms(record, state, evaluated):  # each printed once, kept in the run
                    bar.note(f"alarm at step {step + 1}: {message}")
                    with (out / "alarms.jsonl").open("a") as handle:
                        handle.write(json.dumps({"step": step + 1, "alarm": message}) + "\n")
                bar.update(state["step"], state["elapsed_s"], _bar_fields(record, last_eval))
                session_steps += 1
                final = state["step"] >= config.train.steps or _out_of_time(config, state)
                if config.train.save_every and state["step"] % config.train.save_every == 0 and not final:
                    _checkpoint(config, out, student, tokenizer, optimizer, state)
                if not final and (stop_requested or (stop_after is not None and session_steps >= stop_after)):
                    _checkpoint(config, out, student, tokenizer, optimizer, state)
                    return {"stopped_at": state["step"], "out": str(out), "complete": False}
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if task.test and last_eval.get("step") != state["step"]:
        last_eval = _evaluate_and_log(config, student, tokenizer, task, out, state)
    _checkpoint(config, out, student, tokenizer, optimizer, state)
    save_model(student, tokenizer, out / "final")
    return {"out": str(out), "complete": True, "steps": state["step"], "final_eval": last_eval, **state}


def train_step(config: Config, student, optimizer, batch: sources.StepBatch) -> dict:
    """Backward over micro-batches, each loss normalised by the whole step's counts (so micro-batching does not
    change the update), plus the optional SFT-stabiliser term; then clip and AdamW. A non-finite loss or
    gradient skips the update; the returned metrics say so."""
    objective, rollout = config.objective, batch.rollout
    optimizer.zero_grad(set_to_none=True)
    loss_mask_BT = rollout.loss_mask_BT if batch.shaping is None else batch.shaping.mask_BT
    tokens, rows = float(loss_mask_BT.sum()), rollout.tokens_BT.shape[0]
    normalizer = losses.Normalizer(objective.aggregation, tokens, float(rows), objective.aggregation_constant)
    totals = _backward(
        config, loss_mask_BT, normalizer, lambda part: objective_loss(config, student, batch.select(part))
    )
    trained_tokens = int(rollout.attention_mask.sum())
    if batch.sft_rollout is not None:  # the SFT-stabiliser (ALGORITHMS §5.5): token-mean CE on its own batch
        sft = batch.sft_rollout
        sft_normalizer = losses.Normalizer(
            "token-mean", float(sft.loss_mask_BT.sum()), float(len(sft.tokens_BT))
        )

        def sft_loss(part: slice):
            mb = sft.select(part)
            nll_BT = -losses.token_logprobs(completion_logits(student, mb), mb.tokens_BT)
            return objective.sft_coef * nll_BT, {"sft_nll": losses.masked_mean(nll_BT, mb.loss_mask_BT)}

        sft_totals = _backward(config, sft.loss_mask_BT, sft_normalizer, sft_loss)
        totals["loss"] += sft_totals.pop("loss")
        totals.update(sft_totals)
        trained_tokens += int(sft.attention_mask.sum())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    grad_norm = float(total_norm)
    if math.isfinite(totals["loss"]) and math.isfinite(grad_norm):
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(student.parameters(), config.optim.grad_clip, total_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        **totals,
        "grad_norm": grad_norm,
        "loss_tokens": int(tokens),
        "student_train_tokens": trained_tokens,
    }


PerTokenLoss = Callable[[slice], tuple[torch.Tensor, dict[str, float]]]


def _backward(
    config: Config, loss_mask_BT: torch.Tensor, normalizer: losses.Normalizer, per_token_loss: PerTokenLoss
) -> dict[str, float]:
    """Accumulate gradients of ``normalizer(per_token_loss(rows))`` over micro-batches of rows; returns the summed
    loss and token-weighted metrics (min/max for ``*_min``/``*_max``)."""
    rows = loss_mask_BT.shape[0]
    micro = config.train.micro_batch_size or rows
    tokens = max(float(loss_mask_BT.sum()), 1.0)
    totals: dict[str, float] = {"loss": 0.0}
    for start in range(0, rows, micro):
        part = slice(start, start + micro)
        per_token_BT, metrics = per_token_loss(part)
        loss = normalizer(per_token_BT, loss_mask_BT[part])
        loss.backward()
        totals["loss"] += float(loss.detach())
        share = float(loss_mask_BT[part].sum()) / tokens
        for key, value in metrics.items():
            if key.endswith(("_min", "_max")):
                pick = min if key.endswith("_min") else max
                totals[key] = pick(totals[key], value) if key in totals else value
            else:
                totals[key] = totals.get(key, 0.0) + share * value
    return totals


class Board:
    """TensorBoard scalars beside the JSONL logs when ``train.tensorboard`` is on: every number of a step's
    record under ``train/``, of an evaluation under ``eval/``, at the step; lists (per-position buckets)
    stay in metrics.jsonl only."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def log(self, prefix: str, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])


def _out_of_time(config: Config, state: dict) -> bool:
    return config.train.time_budget_s > 0 and state["elapsed_s"] >= config.train.time_budget_s


def _eval_due(config: Config, state: dict, step_s: float) -> bool:
    train = config.train
    if train.eval_every and state["step"] % train.eval_every == 0:
        return True
    # time-based cadence: the step that crosses a multiple of eval_every_s
    return bool(train.eval_every_s) and (state["elapsed_s"] // train.eval_every_s) > (
        (state["elapsed_s"] - step_s) // train.eval_every_s
    )


def _evaluate_and_log(config: Config, student, tokenizer, task: Task, out: Path, state: dict) -> dict:
    result = evaluate(
        student,
        tokenizer,
        task.test[: config.train.eval_size],
        task.verify,
        max_new_tokens=config.rollout.max_new_tokens,
        n=config.train.eval_samples,
        temperature=config.rollout.temperature,
        seed=config.train.seed,
    )
    record = {"step": state["step"], "elapsed_s": state["elapsed_s"], **result}
    with (out / "eval.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def _checkpoint(config: Config, out: Path, student, tokenizer, optimizer, state: dict) -> None:
    save_checkpoint(
        out,
        state["step"],
        student,
        tokenizer,
        {**state, "optimizer": optimizer.state_dict()},
        config.train.keep_checkpoints,
    )


def _bar_fields(record: dict, last_eval: dict) -> dict[str, float]:
    fields = {"loss": record["loss"]}
    if "teacher_kl" in record:
        fields["teacher_kl"] = record["teacher_kl"]
    if "greedy_acc" in last_eval:
        fields["acc"] = last_eval["greedy_acc"]
    fields["tok/s"] = record["tokens_per_s"]
    return fields
