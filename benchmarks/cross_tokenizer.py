"""On-policy distillation across tokenizers on the built-in task (docs/cross_tokenizer.md): the shipped
character-level student distilled from a teacher that reads the same text in other tokens, against the
same student distilled from the shipped teacher, which shares its tokenizer, at equal steps.

    python benchmarks/cross_tokenizer.py [--steps 200] [--eval-size 500] [--merges 40]

First, if missing, a BPE tokenizer is learnt on the task's text (``--merges`` merged tokens: "12", "+5",
"=1", ...) and a teacher is trained on it with the shipped teacher's own recipe (configs/assets_teacher.yaml,
the same model size, steps and seed: only the tokenizer differs; about 90 s). Then each objective runs from
the shipped student (configs/distill_addition.yaml, 64 prompts per step) once with each teacher:

  sampled_rkl         exact across tokenizers: the span-level sampled reverse KL (math.md §18.2)
  full_rkl            the full reverse KL with the teacher's next-token distribution projected onto the
                      student's vocabulary, at span starts (objective.cross_vocab=prefix, the default;
                      exact for a character-level student, §18.3)
  full_rkl_shared     the full reverse KL over the shared vocabulary at one-to-one spans
                      (objective.cross_vocab=shared, GOLD's idea; BPE teacher only: with one tokenizer it
                      is full_rkl)

Reported: held-out greedy accuracy before and after, the gap between the two teachers' runs, and the
alignment's cost: its seconds per step (re-tokenizing, aligning, moving the scores) against the step's,
student tokens per aligned span, and the share of spans of one token on each side.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from statistics import mean

import torch

from opdistill.config import load_config
from opdistill.data.tasks import corpus_text, load_task
from opdistill.models import bpe_tokenizer
from opdistill.training import loop

REPO = Path(__file__).resolve().parents[1]
SAME_TEACHER = "src/opdistill/assets/addition-teacher"
METHODS = {  # name: (overrides, the teachers it runs with)
    "sampled_rkl": (["objective.type=sampled_rkl", "optim.lr=3e-4"], ("same", "bpe")),
    "full_rkl": (["objective.type=full_rkl"], ("same", "bpe")),
    "full_rkl_shared": (["objective.type=full_rkl", "objective.cross_vocab=shared"], ("bpe",)),
}


def bpe_teacher(out: Path, merges: int) -> Path:
    """A teacher trained on a BPE tokenizer of the task's text with the shipped teacher's recipe."""
    teacher = out / "teacher" / "final"
    if (teacher / "model.safetensors").is_file():
        return teacher
    tokenizer_dir = out / f"bpe-{merges}"
    task = load_task(task="addition", task_options={"digits": 4}, seed=0)
    bpe_tokenizer(corpus_text(task), merges).save_pretrained(tokenizer_dir)
    config = load_config(
        REPO / "configs" / "assets_teacher.yaml",
        [f"student.tokenizer={tokenizer_dir}", f"train.out_dir={out / 'teacher'}", "train.eval_every=0"],
    )
    print(f"training the BPE teacher into {teacher} (configs/assets_teacher.yaml)", file=sys.stderr)
    loop.run(config, show_progress=False)
    return teacher


def teacher_accuracy(model: str, problems: int) -> float:
    """``opd eval``'s greedy accuracy of ``model`` on the first ``problems`` held-out problems."""
    command = [sys.executable, "-m", "opdistill.cli", "eval", "--model", model, "--task", "addition"]
    done = subprocess.run(
        [*command, "--limit", str(problems)], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)["greedy_acc"]


def run(name: str, overrides: list[str], out: Path) -> dict:
    config = load_config(
        REPO / "configs" / "distill_addition.yaml", [*overrides, f"train.out_dir={out / name}"]
    )
    summary = loop.run(config, show_progress=False)
    evals = [json.loads(line) for line in (out / name / "eval.jsonl").open()]
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
    result = {
        "run": name,
        "before": evals[0]["greedy_acc"],
        "after": summary["final_eval"]["greedy_acc"],
        "step_s": mean(r["step_s"] for r in rows),
        "problems": evals[0]["n_problems"],
    }
    if "time_align_s" in rows[0]:
        result |= {
            "align_s": mean(r["time_align_s"] for r in rows),
            "tokens_per_span": mean(r["align_tokens_per_span"] for r in rows),
            "one_to_one": mean(r["align_one_to_one"] for r in rows),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--merges", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_cross_tokenizer")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}", file=sys.stderr
    )
    teachers = {
        "same": SAME_TEACHER,
        "bpe": str(bpe_teacher(REPO / "build" / "cross_tokenizer", args.merges)),
    }
    common = [
        f"train.steps={args.steps}",
        f"train.eval_size={args.eval_size}",
        f"train.eval_every={args.steps}",
    ]
    results = []
    for method in args.methods:
        settings, tags = METHODS[method]
        for tag in tags:
            overrides = [*common, *settings, f"teacher.path={teachers[tag]}"]
            results.append({"method": method, "teacher": tag, **run(f"{method}_{tag}", overrides, args.out)})
            print(json.dumps(results[-1]), file=sys.stderr)
    accuracy = {tag: teacher_accuracy(teacher, args.eval_size) for tag, teacher in teachers.items()}
    print(f"\n{args.steps} steps, greedy accuracy on {results[0]['problems']} held-out problems")
    print(f"(teachers: same tokenizer {accuracy['same']:.3f}, BPE {accuracy['bpe']:.3f})\n")
    print("| method | teacher tokenizer | before | after | step s | align s / step | tokens / span | 1:1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        align = "— | 1 | 1"
        if "align_s" in r:
            share = r["align_s"] / r["step_s"]
            align = f"{r['align_s']:.3f} ({share:.0%}) | {r['tokens_per_span']:.2f} | {r['one_to_one']:.2f}"
        accuracies = f"{r['before']:.3f} | **{r['after']:.3f}**"
        print(f"| {r['method']} | {r['teacher']} | {accuracies} | {r['step_s']:.3f} | {align} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
