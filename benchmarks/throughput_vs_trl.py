"""Throughput of opdistill against TRL's GKDTrainer and DistillationTrainer, on one setup, on this CPU.

    python benchmarks/throughput_vs_trl.py [--repeats 3] [--steps 25] [--warmup 5] [--eval-size 500]
    python benchmarks/throughput_vs_trl.py --quick          # smoke run: 6 steps, 1 repeat, 2-4 min
    python benchmarks/throughput_vs_trl.py --only opd-b1 gkd-default-b1   # a subset of the rows
    python benchmarks/throughput_vs_trl.py --report runs/throughput_vs_trl/DIR   # re-render a finished run

Every row trains the same student (the shipped 34k-parameter warm start) from the same teacher (the shipped
133k one, or --teacher DIR) on the same prompts (--task: the built-in task's training stream, rendered by
the tokenizer's chat template), fully on-policy (GKD λ = 1), 64 prompts per optimizer step, one sample per
prompt, --max-new-tokens for all, temperature 1 with top-k 0 and top-p 1, fp32, AdamW at --lr (1e-3) with
betas (0.9, 0.98) and weight decay 0.01, 10 warmup steps then cosine to 10% of lr, grad clip 1.0, 2 torch
threads (TRL's warmup starts at lr 0 where opdistill's starts at lr/10: the same ramp one step later). Every
other TRL argument keeps its default; report_to="none", save_strategy="no" and disable_tqdm=True are set
as a user timing a run would set them. opdistill runs `configs/distill_addition.yaml` with
train.diagnostics_every=0 and train.eval_every=0, so no timed step runs diagnostics or an evaluation. β is
GKD's (TRL convention; opdistill's objective.jsd_beta uses the same one): β = 1 is the reverse KL
(opdistill full_rkl), β = 0.5 the JSD (opdistill jsd, jsd_beta 0.5).

Timing. Each (row, repeat) is a fresh subprocess; repeats are interleaved and the row order rotates per
repeat, so slow phases of a shared machine spread over all rows. One step's time is the wall time between
consecutive optimizer-step ends: everything the training loop does per step (data, sampling, teacher, loss,
backward, optimizer, logging). TRL's on_step_begin -> on_step_end misses the batch fetch (GKD's collator
tokenizes there) and the logging, so it is reported beside it as "in-step s", as is opdistill's own
metrics.jsonl step_s. The first --warmup steps of each run are dropped; the rest are pooled over repeats:
median and interquartile range; also the 10th percentile (the least disturbed steps) and the median CPU
seconds of the process per step, both less sensitive to other jobs on a shared machine. Student tokens
per step = completion tokens that receive loss: the sampled tokens up to and including the first EOS
(GKD: labels != -100; DistillationTrainer: completion_mask;
opdistill: loss_tokens). Tokens/s = median tokens per step / median s per step. Accuracy: greedy exact match
on the first --eval-size held-out problems (opdistill.evaluate.evaluate), after the run's --steps steps.

Prints Markdown for benchmarks/RESULTS.md, ending with the lines `throughput_vs_trl_default: N.NNx`
(opdistill β = 1 against GKDTrainer at TRL's defaults, β = 1) and `throughput_vs_trl_best: N.NNx`
(against the fastest TRL row at β = 1) — `real_model_vs_trl_default` / `real_model_vs_trl_best` with
another --student than the shipped one — and writes it, with every raw per-step record, under --out.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "distill_addition.yaml"
THREADS = 2


@dataclass(frozen=True)
class Row:
    name: str
    trainer: str  # "opdistill" | "gkd" | "distillation"
    beta: float
    gradient_checkpointing: bool | None = None  # None: the trainer's default (TRL: True)
    bf16: bool | None = False  # None: TRL's default (True, autocast on CPU); False: fp32 like every other row
    label: str = ""


ROWS = [
    Row("opd-b1", "opdistill", 1.0, label="opdistill full_rkl (defaults)"),
    Row("gkd-default-b1", "gkd", 1.0, label="GKDTrainer, TRL defaults (gradient checkpointing on)"),
    Row("gkd-nogc-b1", "gkd", 1.0, False, label="GKDTrainer, gradient_checkpointing=False"),
    Row("dist-default-b1", "distillation", 1.0, label="DistillationTrainer, TRL defaults (gc on)"),
    Row(
        "dist-nogc-b1", "distillation", 1.0, False, label="DistillationTrainer, gradient_checkpointing=False"
    ),
    Row("opd-b0.5", "opdistill", 0.5, label="opdistill jsd, jsd_beta=0.5 (defaults)"),
    Row("gkd-default-b0.5", "gkd", 0.5, label="GKDTrainer, TRL defaults (gradient checkpointing on)"),
    Row("gkd-nogc-b0.5", "gkd", 0.5, False, label="GKDTrainer, gradient_checkpointing=False"),
    Row("dist-default-b0.5", "distillation", 0.5, label="DistillationTrainer, TRL defaults (gc on)"),
    Row(
        "dist-nogc-b0.5",
        "distillation",
        0.5,
        False,
        label="DistillationTrainer, gradient_checkpointing=False",
    ),
]
# not run unless named with --only: TRL's bf16 default too (autocast on CPU changes the numerics)
EXTRA_ROWS = [
    Row("gkd-alldefaults-b1", "gkd", 1.0, bf16=None, label="GKDTrainer, TRL all defaults incl. bf16"),
    Row("gkd-alldefaults-b0.5", "gkd", 0.5, bf16=None, label="GKDTrainer, TRL all defaults incl. bf16"),
]
ALL_ROWS = {row.name: row for row in ROWS + EXTRA_ROWS}


# ------------------------------------------------------------------------------------------------ worker


class StepClock:
    """Per-step records: wall time between consecutive optimizer-step ends, plus named phases and token counts
    accumulated by the wrappers below since the previous step end."""

    def __init__(self):
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.last_end: float | None = None
        self.last_cpu = time.process_time()
        self.step_begin: float | None = None

    def add(self, key: str, value: float) -> None:
        self.current[key] = self.current.get(key, 0.0) + value

    def timed(self, key: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - started)

        return wrapper

    def begin(self) -> None:
        self.step_begin = time.perf_counter()

    def end(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        record = dict(self.current)
        # CPU seconds of this process (all its threads) since the previous step end: less sensitive than wall
        # time to other jobs on a shared machine, but it counts the thread pool's spin-waiting too
        record["cpu_s"] = cpu - self.last_cpu
        if self.step_begin is not None:  # TRL: on_step_begin -> on_step_end
            record["in_step_s"] = now - self.step_begin
        # the first step has no previous end: its interval is its in-step time (it is a warm-up step anyway)
        record["interval_s"] = (
            now - self.last_end if self.last_end is not None else record.get("in_step_s", 0)
        )
        self.records.append(record)
        self.current, self.last_end, self.last_cpu, self.step_begin = {}, now, cpu, None


def time_module_forward(module, clock: StepClock, key: str) -> None:
    """Add the wall time of every forward of ``module`` to ``key`` (forward pre/post hooks)."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: clock.add(key, time.perf_counter() - starts.pop()))


def task_overrides(task: str) -> list[str]:
    """The config overrides that train and evaluate every row on built-in task ``task``."""
    return [] if task == "addition" else [f"data.task={task}", "data.task_options={}"]


def opdistill_worker(row: Row, args) -> dict[str, Any]:
    """One opdistill run of ``args.steps`` steps; phases timed by wrapping module functions (src is
    untouched)."""
    from opdistill.config import load_config
    from opdistill.teachers import local as teachers
    from opdistill.training import batches
    from opdistill.training import loop as train_module
    from opdistill.training import step as step_module

    clock = StepClock()
    unpatched = []
    # sampling (prompt padding + KV-cached generation), teacher scoring, student forward + loss, the whole
    # backward pass over micro-batches, and the whole train_step (adds grad norm, clip, AdamW)
    for owner, attr, key in [
        (batches, "sample_prompts", "sampling_s"),
        (teachers.LocalTeacher, "score", "teacher_s"),
        (step_module, "micro_batch_loss", "student_forward_loss_s"),
        (step_module, "_backward", "forward_backward_s"),
    ]:
        if hasattr(owner, attr):
            setattr(owner, attr, clock.timed(key, getattr(owner, attr)))
        else:  # opdistill's internals moved: that phase reads 0 in the breakdown
            unpatched.append(f"{getattr(owner, '__name__', owner)}.{attr}")
    inner_step = train_module.train_step

    def timed_train_step(*a, **k):
        started = time.perf_counter()
        result = inner_step(*a, **k)
        clock.add("train_step_s", time.perf_counter() - started)
        clock.end()
        return result

    train_module.train_step = timed_train_step

    run_dir = Path(args.run_dir)
    objective = (
        ["objective.type=full_rkl"]
        if row.beta == 1
        else ["objective.type=jsd", f"objective.jsd_beta={row.beta}"]
    )
    overrides = [
        *objective,
        f"student.path={args.student}",
        f"teacher.path={args.teacher}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"optim.lr={args.lr}",
        *task_overrides(args.task),
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.n_per_prompt=1",
        "rollout.on_policy_fraction=1.0",
        f"train.prompts_per_step={args.batch}",
        f"train.steps={args.steps}",
        f"train.seed={args.seed}",
        "train.eval_every=0",
        f"train.eval_size={args.eval_size}",
        "train.save_every=0",
        "train.diagnostics_every=0",
        f"train.threads={THREADS}",
        f"train.out_dir={run_dir / 'opd'}",
    ]
    config = load_config(BASE_CONFIG, overrides)
    started = time.perf_counter()
    result = train_module.run(config, show_progress=False)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (run_dir / "opd" / "metrics.jsonl").read_text().splitlines()]
    for record, logged in zip(clock.records, metrics, strict=True):
        if not record["interval_s"]:  # the first step: no previous step end
            record["interval_s"] = logged["step_s"]
        record["tokens"] = logged["loss_tokens"]
        record["in_step_s"] = logged["step_s"]  # opdistill's own step time
    return {
        "records": clock.records,
        "accuracy": result["final_eval"]["greedy_acc"],
        "settings": {
            "overrides": overrides,
            "base_config": str(BASE_CONFIG.relative_to(REPO)),
            "untimed phases": unpatched,
        },
        "wall_s": wall,
    }


def trl_worker(row: Row, args) -> dict[str, Any]:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback

    from opdistill.config import ModelSpec, load_config
    from opdistill.data.tasks import task_from_config
    from opdistill.models import check_same_tokenizer, load_model
    from opdistill.observe.evaluate import evaluate

    student, tokenizer = load_model(ModelSpec(path=args.student))
    teacher, teacher_tokenizer = load_model(ModelSpec(path=args.teacher))
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    # the same prompts opdistill trains on: steps x batch examples of the task's stream for this seed
    task = task_from_config(load_config(BASE_CONFIG, task_overrides(args.task)).data, args.seed)
    examples = [task.train[i] for i in range(args.steps * args.batch)]

    clock = StepClock()
    time_module_forward(teacher.model, clock, "teacher_s")  # the backbone: both trainers call it

    common: dict[str, Any] = dict(
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        adam_beta1=0.9,
        adam_beta2=0.98,
        weight_decay=0.01,
        max_grad_norm=1.0,
        warmup_steps=10,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        seed=args.seed,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    if row.bf16 is not None:
        common["bf16"] = row.bf16
    else:  # TRL's default bf16=True: transformers refuses it without a GPU unless use_cpu is set
        common["use_cpu"] = True
    if row.gradient_checkpointing is not None:
        common["gradient_checkpointing"] = row.gradient_checkpointing

    class Timing(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.begin()

        def on_step_end(self, *_, **__):
            clock.end()

    with tempfile.TemporaryDirectory() as output_dir:
        if row.trainer == "gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            specific = dict(beta=row.beta, lmbda=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens)
            config = GKDConfig(output_dir=output_dir, **common, **specific)

            class TimedGKD(GKDTrainer):
                @staticmethod
                def generate_on_policy_outputs(model, inputs, generation_config):
                    started = time.perf_counter()
                    ids, mask, labels = GKDTrainer.generate_on_policy_outputs(
                        model, inputs, generation_config
                    )
                    clock.add("sampling_s", time.perf_counter() - started)
                    clock.add("tokens", float((labels != -100).sum()))
                    return ids, mask, labels

                def training_step(self, *a, **k):
                    return clock.timed("train_step_s", super().training_step)(*a, **k)

            # GKD's collator tokenizes the whole conversation even at λ = 1, so it needs the completion too
            rows = [
                {"messages": [*ex.messages(), {"role": "assistant", "content": ex.completion}]}
                for ex in examples
            ]
            trainer = TimedGKD(
                model=student,
                teacher_model=teacher,
                args=config,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[Timing()],
            )
            resolved = {"generation use_cache": trainer.generation_config.use_cache}
        else:
            from trl import DistillationConfig, DistillationTrainer

            specific = dict(
                beta=row.beta, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=args.max_new_tokens
            )
            config = DistillationConfig(output_dir=output_dir, **common, **specific)

            class TimedDistillation(DistillationTrainer):
                def _generate(self, prompts):  # chat-template tokenization + generate
                    return clock.timed("sampling_s", super()._generate)(prompts)

                def _generate_and_score_completions(self, inputs):
                    output = super()._generate_and_score_completions(inputs)
                    clock.add("tokens", float(output["completion_mask"].sum()))
                    return output

                def training_step(self, *a, **k):
                    return clock.timed("train_step_s", super().training_step)(*a, **k)

            rows = [{"prompt": ex.messages()} for ex in examples]
            trainer = TimedDistillation(
                model=student,
                teacher_model=teacher,
                args=config,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[Timing()],
            )
            # DistillationTrainer leaves use_cache unset: generate's default, the KV cache, applies
            resolved = {"generation use_cache": trainer.generation_config.use_cache or "unset (cache on)"}
        resolved.update(
            {
                key: getattr(config, key)
                for key in (
                    "gradient_checkpointing",
                    "bf16",
                    "optim",
                    "lr_scheduler_type",
                    "logging_steps",
                    "dataloader_num_workers",
                    "torch_empty_cache_steps",
                )
            }
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    model = trainer.model
    model.eval()
    with torch.no_grad():
        accuracy = evaluate(
            model, tokenizer, task.test[: args.eval_size], task.verify, max_new_tokens=args.max_new_tokens
        )["greedy_acc"]
    settings = {"trl": trl.__version__, "set": {**common, **specific}, "resolved": resolved}
    return {"records": clock.records, "accuracy": accuracy, "settings": settings, "wall_s": wall}


def worker(args) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(THREADS)
    row = ALL_ROWS[args.worker]
    load_before = os.getloadavg()[0]
    result = opdistill_worker(row, args) if row.trainer == "opdistill" else trl_worker(row, args)
    result.update(
        row=row.name,
        seed=args.seed,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        loadavg_1min=[load_before, os.getloadavg()[0]],
        torch_threads=torch.get_num_threads(),
    )
    Path(args.result).write_text(json.dumps(result, default=str))


# ------------------------------------------------------------------------------------------------ driver


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def machine_info() -> dict[str, str]:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "accelerate", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "logical cores": str(os.cpu_count()),
        "torch threads per run": str(THREADS),
        "python": platform.python_version(),
        **versions,
    }


def summarise(row: Row, runs: list[dict], warmup: int) -> dict[str, Any]:
    timed = [record for run in runs for record in run["records"][warmup:]]
    interval = [r["interval_s"] for r in timed]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in timed)  # noqa: E731
    tokens = statistics.median(r["tokens"] for r in timed)
    summary = {
        "steps": len(timed),
        "median_s": statistics.median(interval),
        "q1": quantile(interval, 0.25),
        "q3": quantile(interval, 0.75),
        "in_step_s": statistics.median(r["in_step_s"] for r in timed),
        "cpu_s": statistics.median(r["cpu_s"] for r in timed),
        "p10": quantile(interval, 0.10),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / statistics.median(interval),
        "accuracy": [run["accuracy"] for run in runs],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        # means (they add up): sampling, teacher forward, student forward/loss/backward, optimizer and the
        # rest
        "sampling_s": mean("sampling_s"),
        "teacher_s": mean("teacher_s"),
        "interval_mean_s": mean("interval_s"),
    }
    if row.trainer == "opdistill":
        summary["student_s"] = mean("forward_backward_s")
        summary["student_forward_loss_s"] = mean("student_forward_loss_s")
        summary["backward_s"] = mean("forward_backward_s") - mean("student_forward_loss_s")
        summary["optimizer_s"] = mean("train_step_s") - mean("forward_backward_s")
        summary["rest_s"] = (
            summary["interval_mean_s"] - mean("sampling_s") - mean("teacher_s") - mean("train_step_s")
        )
    else:
        # training_step holds generation and the teacher forward; what follows it is clip, AdamW, scheduler,
        # logging, and the next batch's fetch (GKD's collator)
        summary["student_s"] = mean("train_step_s") - mean("sampling_s") - mean("teacher_s")
        summary["optimizer_s"] = None
        summary["rest_s"] = summary["interval_mean_s"] - mean("train_step_s")
    return summary


def settings_lines(settings: dict[str, dict]) -> list[str]:
    """What each row set: opdistill's overrides once, the TRL arguments all TRL rows share once, then each TRL
    row's own arguments and the values its trainer resolved (defaults we did not set)."""
    lines = []
    opd = [value for value in settings.values() if "overrides" in value]
    if opd:
        shared = [
            o for o in opd[0]["overrides"] if not o.startswith(("objective.", "train.out_dir", "train.seed"))
        ]
        lines.append(
            f"* opdistill: `train.run` on `{opd[0]['base_config']}` (its defaults otherwise) with "
            f"{' '.join(shared)}; plus objective.type=full_rkl (β=1) or objective.type=jsd "
            "objective.jsd_beta=0.5; "
            "train.seed = repeat index."
        )
    trl_rows = {name: value for name, value in settings.items() if "set" in value}
    if trl_rows:
        first = next(iter(trl_rows.values()))
        common = {
            key: value
            for key, value in first["set"].items()
            if all(key in v["set"] and v["set"][key] == value for v in trl_rows.values())
        }
        lines.append(
            f"* TRL {first['trl']}, set on every TRL row (seed = repeat index): "
            + ", ".join(f"{k}={v!r}" for k, v in common.items() if k != "seed")
        )
        for name, value in trl_rows.items():
            own = ", ".join(f"{k}={v!r}" for k, v in value["set"].items() if k not in common)
            resolved = ", ".join(f"{k}={v!r}" for k, v in value["resolved"].items())
            lines.append(f"* `{name}`: set {own}; resolved {resolved}")
    return lines


def report(rows: list[Row], summaries: dict[str, dict], args, info: dict, settings: dict) -> str:
    lines = [
        f"Setup: student {args.student}, teacher {args.teacher}; {args.batch} prompts per step, G = 1, "
        f"max_new_tokens {args.max_new_tokens}; {args.steps} steps per run, first {args.warmup} dropped; "
        f"{args.repeats} interleaved repeat(s), each row in a fresh process; greedy accuracy on "
        f"{args.eval_size} held-out problems after {args.steps} steps (one value per repeat).",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "| row | configuration | median s/step | IQR | 10th pct | in-step s | CPU s/step | tokens/step | "
        "student tokens/s | opdistill ÷ row (same β) | ÷ at 10th pct | ÷ by CPU s | accuracy | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = summaries.get(row.name)
        if s is None:
            lines.append(f"| {row.name} | {row.label}, β={row.beta:g} | failed: see its log |" + " |" * 11)
            continue
        opd = summaries.get("opd-b1" if row.beta == 1 else f"opd-b{row.beta:g}")
        ratio = f"{opd['tokens_per_s'] / s['tokens_per_s']:.2f}x" if opd else "n/a"
        per_token = lambda key, x: x[key] / x["tokens_per_step"]  # noqa: E731
        p10_ratio = f"{per_token('p10', s) / per_token('p10', opd):.2f}x" if opd else "n/a"
        cpu_ratio = (
            f"{(s['cpu_s'] / s['tokens_per_step']) / (opd['cpu_s'] / opd['tokens_per_step']):.2f}x"
            if opd
            else "n/a"
        )
        accuracy = ", ".join(f"{a:.3f}" for a in s["accuracy"])
        lines.append(
            f"| {row.name} | {row.label}, β={row.beta:g} | {s['median_s']:.3f} | "
            f"{s['q1']:.3f}–{s['q3']:.3f} | "
            f"{s['p10']:.3f} | {s['in_step_s']:.3f} | {s['cpu_s']:.3f} | {s['tokens_per_step']:.0f} | "
            f"{s['tokens_per_s']:,.0f} | "
            f"{ratio} | {p10_ratio} | {cpu_ratio} | "
            f"{accuracy} | {s['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Where a step goes (mean s per timed step; the parts add up to the mean step, which can exceed "
        "the median):",
        "",
        "| row | mean step | sampling | teacher forward | student fwd+loss+bwd | optimizer | rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = summaries.get(row.name)
        if s is None:
            continue
        optimizer = "in rest" if s["optimizer_s"] is None else f"{s['optimizer_s']:.3f}"
        student = f"{s['student_s']:.3f}"
        if "student_forward_loss_s" in s:
            student += f" ({s['student_forward_loss_s']:.3f} fwd+loss, {s['backward_s']:.3f} bwd)"
        lines.append(
            f"| {row.name} | {s['interval_mean_s']:.3f} | {s['sampling_s']:.3f} | {s['teacher_s']:.3f} | "
            f"{student} | {optimizer} | {s['rest_s']:.3f} |"
        )
    lines += [
        "",
        "Sampling: opdistill `sample_prompts` (padding + KV-cached sampling); GKD "
        "`generate_on_policy_outputs`; "
        "DistillationTrainer `_generate` (chat-template tokenization + `generate`). Teacher: opdistill "
        "`LocalTeacher.score` (forward + log-softmax); TRL the teacher backbone's forward (hooks; its head "
        "and "
        "softmax fall in the loss). TRL's rest = clip, AdamW, scheduler, logging and the next batch's fetch "
        "(GKD's collator tokenization); opdistill's rest = prompt batching, metrics and the JSONL line.",
        "",
        "Settings:",
        "",
        *settings_lines(settings),
        "",
    ]
    for beta in sorted({row.beta for row in rows}, reverse=True):
        opd = summaries.get("opd-b1" if beta == 1 else f"opd-b{beta:g}")
        default = summaries.get("gkd-default-b1" if beta == 1 else f"gkd-default-b{beta:g}")
        trl_rows = [r for r in rows if r.trainer != "opdistill" and r.beta == beta and r.name in summaries]
        if not (opd and default and trl_rows):
            continue
        best = max(trl_rows, key=lambda r: summaries[r.name]["tokens_per_s"])
        vs_default = opd["tokens_per_s"] / default["tokens_per_s"]
        vs_best = opd["tokens_per_s"] / summaries[best.name]["tokens_per_s"]
        if beta == 1:
            shipped = REPO / "src" / "opdistill" / "assets" / "addition-student"
            name = "throughput" if Path(args.student).resolve() == shipped.resolve() else "real_model"
            lines.append(f"β=1 (headline): fastest TRL row {best.name}.")
            lines.append(f"{name}_vs_trl_default: {vs_default:.2f}x")
            lines.append(f"{name}_vs_trl_best: {vs_best:.2f}x")
        else:
            lines.append(
                f"β={beta:g}: {vs_default:.2f}x GKDTrainer at TRL defaults, {vs_best:.2f}x the fastest TRL "
                f"row ({best.name})."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    assets = REPO / "src" / "opdistill" / "assets"
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each run")
    parser.add_argument("--eval-size", type=int, default=500, help="held-out problems for the accuracy")
    parser.add_argument("--batch", type=int, default=64, help="prompts per optimizer step")
    parser.add_argument(
        "--max-new-tokens", type=int, default=52, help="completions are <= 42 tokens with EOS"
    )
    parser.add_argument("--student", default=str(assets / "addition-student"))
    parser.add_argument("--teacher", default=str(assets / "addition-teacher"))
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate of every row (1e-5 for SmolLM2)"
    )
    parser.add_argument(
        "--task", default="addition", help="built-in task of every row (capitals for SmolLM2)"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(ALL_ROWS), help="run only these rows")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 6 steps (2 dropped), 1 repeat, 100 problems"
    )
    parser.add_argument("--out", type=Path, help="run directory (default runs/throughput_vs_trl/<time>)")
    parser.add_argument("--report", type=Path, metavar="DIR", help="only re-render the report of run DIR")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report:
        if not (args.report / "args.json").is_file():
            sys.exit(f"{args.report} is not a run directory of this benchmark (no args.json).")
        print(render(args.report))
        return
    if args.quick:
        args.repeats, args.steps, args.warmup, args.eval_size = 1, 6, 2, 100
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need 1 <= --warmup < --steps (the first step has no previous step end to time from).")
    rows = [ALL_ROWS[name] for name in args.only] if args.only else ROWS
    if any(row.trainer != "opdistill" for row in rows) and importlib.util.find_spec("trl") is None:
        sys.exit(
            "trl is not installed; this benchmark compares against it. Install the dev extras "
            "(pip install -e '.[dev]', which pins trl==1.16.0) or run only the opdistill rows with "
            "--only opd-b1 opd-b0.5."
        )
    out = args.out or REPO / "runs" / "throughput_vs_trl" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} already holds a run; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "args.json").write_text(json.dumps({**recorded, "rows": [row.name for row in rows]}, indent=1))
    started = time.perf_counter()
    failed = run_all(args, rows, out)
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    print(render(out))
    if failed:
        sys.exit(f"rows that failed: {', '.join(sorted(failed))} (logs under {out}).")


def run_all(args, rows: list[Row], out: Path) -> set[str]:
    """Every row once per repeat, each in a fresh subprocess, the order rotated per repeat; returns the rows
    that failed at least once (their logs stay in the run directory)."""
    env = {
        **os.environ,
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "OMP_NUM_THREADS": str(THREADS),
        "MKL_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
    }
    shared = [
        "--steps",
        str(args.steps),
        "--eval-size",
        str(args.eval_size),
        "--batch",
        str(args.batch),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--student",
        args.student,
        "--teacher",
        args.teacher,
        "--lr",
        str(args.lr),
        "--task",
        args.task,
    ]
    failed: set[str] = set()
    for repeat in range(args.repeats):
        order = rows[repeat % len(rows) :] + rows[: repeat % len(rows)]
        for index, row in enumerate(order):
            run_dir = out / f"r{repeat}-{row.name}"
            run_dir.mkdir()
            result_path = run_dir / "result.json"
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                row.name,
                "--seed",
                str(repeat),
                "--run-dir",
                str(run_dir),
                "--result",
                str(result_path),
                *shared,
            ]
            run_started = time.perf_counter()
            with (run_dir / "log.txt").open("w") as log:
                status = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            took = time.perf_counter() - run_started
            where = f"[{repeat + 1}/{args.repeats} {index + 1}/{len(rows)}] {row.name}"
            if status.returncode or not result_path.is_file():
                failed.add(row.name)
                tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
                print(
                    f"{where} FAILED (exit {status.returncode}, {run_dir / 'log.txt'}):\n  "
                    + "\n  ".join(tail),
                    file=sys.stderr,
                    flush=True,
                )
                continue
            result = json.loads(result_path.read_text())
            times = [r["interval_s"] for r in result["records"][args.warmup :]]
            print(
                f"{where}: median {statistics.median(times):.3f} s/step, accuracy {result['accuracy']:.3f}, "
                f"load {result['loadavg_1min'][0]:.1f}->{result['loadavg_1min'][1]:.1f}, {took:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return failed


def render(out: Path) -> str:
    """The report of run directory ``out`` from its result files; also written to out/report.md."""
    args = argparse.Namespace(**json.loads((out / "args.json").read_text()))
    rows = [ALL_ROWS[name] for name in args.rows]
    runs = {
        row.name: [json.loads(p.read_text()) for p in sorted(out.glob(f"r*-{row.name}/result.json"))]
        for row in rows
    }
    settings = {name: found[0]["settings"] for name, found in runs.items() if found}
    summaries = {name: summarise(ALL_ROWS[name], found, args.warmup) for name, found in runs.items() if found}
    loads = [load for found in runs.values() for run in found for load in run["loadavg_1min"]]
    info = {**machine_info(), "1-min load average at run starts/ends": f"{min(loads):.1f}–{max(loads):.1f}"}
    text = report(rows, summaries, args, info, settings)
    wall = out / "wall_s.txt"
    text += f"\n\nRun directory {out}" + (
        f"; total wall time {wall.read_text().strip()} s." if wall.is_file() else "."
    )
    (out / "report.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"summaries": summaries, "machine": info}, indent=1))
    return text


if __name__ == "__main__":
    main()
