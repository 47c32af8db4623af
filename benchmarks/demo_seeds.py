"""Run `opd demo` for several seeds (one after another, nothing else running) and print a Markdown table.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/bench-demo \\
        [--teacher DIR] [--budget-flops 7.2e11] [--prompts 256]

Rows come from each run's summary.json; README.md and benchmarks/RESULTS.md quote this output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-demo"))
    parser.add_argument("--budget-flops", type=float, default=7.2e11)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument(
        "--prompts", type=int, default=256, help="training prompts (0: a fresh one every time)"
    )
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        if not (run_dir / "summary.json").is_file():
            command = [
                sys.executable,
                "-m",
                "opdistill.cli",
                "demo",
                "--seed",
                str(seed),
                "--out",
                str(run_dir),
                "--budget-flops",
                str(args.budget_flops),
                "--prompts",
                str(args.prompts),
            ]
            if args.teacher:
                command += ["--teacher", str(args.teacher)]
            subprocess.run(command, check=True)
        s = json.loads((run_dir / "summary.json").read_text())
        steps = " / ".join(str(s["compute"][name]["steps"]) for name in ("opd", "sft", "sft_pool"))
        train_s = " / ".join(f"{s['compute'][name]['elapsed_s']:.0f}" for name in ("opd", "sft", "sft_pool"))
        rows.append(
            f"| {seed} | {s['teacher_acc']:.3f} | {s['student_before_acc']:.3f} | **{s['opd_acc']:.3f}** | "
            f"{s['sft_acc']:.3f} | {s['sft_pool_acc']:.3f} | {steps} | {train_s} s | {s['wall_s']:.0f} s |"
        )
    print(
        f"teacher {s['teacher_params'] / 1e3:.0f}k params, student {s['student_params'] / 1e3:.0f}k params, "
        f"{args.budget_flops:.2g} FLOPs of training per method, "
        f"{args.prompts or 'unlimited'} training prompts, "
        f"{s['eval_problems']} held-out problems"
    )
    print(
        "| seed | teacher | student before | **opd** | sft (fresh samples) | sft_pool "
        "| opd / sft / sft_pool steps | training time | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
