"""S2: does reverse KL collapse the student's diversity, and does a forward-KL blend restore it? The student's
high-entropy-token rate against the teacher's at the same states, and pass@1 against pass@k over training,
for reverse KL, JSD(β) and entropy-aware OPD (docs/science.md).

    python benchmarks/science/s2_diversity.py [--budget-flops 7.2e11] [--samples 8] [--seed 0]
    python benchmarks/science/s2_diversity.py --smoke      # the machinery at a tiny size (tests)

Every run starts from the shipped 34k-parameter student warm start with the shipped 133k-parameter teacher
on 4-digit addition (a fresh problem every time), the recipe of `opd demo`, and stops at the same
--budget-flops. Methods:
  rkl   full-vocabulary reverse KL (mode-seeking)
  jsd   generalised JSD with β = 0.5 (TRL convention: 0 = forward KL, 1 = reverse KL), GKD's blend
  eopd  reverse KL plus α = 1 x forward KL on the teacher's top-K where the teacher's entropy exceeds
        0.8 nats (EOPD, weighting.eopd_coef)
The diagnostics (every 10 steps) log each model's share of tokens above 0.8 nats at the student's sampled
states (student_high_entropy_rate, teacher_high_entropy_rate); each evaluation samples --samples
completions per held-out problem at temperature 1 for pass@1 and pass@k (k = --samples, unbiased) and the
number of distinct final answers per problem.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

METHODS = {
    "rkl": ("reverse KL", ["objective.type=full_rkl"]),
    "jsd": ("JSD, β = 0.5", ["objective.type=jsd", "objective.jsd_beta=0.5"]),
    "eopd": ("entropy-aware (EOPD)", ["objective.type=full_rkl", "weighting.eopd_coef=1.0"]),
}
COLORS = {"rkl": "tab:blue", "jsd": "tab:orange", "eopd": "tab:green"}


def run_config(out: Path, method: str, args: argparse.Namespace):
    return common.config(
        out / method,
        [
            *METHODS[method][1],
            *common.budget(args.budget_flops, args.evals),
            f"train.eval_size={args.eval_size}",
            f"train.eval_samples={args.samples}",
            "train.diagnostics_every=10",
            f"train.seed={args.seed}",
            *args.override,
        ],
    )


def entropy_rates(run: common.Run, last: int = 5) -> tuple[float, float]:
    """Mean student and teacher high-entropy-token rates over the last ``last`` diagnostics steps."""
    rows = [m for m in run.metrics if "student_high_entropy_rate" in m][-last:]
    return (
        sum(m["student_high_entropy_rate"] for m in rows) / len(rows),
        sum(m["teacher_high_entropy_rate"] for m in rows) / len(rows),
    )


def analyse(runs: dict[str, common.Run], k: int) -> list[dict]:
    rows = []
    for method, run in runs.items():
        first, last = run.evals[0], run.evals[-1]
        student, teacher = entropy_rates(run)
        rows.append(
            {
                "method": method,
                "greedy": (first["greedy_acc"], last["greedy_acc"]),
                "pass1": (first["pass@1"], last["pass@1"]),
                "passk": (first[f"pass@{k}"], last[f"pass@{k}"]),
                "distinct": (first["distinct_answers"], last["distinct_answers"]),
                "her": (student, teacher),
            }
        )
    return rows


def table(rows: list[dict], k: int) -> list[str]:
    lines = [
        f"| method | greedy | pass@1 | pass@{k} | pass@{k} − pass@1 | distinct answers / problem "
        "| high-entropy rate, student / teacher (last 5 diagnostics) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        (g0, g1), (p0, p1), (k0, k1), (d0, d1) = row["greedy"], row["pass1"], row["passk"], row["distinct"]
        student, teacher = row["her"]
        lines.append(
            f"| {METHODS[row['method']][0]} | {g0:.3f} → {g1:.3f} | {p0:.3f} → {p1:.3f} "
            f"| {k0:.3f} → {k1:.3f} | {k0 - p0:.3f} → {k1 - p1:.3f} | {d0:.2f} → {d1:.2f} "
            f"| {student:.1%} / {teacher:.1%} |"
        )
    return lines


def plot(runs: dict[str, common.Run], k: int, path: Path) -> None:
    plt = common.pyplot()
    fig, (acc, gap, her) = plt.subplots(1, 3, figsize=(14, 4))
    for method, run in runs.items():
        name, color = METHODS[method][0], COLORS[method]
        flops = [e["flops"] for e in run.evals]
        acc.plot(flops, [e["pass@1"] for e in run.evals], ".-", color=color, label=f"{name} pass@1")
        acc.plot(flops, [e[f"pass@{k}"] for e in run.evals], ".--", color=color, label=f"{name} pass@{k}")
        gap.plot(flops, [e[f"pass@{k}"] - e["pass@1"] for e in run.evals], ".-", color=color, label=name)
        diag = [m for m in run.metrics if "student_high_entropy_rate" in m]
        xs = [m["flops"] for m in diag]
        her.plot(
            xs, [m["student_high_entropy_rate"] for m in diag], "-", color=color, label=f"{name} student"
        )
        her.plot(
            xs, [m["teacher_high_entropy_rate"] for m in diag], ":", color=color, label=f"{name} teacher"
        )
    acc.set_ylabel("held-out accuracy (sampled, T = 1)")
    gap.set_ylabel(f"pass@{k} − pass@1 (what sampling adds)")
    her.set_ylabel("share of tokens above 0.8 nats, at the student's states")
    common.finish(fig, (acc, gap, her), "student + teacher FLOPs", path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__doc__, "s2_diversity")
    parser.add_argument("--budget-flops", type=float, default=7.2e11, help="per run: about 400 steps")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--samples", type=int, default=8, help="samples per problem: pass@1 .. pass@k")
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget_flops, args.evals, args.eval_size, args.samples = 2e9, 2, 10, 2
        args.override = [*args.override, "train.prompts_per_step=8", "train.diagnostics_every=1"]
    started = time.perf_counter()
    runs = {method: common.train(method, run_config(args.out, method, args)) for method in METHODS}
    rows = analyse(runs, args.samples)
    lines = table(rows, args.samples)
    plot(runs, args.samples, args.report.with_suffix(".png"))
    summary = (
        f"Budget {args.budget_flops:.2e} FLOPs per run; {args.eval_size} held-out problems, {args.samples} "
        f"samples each at T = 1; seed {args.seed}; steps: "
        + ", ".join(f"{m} {runs[m].result['steps']}" for m in METHODS)
        + ". Arrows: warm start → end of the budget."
    )
    common.write(
        args.report, "S2: diversity under reverse KL, JSD and entropy-aware OPD", started, summary, lines
    )
    return rows


if __name__ == "__main__":
    main()
