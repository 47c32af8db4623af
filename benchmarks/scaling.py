"""Scaling: step time and peak memory against world size (torchrun, 1 and 2 CPU ranks) and response length.

    python benchmarks/scaling.py [--steps 12] [--warmup 3] [--lengths 32 64 128 256 512]

World size: `opd distill --config configs/distill_addition.yaml` (shipped student and teacher, 64 prompts
per step) in one process and under `torchrun --nproc_per_node=2` with DDP and FSDP2, same global batch;
each process gets 2 threads / world size, so both use the machine's 2 cores. Response length: the
shipped student sampling 16 responses of exactly N tokens (EOS ignored), one teacher forward, the student's
full_rkl forward + backward and AdamW, in one process (the library's parts, as in benchmarks/waste.py).
Step time is the median `step_s` after --warmup; peak memory is the largest resident set of any one
process of the run (`getrusage` of the children).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

BASE = [
    "train.eval_every=0",
    "train.eval_size=1",
    "train.diagnostics_every=0",
    "train.save_every=0",
    "rollout.max_new_tokens=52",
]


MEASURE = """import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def run(out: Path, overrides: list[str], world_size: int, steps: int) -> tuple[list[dict], float]:
    """(metrics.jsonl records, peak RSS in MB of the largest process) of one `opd distill` run."""
    shutil.rmtree(out, ignore_errors=True)
    threads = max(1, 2 // world_size)
    args = [
        "-m",
        "opdistill.cli",
        "distill",
        *overrides,
        f"train.steps={steps}",
        f"train.threads={threads}",
        f"train.out_dir={out}",
    ]
    if world_size > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a fresh parent per run: ru_maxrss of its children is the largest process of this run alone
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, *args],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    peak_kb = int(done.stdout.split()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--out", default="runs/scaling")
    parser.add_argument("--length-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.length_worker:
        length_worker(args.length_worker, args.steps, args.warmup)
        return
    root = Path(args.out)

    print("| world size | parallel | median s/step | sequences/s | peak RSS per process (MB) |")
    print("|---|---|---|---|---|")
    addition = ["--config", "configs/distill_addition.yaml", *BASE]
    for world_size, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = root / f"world{world_size}-{parallel}"
        rows, peak = run(out, [*addition, f"train.parallel={parallel}"], world_size, args.steps)
        median = statistics.median(r["step_s"] for r in rows[args.warmup :])
        print(
            f"| {world_size} | {parallel if world_size > 1 else '-'} | {median:.3f} | "
            f"{64 / median:.0f} | {peak:.0f} |",
            flush=True,
        )

    print("\n| response tokens | median s/step | s per 1k response tokens | peak RSS (MB) |")
    print("|---|---|---|---|")
    for length in args.lengths:
        command = [
            sys.executable,
            "-c",
            MEASURE,
            sys.executable,
            __file__,
            "--length-worker",
            str(length),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        median, peak_kb = float(done.stdout.split()[-2]), int(done.stdout.split()[-1])
        print(
            f"| {length} | {median:.3f} | {median / (16 * length) * 1000:.3f} | {peak_kb / 1024:.0f} |",
            flush=True,
        )


def length_worker(length: int, steps: int, warmup: int) -> None:
    """Prints the median seconds of a step whose 16 responses are exactly ``length`` tokens: sampling (EOS
    ignored), one teacher forward, the student's full_rkl forward + backward and AdamW."""
    import time

    import torch

    from opdistill.config import load_config
    from opdistill.data.examples import left_pad
    from opdistill.data.rendering import encode_prompts
    from opdistill.data.tasks import task_from_config
    from opdistill.logits import completion_logits
    from opdistill.models import load_model
    from opdistill.objectives.losses import Normalizer, generalized_jsd
    from opdistill.sampling.rollout import generate

    torch.set_num_threads(2)
    config = load_config("configs/distill_addition.yaml")
    student, tokenizer = load_model(config.student)
    teacher, _ = load_model(config.teacher)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    task = task_from_config(config.data, 0)
    times = []
    for step in range(steps):
        ids_BP, mask_BP = left_pad(
            encode_prompts(tokenizer, task.train.batch(step, 16)), tokenizer.pad_token_id
        )
        started = time.perf_counter()
        student.eval()
        rollout = generate(
            student, ids_BP, mask_BP, max_new_tokens=length, end_ids=(), pad_id=tokenizer.pad_token_id
        )
        student.train()
        with torch.inference_mode():
            teacher_logits_BTV = completion_logits(teacher, rollout)
        divergence_BT = generalized_jsd(completion_logits(student, rollout), teacher_logits_BTV.clone(), 1.0)
        mask_BT = rollout.loss_mask_BT
        Normalizer("token-mean", float(mask_BT.sum()), 16.0)(divergence_BT, mask_BT).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    print(statistics.median(times[warmup:]))


if __name__ == "__main__":
    main()
