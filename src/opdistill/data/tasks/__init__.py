"""Tasks: a training stream, a held-out test set and a verifier — built in, or from the user's data."""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from opdistill.data.examples import (
    EVAL_SPLITS,
    Example,
    ExampleStream,
    LazyExampleStream,
    open_source,
    read_examples,
)
from opdistill.errors import UserError

Verifier = Callable[[str, Example], bool]


class Stream(Protocol):
    def __getitem__(self, index: int) -> Example: ...
    def batch(self, step: int, size: int) -> list[Example]: ...


@dataclass
class Task:
    name: str
    train: Stream  # endless, deterministic in (seed, index)
    test: list[Example]  # held out; may be empty for user data without an eval file
    verify: Verifier  # completion text, example -> correct?


class RegexVerifier:
    """Correct when the last match of ``pattern`` (its group 1, if it has groups) equals ``example.answer``;
    ``extract`` gives that final answer (diversity metrics count distinct ones)."""

    def __init__(self, pattern: str):
        try:
            self.compiled = re.compile(pattern)
        except re.error as err:
            raise UserError(f"answer regex {pattern!r} does not compile: {err}.") from None

    def extract(self, completion: str) -> str | None:
        matches = list(self.compiled.finditer(completion))
        if not matches:
            return None
        found = matches[-1].group(1) if self.compiled.groups else matches[-1].group(0)
        return None if found is None else found.strip()

    def __call__(self, completion: str, example: Example) -> bool:
        found = self.extract(completion)
        return found is not None and found == example.answer.strip()


def function_verifier(spec: str) -> Verifier:
    """Import a user verifier named ``module:function``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise UserError(f"verifier {spec!r} must look like module:function.")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import verifier {spec!r}: {err}.") from None
    if not callable(fn):
        raise UserError(f"verifier {spec!r} is not a function.")
    return lambda completion, example: bool(fn(completion, example))


class _Limited:
    """The first ``n`` examples of a stream, cycled: the prompt-limited regime (held, so a lazily read stream
    is not re-read from its start every cycle)."""

    def __init__(self, stream: Stream, n: int):
        self.stream, self.n = stream, n
        self.held: list[Example] = []

    def __getitem__(self, index: int) -> Example:
        if not self.held:
            self.held = [self.stream[i] for i in range(self.n)]
        return self.held[index % self.n]

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


def _builtin() -> dict[str, tuple[str, Callable[..., tuple[Stream, list[Example], Verifier]]]]:
    from opdistill.data.tasks import addition, capitals, guess

    return {
        "addition": (addition.DESCRIPTION, addition.build),
        "capitals": (capitals.DESCRIPTION, capitals.build),
        "guess": (guess.DESCRIPTION, guess.build),
    }


def _check_options(task: str, build: Callable, options: dict[str, Any]) -> None:
    """Each of ``options`` is a keyword of the task's ``build`` with a value of its default's type (an int
    does for a float)."""
    signature = inspect.signature(build).parameters
    parameters = {name: p.default for name, p in signature.items() if name != "seed"}
    for key, value in options.items():
        if key not in parameters:
            choices = ", ".join(parameters) or "none"
            raise UserError(
                f"data.task_options.{key} is not an option of task {task!r} (its options: {choices})."
            )
        kind = type(parameters[key])
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise UserError(
                f"data.task_options.{key} must be a {kind.__name__}, like its default {parameters[key]!r}; "
                f"got {value!r}."
            )


def task_names() -> dict[str, str]:
    """Built-in task name -> one-line description."""
    return {name: desc for name, (desc, _) in _builtin().items()}


def load_task(
    task: str = "",
    task_options: dict[str, Any] | None = None,
    train_file: str = "",
    eval_file: str = "",
    columns: dict[str, str] | None = None,
    streaming: bool = False,
    shuffle_buffer: int = 10000,
    n_train_prompts: int = 0,
    answer_regex: str = r"-?\d+(?:\.\d+)?",
    verifier: str = "",
    seed: int = 0,
) -> Task:
    """The Task a DataConfig describes (its fields are this function's keywords)."""
    if task:
        builtin = _builtin()
        if task not in builtin:
            raise UserError(
                f"unknown task {task!r}; built-in tasks: {', '.join(builtin)} (or give data.train_file)."
            )
        build = builtin[task][1]
        _check_options(task, build, task_options or {})
        try:
            train, test, verify = build(seed=seed, **(task_options or {}))
        except TypeError as err:
            raise UserError(f"bad data.task_options for task {task!r}: {err}.") from None
    else:
        if streaming:
            train = LazyExampleStream(open_source(train_file, columns), seed, shuffle_buffer)
        else:
            train = ExampleStream(read_examples(train_file, columns), seed)
        # evaluation sets are small: always read whole, so every line is checked before training starts
        test = (
            read_examples(eval_file, columns, EVAL_SPLITS, require_answer=not verifier) if eval_file else []
        )
        verify = function_verifier(verifier) if verifier else RegexVerifier(answer_regex)
    if n_train_prompts > 0:
        train = _Limited(train, n_train_prompts)
    return Task(task or train_file, train, test, verify)


def task_from_config(data, seed: int) -> Task:
    """``load_task`` from a DataConfig (the fields it takes; the others say where completions come from)."""
    fields = {k: getattr(data, k) for k in inspect.signature(load_task).parameters if hasattr(data, k)}
    return load_task(**fields, seed=seed)


def corpus_text(task: Task, n: int = 2000) -> Iterable[str]:
    """Text to build a character vocabulary from: every example of a file (read lazily, once, when the
    file is streamed; the first n of an endless generator) and the test set."""
    test = [ex.text() for ex in task.test]
    if isinstance(task.train, LazyExampleStream):
        source = task.train.source
        return itertools.chain((source.parse(i, raw).text() for i, raw in source.records()), test)
    train = (
        task.train.examples if isinstance(task.train, ExampleStream) else [task.train[i] for i in range(n)]
    )
    return [ex.text() for ex in train] + test
