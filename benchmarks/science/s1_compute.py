"""S1: where is OPD cheaper than off-policy distillation? Compute (student + teacher FLOPs) to reach the
best score SFT on teacher samples reaches, over the number of distinct training prompts (docs/science.md).

    python benchmarks/science/s1_compute.py [--prompts 64 256 1024 0] [--budget-flops 7.2e11] [--seed 0]
    python benchmarks/science/s1_compute.py --smoke      # the machinery at a tiny size (tests)

Every run starts from the shipped 34k-parameter student warm start with the shipped 133k-parameter teacher
on 4-digit addition written with its carry chain (about 42 tokens an answer), the recipe of `opd demo`
(AdamW 1e-3, cosine to 10%, 64 sequences a step), and stops when its counted FLOPs (observe/flops.py:
6N per trained token, 2N per sampled or prefilled token, 2N_teacher per token the teacher scores or writes)
reach the same --budget-flops. Methods:
  opd       the student samples (temperature 1), the teacher scores every token: full-vocabulary reverse KL
  sft       SFT on fresh teacher samples (temperature 1) of the step's prompts, paid every step
  sft_pool  SFT on a cached pool of the teacher's greedy completions of the training prompts, reused
--prompts restricts every method to the first P training problems (0 = a fresh problem every time; the
pool then holds 4,096). The target for each P is the best held-out accuracy either SFT reached in the
budget (the Thinking Machines accounting: OPD's compute to the SFT run's score); "x cheaper" is SFT's
compute to that score over OPD's. The same runs re-priced with a teacher 10x and 100x larger (its FLOPs
scaled; the student's learning unchanged) give the teacher-size axis.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

METHODS = {
    "opd": ("OPD (full_rkl)", ["objective.type=full_rkl"]),
    "sft": (
        "SFT, fresh teacher samples",
        ["objective.type=sft", "data.completions=teacher", "data.teacher_temperature=1.0"],
    ),
    "sft_pool": ("SFT, reused teacher pool", ["objective.type=sft", "data.completions=teacher_pool"]),
}
COLORS = {"opd": "tab:blue", "sft": "tab:orange", "sft_pool": "tab:green"}
# FLOPs per token of each method's step with the shipped pair (8N+2N_t, 6N+2N_t, 6N; N=33.5k, N_t=133k):
# sets how often each evaluates, so every curve has about --evals points
COST = {"opd": 8 * 33_504 + 2 * 133_008, "sft": 6 * 33_504 + 2 * 133_008, "sft_pool": 6 * 33_504}
TOKENS_PER_STEP = 64 * 53
PRICES = (1, 10, 100)  # the teacher's FLOPs re-priced at this multiple of the shipped teacher's


def run_config(out: Path, method: str, prompts: int, args: argparse.Namespace):
    return common.config(
        out / f"{method}-p{prompts}",
        [
            *METHODS[method][1],
            f"data.n_train_prompts={prompts}",
            f"data.pool_size={prompts or 4096}",
            *common.budget(args.budget_flops, args.evals, COST[method] * TOKENS_PER_STEP),
            f"train.eval_size={args.eval_size}",
            f"train.seed={args.seed}",
            *args.override,
        ],
    )


def cost_to(run: common.Run, target: float, price: float) -> float | None:
    """FLOPs (teacher's at ``price`` times its size) at the run's first evaluation at or above ``target``."""
    hit = run.first_reach(target)
    return None if hit is None else hit["student_flops"] + price * hit["teacher_flops"]


def analyse(runs: dict[tuple[str, int], common.Run], prompts: list[int]) -> list[dict]:
    rows = []
    for p in prompts:
        sft = max((runs["sft", p], runs["sft_pool", p]), key=lambda r: r.best())
        target = sft.best()
        row = {"prompts": p, "target": target, "sft_best": sft.name, "final": {}, "cheaper": {}}
        for method in METHODS:
            row["final"][method] = runs[method, p].final()
        for price in PRICES:
            opd_cost, sft_cost = cost_to(runs["opd", p], target, price), cost_to(sft, target, price)
            row["cheaper"][price] = None if opd_cost is None or sft_cost is None else sft_cost / opd_cost
        rows.append(row)
    return rows


def label(p: int) -> str:
    return "unlimited" if p == 0 else str(p)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| training prompts | opd final | sft final | sft_pool final | target (best SFT) | OPD x cheaper, "
        + " | ".join(f"teacher x{price}" for price in PRICES)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(PRICES),
    ]
    for row in rows:
        finals = " | ".join(f"{row['final'][m]:.3f}" for m in METHODS)
        cheaper = " | ".join("not reached" if c is None else f"**{c:.2f}x**" for c in row["cheaper"].values())
        lines.append(
            f"| {label(row['prompts'])} | {finals} | {row['target']:.3f} ({row['sft_best']}) | {cheaper} |"
        )
    return lines


def plot(runs, rows, prompts, path: Path, teacher_acc: float) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(prompts) + 1, figsize=(4 * (len(prompts) + 1), 4))
    for ax, p in zip(axes, prompts, strict=False):
        for method, (name, _) in METHODS.items():
            run = runs[method, p]
            ax.plot(
                [e["flops"] for e in run.evals],
                [e["greedy_acc"] for e in run.evals],
                ".-",
                ms=3,
                color=COLORS[method],
                label=name,
            )
        ax.axhline(teacher_acc, color="gray", lw=0.8, label=f"teacher {teacher_acc:.3f}")
        ax.set_title(f"{label(p)} training prompts")
        ax.set_xlabel("student + teacher FLOPs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy")
    axes[0].legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    xs = range(len(prompts))
    for price in PRICES:
        ys = [row["cheaper"][price] or 0.0 for row in rows]
        ax.plot(xs, ys, "o-", label=f"teacher x{price} (re-priced)")
    ax.axhline(1.0, color="black", ls="--", lw=1, label="break-even")
    ax.set_xticks(list(xs), [label(p) for p in prompts])
    ax.set_yscale("log")
    ax.set_xlabel("distinct training prompts")
    ax.set_ylabel("SFT compute / OPD compute to SFT's best (0: OPD never reached it)")
    ax.set_title("where OPD is cheaper (> 1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.parser(__doc__, "s1_compute", smoke="tiny: 2 prompt counts, a few steps each")
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 256, 1024, 0])
    parser.add_argument("--budget-flops", type=float, default=7.2e11, help="per run: about 400 OPD steps")
    parser.add_argument("--evals", type=int, default=16, help="evaluations per run")
    parser.add_argument("--eval-size", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.budget_flops, args.evals, args.eval_size = [8, 0], 1.5e9, 2, 20
        args.override = [*args.override, "train.prompts_per_step=8", "data.pool_size=16"]
    started = time.perf_counter()
    runs = {
        (method, p): common.train(method, run_config(args.out, method, p, args))
        for p in args.prompts
        for method in METHODS
    }
    first = run_config(args.out, "opd", args.prompts[0], args)
    teacher_acc = common.accuracy(first.teacher.path, first, args.eval_size)["greedy_acc"]
    rows = analyse(runs, args.prompts)
    lines = table(rows)
    plot(runs, rows, args.prompts, args.report.with_suffix(".png"), teacher_acc)
    summary = (
        f"Budget {args.budget_flops:.2e} FLOPs per run (student + teacher, observe/flops.py); greedy "
        f"accuracy on {args.eval_size} held-out problems (teacher {teacher_acc:.3f}, warm start "
        f"{runs['opd', args.prompts[0]].evals[0]['greedy_acc']:.3f}); seed {args.seed}. Steps (opd / sft / "
        "sft_pool): "
        + "; ".join(
            f"{label(p)}: " + " / ".join(str(runs[m, p].result["steps"]) for m in METHODS)
            for p in args.prompts
        )
        + "."
    )
    title = "S1: compute to SFT's best score, OPD vs SFT on teacher samples"
    common.write(args.report, title, started, summary, lines)
    return rows


if __name__ == "__main__":
    main()
