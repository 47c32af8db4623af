"""Waste: a distillation step's time against the sum of its irreducible parts, each measured alone; and
model-FLOPs utilisation against this machine's fp32 matmul peak, measured in the same run.

    python benchmarks/waste.py [--steps 30] [--warmup 5] [--repeats 3] [--objective full_rkl]
    python benchmarks/waste.py --student build/models/smollm2-135m-instruct \
        --teacher build/models/smollm2-135m-instruct --prompts-per-step 8 --max-new-tokens 32 \
        --steps 6 --warmup 2 --repeats 2      # the real model: prints real_model_waste / real_model_mfu

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

MFU: the step's model FLOPs over its time and the peak. Model FLOPs count the matmuls of the real
(unpadded) tokens: 2 per weight per token forward (decoder layers over prompt + completion, the LM head
over the completion), for sampling and the teacher forward, and 6 for the student's forward + backward;
attention scores are left out (a few percent at these lengths, so MFU is if anything understated). The
peak is the best of five fp32 2048^3 matmuls at the same thread count. Target: at least 0.5.
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
from opdistill.data.rendering import encode_prompts
from opdistill.data.tasks import task_from_config
from opdistill.logits import completion_logits
from opdistill.models import load_model
from opdistill.sampling.rollout import sample_prompts
from opdistill.training import distributed, loop


def matmul_peak(threads: int, size: int = 2048) -> float:
    """This machine's fp32 matmul rate (FLOP/s): the best of five ``size``^3 products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def weights(model) -> tuple[int, int]:
    """(weights in the decoder layers, weights of the LM head): what a token's forward multiplies by."""
    head = model.get_output_embeddings().weight.numel()
    layers = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() > 1)
    return layers, head


def step_flops(student, teacher, train_tokens: float, loss_tokens: float) -> float:
    """Model FLOPs of one OPD step: sampling and the teacher's forward (2 per weight per token) and the
    student's forward + backward (6); layers see prompt + completion, the LM head the completion."""
    (s_layers, s_head), (t_layers, t_head) = weights(student), weights(teacher)
    sample = 2 * (s_layers * train_tokens + s_head * loss_tokens)
    score = 2 * (t_layers * train_tokens + t_head * loss_tokens)
    learn = 6 * (s_layers * train_tokens + s_head * loss_tokens)
    return sample + score + learn


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
    parser.add_argument("--student", default="", help="student directory (default: the shipped one)")
    parser.add_argument("--teacher", default="", help="teacher directory (default: the shipped one)")
    parser.add_argument("--prompts-per-step", type=int, default=0, help="default: the config's 64")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="default: the config's 52")
    parser.add_argument("--out", default="runs/waste")
    args = parser.parse_args()
    torch.set_num_threads(2)
    measured = range(args.warmup, args.steps)
    peak = matmul_peak(2)
    real = bool(args.student)
    chosen = [
        *([f"student.path={args.student}"] if args.student else []),
        *([f"teacher.path={args.teacher}"] if args.teacher else []),
        *([f"train.prompts_per_step={args.prompts_per_step}"] if args.prompts_per_step else []),
        *([f"rollout.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens else []),
        *(["optim.lr=1e-5"] if real else []),
    ]
    step_s, tokens, part_s = [], [], {"sample": [], "teacher": [], "student": []}
    train_tokens = []
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
                *chosen,
            ],
        )
        loop.run(config, show_progress=False)
        every = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = every[args.warmup :]
        step_s += [r["step_s"] for r in rows]
        trained = [r["student_train_tokens"] for r in every]  # run totals: this step's is the difference
        train_tokens += [b - a for a, b in zip(trained, trained[1:], strict=False)][args.warmup - 1 :]
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
    student, _ = load_model(config.student)
    teacher, _ = load_model(config.teacher)
    flops = step_flops(student, teacher, statistics.median(train_tokens), statistics.median(tokens))
    mfu = flops / step / peak
    print(
        f"\nfp32 matmul peak {peak / 1e9:.1f} GFLOP/s; step model FLOPs {flops / 1e9:.1f} G "
        f"({statistics.median(train_tokens):.0f} tokens through the student, "
        f"{statistics.median(tokens):.0f} with loss) -> {flops / step / 1e9:.1f} GFLOP/s"
    )
    prefix = "real_model_" if real else ""
    print(f"{prefix}waste{'' if real else '_ratio'}: {step / total:.2f}x")
    print(f"{prefix}mfu: {mfu:.2f}")


if __name__ == "__main__":
    main()
