"""Waste: a distillation step's time against the sum of its irreducible parts, each measured alone.

    python benchmarks/waste.py [--steps 30] [--warmup 5] [--repeats 3] [--objective full_rkl]

The step is `opd distill --config configs/distill_addition.yaml` (the shipped 34k-parameter student, the
shipped 133k-parameter teacher, 64 prompts per step, up to 52 new tokens; periodic evaluation and
diagnostics off), its `step_s` from metrics.jsonl: everything from drawing the prompts to the optimizer
step. The parts, on the same prompts, seeds and models, each timed alone: (1) sampling the completions
with the KV-cached sampler, (2) one teacher forward over prompt + completion in inference mode, (3) one
student forward + backward of the plain reverse KL over the vocabulary and the AdamW step (fused, as the
loop builds it). Everything
else — tokenising prompts, the teacher's derived tensors, masks, metrics, chunked loss functions — is the
waste. Repeats interleave a run and a parts pass; the ratio is median step time / median sum of parts
over the steps after --warmup. Target: at most 1.15x.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from opdistill.config import load_config
from opdistill.data.examples import encode_prompts
from opdistill.data.tasks import task_from_config
from opdistill.models import completion_logits, load_model
from opdistill.sampling.rollout import sample_prompts
from opdistill.training import distributed, loop


def parts(config, steps: range) -> list[dict[str, float]]:
    """Per step: seconds to sample, score with the teacher, and update the student, each alone."""
    student, tokenizer = load_model(config.student)
    teacher, _ = load_model(config.teacher)
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = distributed.adamw(student, config.optim.lr, config.optim.betas, config.optim.weight_decay)
    task = task_from_config(config.data, config.train.seed)
    timings = []
    for step in steps:
        prompts = encode_prompts(tokenizer, task.train.batch(step, config.train.prompts_per_step))
        torch.manual_seed(config.train.seed * 1_000_003 + step)
        started = time.perf_counter()
        rollout = sample_prompts(student, tokenizer, prompts, max_new_tokens=config.rollout.max_new_tokens)
        sampled = time.perf_counter()
        with torch.inference_mode():
            teacher_logits_BTV = completion_logits(teacher, rollout)
        scored = time.perf_counter()
        logp_BTV = completion_logits(student, rollout).log_softmax(-1)
        kl_BT = (logp_BTV.exp() * (logp_BTV - teacher_logits_BTV.clone().log_softmax(-1))).sum(-1)
        mask_BT = rollout.loss_mask_BT
        (kl_BT * mask_BT).sum().div(mask_BT.sum()).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updated = time.perf_counter()
        timings.append(
            {
                "sample": sampled - started,
                "teacher": scored - sampled,
                "student": updated - scored,
                "tokens": int(mask_BT.sum()),
            }
        )
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objective", default="full_rkl")
    parser.add_argument("--out", default="runs/waste")
    args = parser.parse_args()
    torch.set_num_threads(2)
    measured = range(args.warmup, args.steps)
    step_s, tokens, part_s = [], [], {"sample": [], "teacher": [], "student": []}
    part_tokens = []
    for repeat in range(args.repeats):
        out = Path(args.out) / f"r{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        config = load_config(
            "configs/distill_addition.yaml",
            [
                f"objective.type={args.objective}",
                f"train.steps={args.steps}",
                "train.eval_every=0",
                "train.eval_size=1",
                "train.diagnostics_every=0",
                "train.save_every=0",
                "train.threads=2",
                f"train.out_dir={out}",
            ],
        )
        loop.run(config, show_progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
        step_s += [r["step_s"] for r in rows]
        tokens += [r["loss_tokens"] for r in rows]
        for timing in parts(config, measured):
            for key in part_s:
                part_s[key].append(timing[key])
            part_tokens.append(timing["tokens"])
    median = {key: statistics.median(values) for key, values in part_s.items()}
    step, total = statistics.median(step_s), sum(median.values())
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {args.repeats} repeats x {len(measured)} steps, "
        f"objective {args.objective}"
    )
    print("| | median s/step | tokens with loss per step |")
    print("|---|---|---|")
    print(f"| opdistill step | {step:.4f} | {statistics.median(tokens):.0f} |")
    for key, value in median.items():
        print(f"| part alone: {key} | {value:.4f} | |")
    print(f"| sum of parts | {total:.4f} | {statistics.median(part_tokens):.0f} |")
    print(f"\nwaste_ratio: {step / total:.2f}x")


if __name__ == "__main__":
    main()
