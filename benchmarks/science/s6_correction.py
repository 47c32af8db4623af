"""S6: can per-token OPD teach a multi-step correction path? A teacher that knows how to recover from a wrong
step, a student that never saw a correction, and the student's recovery from a forced misleading prefix
before and after plain OPD, SKD and TRD, each with reverse and with forward KL (docs/science.md).

    python benchmarks/science/s6_correction.py [--budget-flops 5.4e11] [--corrections 0.3] [--seed 0]
                                               [--threads 2]
    python benchmarks/science/s6_correction.py --smoke      # the machinery at a tiny size (tests)

The recovering teacher is made here (into --out/teacher, reused when finished): the shipped 133k-parameter
teacher, fine-tuned with its own recipe (configs/assets_teacher.yaml: SFT on 64 fresh problems a step,
cosine schedule, seed 1) for 600 steps at lr 1e-3 on the addition task's `corrections=P` option, where each
step of a training completion is, with probability P, written with a wrong sum first and corrected in place:
`1+9+0=11=10,2+8+1=11,...>5110`. (The same recipe from scratch, 1400 steps, recovered less often: 0.48 at
P = 0.15, 0.68 at P = 0.3, against 0.82 this way.) Its characters are the shipped tokenizer's, so it
teaches the shipped student. Every run starts from the shipped 34k-parameter student warm start (trained
without corrections), uses the demo's recipe with this teacher and stops at the same --budget-flops (SKD's
token-by-token verification and TRD's refinements count as the teacher's, so they get fewer steps).
Trajectories, each distilled with full-vocabulary reverse KL (the demo's) and forward KL (TRD's launcher's):
  opd   the student's own rollout, scored per token
  skd   SKD, rollout.skd_topk=2 (configs/skd.yaml): a student token outside the teacher's top-2 is replaced
        by a teacher sample while sampling
  trd   TRD, trd.mode=prefix, cut_topk=2 (configs/trd.yaml): the teacher rewrites the rollout greedily from
        its first token outside the teacher's top-2; kept if it verifies
Measured on the first --eval-size held-out problems, greedily, at the warm start, every saved checkpoint and
the end: accuracy on the plain prompts (and the share of them where the model corrects a step of its own,
`=dd=dd`), and on FORCED misleading prefixes, the same problems with the first step already written wrong
in the prompt (`4721+0389=1+9+0=11`, the wrong sum drawn as the corrections option draws it; the answer is
still 5110): the share that ends in the right answer (recovered; without the onset that is a silent
recovery: the model ignores what is written), the share whose next token is the correction onset `=`
(onset), the share that writes the whole corrected path exactly (`=10,2+8+1=11,...>5110`), the model's
mean probability of `=` there (P(onset)), and the path alone: the share that ends right when the onset is
forced too (`4721+0389=1+9+0=11=`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import common
import torch

from opdistill.cli.demo import asset_dir
from opdistill.config import Config, ModelSpec, load_config
from opdistill.data.examples import Example
from opdistill.data.rendering import encode_prompts
from opdistill.data.tasks import task_from_config
from opdistill.data.tasks.addition import wrong_sum
from opdistill.models import load_model
from opdistill.observe.evaluate import sample_completions

METHODS = {
    "opd": ("OPD (student rollout)", []),
    "skd": ("SKD, top-2", ["rollout.skd_topk=2"]),
    "trd": ("TRD, prefix cut at top-2", ["trd.mode=prefix", "trd.cut_topk=2"]),
}
OBJECTIVES = {"rkl": ("reverse KL", "full_rkl"), "fkl": ("forward KL", "full_fkl")}
RUNS = [(method, objective) for objective in OBJECTIVES for method in METHODS]
COLORS = {"opd": "tab:blue", "skd": "tab:orange", "trd": "tab:green"}
STYLES = {"rkl": "-", "fkl": "--"}
TEACHER_RECIPE = common.REPO / "configs" / "assets_teacher.yaml"
TEACHER_TUNING = ["train.steps=600", "optim.lr=1e-3", "optim.warmup_steps=20"]  # from the shipped teacher
MAX_NEW_TOKENS = 64  # a completion with every step corrected is 54 tokens; the demo's 52 would cut it
PROMPT_FLOPS = (8 * 33_504 + 2 * 133_008) * 53  # about one prompt of a step of any method, 34k/133k pair
ONSET = "="
CORRECTION = re.compile(r"=\d\d=")  # a sum written and then corrected


def teacher_config(out: Path, args: argparse.Namespace) -> Config:
    """The shipped teacher, fine-tuned with its own recipe on the task with corrections."""
    return load_config(
        TEACHER_RECIPE,
        [
            f"student.path={asset_dir('addition-teacher')}",
            *TEACHER_TUNING,
            f"data.task_options={{digits: 4, corrections: {args.corrections}}}",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            "train.eval_every=0",
            f"train.eval_size={args.eval_size}",
            "train.save_every=0",
            "train.diagnostics_every=0",
            f"train.threads={common.THREADS}",
            *args.teacher_override,
            f"train.out_dir={out / 'teacher'}",
        ],
    )


def run_config(out: Path, method: str, objective: str, teacher: Path, args: argparse.Namespace) -> Config:
    overrides = [
        *METHODS[method][1],
        f"objective.type={OBJECTIVES[objective][1]}",
        f"teacher.path={teacher}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"train.budget_flops={args.budget_flops}",
        "train.eval_every=0",  # measure() reads every checkpoint instead
        f"train.eval_size={args.eval_size}",
        "train.keep_checkpoints=0",
        f"train.seed={args.seed}",
        *args.override,
    ]
    steps = args.budget_flops / PROMPT_FLOPS / common.config(out, overrides).train.prompts_per_step
    every = max(1, round(steps / args.evals))
    return common.config(out / f"{method}-{objective}", [*overrides, f"train.save_every={every}"])


def misled(ex: Example) -> Example:
    """``ex`` with its first step written wrong in the prompt: ``4721+0389=`` → ``4721+0389=1+9+0=11``; the
    completion is the corrected path from there (``=10,2+8+1=11,...>5110``), the answer unchanged. The wrong
    sum is drawn as the task's ``corrections`` option draws one, from a stream seeded by the prompt."""
    first = re.match(r"[^,>]*", ex.completion)
    assert first is not None and first.group().count("=") == 1, f"not a plain addition chain: {ex.completion}"
    step, rest = first.group(), ex.completion[first.end() :]
    total = int(step[-2:])
    wrong = wrong_sum(random.Random(f"s6-{ex.prompt}"), total)
    return Example(
        prompt=f"{ex.prompt}{step[:-2]}{wrong:02d}", answer=ex.answer, completion=f"={total:02d}{rest}"
    )


@torch.no_grad()
def measure(model_dir: Path | str, plain: list[Example], forced: list[Example], verify) -> dict[str, float]:
    """Greedy accuracy on the plain prompts and the share of them where the model corrects a step of its own;
    on the forced misleading prefixes the shares that recover (right answer), start with the onset, and write
    the corrected path exactly, the mean P(onset) there, and the share that recovers when the onset is forced
    too (the path alone)."""
    model, tokenizer = load_model(ModelSpec(path=str(model_dir)))
    model.eval()
    onset_forced = [replace(ex, prompt=f"{ex.prompt}{ONSET}", completion=ex.completion[1:]) for ex in forced]
    texts = {
        name: sample_completions(model, tokenizer, examples, max_new_tokens=MAX_NEW_TOKENS)[0]
        for name, examples in (("plain", plain), ("forced", forced), ("onset", onset_forced))
    }
    prompts_PT = torch.tensor(encode_prompts(tokenizer, forced))  # all one length: 4-digit prompts
    onset_p_P = model(prompts_PT).logits[:, -1].float().softmax(-1)[:, tokenizer.convert_tokens_to_ids(ONSET)]

    def share(name: str, examples: list[Example], check) -> float:
        return sum(bool(check(t, ex)) for t, ex in zip(texts[name], examples, strict=True)) / len(examples)

    return {
        "greedy_acc": share("plain", plain, verify),
        "self_corrected": share("plain", plain, lambda t, _: CORRECTION.search(t)),
        "recovered": share("forced", forced, verify),
        "onset": share("forced", forced, lambda t, _: t.startswith(ONSET)),
        "path": share("forced", forced, lambda t, ex: t == ex.completion),
        "onset_p": float(onset_p_P.mean()),
        "after_onset": share("onset", onset_forced, verify),
    }


def problems(cfg: Config, size: int):
    task = task_from_config(cfg.data, cfg.train.seed)
    plain = task.test[:size]
    return plain, [misled(ex) for ex in plain], task.verify


def curve(run: common.Run, start: dict, plain, forced, verify) -> list[dict]:
    """``start`` (the warm start's measures), then ``measure`` at every checkpoint and the end, each with the
    FLOPs spent by then (cached in the run directory, keyed by the problems measured)."""
    cache = run.out / "s6_curve.json"
    key = [len(plain), forced[0].prompt if forced else "", sorted(start)]
    if cache.is_file() and (saved := json.loads(cache.read_text()))["key"] == key:
        return saved["points"]
    flops = {m["step"]: m["flops"] for m in run.metrics}
    models = {int(path.name.removeprefix("step_")): path for path in (run.out / "checkpoints").glob("step_*")}
    models[run.result["steps"]] = run.out / "final"
    points = [{"step": 0, "flops": 0.0, **start}] + [
        {"step": step, "flops": flops[step], **measure(models[step], plain, forced, verify)}
        for step in sorted(models)
    ]
    cache.write_text(json.dumps({"key": key, "points": points}, indent=1))
    return points


def mean_metric(run: common.Run, key: str) -> float | None:
    values = [m[key] for m in run.metrics if key in m]
    return sum(values) / len(values) if values else None


def trajectory(run: common.Run) -> str:
    """What the run trained on, from its per-step metrics."""
    kept, refined = mean_metric(run, "skd_acceptance"), mean_metric(run, "trd_refined")
    if kept is not None:
        return f"{kept:.1%} of student tokens kept"
    if refined is not None:
        return f"{refined:.1%} of rows refined ({mean_metric(run, 'trd_prefix_kept') or 0:.0%} prefix kept)"
    return "the student's own"


def probability(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


COLUMNS = (
    "greedy accuracy | self-corrections (plain prompts) | forced prefix: recovered | onset `=` next "
    "| exact corrected path | P(onset) | onset forced too: recovered"
)
SHARES = ("greedy_acc", "self_corrected", "recovered", "onset", "path")


def models_table(models: dict[str, dict]) -> list[str]:
    lines = [f"| model | {COLUMNS} |", "|---" * 8 + "|"]
    for name, m in models.items():
        cells = " | ".join(f"{m[k]:.3f}" for k in SHARES)
        lines.append(f"| {name} | {cells} | {probability(m['onset_p'])} | {m['after_onset']:.3f} |")
    return lines


def runs_table(runs: dict[str, common.Run], curves: dict[str, list[dict]]) -> list[str]:
    lines = [
        f"| trajectory | loss | steps | wall s | {COLUMNS} | trained on (mean over steps) |",
        "|---" * 12 + "|",
    ]
    for name, run in runs.items():
        method, objective = name.split("-")
        first, last = curves[name][0], curves[name][-1]
        cells = [f"{first[k]:.3f} → {last[k]:.3f}" for k in SHARES]
        cells.append(f"{probability(first['onset_p'])} → {probability(last['onset_p'])}")
        cells.append(f"{first['after_onset']:.3f} → {last['after_onset']:.3f}")
        lines.append(
            f"| {METHODS[method][0]} | {OBJECTIVES[objective][0]} | {run.result['steps']} "
            f"| {run.result['wall_s']:.0f} | {' | '.join(cells)} | {trajectory(run)} |"
        )
    return lines


def plot(curves: dict[str, list[dict]], teacher: dict, path: Path) -> None:
    plt = common.pyplot()
    panels = (
        ("greedy_acc", "held-out greedy accuracy (plain prompts)"),
        ("recovered", "forced misleading prefix: right answer"),
        ("onset_p", "forced misleading prefix: P(onset `=`)"),
        ("after_onset", "onset forced too: right answer"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, points in curves.items():
            method, objective = name.split("-")
            ax.plot(
                [p["flops"] for p in points],
                [p[key] for p in points],
                ".",
                ls=STYLES[objective],
                color=COLORS[method],
                label=f"{METHODS[method][0]}, {OBJECTIVES[objective][0]}",
            )
        ax.axhline(teacher[key], color="black", ls=":", lw=1, label="recovering teacher")
        ax.set_xlabel("student + teacher FLOPs")
        ax.set_ylabel(label)
        if key == "onset_p":  # the warm start gives the onset almost no mass: a log scale shows it move
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "s6_correction")
    parser.add_argument("--budget-flops", type=float, default=5.4e11, help="per run: about 300 steps")
    parser.add_argument(
        "--corrections", type=float, default=0.3, help="the teacher's share of corrected steps"
    )
    parser.add_argument("--evals", type=int, default=5, help="checkpoints measured per run")
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=common.THREADS, help="torch threads (1 on a machine shared by others)"
    )
    parser.add_argument(
        "--teacher-override", nargs="*", default=[], help="extra overrides for the teacher's SFT"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget_flops, args.evals, args.eval_size = 6e8, 1, 8
        args.override = [*args.override, "train.prompts_per_step=8"]
        args.teacher_override = [*args.teacher_override, "train.steps=3", "train.prompts_per_step=8"]
    common.THREADS = args.threads  # what every run's config and the report's header use
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher_run = common.train("teacher", teacher_config(args.out, args))
    teacher_dir = teacher_run.out / "final"
    configs = {f"{m}-{o}": run_config(args.out, m, o, teacher_dir, args) for m, o in RUNS}
    runs = {name: common.train(name, cfg) for name, cfg in configs.items()}
    plain, forced, verify = problems(configs["opd-rkl"], args.eval_size)
    recovering = f"recovering teacher (corrections={args.corrections})"
    models = {
        "shipped teacher (no corrections)": measure(asset_dir("addition-teacher"), plain, forced, verify),
        recovering: measure(teacher_dir, plain, forced, verify),
        "student warm start": measure(asset_dir("addition-student"), plain, forced, verify),
    }
    curves = {
        name: curve(run, models["student warm start"], plain, forced, verify) for name, run in runs.items()
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, models[recovering], args.report.with_suffix(".png"))
    lines = [
        *models_table(models),
        "",
        "Students from the warm start, each with the recovering teacher (arrows: warm start → end of the "
        "budget):",
        "",
        *runs_table(runs, curves),
    ]
    summary = (
        f"Recovering teacher: the shipped one after {teacher_run.result['steps']} SFT steps on "
        f"corrections={args.corrections} ({teacher_run.result['wall_s']:.0f} s). Budget "
        f"{args.budget_flops:.2e} FLOPs per student run; {args.eval_size} held-out problems, greedy; forced "
        f"prefix = the first step written wrong in the prompt; seed {args.seed}."
    )
    title = "S6: recovering from a misleading prefix under OPD, SKD and TRD"
    common.write(args.report, title, started, summary, lines)
    return {"models": models, "curves": curves, "runs": runs}


if __name__ == "__main__":
    main()
