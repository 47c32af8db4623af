"""Where a step's completions come from: the student's own samples (OPD), the dataset, fresh teacher
samples, or a cached pool of teacher samples — or, for GKD's data mixing, a per-step coin between the
student's samples and one of the others. Each source is ``step -> (rollout, teacher signal or None,
metrics)``; what a step sees depends only on (seed, step), which keeps resume exact."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from opdistill import diagnostics, weighting
from opdistill.config import Config
from opdistill.data import (
    Example,
    ExampleStream,
    encode_completion,
    encode_prompts,
    read_jsonl,
    rollout_of,
    write_jsonl,
)
from opdistill.distributed import ONE_PROCESS, World
from opdistill.errors import UserError
from opdistill.evaluate import decode_completions, sample_completions
from opdistill.models import completion_logits
from opdistill.rollout import sample_prompts
from opdistill.tasks import Task
from opdistill.types import Rollout, Shaping, SignalRequest, TeacherSignal


@dataclass
class StepBatch:
    rollout: Rollout  # what the objective trains on
    signal: TeacherSignal | None  # the teacher's scores of it (None for SFT)
    metrics: dict[str, float]  # lengths, token counters, the GKD coin
    sft_rollout: Rollout | None = None  # off-policy completions for the SFT-stabiliser (objective.sft_coef)
    reward_B: torch.Tensor | None = (
        None  # verifier outcome (1.0 = correct) per sample, when the objective uses it
    )
    reference_logp_BT: torch.Tensor | None = (
        None  # the initial student's log-prob of each token (ref-KL term)
    )
    shaping: Shaping | None = None  # per-token weights and masks (shaping.py), set by the loop

    def select(self, rows: slice) -> StepBatch:
        """The micro-batch of ``rows`` (the SFT-stabiliser's batch is separate and stays whole)."""
        return StepBatch(
            self.rollout.select(rows),
            None if self.signal is None else self.signal.select(rows),
            self.metrics,
            self.sft_rollout,
            None if self.reward_B is None else self.reward_B[rows],
            None if self.reference_logp_BT is None else self.reference_logp_BT[rows],
            None if self.shaping is None else self.shaping.select(rows),
        )


def batch_source(
    config: Config,
    task: Task,
    tokenizer,
    student,
    teacher,
    out: Path,
    state: dict,
    world: World = ONE_PROCESS,
    reference=None,
) -> Callable:
    """step -> StepBatch: where this run's completions come from; under torchrun, this rank's share of the
    step's prompts. ``reference`` (a frozen copy of the initial student, as a teacher) scores the tokens for the
    reference-KL term."""
    roll, data = config.rollout, config.data
    pad, device = tokenizer.pad_token_id, next(student.parameters()).device
    first, count = world.share(config.train.prompts_per_step)

    def shard(stream, step: int) -> list[Example]:
        return stream.batch(step, config.train.prompts_per_step)[first : first + count]

    def sampled(model, examples: list[Example], temperature: float, repeats: int) -> Rollout:
        prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(repeats)]
        return sample_prompts(
            model, tokenizer, prompts, max_new_tokens=roll.max_new_tokens, temperature=temperature,
            top_p=roll.top_p, rows=(first * repeats, config.train.prompts_per_step * repeats),
            all_finished=world.all_finished if config.train.parallel == "fsdp" else bool,
        )  # fmt: skip

    prompts = (
        curriculum(config, task, tokenizer, student, out, state, world) if data.curriculum else task.train
    )

    def on_policy(examples: list[Example]) -> tuple[Rollout, dict[str, float]]:
        rollout = sampled(student, examples, roll.temperature, roll.n_per_prompt)
        return rollout, {
            "response_length": float(rollout.loss_mask_BT.sum(1).float().mean()),
            "truncation_rate": diagnostics.truncation_rate(rollout.truncated_B),
            "student_sampled_tokens": int(rollout.loss_mask_BT.sum()),
        }

    def from_text(examples: list[Example]) -> Rollout:
        missing = [ex.id or ex.prompt for ex in examples if not ex.completion]
        if missing:
            raise UserError(f"training on dataset completions needs a 'completion'; {missing[0]!r} has none.")
        completions = [encode_completion(tokenizer, ex.completion) for ex in examples]
        return rollout_of(encode_prompts(tokenizer, examples), completions, pad).to(device)

    def fresh_teacher(step: int) -> tuple[Rollout, dict[str, float]]:
        rollout = sampled(teacher.model, shard(task.train, step), data.teacher_temperature, 1)
        return rollout, {"teacher_generated_tokens": int(rollout.attention_mask.sum())}

    # completions that are not the student's own: SFT targets, and GKD's off-policy batches (λ < 1)
    stream = task.train
    uses_off_policy = (
        config.objective.type == "sft" or roll.on_policy_fraction < 1 or config.objective.sft_coef > 0
    )
    if data.completions == "teacher_pool" and uses_off_policy:
        stream = teacher_pool(config, task, tokenizer, teacher, out, state, world)

    def off_policy(step: int) -> tuple[Rollout, dict[str, float]]:
        if data.completions == "teacher":
            return fresh_teacher(step)
        return from_text(shard(stream, step)), {}

    if config.objective.type == "sft":

        def sft(step: int) -> StepBatch:
            rollout, metrics = off_policy(step)
            return StepBatch(rollout, None, metrics)

        return sft

    def verify(rollout: Rollout, examples: list[Example]) -> torch.Tensor:
        """1.0 where the task's verifier accepts a sample (G consecutive samples per example), else 0.0."""
        unanswered = [ex.id or ex.prompt for ex in examples if not ex.answer]
        if unanswered and not data.verifier:
            raise UserError(
                f"verifier rewards need an 'answer' for every prompt; {unanswered[0]!r} has none."
            )
        keep_BT = rollout.loss_mask_BT & (rollout.tokens_BT != tokenizer.eos_token_id)
        texts = decode_completions(tokenizer, rollout.tokens_BT, keep_BT)
        rows = [ex for ex in examples for _ in range(roll.n_per_prompt)]
        outcome = [float(task.verify(t, ex)) for t, ex in zip(texts, rows, strict=True)]
        return torch.tensor(outcome, device=device)

    def distill(step: int) -> StepBatch:
        # GKD data mixing: one coin per step, a function of (seed, step) so resume replays it
        coin = random.Random(f"gkd-{config.train.seed}-{step}").random()
        on = roll.on_policy_fraction >= 1 or coin < roll.on_policy_fraction
        reward_B = None
        if on:
            examples = shard(prompts, step)
            rollout, metrics = on_policy(examples)
            if config.objective.needs_reward:
                reward_B = verify(rollout, examples)
                metrics["reward"] = float(reward_B.mean())
        else:
            rollout, metrics = off_policy(step)
        metrics["on_policy"] = float(on)
        metrics["teacher_scored_tokens"] = int(rollout.attention_mask.sum())
        request = config.diagnostics_request if config.diagnostics_due(step) else None
        batch = StepBatch(
            rollout, score(config, student, teacher, rollout, request), metrics, reward_B=reward_B
        )
        if reference is not None:
            batch.reference_logp_BT = reference.score(rollout, SignalRequest()).token_logp_BT
        if config.objective.sft_coef > 0:  # the same prompts, with dataset or teacher completions
            # an off-policy step already holds them: reuse rather than generate a second time
            batch.sft_rollout, sft_metrics = off_policy(step) if on else (rollout, {})
            for key, value in sft_metrics.items():
                metrics[key] = metrics.get(key, 0) + value
        return batch

    return distill


def score(
    config: Config, student, teacher, rollout: Rollout, request: SignalRequest | None = None
) -> TeacherSignal:
    """The teacher's signal for ``rollout`` (``request``, by default the objective's); for L1s it scores the
    student's own top-K ids at each visited state (one student forward without gradient)."""
    k, ids_BTK = config.objective.student_topk, None
    if k:
        with torch.no_grad():
            ids_BTK = completion_logits(student, rollout).topk(k, dim=-1).indices
    return teacher.score(rollout, request or config.teacher_request, ids_BTK)


class CurriculumStream:
    """SEAD's competence-gated curriculum (ALGORITHMS.md §7.7, [D] form): step t draws, with replacement and
    as a function of (seed, t), only pool prompts whose difficulty d = 1 - the initial student's pass rate is
    at most c(t); when none is, the easiest ones."""

    def __init__(self, examples: list[Example], difficulty: list[float], config: Config):
        self.examples, self.difficulty, self.config = examples, difficulty, config

    def batch(self, step: int, size: int) -> list[Example]:
        data, train = self.config.data, self.config.train
        limit = max(weighting.sead_competence(step, train.steps, data.curriculum_start), min(self.difficulty))
        eligible = [ex for ex, d in zip(self.examples, self.difficulty, strict=True) if d <= limit]
        rng = random.Random(f"curriculum-{train.seed}-{step}")
        return [eligible[rng.randrange(len(eligible))] for _ in range(size)]


def curriculum(
    config: Config, task: Task, tokenizer, student, out: Path, state: dict, world: World
) -> CurriculumStream:
    """The difficulty of the first ``data.pool_size`` training prompts for the student as the run starts,
    from ``data.curriculum_samples`` samples each (their time counts against the run); kept in the run
    directory (every rank computes it, rank 0 writes it), so a resumed run keeps the initial student's
    difficulties."""
    path = out / "curriculum.jsonl"
    cached = path.is_file()
    world.barrier()  # every rank has looked before rank 0 writes
    if cached:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return CurriculumStream(
            [Example(**r["example"]) for r in rows], [r["difficulty"] for r in rows], config
        )
    started = time.perf_counter()
    examples, n = [task.train[i] for i in range(config.data.pool_size)], config.data.curriculum_samples
    texts = sample_completions(
        student, tokenizer, examples, max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature, n=n, seed=config.train.seed,
    )  # fmt: skip
    difficulty = [
        1 - sum(task.verify(texts[i * n + j], ex) for j in range(n)) / n for i, ex in enumerate(examples)
    ]
    if world.is_main:
        path.write_text(
            "".join(json.dumps({"example": dataclasses.asdict(ex), "difficulty": d}) + "\n"
                    for ex, d in zip(examples, difficulty, strict=True))
        )  # fmt: skip
    state["elapsed_s"] += time.perf_counter() - started
    state["student_sampled_tokens"] += sum(len(encode_completion(tokenizer, t)) for t in texts)
    return CurriculumStream(examples, difficulty, config)


def teacher_pool(
    config: Config, task: Task, tokenizer, teacher, out: Path, state: dict, world: World
) -> ExampleStream:
    """Teacher completions for the first ``pool_size`` training prompts, made once (their time and tokens
    count against the run) and reused every epoch; kept in the run directory (every rank makes it, rank 0
    writes it) so resume reuses them."""
    path = out / "teacher_pool.jsonl"
    cached = path.is_file()
    world.barrier()  # every rank has looked before rank 0 writes
    if cached:
        return ExampleStream(read_jsonl(path), config.train.seed)
    started = time.perf_counter()
    examples = [task.train[i] for i in range(config.data.pool_size)]
    texts = sample_completions(
        teacher.model, tokenizer, examples, max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.data.teacher_temperature, seed=config.train.seed,
    )  # fmt: skip
    pool = [
        Example(prompt=ex.prompt, answer=ex.answer, completion=text)
        for ex, text in zip(examples, texts, strict=True)
    ]
    if world.is_main:
        write_jsonl(pool, path)
    state["elapsed_s"] += time.perf_counter() - started
    prompt_tokens = sum(len(ids) for ids in encode_prompts(tokenizer, pool))
    state["teacher_generated_tokens"] += prompt_tokens + sum(
        len(encode_completion(tokenizer, t)) for t in texts
    )
    return ExampleStream(pool, config.train.seed)
