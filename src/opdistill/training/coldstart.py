"""Off-policy cold start (math.md §11.2; Li, Zuo, He et al. 2026): before distillation, SFT the student
on validity-filtered teacher samples of the first ``cold_start.samples`` training prompts, then distil on
prompts disjoint from those. The samples are filtered for validity, not correctness (``opd generate``'s
filters), and the SFT runs through the loop's own ``train_step`` with an SFT objective."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from opdistill.config import Config, ObjectiveConfig
from opdistill.data.examples import Example, ExampleStream, prompt_key, read_jsonl, rollout_of, write_jsonl
from opdistill.data.rendering import completion_target, encode_prompts
from opdistill.data.tasks import Stream, Task
from opdistill.errors import UserError
from opdistill.observe.progress import NullProgress, ProgressBar
from opdistill.sampling.generate import generate
from opdistill.teachers.local import LocalTeacher
from opdistill.training import distributed
from opdistill.training.distributed import World
from opdistill.training.step import train_step
from opdistill.types import Cost, StepBatch

WARMUP_STEPS = 10  # linear warmup of the SFT learning rate, then constant
MAX_RETRIES = 3  # an invalid teacher sample is drawn again at most this often (math.md §11.2)


def cold_start(
    config: Config,
    task: Task,
    tokenizer,
    model,
    teacher,
    run_dir: Path,
    world: World,
    *,
    resume: bool = False,
    show_progress: bool = False,
) -> tuple[frozenset[str], Cost]:
    """SFT ``model`` (the student the loss runs through: DDP- or FSDP-wrapped under torchrun) on the teacher's
    samples; returns the prompt keys (``prompt_key``) it trained on, which distillation must avoid, and what
    it cost (its time and tokens count against the run, as the curriculum's do; nothing on resume).

    ``teacher`` is the run's local teacher (``LocalTeacher``: it samples, so a remote one is refused). Each
    rank generates the same samples (seed ``train.seed``) and trains on its share of each step's
    ``cold_start.prompts_per_step`` kept samples, walked in seeded epochs; rank 0 writes
    ``run_dir/cold_start.jsonl`` (the kept samples, written last: the cold start is complete when it exists)
    and ``run_dir/cold_start_metrics.jsonl`` (one line per SFT step). ``resume``: the student comes from a
    checkpoint taken after the cold start, so only its prompts are read back."""
    cold = config.cold_start
    path = run_dir / "cold_start.jsonl"
    if resume:
        if not path.is_file():
            raise UserError(
                f"resuming a run with cold_start.samples > 0 needs {path}, written when its cold start "
                "ended; restore it, or start a new run."
            )
        return frozenset(prompt_key(ex) for ex in read_jsonl(path)), Cost()
    if not isinstance(teacher, LocalTeacher):
        raise UserError(
            "cold_start samples from the teacher, and a remote teacher (teacher.url) only scores: give a "
            "local teacher.path or set cold_start.samples=0."
        )
    if cold.prompts_per_step % world.size:
        raise UserError(
            f"cold_start.prompts_per_step={cold.prompts_per_step} must divide evenly across {world.size} "
            "ranks."
        )
    started = time.perf_counter()
    examples = [task.train[i] for i in range(cold.samples)]
    kept, counts = generate(
        teacher.model,
        tokenizer,
        examples,
        n=1,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=cold.temperature,
        require=re.compile(cold.require) if cold.require else None,
        max_retries=MAX_RETRIES,
        seed=config.train.seed,
        show_progress=show_progress,
    )
    if not kept:
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason != "kept")
        raise UserError(
            f"the cold start kept none of the teacher's {cold.samples} samples ({reasons}): loosen "
            "cold_start.require, or raise rollout.max_new_tokens."
        )

    sft_config = sft_settings(config)
    optimizer = distributed.adamw(model, cold.lr, config.optim.betas, config.optim.weight_decay)
    stream = ExampleStream(kept, config.train.seed)  # a fresh seeded permutation of the samples each epoch
    first, count = world.share(cold.prompts_per_step)
    device = next(model.parameters()).device
    records, trained_tokens, bad_steps = [], 0, 0
    model.train()
    bar = ProgressBar("cold start", cold.steps, 0) if show_progress else NullProgress()
    with bar:
        for step in range(cold.steps):
            lr = cold.lr * min(1.0, (step + 1) / WARMUP_STEPS)
            for group in optimizer.param_groups:
                group["lr"] = lr
            examples = stream.batch(step, cold.prompts_per_step)[first : first + count]
            completions = [completion_target(tokenizer, ex) for ex in examples]
            rollout = rollout_of(encode_prompts(tokenizer, examples), completions, tokenizer.pad_token_id)
            batch = StepBatch(rollout.to(device), None, {})
            metrics = train_step(sft_config, model, optimizer, batch, world)
            bad_steps = 0 if _finite(metrics) else bad_steps + 1  # train_step skipped that update
            if bad_steps >= config.train.max_bad_steps:
                raise UserError(
                    f"the cold start's loss or gradient was not finite for {bad_steps} steps in a row; lower "
                    "cold_start.lr."
                )
            trained_tokens += metrics["student_train_tokens"]
            records.append({"step": step + 1, "lr": lr, **{k: metrics[k] for k in ("loss", "grad_norm")}})
            bar.update(step + 1, 0.0, {"loss": metrics["loss"]})

    if world.is_main:
        (run_dir / "cold_start_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_jsonl(kept, path)
    cost = Cost(
        distributed.all_sum(time.perf_counter() - started, world) / world.size,
        student_train_tokens=int(distributed.all_sum(trained_tokens, world)),
        # the kept samples' prompts and completions (redrawn invalid samples are not counted)
        teacher_generated_tokens=sum(
            len(prompt) + len(completion_target(tokenizer, ex))
            for prompt, ex in zip(encode_prompts(tokenizer, kept), kept, strict=True)
        ),
    )
    world.barrier()
    return frozenset(prompt_key(ex) for ex in kept), cost


def sft_settings(config: Config) -> Config:
    """What ``train_step`` needs for a cold-start step: token-mean cross-entropy without shaping, clipped at
    ``optim.grad_clip`` and micro-batched by ``train.micro_batch_size``. Built from the defaults rather than
    from ``config``, whose distillation-only settings would be refused beside objective.type=sft."""
    return Config(objective=ObjectiveConfig(type="sft"), optim=config.optim, train=config.train)


def _finite(metrics: dict) -> bool:
    return math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def disjoint(stream: Stream, excluded: frozenset[str]) -> Stream:
    """``stream`` without the examples whose ``prompt_key`` is in ``excluded``, deterministic in the index.

    A stream over a list held in memory (a user file: ``ExampleStream``) becomes the same kind of stream over
    the remaining examples (the same seed: a fresh permutation of them each epoch); a UserError when none
    remain. Any other stream (a built-in task's endless generator, a streamed file) keeps its order and skips
    the excluded examples: ``disjoint(stream)[i]`` is the i-th example of ``stream`` that is not excluded."""
    if not excluded:
        return stream
    if isinstance(stream, ExampleStream):
        remaining = [ex for ex in stream.examples if prompt_key(ex) not in excluded]
        if not remaining:
            raise UserError(
                f"all {len(stream.examples)} training prompts were used by the cold start, and distillation "
                "needs others: lower cold_start.samples or add prompts."
            )
        return ExampleStream(remaining, stream.seed)
    return SkippingStream(stream, excluded)


class SkippingStream:
    """``stream`` in its own order with the excluded examples left out: ``self[i]`` is the i-th example not
    excluded. Reading forward is one step of the underlying stream per example; a read behind the furthest one
    rescans from the nearest of the positions remembered every ``EVERY`` examples."""

    EVERY = 1024
    MAX_SKIPPED = 100_000  # excluded examples in a row that mean the stream has nothing else

    def __init__(self, stream: Stream, excluded: frozenset[str]):
        self.stream, self.excluded = stream, excluded
        self._marks = [0]  # _marks[m]: the stream index of self[m * EVERY]
        # (i, j): where the scan stands; self[i] is the first example at or after stream[j] not excluded
        self._next = (0, 0)

    def __getitem__(self, index: int) -> Example:
        if index < 0:
            raise IndexError(index)
        i, j = self._next
        if index < i:  # behind the scan: restart from the last mark at or before index
            mark = min(index // self.EVERY, len(self._marks) - 1)
            i, j = mark * self.EVERY, self._marks[mark]
        skipped = 0
        while True:
            example = self.stream[j]
            j += 1
            if prompt_key(example) in self.excluded:
                skipped += 1
                if skipped >= self.MAX_SKIPPED:
                    raise UserError(
                        f"the training stream gave {skipped} cold-start prompts in a row and no other: lower "
                        "cold_start.samples or train on more prompts."
                    )
                continue
            skipped = 0
            if i % self.EVERY == 0 and i // self.EVERY == len(self._marks):
                self._marks.append(j - 1)
            if i == index:
                self._next = (i + 1, j)
                return example
            i += 1

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]
