"""S7: is successful OPD marked by progressive alignment on a small shared set of high-probability tokens?
Rethinking OPD (Li, Zuo, He et al. 2026) finds that at the student's own states the student's and the
teacher's top-k sets come to share most ids, and that the shared ids carry 97–99% of both models'
probability mass, while failing runs show no such alignment (docs/science.md, docs/metrics.md#diagnostics).

    python benchmarks/science/s7_shared_mass.py [--budget-flops 7.2e11] [--seed 0]
    python benchmarks/science/s7_shared_mass.py --smoke      # the machinery at a tiny size (tests)

Three runs of S8 (s8_conditions.py: the same configs, so `--out runs/science/s8` reuses S8's runs), each
with the recipe of `opd demo` and the same --budget-flops on 4-digit addition:
  control  the shipped 34k-parameter student warm start and 133k-parameter teacher: OPD that succeeds
  swap     the same student under a teacher of equal quality that writes each step's operands swapped
  tiny     a fresh 1k-parameter student (d8l1) under the shipped teacher: too small for the task
The diagnostics every --diagnostics-every (5) steps, at top-k with k = 3 of the 18 tokens (objective.topk,
which the full reverse-KL loss does not read), log overlap = |S_p ∩ S_q| / k, overlap_mass_student = Σ p
and overlap_mass_teacher = Σ q over the shared ids, and overlap_advantage (≤ 0, → 0 as the student
aligns).
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import s8_conditions as s8

NAMES = ["control", "swap", "tiny"]
KEYS = {  # diagnostics key: column / axis label
    "overlap_mass_student": "shared mass, student Σp",
    "overlap_mass_teacher": "shared mass, teacher Σq",
    "overlap": "top-k overlap (shared ids / k)",
    "overlap_advantage": "overlap advantage",
}
BAND = 0.97  # the paper's successful runs: 97–99% of the mass on the shared ids


def diagnostics(run: common.Run) -> list[dict]:
    return [m for m in run.metrics if "overlap_mass_student" in m]


def analyse(runs: dict[str, common.Run], last: int = 5) -> list[dict]:
    """Per run: accuracy at its first and last evaluation; each diagnostic at the first diagnostics step and
    averaged over the last ``last``; and the FLOPs at which both shared masses first reached BAND (None:
    never)."""
    rows = []
    for name, run in runs.items():
        diag = diagnostics(run)
        tail = diag[-last:]
        reached = next(
            (m["flops"] for m in diag if min(m["overlap_mass_student"], m["overlap_mass_teacher"]) >= BAND),
            None,
        )
        rows.append(
            {
                "run": name,
                "acc": (run.evals[0]["greedy_acc"], run.evals[-1]["greedy_acc"]),
                **{key: (diag[0][key], s8.mean([m[key] for m in tail])) for key in KEYS},
                "reached": reached,
            }
        )
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | accuracy | " + " | ".join(KEYS.values()) + f" | both masses ≥ {BAND:.0%} first at |",
        "|---|---|" + "---|" * len(KEYS) + "---|",
    ]
    for row in rows:
        a0, a1 = row["acc"]
        cells = [f"{row[key][0]:.3f} → {row[key][1]:.3f}" for key in KEYS]
        reached = "never" if row["reached"] is None else f"{row['reached']:.2e} FLOPs"
        lines.append(
            f"| {s8.METHODS[row['run']][0]} | {a0:.3f} → {a1:.3f} | {' | '.join(cells)} | {reached} |"
        )
    return lines


def plot(runs: dict[str, common.Run], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    acc, mass, overlap, advantage = axes
    for name, run in runs.items():
        label, color = s8.METHODS[name][0], s8.COLORS[name]
        acc.plot(
            [e["flops"] for e in run.evals], [e["greedy_acc"] for e in run.evals], ".-", c=color, label=label
        )
        diag = diagnostics(run)
        flops = [m["flops"] for m in diag]
        mass.plot(
            flops, [m["overlap_mass_student"] for m in diag], "-", c=color, label=f"{label}: student Σp"
        )
        mass.plot(
            flops, [m["overlap_mass_teacher"] for m in diag], ":", c=color, label=f"{label}: teacher Σq"
        )
        overlap.plot(flops, [m["overlap"] for m in diag], "-", c=color, label=label)
        advantage.plot(flops, [m["overlap_advantage"] for m in diag], "-", c=color, label=label)
    mass.axhline(BAND, color="black", lw=0.8, ls="--")
    acc.set_ylabel("held-out greedy accuracy")
    mass.set_ylabel(f"mass on the shared top-{s8.K} ids")
    overlap.set_ylabel(KEYS["overlap"])
    advantage.set_ylabel("overlap advantage (≤ 0; 0 = aligned)")
    common.finish(fig, axes, "student + teacher FLOPs", path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = s8.options(__doc__, "s7_shared_mass")
    args = parser.parse_args(argv)
    s8.prepare(args)
    started = time.perf_counter()
    runs, _ = s8.train_runs(args.out, args.teachers, NAMES, args)
    rows = analyse(runs)
    plot(runs, args.report.with_suffix(".png"))
    summary = (
        f"Budget {args.budget_flops:.2e} FLOPs per run; {args.eval_size} held-out problems (greedy); seed "
        f"{args.seed}; diagnostics every {args.diagnostics_every} steps at top-{s8.K}, on each step's own "
        "rollouts before its update. Arrows: the first diagnostics step → the mean of the last five "
        "(accuracy: step 0 → the end of the budget). Steps: "
        + ", ".join(f"{n} {runs[n].result['steps']}" for n in NAMES)
        + "."
    )
    common.write(
        args.report, "S7: the shared top-k mass at student-visited states", started, summary, table(rows)
    )
    return rows


if __name__ == "__main__":
    main()
