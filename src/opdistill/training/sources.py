"""Where a step's completions come from: the student's own samples (OPD), the dataset, fresh teacher
samples, or a cached pool of teacher samples — or, for GKD's data mixing, a per-step coin between the
student's samples and one of the others. Each source is ``step -> (rollout, teacher signal or None,
metrics)``; what a step sees depends only on (seed, step), which keeps resume exact."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from opdistill.config import Config
from opdistill.data.examples import (
    Example,
    ExampleStream,
    encode_completion,
    encode_prompts,
    left_pad,
    privileged_view,
    read_jsonl,
    rollout_of,
    write_jsonl,
)
from opdistill.data.selection import selected_prompts
from opdistill.data.tasks import Task
from opdistill.errors import UserError
from opdistill.models import completion_logits
from opdistill.objectives import weighting
from opdistill.observe import diagnostics
from opdistill.observe.evaluate import decode_completions, sample_completions
from opdistill.sampling.refine import refine
from opdistill.sampling.rollout import sample_prompts
from opdistill.sampling.speculative import SpeculativeGuide
from opdistill.teachers.base import Teacher
from opdistill.training.distributed import ONE_PROCESS, World
from opdistill.types import Rollout, SignalRequest, StepBatch, TeacherSignal


def batch_source(
    config: Config,
    task: Task,
    tokenizer,
    student,
    teachers: Mapping[str, Teacher],
    out: Path,
    state: dict,
    world: World = ONE_PROCESS,
    reference=None,
) -> Callable:
    """step -> StepBatch: where this run's completions come from; under torchrun, this rank's share of the
    step's prompts. ``teachers`` maps an example's ``teacher`` tag to the teacher that scores it ("" is the
    default one; OPSD's self-teacher under ``opsd.teacher``). ``reference`` (a frozen copy of the initial
    student, as a teacher) scores the tokens for the reference-KL term."""
    roll, data = config.rollout, config.data
    teacher: Any = teachers.get("")  # a LocalTeacher wherever it must sample (the config checks)
    scorer = Scorer(config, tokenizer, student, teachers)
    pad, device = tokenizer.pad_token_id, next(student.parameters()).device
    first, count = world.share(config.train.prompts_per_step)

    def shard(stream, step: int) -> list[Example]:
        return stream.batch(step, config.train.prompts_per_step)[first : first + count]

    def sampled(model, examples: list[Example], temperature: float, repeats: int, guide=None) -> Rollout:
        prompts = [p for p in encode_prompts(tokenizer, examples) for _ in range(repeats)]
        return sample_prompts(
            model, tokenizer, prompts, max_new_tokens=roll.max_new_tokens, temperature=temperature,
            top_p=roll.top_p, rows=(first * repeats, config.train.prompts_per_step * repeats),
            all_finished=world.all_finished if config.train.parallel == "fsdp" else bool, guide=guide,
        )  # fmt: skip

    prompts = task.train
    if data.curriculum:
        prompts = curriculum(config, task, tokenizer, student, out, state, world)
    elif data.select_fraction:
        prompts = selected_prompts(config, task, tokenizer, student, teacher, out, world, state=state)

    def on_policy(examples: list[Example], step: int) -> tuple[Rollout, dict[str, float]]:
        guide = None
        if (
            roll.skd_topk >= 0
        ):  # SKD: the teacher verifies each token, with its own (seed, step) random stream
            seed = random.Random(f"skd-{config.train.seed}-{step}").getrandbits(63)
            guide = SpeculativeGuide(teacher.model, roll.skd_topk, roll.temperature, roll.top_p,
                                     torch.Generator().manual_seed(seed))  # fmt: skip
        rollout = sampled(student, examples, roll.temperature, roll.n_per_prompt, guide)
        metrics = {
            "response_length": float(rollout.loss_mask_BT.sum(1).float().mean()),
            "truncation_rate": diagnostics.truncation_rate(rollout.truncated_B),
            "student_sampled_tokens": int(rollout.loss_mask_BT.sum()),
        }
        if guide is not None:
            metrics.update(guide.stats())
        return rollout, metrics

    def from_text(examples: list[Example]) -> Rollout:
        missing = [ex.id or ex.prompt for ex in examples if not ex.completion]
        if missing:
            raise UserError(f"training on dataset completions needs a 'completion'; {missing[0]!r} has none.")
        completions = [encode_completion(tokenizer, ex.completion) for ex in examples]
        return rollout_of(encode_prompts(tokenizer, examples), completions, pad).to(device)

    def fresh_teacher(examples: list[Example]) -> tuple[Rollout, dict[str, float]]:
        rollout = sampled(teacher.model, examples, data.teacher_temperature, 1)
        return rollout, {"teacher_generated_tokens": int(rollout.attention_mask.sum())}

    # completions that are not the student's own: SFT targets, and GKD's off-policy batches (λ < 1)
    stream = task.train
    uses_off_policy = (
        config.objective.type == "sft" or roll.on_policy_fraction < 1 or config.objective.sft_coef > 0
    )
    if data.completions == "teacher_pool" and uses_off_policy:
        stream = teacher_pool(config, task, tokenizer, teacher, out, state, world)

    def off_policy(step: int) -> tuple[Rollout, dict[str, float], list[Example]]:
        """Completions that are not the student's, one per prompt, and the prompts' examples."""
        if data.completions == "teacher":
            examples = shard(task.train, step)
            return *fresh_teacher(examples), examples
        examples = shard(stream, step)
        return from_text(examples), {}, examples

    if config.objective.type == "sft":

        def sft(step: int) -> StepBatch:
            rollout, metrics, _ = off_policy(step)
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
            rollout, metrics = on_policy(examples, step)
            rows = [ex for ex in examples for _ in range(roll.n_per_prompt)]
            if config.trd.mode != "off":  # TRD: distil along the teacher's refinement of each rollout
                generator = torch.Generator().manual_seed(
                    random.Random(f"trd-{config.train.seed}-{step}").getrandbits(63)
                )
                rollout, trd_metrics = refine(
                    rollout, rows, teacher=teacher.model, student=student, tokenizer=tokenizer,
                    settings=config.trd, max_new_tokens=roll.max_new_tokens, verify=task.verify, generator=generator,
                )  # fmt: skip
                metrics.update(trd_metrics)
            if config.objective.needs_reward:
                reward_B = verify(rollout, examples)
                metrics["reward"] = float(reward_B.mean())
        else:
            rollout, metrics, rows = off_policy(step)
        metrics["on_policy"] = float(on)
        metrics["teacher_scored_tokens"] = int(rollout.attention_mask.sum())
        request = config.diagnostics_request if config.diagnostics_due(step) else config.teacher_request
        signal, score_metrics = scorer(rollout, rows, request)
        metrics.update(score_metrics)
        batch = StepBatch(rollout, signal, metrics, reward_B=reward_B)
        if reference is not None:
            batch.reference_logp_BT = reference.score(rollout, SignalRequest()).token_logp_BT
        if config.objective.sft_coef > 0:  # the same prompts, with dataset or teacher completions
            # an off-policy step already holds them: reuse rather than generate a second time
            batch.sft_rollout, sft_metrics = off_policy(step)[:2] if on else (rollout, {})
            for key, value in sft_metrics.items():
                metrics[key] = metrics.get(key, 0) + value
        return batch

    return distill


def score(
    config: Config,
    student,
    teacher: Teacher,
    rollout: Rollout,
    request: SignalRequest | None = None,
    teacher_view: Rollout | None = None,
) -> TeacherSignal:
    """The teacher's signal for ``rollout`` (``request``, by default the objective's), scored on ``teacher_view``
    when given (the same completions after other prompts: OPSD); for L1s it scores the student's own top-K ids
    at each visited state (one student forward without gradient, on the student's prompts)."""
    k, ids_BTK = config.objective.student_topk, None
    if k:
        with torch.no_grad():
            ids_BTK = completion_logits(student, rollout).topk(k, dim=-1).indices
    return teacher.score(teacher_view or rollout, request or config.teacher_request, ids_BTK)


class Scorer:
    """Who scores a step's rollout (rows = the example of each sequence): the teacher each example's ``teacher``
    tag names (untagged: the default teacher), with per-teacher metrics when there are several; or OPSD's
    self-teacher, which sees every prompt with its example's privileged context (``opsd.template`` and
    ``opsd.system``). Its prompts are longer than the student's, and its scores line up with the student's by
    response position: ``completion_logits`` reads the last T + 1 positions of prompt ⊕ completion."""

    def __init__(self, config: Config, tokenizer, student, teachers: Mapping[str, Teacher]):
        self.config, self.tokenizer, self.student, self.teachers = config, tokenizer, student, teachers

    def __call__(
        self, rollout: Rollout, rows: Sequence[Example], request: SignalRequest
    ) -> tuple[TeacherSignal, dict[str, float]]:
        tags = [ex.teacher for ex in rows]
        unknown = sorted(set(tags) - set(self.teachers))
        if unknown:
            known = ", ".join(repr(t) for t in self.teachers if t) or "none"
            raise UserError(
                f"an example names teacher {unknown[0]!r}, which is not a key of teachers ({known})."
            )
        if self.config.opsd.teacher != "off":
            return score(
                self.config, self.student, self.teachers[""], rollout, request, self.view(rollout, rows)
            ), {}
        if len(self.teachers) == 1:
            return score(self.config, self.student, self.teachers[""], rollout, request), {}
        parts, metrics = [], {}
        for tag in sorted(set(tags)):
            index_B = torch.tensor(
                [b for b, t in enumerate(tags) if t == tag], device=rollout.tokens_BT.device
            )
            part = rollout.select(index_B)
            signal = score(self.config, self.student, self.teachers[tag], part, request)
            parts.append((index_B, signal))
            name = tag or "default"
            metrics[f"teacher_sequences/{name}"] = len(index_B)
            if part.sampler_logp_BT.any():  # the student's own samples: the sampled reverse-KL estimate
                log_ratio_BT = (part.sampler_logp_BT - signal.token_logp_BT) * part.loss_mask_BT
                metrics[f"teacher_kl/{name}"] = float(
                    log_ratio_BT.sum() / part.loss_mask_BT.sum().clamp(min=1)
                )
        return TeacherSignal.gather(parts, len(tags)), metrics

    def view(self, rollout: Rollout, rows: Sequence[Example]) -> Rollout:
        """``rollout`` with the self-teacher's prompts: each row's example shown with its privileged context."""
        opsd = self.config.opsd
        missing = [ex.id or ex.prompt for ex in rows if not ex.privileged]
        if missing:
            raise UserError(
                f"opsd.teacher={opsd.teacher} needs a 'privileged' field on every example; {missing[0]!r} has none."
            )
        views = [privileged_view(ex, opsd.template, opsd.system) for ex in rows]
        ids_BP, mask_BP = left_pad(encode_prompts(self.tokenizer, views), self.tokenizer.pad_token_id)
        device = rollout.tokens_BT.device
        return dataclasses.replace(
            rollout, prompt_ids_BP=ids_BP.to(device), prompt_mask_BP=mask_BP.to(device)
        )


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
