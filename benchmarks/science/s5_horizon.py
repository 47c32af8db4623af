"""S5: does the teacher's supervision decay with the horizon, and do shorter horizons help? The teacher's
signal by position in the response (sampled and exact reverse KL, top-K overlap, the teacher's rank of the
sampled token, by decile of each response's length) at the warm start and over a plain OPD run, and the
held-out accuracy of the horizon interventions at the same FLOP budget (docs/science.md).

    python benchmarks/science/s5_horizon.py [--budget-flops 7.2e11] [--window 20] [--seed 0]
    python benchmarks/science/s5_horizon.py --smoke      # the machinery at a tiny size (tests)

Every run starts from the shipped 34k-parameter student warm start with the shipped 133k-parameter teacher
on 4-digit addition (a fresh problem every time; responses of about 41 tokens: a 35-token carry chain,
``>`` and the answer), the recipe of `opd demo` (full-vocabulary reverse KL, 52 new tokens at most), and
stops at the same --budget-flops. Runs:
  opd     plain OPD: loss on every token
  cap     rollouts capped at --window new tokens (rollout.max_new_tokens): the student samples, and the
          teacher scores, only the first part of each response, so a step costs about half and the run
          takes about twice the steps
  first   prefix-only OPD: loss on the first --window tokens of full rollouts (weighting.loss_window)
  last    its control: loss on the last --window tokens (weighting.loss_window_from=last)
  prune   Prune-OPD (weighting.prune): w = 0.9^(drift events), a drift event a top-K overlap under 0.5
  decay   Open-OPD position decay w_t = exp(-α t / 52), α = --decay (weighting.position_decay)
The diagnostics (every --diagnostics-every steps, on the step's own rollouts before its update) log the
per-decile statistics; objective.topk = --topk (4) sets their K and Prune-OPD's: the vocabulary has 18 ids,
so the default K = 16 shares at least 14 ids by construction and cannot move.

Evaluation length: the loop evaluates with rollout.max_new_tokens, the same cap as the rollouts, so a
capped run evaluated in the loop could never reach the answer and scores 0 by construction. The capped run
therefore saves a checkpoint at each evaluation point instead, and each is evaluated afterwards, like the
warm start, by the same greedy evaluation at the full 52 tokens (plain OPD's final model is re-evaluated
that way too, as a check that both paths agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import common

from opdistill.config import Config

FULL_TOKENS = 52  # the recipe's rollout.max_new_tokens: room for the whole answer
PROMPT_TOKENS = 11  # <bos> and "4721+0389="
RESPONSE_TOKENS = 42  # the carry chain, ">", the answer and <eos>, at most
POSITION_KEYS = {
    "kl_by_position": "sampled reverse KL (nats)",
    "exact_kl_by_position": "exact reverse KL (nats)",
    "overlap_by_position": "top-K overlap",
    "teacher_rank_by_position": "teacher's rank of the sampled token",
}
LATE = 5  # "late in training": the mean of the last LATE diagnostics steps
COLORS = {
    "opd": "tab:blue",
    "cap": "tab:purple",
    "first": "tab:orange",
    "last": "tab:green",
    "prune": "tab:red",
    "decay": "tab:brown",
}
# runs whose rollouts stop early: evaluated afterwards at the full length; their deciles are of a prefix
CAPPED = ("cap",)


def runs_spec(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Each run's label and the overrides that make it differ from plain OPD."""
    n = args.window
    return {
        "opd": ("plain OPD", []),
        "cap": (f"rollouts capped at {n} tokens", [f"rollout.max_new_tokens={n}"]),
        "first": (
            f"loss on the first {n} tokens",
            [f"weighting.loss_window={n}", "weighting.loss_window_from=first"],
        ),
        "last": (
            f"loss on the last {n} tokens",
            [f"weighting.loss_window={n}", "weighting.loss_window_from=last"],
        ),
        "prune": ("Prune-OPD (η 0.5, ζ 0.9)", ["weighting.prune=true"]),
        "decay": (f"position decay α = {args.decay:g}", [f"weighting.position_decay={args.decay}"]),
    }


def step_flops(response_tokens: int, prompts: int) -> float:
    """Student (8N: sample + train) and teacher (2N: score) FLOPs of one step, to space the evaluations."""
    return (8 * 33_504 + 2 * 133_008) * prompts * (PROMPT_TOKENS + response_tokens)


def run_config(out: Path, name: str, args: argparse.Namespace) -> Config:
    capped = name in CAPPED
    steps = args.budget_flops / step_flops(args.window if capped else RESPONSE_TOKENS, args.prompts_per_step)
    every = max(1, round(steps / args.evals))
    # a capped run cannot be evaluated in the loop (its evaluation stops at the cap too): checkpoints instead
    cadence = (
        [f"train.save_every={every}", "train.keep_checkpoints=0"] if capped else [f"train.eval_every={every}"]
    )
    return common.config(
        out / name,
        [
            "objective.type=full_rkl",
            f"rollout.max_new_tokens={FULL_TOKENS}",
            f"objective.topk={args.topk}",
            f"train.budget_flops={args.budget_flops}",
            f"train.prompts_per_step={args.prompts_per_step}",
            f"train.eval_size={args.eval_size}",
            f"train.diagnostics_every={args.diagnostics_every}",
            f"train.seed={args.seed}",
            *cadence,
            *runs_spec(args)[name][1],
            *args.override,
        ],
    )


def full_length(cfg: Config) -> Config:
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=FULL_TOKENS))


def evaluate_checkpoints(run: common.Run, cfg: Config) -> list[dict]:
    """Greedy accuracy at the full length of the warm start and of every checkpoint of ``run``, each with the
    FLOPs spent by its step (cached in the run directory, like the run itself)."""
    cache = run.out / "full_length_eval.jsonl"
    if not cache.is_file():
        checkpoints = sorted(
            (run.out / "checkpoints").glob("step_*"), key=lambda path: int(path.name.split("_")[1])
        )
        models = [(0, Path(cfg.student.path))] + [(int(p.name.split("_")[1]), p) for p in checkpoints]
        rows = [
            {"step": step, **common.accuracy(path, full_length(cfg), cfg.train.eval_size)}
            for step, path in models
        ]
        cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    by_step = {0: {"flops": 0.0}} | {m["step"]: m for m in run.metrics}
    return [e | {"flops": by_step[e["step"]]["flops"]} for e in common.read_jsonl(cache)]


def diagnostics_rows(run: common.Run, key: str) -> list[dict]:
    """The metrics rows that carry ``key`` (the diagnostics steps), in step order."""
    return [m for m in run.metrics if m.get(key) is not None]


def profile(rows: list[dict], key: str) -> list[float | None]:
    """The per-bin mean of ``key``'s lists over ``rows``; a bin empty (None) in a row is left out of that
    bin's mean, and a bin empty in every row stays None."""
    bins: list[list[float]] = []
    for row in rows:
        values = row[key]
        bins.extend([] for _ in range(len(values) - len(bins)))
        for i, value in enumerate(values):
            if value is not None:
                bins[i].append(value)
    return [sum(b) / len(b) if b else None for b in bins]


def warm_and_late(
    run: common.Run, key: str, last: int = LATE
) -> tuple[list[float | None], list[float | None]]:
    """``key`` by decile at the warm start (the first diagnostics step: its rollouts come before any update)
    and late in training (the mean of the last ``last`` diagnostics steps)."""
    rows = diagnostics_rows(run, key)
    return profile(rows[:1], key), profile(rows[-last:], key)


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def loss_tokens(run: common.Run) -> tuple[float, float]:
    """Mean sampled tokens per response, and mean tokens with loss per response: those the loss windows
    keep (``kept_token_frac``, absent when all are kept), or Prune-OPD's leading tokens with weight ≥ 0.1."""
    rows = [m for m in run.metrics if "response_length" in m]
    sampled = [m["response_length"] for m in rows]
    kept = [
        m.get("prune_effective_length", m["response_length"] * m.get("kept_token_frac", 1.0)) for m in rows
    ]
    return sum(sampled) / len(rows), sum(kept) / len(rows)


def analyse(runs: dict[str, common.Run], last: int = LATE) -> dict:
    """Plain OPD's per-decile profiles (warm start, late), and per run: steps, tokens sampled and with loss
    per response, greedy accuracy at the warm start and the end, the best, and the exact reverse KL late in
    training over deciles 1-9 and decile 10."""
    plain = runs["opd"]
    profiles = {key: warm_and_late(plain, key, last) for key in POSITION_KEYS}
    rows = []
    for name, run in runs.items():
        kl = None if name in CAPPED else warm_and_late(run, "exact_kl_by_position", last)[1]
        rows.append(
            {
                "run": name,
                "steps": run.result["steps"],
                "tokens": loss_tokens(run),
                "greedy": (run.evals[0]["greedy_acc"], run.evals[-1]["greedy_acc"]),
                "best": run.best(),
                "flops": run.evals[-1]["flops"],
                "kl_head_tail": None if not kl else (mean(kl[:-1]), kl[-1]),
            }
        )
    return {"profiles": profiles, "rows": rows}


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def tables(analysis: dict, labels: dict[str, str], topk: int) -> list[str]:
    names = {**POSITION_KEYS, "overlap_by_position": f"top-{topk} overlap"}
    profiles = analysis["profiles"]
    lines = [
        "Plain OPD, by decile of each response's length (decile 10 ≈ the last four answer digits and <eos>); "
        f"warm start → late (the last {LATE} diagnostics steps):",
        "",
        "| decile | " + " | ".join(names[key] for key in POSITION_KEYS) + " |",
        "|---" * (len(POSITION_KEYS) + 1) + "|",
    ]
    for i in range(len(profiles["kl_by_position"][0])):
        cells = [f"{fmt(profiles[key][0][i])} → {fmt(profiles[key][1][i])}" for key in POSITION_KEYS]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The interventions, each from the same warm start to the same FLOP budget (greedy accuracy on the "
        "held-out problems; exact reverse KL by decile over the last diagnostics steps):",
        "",
        "| run | steps | tokens / response: sampled, with loss (Prune-OPD: weight ≥ 0.1) "
        "| greedy, warm start → end | best | FLOPs | exact KL late, deciles 1–9 | decile 10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["rows"]:
        head, tail = row["kl_head_tail"] or (None, None)
        (g0, g1) = row["greedy"]
        lines.append(
            f"| {labels[row['run']]} | {row['steps']} | {row['tokens'][0]:.1f}, {row['tokens'][1]:.1f} "
            f"| {g0:.3f} → {g1:.3f} | {row['best']:.3f} "
            f"| {row['flops']:.2e} | {fmt(head)} | {fmt(tail)} |"
        )
    return lines


def phase_rows(rows: list[dict], groups: int) -> list[tuple[str, list[dict]]]:
    """The warm start (the first row), then the rest in ``groups`` consecutive stretches, each labelled."""
    if not rows:
        return []
    rest = rows[1:]
    size = max(1, -(-len(rest) // groups))
    stretches = [rest[i : i + size] for i in range(0, len(rest), size)]
    return [("warm start", rows[:1])] + [
        (f"after {chunk[0]['step'] - 1}–{chunk[-1]['step'] - 1} steps", chunk) for chunk in stretches
    ]


def plot(runs: dict[str, common.Run], labels: dict[str, str], topk: int, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    deciles = list(range(1, 11))
    plain = runs["opd"]
    for ax, (key, name) in zip(axes[0], POSITION_KEYS.items(), strict=True):
        phases = phase_rows(diagnostics_rows(plain, key), groups=4)
        colors = plt.get_cmap("viridis")([i / max(1, len(phases) - 1) for i in range(len(phases))])
        for (label, rows), color in zip(phases, colors, strict=True):
            values = profile(rows, key)
            ax.plot(
                deciles[: len(values)],
                values,
                ".-",
                color="black" if label == "warm start" else color,
                label=label,
            )
        ax.set_title(
            f"plain OPD: {name if key != 'overlap_by_position' else f'top-{topk} overlap'}", fontsize=9
        )
        ax.set_xlabel("decile of the response")
        ax.legend(fontsize=7)
    acc, end_kl, tail_kl, head_kl = axes[1]
    for name, run in runs.items():
        color = COLORS.get(name)
        acc.plot(
            [e["flops"] for e in run.evals],
            [e["greedy_acc"] for e in run.evals],
            ".-",
            color=color,
            label=labels[name],
        )
        if name in CAPPED:
            continue
        rows = diagnostics_rows(run, "exact_kl_by_position")
        late = profile(rows[-LATE:], "exact_kl_by_position")
        end_kl.plot(deciles[: len(late)], late, ".-", color=color, label=labels[name])
        flops = [m["flops"] for m in rows]
        tail_kl.plot(
            flops, [m["exact_kl_by_position"][-1] for m in rows], "-", color=color, label=labels[name]
        )
        head_kl.plot(
            flops, [mean(m["exact_kl_by_position"][:-1]) for m in rows], "-", color=color, label=labels[name]
        )
    acc.set_ylabel("held-out greedy accuracy")
    acc.set_xlabel("student + teacher FLOPs")
    end_kl.set_title(f"exact reverse KL by decile, last {LATE} diagnostics", fontsize=9)
    end_kl.set_xlabel("decile of the response")
    tail_kl.set_title("exact reverse KL, decile 10 (the answer)", fontsize=9)
    head_kl.set_title("exact reverse KL, mean of deciles 1–9", fontsize=9)
    for ax in (tail_kl, head_kl):
        ax.set_xlabel("student + teacher FLOPs")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (acc, end_kl, tail_kl, head_kl):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "s5_horizon")
    parser.add_argument(
        "--budget-flops", type=float, default=7.2e11, help="per run: about 400 full-length steps"
    )
    parser.add_argument("--window", type=int, default=20, help="tokens kept by the cap and the loss windows")
    parser.add_argument("--decay", type=float, default=3.0, help="α of the position decay")
    parser.add_argument("--topk", type=int, default=4, help="K of the overlap diagnostics and of Prune-OPD")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--diagnostics-every", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget_flops, args.evals, args.eval_size, args.prompts_per_step = 6e8, 1, 10, 8
        args.diagnostics_every = 1
    started = time.perf_counter()
    spec = runs_spec(args)
    labels = {name: label for name, (label, _) in spec.items()}
    configs = {name: run_config(args.out, name, args) for name in spec}
    runs = {name: common.train(name, cfg) for name, cfg in configs.items()}
    for name in CAPPED:
        runs[name].evals = evaluate_checkpoints(runs[name], configs[name])
    # the check that the capped run's evaluation is the loop's: plain OPD's final model both ways
    plain = runs["opd"]
    recheck = common.accuracy(plain.out / "final", configs["opd"], args.eval_size)["greedy_acc"]
    teacher = common.accuracy(configs["opd"].teacher.path, configs["opd"], args.eval_size)["greedy_acc"]
    analysis = analyse(runs)
    lines = tables(analysis, labels, args.topk)
    plot(runs, labels, args.topk, args.report.with_suffix(".png"))
    summary = (
        f"Budget {args.budget_flops:.2e} FLOPs per run; {args.eval_size} held-out problems, greedy; seed "
        f"{args.seed}; top-K with K = {args.topk}; diagnostics every {args.diagnostics_every} steps. "
        f"The teacher's greedy accuracy: {teacher:.3f}. --window {args.window} keeps about the first "
        f"(or last) half of a ~41-token response; the capped run was evaluated afterwards from its "
        f"checkpoints at {FULL_TOKENS} tokens (the loop would evaluate it at its cap, where no answer fits): "
        f"plain OPD's final model scores {recheck:.3f} that way and "
        f"{plain.evals[-1]['greedy_acc']:.3f} in the loop."
    )
    common.write(
        args.report,
        "S5: the teacher's signal by position, and horizon interventions",
        started,
        summary,
        lines,
    )
    return analysis


if __name__ == "__main__":
    main()
