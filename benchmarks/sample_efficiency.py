"""Sample efficiency on the built-in task: student training FLOPs to reach 90% of the teacher's held-out
accuracy, for OPD, SFT on teacher samples and RLVR (GRPO on the verifier, no teacher term).

    python benchmarks/sample_efficiency.py [--steps 400] [--eval-every 10] [--eval-size 1000] [--seeds 0 1 2]
    python benchmarks/sample_efficiency.py --quick      # smoke run: 150 steps, seed 0, ~2 min
    python benchmarks/sample_efficiency.py --methods rlvr_lr1e-3 --seeds 0   # the RLVR lr probe

Every run is `configs/distill_addition.yaml` (the shipped 34k-parameter student warm start, the shipped
133k-parameter teacher, addition with 4 digits, temperature-1 rollouts of at most 52 tokens, AdamW lr 1e-3,
10 warmup steps then cosine to 10% over --steps, grad clip 1) with the method's overrides below, 64
sequences per optimizer step for every method, and a greedy evaluation on the first --eval-size held-out
problems every --eval-every steps. The target is 0.9 x the teacher's greedy accuracy on the same problems.

Student FLOPs (N = the student's total parameter count, embedding included; it is tied to the LM head, so
its N also pays for the head's matmul), from the cumulative counters in each run's metrics.jsonl:
  6 N x student_train_tokens    forward + backward; train.py counts every non-pad token of each trained
                                sequence, prompt included (rollout.attention_mask)
  2 N x student_sampled_tokens  KV-cached decoding: one forward per sampled token (completion tokens up to
                                and including EOS; decode steps of rows already past their EOS not counted)
  2 N x prompt tokens           the sampler's prefill; on-policy the trained rows are the sampled rows, so
                                it is student_train_tokens - student_sampled_tokens
No method here runs an extra no-grad student forward (that happens only for TIP, Prune, KAT, SEAD, SCOPE,
student-side top-K teacher requests and diagnostics, all off). The attention-score FLOPs (~4 x layers x
context x hidden per token) are ignored, as in the usual 6N rule. Evaluation is not training compute.
Teacher FLOPs = 2 N_teacher x (teacher_scored_tokens + teacher_generated_tokens), reported separately: OPD's
scoring forward every step, SFT's pool generation (paid once, before step 1, prompt prefill included).
RLVR needs no teacher, but the loop still runs the teacher's scoring forward (kl_coef=0 multiplies its
log-ratio by zero), so that compute is shown as "ran, not needed".

Run directories go under --out; a run whose result.json exists is reused, not rerun. The Markdown report
and the plot go to --report(.md, .png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from opdistill.config import Config, ModelSpec, load_config
from opdistill.data.tasks import task_from_config
from opdistill.models import load_model
from opdistill.observe.evaluate import evaluate
from opdistill.observe.flops import FlopCounter
from opdistill.training import loop

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "distill_addition.yaml"
THREADS = 2
TARGET_FRACTION = 0.9
RLVR = [
    "objective.type=sampled_rkl",
    "objective.kl_coef=0",  # the teacher's log-ratio advantage times 0: no teacher term
    "objective.grpo_coef=1",  # + the GRPO advantage of the verifier's reward
    "rollout.n_per_prompt=4",
    "train.prompts_per_step=16",  # 16 prompts x 4 samples = 64 sequences, as the others
]
# name -> (label, what it trains on, overrides of configs/distill_addition.yaml)
METHODS: dict[str, tuple[str, str, list[str]]] = {
    "opd": ("OPD (full_rkl)", "student samples, teacher scores every token", ["objective.type=full_rkl"]),
    "sft_pool": (
        "SFT on teacher pool",
        "cross-entropy on 4,096 greedy teacher completions, reused",
        ["objective.type=sft", "data.completions=teacher_pool"],
    ),
    # at the shared lr 1e-3 GRPO collapsed (0.706 -> 0.19 held-out at step 10, 0.006 at step 20): 3e-4 is the
    # repository's policy-gradient lr (benchmarks/objectives.py)
    "rlvr": (
        "RLVR (GRPO, no teacher)",
        "student samples, verifier reward, GRPO G=4",
        [*RLVR, "optim.lr=3e-4"],
    ),
    "rlvr_lr1e-3": ("RLVR at lr 1e-3", "as rlvr, at the shared lr (not run by default)", RLVR),
}
DEFAULT_METHODS = ["opd", "sft_pool", "rlvr"]
COLORS = {"opd": "tab:blue", "sft_pool": "tab:orange", "rlvr": "tab:green", "rlvr_lr1e-3": "tab:red"}


def run_config(method: str, seed: int, args: argparse.Namespace) -> Config:
    return load_config(
        BASE_CONFIG,
        [
            *METHODS[method][2],
            f"train.steps={args.steps}",
            f"train.seed={seed}",
            f"train.eval_every={args.eval_every}",
            f"train.eval_size={args.eval_size}",
            "train.diagnostics_every=0",
            "train.save_every=0",
            f"train.out_dir={args.out / f'{method}-seed{seed}'}",
            f"train.threads={THREADS}",
        ],
    )


def param_count(path: str) -> int:
    model, _ = load_model(ModelSpec(path=path))
    return sum(p.numel() for p in model.parameters())


def teacher_accuracy(config: Config, eval_size: int) -> float:
    """The teacher's greedy accuracy on the same held-out problems the runs are evaluated on."""
    model, tokenizer = load_model(config.teacher)
    task = task_from_config(config.data, config.train.seed)
    result = evaluate(
        model, tokenizer, task.test[:eval_size], task.verify, max_new_tokens=config.rollout.max_new_tokens
    )
    return result["greedy_acc"]


def run_method(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or reuse) one run; return its eval curve with cumulative FLOPs at each evaluated step."""
    config = run_config(method, seed, args)
    out = Path(config.train.out_dir)
    reused = (out / "result.json").is_file()
    if not reused:
        if out.exists():
            sys.exit(f"{out} holds an unfinished run: remove it or choose another --out.")
        started = time.perf_counter()
        result = loop.run(config, show_progress=False)
        result = {k: result[k] for k in ("steps", "elapsed_s", "final_eval", *loop.COUNTERS)}
        result["wall_s"] = time.perf_counter() - started  # evaluation included
        (out / "result.json").write_text(json.dumps(result, indent=2))
    result = json.loads((out / "result.json").read_text())
    flops = FlopCounter(args.student_params, args.teacher_params)
    rows = {0: dict.fromkeys(loop.COUNTERS, 0)}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[record["step"]] = record
    curve = []
    for line in (out / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        row = rows[record["step"]]
        curve.append(
            {
                "step": record["step"],
                "acc": record["greedy_acc"],
                "student_flops": flops.student(row),
                "teacher_flops": flops(row)["teacher_flops"],
            }
        )
    return {
        **result,
        "method": method,
        "seed": seed,
        "curve": curve,
        "reused": reused,
        "teacher_flops_total": flops(rows[max(rows)])["teacher_flops"],
    }


def first_reach(run: dict, target: float) -> dict | None:
    """The first evaluation (after step 0) at or above the target."""
    return next((p for p in run["curve"] if p["step"] > 0 and p["acc"] >= target), None)


def settled_reach(run: dict, target: float) -> dict | None:
    """The first evaluation from which every later one is at or above the target (less noise-driven)."""
    settled = None
    for point in run["curve"]:
        settled = (settled or point) if point["acc"] >= target and point["step"] > 0 else None
    return settled


def fmt_flops(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def summarise(hits: list[dict | None], key: str) -> str:
    """'median (a / b / c)' over seeds, or 'not reached in budget (k/n seeds)' when a seed missed."""
    reached = [h[key] for h in hits if h is not None]
    per_seed = " / ".join("not reached" if h is None else fmt_flops(h[key]) for h in hits)
    if len(reached) < len(hits):
        seeds = f" ({len(reached)}/{len(hits)} seeds: {per_seed})" if len(hits) > 1 else ""
        return f"not reached in budget{seeds}"
    return f"**{fmt_flops(statistics.median(reached))}**" + (f" ({per_seed})" if len(hits) > 1 else "")


def table(runs: list[dict], target: float) -> list[str]:
    lines = [
        "| method | student FLOPs to target: median (per seed) | step reached | student FLOPs from which it "
        "stays ≥ target | final acc | steps | train s / wall s | teacher FLOPs to target | teacher FLOPs, "
        "whole run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        first = [first_reach(r, target) for r in group]
        settled = [settled_reach(r, target) for r in group]
        at_step = " / ".join("—" if h is None else str(h["step"]) for h in first)
        finals = " / ".join(f"{r['final_eval']['greedy_acc']:.3f}" for r in group)
        seconds = (
            f"{statistics.mean(r['elapsed_s'] for r in group):.0f} / "
            f"{statistics.mean(r['wall_s'] for r in group):.0f}"
        )
        teacher_total = statistics.mean(r["teacher_flops_total"] for r in group)
        if method.startswith("rlvr"):  # the loop's scoring forward, multiplied by kl_coef = 0
            teacher_to_target, teacher_run = (
                "0 (none needed)",
                f"0 needed ({fmt_flops(teacher_total)} ran, unused)",
            )
        else:
            teacher_to_target, teacher_run = summarise(first, "teacher_flops"), fmt_flops(teacher_total)
        lines.append(
            f"| {METHODS[method][0]} | {summarise(first, 'student_flops')} | {at_step} "
            f"| {summarise(settled, 'student_flops')} | {finals} | {group[0]['steps']} | {seconds} "
            f"| {teacher_to_target} | {teacher_run} |"
        )
    return lines


def plot(runs: list[dict], target: float, teacher_acc: float, start_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = [
        ("student training FLOPs (6N·trained + 2N·sampled tokens)", lambda p: p["student_flops"]),
        ("student + teacher FLOPs the method needs", lambda p: p["student_flops"] + p["teacher_flops"]),
    ]
    for ax, (xlabel, x_of) in zip(axes, panels, strict=True):
        labelled = set()
        for run in runs:
            method = run["method"]
            needs_teacher = not method.startswith("rlvr")
            points = [p for p in run["curve"] if p["step"] > 0]  # step 0 has 0 FLOPs: off a log axis
            xs = [x_of(p) if needs_teacher else p["student_flops"] for p in points]
            label = None if method in labelled else METHODS[method][0]
            labelled.add(method)
            ax.plot(
                xs,
                [p["acc"] for p in points],
                color=COLORS[method],
                lw=1.2,
                alpha=0.8,
                marker=".",
                ms=3,
                label=label,
            )
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target 0.9 × teacher = {target:.3f}")
        ax.axhline(teacher_acc, color="gray", ls="-", lw=0.8, label=f"teacher {teacher_acc:.3f}")
        ax.axhline(start_acc, color="gray", ls=":", lw=1, label=f"student warm start {start_acc:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out greedy accuracy")
    lowest = min([start_acc, *(p["acc"] for run in runs for p in run["curve"])])
    axes[0].set_ylim(max(0.0, lowest - 0.03), 1.005)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title("accuracy vs student training compute")
    axes[1].set_title("incl. teacher compute (SFT: pool paid before step 1)")
    seeds = sorted({r["seed"] for r in runs})
    fig.suptitle(f"addition (4 digits), 34k student, 133k teacher; one line per seed ({len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def lr_probe_note(args: argparse.Namespace) -> str:
    """Why RLVR runs at lr 3e-4: the runs of `--methods rlvr_lr1e-3` under --out, when they exist."""
    probes = sorted(args.out.glob("rlvr_lr1e-3-seed*/eval.jsonl"))
    if not probes:
        return "RLVR runs at lr 3e-4 (the others at 1e-3); `--methods rlvr_lr1e-3` runs it at 1e-3."
    parts = []
    for path in probes:
        curve = [json.loads(line) for line in path.read_text().splitlines()]
        low = min(curve, key=lambda r: r["greedy_acc"])
        parts.append(
            f"{path.parent.name}: {curve[0]['greedy_acc']:.3f} at step 0, {low['greedy_acc']:.3f} at "
            f"step {low['step']}, {curve[-1]['greedy_acc']:.3f} at step {curve[-1]['step']}"
        )
    return (
        "RLVR runs at lr 3e-4 (the others at 1e-3) because at 1e-3 it collapses: `--methods rlvr_lr1e-3` "
        f"(same budget) gave {'; '.join(parts)}."
    )


def machine() -> str:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{THREADS} torch threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per run (the cosine spans them)"
    )
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out problems per evaluation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/sample_efficiency"))
    parser.add_argument(
        "--report",
        type=Path,
        default=REPO / "benchmarks" / "sample_efficiency",
        help="writes REPORT.md and REPORT.png",
    )
    parser.add_argument("--quick", action="store_true", help="150 steps, eval every 25 on 500, seed 0")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_size, args.seeds = 150, 25, 500, [0]
        args.out = Path("runs/sample_efficiency-quick")
        if "--report" not in sys.argv:
            args.report = args.out / "sample_efficiency"
    torch.set_num_threads(THREADS)
    started, load_before = time.perf_counter(), os.getloadavg()

    base = run_config("opd", args.seeds[0], args)
    args.student_params = param_count(base.student.path)
    args.teacher_params = param_count(base.teacher.path)
    teacher_acc = teacher_accuracy(base, args.eval_size)
    target = TARGET_FRACTION * teacher_acc
    print(
        f"teacher {teacher_acc:.3f} on {args.eval_size} held-out problems -> target {target:.4f}", flush=True
    )

    runs = []
    for seed in args.seeds:
        for method in args.methods:
            run = run_method(method, seed, args)
            hit = first_reach(run, target)
            reach = "not reached" if hit is None else f"step {hit['step']}, {hit['student_flops']:.2e} FLOPs"
            print(
                f"{method} seed {seed}: final {run['final_eval']['greedy_acc']:.3f}, target {reach}, "
                f"{run['elapsed_s']:.0f} s training",
                flush=True,
            )
            runs.append(run)
    start_acc = runs[0]["curve"][0]["acc"]
    reused = sum(run["reused"] for run in runs)

    args.report.parent.mkdir(parents=True, exist_ok=True)
    png = args.report.with_suffix(".png")
    plot(runs, target, teacher_acc, start_acc, png)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    per_method = "\n".join(
        f"* `{name}` — {METHODS[name][1]}: `{' '.join(METHODS[name][2])}`" for name in args.methods
    )
    table_lines = table(runs, target)
    probe_note = lr_probe_note(args) if "rlvr" in args.methods else ""
    report = [
        "# Sample efficiency: student FLOPs to 90% of the teacher's accuracy (addition, 4 digits)",
        "",
        f"`{command}`, run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{(time.perf_counter() - started) / 60:.1f} min in all "
        f"({reused} of {len(runs)} runs reused from `{args.out}`).",
        "",
        f"Machine: {machine()}. Shared with other jobs: load average {load_before[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, so seconds are noisy; the comparison is in FLOPs.",
        "",
        f"Every run: `configs/distill_addition.yaml` + `train.steps={args.steps} train.seed=S "
        f"train.eval_every={args.eval_every} train.eval_size={args.eval_size} train.diagnostics_every=0 "
        f"train.save_every=0 train.threads={THREADS}`, 64 sequences per step, seeds {args.seeds}. "
        "Per method:",
        "",
        per_method,
        "",
        f"Student {args.student_params:,} parameters (N, total, embedding included), teacher "
        f"{args.teacher_params:,}. Teacher greedy accuracy on the {args.eval_size} held-out problems: "
        f"**{teacher_acc:.3f}**, so the target is **{target:.4f}**; the student starts at {start_acc:.3f}.",
        "",
        "Student FLOPs = 6N × trained tokens (prompt included) + 2N × student-sampled tokens + 2N × the "
        "sampler's prompt prefill, from metrics.jsonl's cumulative counters; evaluation excluded; "
        "attention-score "
        'FLOPs ignored. "To target" = at the first evaluation (every '
        f"{args.eval_every} steps) with greedy accuracy ≥ the target, so it overstates by up to "
        f"{args.eval_every} steps' compute; with {args.eval_size} problems one evaluation's binomial "
        "noise near "
        f"0.9 is ±{100 * (0.09 / args.eval_size) ** 0.5:.1f} points. Teacher FLOPs = 2 N_teacher × tokens it "
        "scored or generated. `train s` is training time (evaluation excluded; SFT's includes making "
        "the pool).",
        "",
        *table_lines,
        "",
        *([probe_note, ""] if probe_note else []),
        f"![accuracy vs student FLOPs]({png.name})",
        "",
    ]
    args.report.with_suffix(".md").write_text("\n".join(report))
    print("\n".join(table_lines))
    print(f"wrote {args.report.with_suffix('.md')} and {png}")


if __name__ == "__main__":
    main()
