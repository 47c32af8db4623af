"""S3: top-K reverse KL without the stop-gradient (topk_variant=raw) is biased and unstable; the fixed
variants are not, or less so (docs/science.md, docs/math.md §5).

    python benchmarks/science/s3_topk_bias.py [--budget-flops 5.4e11] [--train-k 4] [--seed 0]
    python benchmarks/science/s3_topk_bias.py --smoke      # the machinery at a tiny size (tests)

(A) Gradient bias at fixed states. From the shipped 34k-parameter student warm start and the shipped
133k-parameter teacher, --batches fixed batches of the student's own rollouts (--prompts prompts of 4-digit
addition each, temperature 1, seeded). At those states, the gradient with respect to every student parameter
of the full-vocabulary reverse KL (objective.type=full_rkl: what top-K approximates) and of top-K reverse KL
(objective.type=topk_rkl) for each variant and K in --ks, on the student's top-K ids (topk_support=student,
the default) and on the teacher's (teacher). Each gradient goes through the training step's own path: the
teacher's signal from ``batches.score``, the loss from ``objective_loss`` (``losses.topk_divergence`` /
``losses.generalized_jsd``) on the student's logits, the step's normaliser. Reported, averaged over the
batches: cosine(g_topk, g_full) and ||g_topk - g_full|| / ||g_full||. Variants (math.md §5.1):
  raw     T1  Σ_S p ℓ, no stop-gradient: its gradient adds ∇m_S, pushing mass out of S
  sg      T2  Σ_S p sg(ℓ): the exact reverse-KL gradient restricted to S (Many Faces' fix; the default)
  renorm  T3  KL of both distributions renormalised on S (LSM)
  tail    T4  KL over S plus one tail bucket (TRL)
  pg      T6  the student-weighted top-K policy gradient (thunlp)
At K = the vocabulary (18 ids) every variant is the full reverse KL.

(B) Training. From the same warm start, OPD with full_rkl and with topk_rkl at K = --train-k: raw, sg,
renorm and tail on the student's top-K, raw and sg on the teacher's; each to the same --budget-flops, with
the recipe of `opd demo` (a fresh problem every step). Greedy held-out accuracy and teacher_kl over FLOPs;
the spread of grad_norm; the mass the student keeps on its support (student_mass, logged by topk_rkl); the
alarms each run fired (alarms.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
import warnings
from pathlib import Path

import common
import torch

from opdistill.config import Config
from opdistill.data.rendering import encode_prompts
from opdistill.data.tasks import task_from_config
from opdistill.logits import completion_logits
from opdistill.models import load_model
from opdistill.objectives import losses
from opdistill.objectives.registry import OBJECTIVES, objective_loss
from opdistill.sampling.rollout import sample_prompts
from opdistill.teachers.base import Teacher, make_teacher
from opdistill.training import batches
from opdistill.types import Rollout, StepBatch

VARIANTS = {
    "raw": "raw (T1, no stop-grad)",
    "sg": "sg (T2, stop-grad)",
    "renorm": "renorm (T3)",
    "tail": "tail (T4)",
    "pg": "pg (T6)",
}
# (B): each training run's (variant, support) by its name; full_rkl is the reference
TRAINED = {
    "raw": ("raw", "student"),
    "sg": ("sg", "student"),
    "renorm": ("renorm", "student"),
    "tail": ("tail", "student"),
    "raw_teacher": ("raw", "teacher"),
    "sg_teacher": ("sg", "teacher"),
}
SUPPORTS = ("student", "teacher")
FULL = "full_rkl"
COLORS = {
    FULL: "black",
    "raw": "tab:red",
    "sg": "tab:blue",
    "renorm": "tab:green",
    "tail": "tab:orange",
    "pg": "tab:purple",
}  # by variant; in (B) the teacher's support is dashed
Key = tuple[str, str, int]  # (support, variant, K)


# --- (A) gradient bias at fixed states ------------------------------------------------------------------


def objective_config(base: Config, k: int = 0, variant: str = "", support: str = "student") -> Config:
    """``base`` with full_rkl (``k`` = 0) or topk_rkl of ``variant`` on ``k`` ids of ``support``."""
    if not k:
        return dataclasses.replace(base, objective=dataclasses.replace(base.objective, type=FULL))
    with warnings.catch_warnings():  # renorm at K = 1 warns that its gradient is 0: measured, not run
        warnings.simplefilter("ignore")
        objective = dataclasses.replace(
            base.objective, type="topk_rkl", topk=k, topk_variant=variant, topk_support=support
        )
    return dataclasses.replace(base, objective=objective)


def fixed_rollouts(base: Config, student, tokenizer, count: int, prompts: int, seed: int) -> list[Rollout]:
    """``count`` batches of the student's own rollouts of ``prompts`` training problems each, batch b from
    the problems of step b and a generator seeded by (seed, b): the same states for every objective."""
    task = task_from_config(base.data, seed)
    rollouts = []
    for b in range(count):
        examples = task.train.batch(b, prompts)
        rollouts.append(
            sample_prompts(
                student,
                tokenizer,
                encode_prompts(tokenizer, examples),
                max_new_tokens=base.rollout.max_new_tokens,
                temperature=base.rollout.temperature,
                generator=torch.Generator().manual_seed(seed * 1_000_003 + b),
            )
        )
    return rollouts


def gradient(
    cfg: Config, logits_BTV: torch.Tensor, batch: StepBatch, parameters: list
) -> tuple[torch.Tensor, dict]:
    """The gradient of ``cfg``'s objective on ``batch`` with respect to ``parameters``, flattened, and the
    objective's metrics: the training step's loss (``objective_loss``, as ``micro_batch_loss`` calls it)
    under the step's normaliser, from the student's logits ``logits_BTV`` (with grad; its graph is kept for
    the next call)."""
    per_token_BT, metrics = objective_loss(cfg, logits_BTV, batch)
    mask_BT, objective = batch.rollout.loss_mask_BT, cfg.objective
    normalizer = losses.Normalizer(
        OBJECTIVES[objective.type].aggregation or objective.aggregation,
        float(mask_BT.sum()),
        float(mask_BT.shape[0]),
        objective.aggregation_constant,
    )
    grads = torch.autograd.grad(
        normalizer(per_token_BT, mask_BT), parameters, retain_graph=True, allow_unused=True
    )
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
    return torch.cat([g.flatten() for g in flat]).double(), metrics


def scored(cfg: Config, student, teacher: Teacher, rollout: Rollout) -> StepBatch:
    """``rollout`` with the signal the training step's teacher sends for ``cfg``'s objective."""
    return StepBatch(rollout, batches.score(cfg, student, teacher, rollout), {})


def compare(g: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative error ||g - reference|| / ||reference||), in float64; a zero ``g`` has cosine 0."""
    g, reference = g.double(), reference.double()
    norm, g_norm = float(reference.norm()), float(g.norm())
    cosine = float(g @ reference) / (g_norm * norm) if g_norm > 0 else 0.0
    return cosine, float((g - reference).norm()) / norm


def gradient_bias(
    base: Config, ks: list[int], count: int, prompts: int, seed: int
) -> tuple[dict[Key, tuple[float, float]], dict[tuple[str, int], tuple[float, float]]]:
    """Per (support, variant, K): (cosine, relative error) to the full reverse-KL gradient, each the mean over
    ``count`` fixed batches; per (support, K): the student's and the teacher's mass on the support. The
    teacher's signal for each objective is what the training step would ask for (``batches.score``)."""
    student, tokenizer = load_model(base.student)
    student.eval()  # no dropout in the shipped models; eval() only makes that explicit
    teacher = make_teacher(base.teacher, tokenizer)
    parameters = list(student.parameters())
    bias: dict[Key, tuple[float, float]] = {}
    mass: dict[tuple[str, int], tuple[float, float]] = {}

    def add(table: dict, key, values: tuple[float, float]) -> None:
        old = table.get(key, (0.0, 0.0))
        table[key] = (old[0] + values[0] / count, old[1] + values[1] / count)

    for rollout in fixed_rollouts(base, student, tokenizer, count, prompts, seed):
        logits_BTV = completion_logits(student, rollout)  # [B, T, V], one forward for every objective
        full = objective_config(base)
        reference, _ = gradient(full, logits_BTV, scored(full, student, teacher, rollout), parameters)
        for support in SUPPORTS:
            for k in ks:
                # the teacher's signal depends on (support, K) only: scored once for every variant
                batch = scored(objective_config(base, k, "sg", support), student, teacher, rollout)
                for variant in VARIANTS:
                    cfg = objective_config(base, k, variant, support)
                    g, metrics = gradient(cfg, logits_BTV, batch, parameters)
                    add(bias, (support, variant, k), compare(g, reference))
                add(mass, (support, k), (metrics["student_mass"], metrics["teacher_mass"]))
    return bias, mass


def bias_table(
    bias: dict[Key, tuple[float, float]], mass: dict[tuple[str, int], tuple[float, float]], ks: list[int]
) -> list[str]:
    lines = [
        "| support | variant | " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for support in SUPPORTS:
        masses = [mass[support, k] for k in ks]
        lines.append(
            f"| {support} | *mass on S, student / teacher* | "
            + " | ".join(f"{s:.3f} / {t:.3f}" for s, t in masses)
            + " |"
        )
        for variant, name in VARIANTS.items():
            cells = [bias[support, variant, k] for k in ks]
            lines.append(
                f"| {support} | {name} | " + " | ".join(f"{c:.4f} / {e:.4f}" for c, e in cells) + " |"
            )
    return lines


# --- (B) training curves ----------------------------------------------------------------------------------


def run_config(out: Path, name: str, args: argparse.Namespace) -> Config:
    if name == FULL:
        objective = [f"objective.type={FULL}"]
    else:
        variant, support = TRAINED[name]
        objective = [
            "objective.type=topk_rkl",
            f"objective.topk={args.train_k}",
            f"objective.topk_variant={variant}",
            f"objective.topk_support={support}",
        ]
    return common.config(
        out / name,
        [
            *objective,
            *common.budget(args.budget_flops, args.evals),
            f"train.eval_size={args.eval_size}",
            f"train.seed={args.seed}",
            *args.override,
        ],
    )


def analyse(runs: dict[str, common.Run], last: int = 20) -> list[dict]:
    """Per run: greedy accuracy (warm start → end, best), teacher_kl and student_mass over the last ``last``
    steps, the spread of grad_norm, the steps whose loss or gradient was not finite, and the alarms."""
    rows = []
    for name, run in runs.items():
        finite = [m for m in run.metrics if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])]
        norms = [m["grad_norm"] for m in finite]
        tail = finite[-last:]
        mass = [m["student_mass"] for m in tail if "student_mass" in m]
        rows.append(
            {
                "name": name,
                "steps": run.result["steps"],
                "greedy": (run.evals[0]["greedy_acc"], run.final(), run.best()),
                "teacher_kl": statistics.fmean(m["teacher_kl"] for m in tail),
                "grad_norm": (statistics.median(norms), max(norms), statistics.pstdev(norms)),
                "student_mass": statistics.fmean(mass) if mass else None,
                "non_finite": len(run.metrics) - len(finite),
                "alarms": [a["alarm"].split(":")[0] for a in common.read_jsonl(run.out / "alarms.jsonl")],
            }
        )
    return rows


def label(name: str, k: int) -> str:
    """A training run's name in tables and legends."""
    if name == FULL:
        return "full reverse KL"
    variant, support = TRAINED[name]
    return f"top-{k} {VARIANTS[variant]}, {support}'s top-K"


def training_table(rows: list[dict], k: int, last: int = 20) -> list[str]:
    lines = [
        f"| objective | steps | greedy: warm → end (best) | teacher_kl, last {last} steps "
        f"| grad_norm median / max / std | student mass on S, last {last} | non-finite steps | alarms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        first, final, best = row["greedy"]
        median, biggest, spread = row["grad_norm"]
        mass = "—" if row["student_mass"] is None else f"{row['student_mass']:.4f}"
        lines.append(
            f"| {label(row['name'], k)} | {row['steps']} | {first:.3f} → {final:.3f} ({best:.3f}) "
            f"| {row['teacher_kl']:.4f} | {median:.3f} / {biggest:.3f} / {spread:.3f} | {mass} "
            f"| {row['non_finite']} | {', '.join(row['alarms']) or 'none'} |"
        )
    return lines


def plot(
    bias: dict[Key, tuple[float, float]], ks: list[int], runs: dict[str, common.Run], k: int, path: Path
) -> None:
    plt = common.pyplot()
    fig, ((cos, err, mass), (acc, kl, norm)) = plt.subplots(2, 3, figsize=(17, 8))
    styles = {"student": "-", "teacher": "--"}  # the line style of each support
    for variant, name in VARIANTS.items():
        for support in SUPPORTS:
            cells = [bias[support, variant, kk] for kk in ks]
            line = {
                "color": COLORS[variant],
                "ls": styles[support],
                "marker": "o",
                "label": f"{name}, {support}",
            }
            cos.plot(ks, [c for c, _ in cells], **line)
            err.plot(ks, [e for _, e in cells], **line)
    for ax in (cos, err):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (ids per position; the vocabulary is 18)")
    cos.set_title("(A) at fixed states", fontsize=9)
    cos.set_ylabel("cosine(top-K gradient, full reverse-KL gradient)")
    err.set_ylabel("||g_topK − g_full|| / ||g_full||")
    err.set_yscale("symlog", linthresh=0.01)
    err.set_ylim(bottom=0)

    def smooth(values: list[float], window: int = 10) -> list[float]:  # per-step metrics are noisy
        return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]

    for name, run in runs.items():
        variant, support = TRAINED.get(name, (FULL, "student"))
        line = {"color": COLORS[variant], "ls": styles[support], "label": label(name, k)}
        acc.plot([e["flops"] for e in run.evals], [e["greedy_acc"] for e in run.evals], marker=".", **line)
        flops = [m["flops"] for m in run.metrics]
        kl.plot(flops, smooth([m["teacher_kl"] for m in run.metrics]), **line)
        norm.plot(flops, [m["grad_norm"] for m in run.metrics], lw=0.7, **line)
        if name != FULL:
            mass.plot(flops, smooth([m["student_mass"] for m in run.metrics]), **line)
    mass.set_title(f"(B) training at K = {k}", fontsize=9)
    mass.set_ylabel("student mass on S (running mean of 10 steps)")
    acc.set_ylabel("held-out greedy accuracy")
    kl.set_ylabel("teacher_kl (running mean of 10 steps)")
    norm.set_ylabel("grad_norm per step (before clipping)")
    for ax in (kl, norm):
        ax.set_yscale("log")
    for ax in (mass, acc, kl, norm):
        ax.set_xlabel("student + teacher FLOPs")
    for ax in (cos, err, mass, acc, kl, norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> tuple[dict[Key, tuple[float, float]], list[dict]]:
    parser = common.parser(__doc__, "s3_topk_bias", smoke="tiny: one small batch, two K, a few steps")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 18], help="(A) top-K widths")
    parser.add_argument("--batches", type=int, default=4, help="(A) fixed batches to average over")
    parser.add_argument("--prompts", type=int, default=64, help="(A) prompts per fixed batch")
    parser.add_argument("--train-k", type=int, default=4, help="(B) K of the top-K training runs")
    parser.add_argument("--budget-flops", type=float, default=5.4e11, help="(B) per run: about 300 steps")
    parser.add_argument("--evals", type=int, default=8, help="(B) evaluations per run")
    parser.add_argument("--eval-size", type=int, default=300)
    args = parser.parse_args(argv)
    if args.smoke:
        args.ks, args.batches, args.prompts = [2, 18], 1, 4
        args.budget_flops, args.eval_size = 2e8, 4  # two steps of 4 prompts, one evaluation at the end
        args.override = [*args.override, "train.prompts_per_step=4", "train.eval_every=0"]
    torch.set_num_threads(common.THREADS)
    started = time.perf_counter()
    base = common.config(args.out / "gradients", [f"train.seed={args.seed}", *args.override])
    bias, mass = gradient_bias(base, args.ks, args.batches, args.prompts, args.seed)
    names = [FULL, *TRAINED]
    runs = {name: common.train(name, run_config(args.out, name, args)) for name in names}
    rows = analyse(runs)
    lines = [
        f"**(A) Gradient bias at fixed states**: cosine / relative error of each top-K gradient to the full "
        f"reverse-KL gradient, mean over {args.batches} batches of {args.prompts} rollouts of the warm start "
        "(1 / 0 is unbiased). The *mass* rows: the student's and the teacher's probability on the support.",
        "",
        *bias_table(bias, mass, args.ks),
        "",
        f"**(B) Training** at K = {args.train_k}, {args.budget_flops:.2e} FLOPs each.",
        "",
        *training_table(rows, args.train_k),
    ]
    plot(bias, args.ks, runs, args.train_k, args.report.with_suffix(".png"))
    summary = (
        f"Seed {args.seed}; {args.eval_size} held-out problems, greedy; "
        f"vocabulary 18 ids. Steps per run: "
        + ", ".join(f"{n} {runs[n].result['steps']}" for n in names)
        + "."
    )
    common.write(
        args.report, "S3: top-K reverse KL, biased without the stop-gradient?", started, summary, lines
    )
    return bias, rows


if __name__ == "__main__":
    main()
