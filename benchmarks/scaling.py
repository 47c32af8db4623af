"""Scaling: step time and peak memory against world size (torchrun, 1 and 2 CPU ranks) and response length.

    python benchmarks/scaling.py [--steps 12] [--warmup 3] [--lengths 32 64 128 256 512]

World size: `opd distill --config configs/distill_addition.yaml` (shipped student and teacher, 64 prompts
per step) in one process and under `torchrun --nproc_per_node=2` with DDP and FSDP2, same global batch;
each process gets 2 threads / world size, so both use the machine's 2 cores. Response length: a fresh
d64l2 student (it never says EOS, so every response is exactly max_new_tokens long) distilled from the
shipped teacher with 16 prompts per step, one process. Step time is the median `step_s` after --warmup;
peak memory is the largest resident set of any one process of the run (`getrusage` of the children).
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
    "train.eval_every=0", "train.eval_size=1", "train.diagnostics_every=0", "train.save_every=0",
    "rollout.max_new_tokens=52",
]  # fmt: skip


MEASURE = """import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def run(out: Path, overrides: list[str], world_size: int, steps: int) -> tuple[list[float], float]:
    """(step seconds, peak RSS in MB of the largest process) of one `opd distill` run in subprocesses."""
    shutil.rmtree(out, ignore_errors=True)
    threads = max(1, 2 // world_size)
    args = ["-m", "opdistill.cli", "distill", *overrides, f"train.steps={steps}", f"train.threads={threads}",
            f"train.out_dir={out}"]  # fmt: skip
    if world_size > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a fresh parent per run: ru_maxrss of its children is the largest process of this run alone
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, *args], check=True, env=env,
                          capture_output=True, text=True)  # fmt: skip
    peak_kb = int(done.stdout.split()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in rows], peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--out", default="runs/scaling")
    args = parser.parse_args()
    root = Path(args.out)

    print("| world size | parallel | median s/step | sequences/s | peak RSS per process (MB) |")
    print("|---|---|---|---|---|")
    addition = ["--config", "configs/distill_addition.yaml", *BASE]
    for world_size, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = root / f"world{world_size}-{parallel}"
        step_s, peak = run(out, [*addition, f"train.parallel={parallel}"], world_size, args.steps)
        median = statistics.median(step_s[args.warmup :])
        print(f"| {world_size} | {parallel if world_size > 1 else '-'} | {median:.3f} | {64 / median:.0f} | {peak:.0f} |",
              flush=True)  # fmt: skip

    print("\n| response tokens | median s/step | s per 1k tokens | peak RSS (MB) |")
    print("|---|---|---|---|")
    from opdistill.demo import asset_dir

    for length in args.lengths:
        overrides = [f"teacher.path={asset_dir('addition-teacher')}", "student.preset=d64l2", *BASE,
                     "train.prompts_per_step=16", f"rollout.max_new_tokens={length}"]  # fmt: skip
        step_s, peak = run(root / f"length{length}", overrides, 1, args.steps)
        median = statistics.median(step_s[args.warmup :])
        print(f"| {length} | {median:.3f} | {median / (16 * length) * 1000:.3f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
