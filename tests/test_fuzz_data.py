"""Data fuzzing (docs/data.md): malformed JSONL lines and dataset rows, generated fault by fault and hidden at
a seeded random place among good records, each read the ways a run reads data: through ``load_config`` and
``task_from_config`` as ``opd sft`` / ``opd distill`` do (the whole file, or streamed: ``data.streaming``),
and as evaluation data (``data.eval_file``; ``opd eval --data`` and ``opd generate --data`` call the same
``read_examples``). Each must stop with a UserError that starts with the faulty record's location
(``FILE:LINE`` for JSONL, ``DATASET row N`` for a dataset) and names its field, and the file without that
record must give back every one of its examples. ``write_jsonl`` leaves its file whole or as it was. The slow
tier mutates good files at random, bytes and structure: a clean load or a located UserError, nothing else."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from opdistill.config import load_config
from opdistill.data.examples import (
    Example,
    ExampleStream,
    LazyExampleStream,
    parse_record,
    read_examples,
    write_jsonl,
)
from opdistill.data.rendering import completion_target
from opdistill.data.tasks import task_from_config
from opdistill.errors import UserError

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets.disable_progress_bars()

KINDS = ("qa", "sft", "chat")  # a prompt with its answer; an SFT completion with token ids; chat messages
TEXT_FIELDS = ("answer", "completion", "privileged", "id", "teacher")
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
COLUMNS = {  # each kind's columns in a typed dataset file
    "qa": {"id": pa.string(), "prompt": pa.string(), "answer": pa.string()},
    "sft": {"prompt": pa.string(), "completion": pa.string(), "completion_ids": pa.list_(pa.int64())},
    "chat": {"prompt": pa.list_(MESSAGE), "answer": pa.string()},
}
FORMATS = ("parquet", "arrow", "saved", "dir", "json")  # every kind of dataset open_source reads
SURROGATE = "\ud800"  # half a surrogate pair: JSON can write it (an escape), no tokenizer can encode it


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """Nothing from (or into) the user's HF cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def good(kind: str, i: int) -> dict[str, Any]:
    """The i-th valid record of a kind."""
    if kind == "qa":
        return {"id": f"p{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)}
    if kind == "sft":
        return {"prompt": f"{i}+{i}=", "completion": str(2 * i), "completion_ids": [3, 4]}
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": f"{i}+{i}="}]
    return {"prompt": messages, "answer": str(2 * i)}


def example(kind: str, i: int) -> Example:
    """What ``good(kind, i)`` must read as, written out independently of the parser."""
    if kind == "qa":
        return Example(prompt=f"{i}+{i}=", answer=str(2 * i), id=f"p{i}")
    if kind == "sft":
        return Example(prompt=f"{i}+{i}=", completion=str(2 * i), completion_ids=(3, 4))
    return Example(prompt=(("system", "add"), ("user", f"{i}+{i}=")), answer=str(2 * i))


# a good record -> the bad one (a dict or list is written as JSON, a str or bytes as the line itself), and
# what the error must say after the location
Make = Callable[[dict[str, Any]], tuple[Any, str]]


@dataclass(frozen=True)
class Fault:
    """One way to break a record of the ``kinds`` it applies to."""

    name: str
    kinds: tuple[str, ...]
    make: Make
    eval_only: bool = False  # malformed only as evaluation data (no answer): a training run takes it
    first: bool = True  # may stand first in the file (a byte order mark may not: there it is dropped)


def _set(field: str, value: Any, says: str) -> Make:
    return lambda rec: ({**rec, field: value}, says)


def _without(field: str, says: str) -> Make:
    return lambda rec: ({k: v for k, v in rec.items() if k != field}, says)


def _message(j: int, message: Any, says: str) -> Make:
    """The record with its j-th chat message replaced."""
    return lambda rec: ({**rec, "prompt": [*rec["prompt"][:j], message, *rec["prompt"][j + 1 :]]}, says)


def _messages(messages: list[Any], says: str) -> Make:
    """The record with its chat messages replaced; ``{user}`` in a content becomes the record's question."""

    def make(rec: dict[str, Any]) -> tuple[Any, str]:
        question = rec["prompt"][-1]["content"]
        filled = [{**m, "content": m["content"].format(user=question)} for m in messages]
        return {**rec, "prompt": filled}, says

    return make


def _invalid_utf8(bad: bytes) -> Make:
    """The line with ``bad`` inserted in its question's text."""

    def make(rec: dict[str, Any]) -> tuple[Any, str]:
        line = json.dumps(rec).encode()
        at = line.index(b"+") + 1
        return line[:at] + bad + line[at:], f"not valid UTF-8 (byte 0x{bad[0]:02x} at column {at + 1})."

    return make


def _cut(fraction: float) -> Make:
    def make(rec: dict[str, Any]) -> tuple[Any, str]:
        text = json.dumps(rec)
        return text[: max(1, int(len(text) * fraction))], "not valid JSON ("

    return make


def _prompt_says(got: str) -> str:
    return f"field 'prompt' must be a non-empty string or a list of chat messages, got {got}."


def _text_says(field: str, value: Any) -> str:
    if field in ("answer", "id") and isinstance(value, float):  # numbers there become text, if finite
        return f"field '{field}' must be a string or a finite number, got {value}."
    return f"field '{field}' must be a string, got {type(value).__name__}."


IDS_SAYS = "field 'completion_ids' must be a list of token ids (integers >= 0)."
OBJECT_SAYS = "must be an object with 'role' and 'content' strings."
LAST_SAYS = "the last message must be the user's, which the model answers, got role"


def record_faults() -> Iterator[Fault]:
    """Faults of a record's values: missing fields, wrong types, empty and blank strings, non-text, bad chat
    messages. Every one applies to JSONL lines and dataset rows alike."""
    every = KINDS
    yield Fault("no prompt", every, _without("prompt", "field 'prompt' is missing."))
    for value, got in ((5, "int"), (2.5, "float"), (True, "bool"), ({"a": "x"}, "dict"), ("", "''")):
        yield Fault(f"prompt {value!r}", every, _set("prompt", value, _prompt_says(got)))
    for value in ("   ", "\t\n ", "\u3000"):
        yield Fault(f"prompt {value!r}", every, _set("prompt", value, _prompt_says("only whitespace")))
    for text, at in ((SURROGATE + "x", 0), ("ab" + SURROGATE, 2)):
        says = f"field 'prompt' holds {SURROGATE!r} at character {at}, half a surrogate pair: not text."
        yield Fault(f"prompt {text!r}", every, _set("prompt", text, says))
    for field in TEXT_FIELDS:
        values: list[Any] = [[1], {"a": 1}, True]
        values += [float("nan"), float("inf")] if field in ("answer", "id") else [7, 7.5]
        for value in values:
            yield Fault(f"{field} {value!r}", every, _set(field, value, _text_says(field, value)))
        says = f"field '{field}' holds {SURROGATE!r} at character 0, half a surrogate pair: not text."
        yield Fault(f"{field} surrogate", every, _set(field, SURROGATE, says))
    for value in ("12", 3, {"0": 1}, [1.5], [-1], [True], [None], ["3"], [[1]]):
        yield Fault(f"completion_ids {value!r}", every, _set("completion_ids", value, IDS_SAYS))
    says = "field 'completion_ids' needs the completion's text too."
    yield Fault("ids without completion", ("sft",), _without("completion", says))
    yield Fault("ids with empty completion", ("sft",), _set("completion", "", says))
    yield Fault(
        "no answer to evaluate", ("qa", "chat"), _without("answer", "field 'answer' is missing;"), True
    )
    yield Fault(
        "empty answer to evaluate", ("qa", "chat"), _set("answer", "", "field 'answer' is missing;"), True
    )
    yield from message_faults()


def message_faults() -> Iterator[Fault]:
    chat = ("chat",)
    for j in (0, 1):  # the system message, then the user's
        role, where = ("system", "user")[j], f"field 'prompt'[{j}]"
        for message in ("hi", 3, [], ["user", "hi"], {"role": role}, {"role": role, "content": 3}):
            yield Fault(f"message {j} {message!r}", chat, _message(j, message, f"{where} {OBJECT_SAYS}"))
        for bad in ("robot", "User", "tool", 3, ""):
            says = f"{where}: role must be system, user or assistant, got {bad!r}."
            yield Fault(f"message {j} role {bad!r}", chat, _message(j, {"role": bad, "content": "x"}, says))
        says = f"{where} holds {SURROGATE!r} at character 0, half a surrogate pair: not text."
        yield Fault(f"message {j} surrogate", chat, _message(j, {"role": role, "content": SURROGATE}, says))
    yield Fault("no messages", chat, _set("prompt", [], "field 'prompt' is an empty list of messages."))
    user, system = {"role": "user", "content": "{user}"}, {"role": "system", "content": "add"}
    for name, messages, says in (
        ("ends with a reply", [user, {"role": "assistant", "content": "4"}], f"[1]: {LAST_SAYS} 'assistant'"),
        ("only a system message", [system], f"[0]: {LAST_SAYS} 'system'"),
        ("ends with a system message", [user, system], f"[1]: {LAST_SAYS} 'system'"),
        (
            "empty question",
            [system, {**user, "content": ""}],
            "[1]: the last message, the user's, has no text.",
        ),
        (
            "blank question",
            [system, {**user, "content": " \n"}],
            "[1]: the last message, the user's, has no text.",
        ),
    ):
        yield Fault(name, chat, _messages(messages, f"field 'prompt'{says}"))


def null_faults(strict: bool) -> Iterator[Fault]:
    """Null values. JSONL is strict: a null is a value of the wrong type. In a dataset a null is an absent
    value (columns are shared by every row), so only a null prompt, answer (for evaluation), message or
    message part is a fault there."""
    every = KINDS
    says = _prompt_says("NoneType") if strict else "field 'prompt' is missing."
    yield Fault("prompt null", every, _set("prompt", None, says))
    if strict:
        for field in TEXT_FIELDS:  # (an SFT record's null completion is named by its token ids: below)
            kinds = every if field != "completion" else ("qa", "chat")
            says = f"field '{field}' must be a string, got NoneType."
            yield Fault(f"{field} null", kinds, _set(field, None, says))
        yield Fault("completion_ids null", every, _set("completion_ids", None, IDS_SAYS))
    else:
        yield Fault("answer null", ("qa", "chat"), _set("answer", None, "field 'answer' is missing;"), True)
    says = "field 'completion_ids' needs the completion's text too."
    yield Fault("completion null beside ids", ("sft",), _set("completion", None, says))
    yield Fault("a null token id", ("sft",), _set("completion_ids", [3, None], IDS_SAYS))
    for j in (0, 1):
        role, where = ("system", "user")[j], f"field 'prompt'[{j}]"
        yield Fault(f"message {j} null", ("chat",), _message(j, None, f"{where} {OBJECT_SAYS}"))
        message = {"role": role, "content": None}
        yield Fault(f"message {j} content null", ("chat",), _message(j, message, f"{where} {OBJECT_SAYS}"))
        says = f"{where}: role must be system, user or assistant, got None."
        yield Fault(f"message {j} role null", ("chat",), _message(j, {"role": None, "content": "x"}, says))


def line_faults() -> Iterator[Fault]:
    """Faults of a JSONL line as text: not JSON, not an object, not UTF-8, bytes of another kind of file."""
    every, not_json = KINDS, "not valid JSON ("
    for text in ("[1, 2]", "3", "-0.5", '"prompt"', "null", "true", "false", "[]"):
        yield Fault(f"line {text}", every, lambda rec, text=text: (text, "each line must be a JSON object"))
    yield Fault("an empty object", every, lambda rec: ("{}", "field 'prompt' is missing."))
    yield Fault("the record in a list", every, lambda rec: ([rec], "each line must be a JSON object"))
    for fraction in (0.0, 0.33, 0.5, 0.99):
        yield Fault(f"cut at {fraction}", every, _cut(fraction))
    for bad in (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"):
        yield Fault(f"invalid UTF-8 {bad!r}", every, _invalid_utf8(bad))
    binary = (
        (b"\x00\x01\x02\x7f", f"{not_json}Expecting value)."),
        (b"\x89PNG\x1a", "not valid UTF-8 (byte 0x89 at column 1)."),
        (b"\x1f\x8b\x08\x00", "not valid UTF-8 (byte 0x8b at column 2)."),
        (b"PK\x03\x04\x14\x00", f"{not_json}Expecting value)."),
    )
    for data, says in binary:
        yield Fault(f"binary {data!r}", every, lambda rec, data=data, says=says: (data, says))
    bom = "\ufeff"
    yield Fault(
        "BOM not first",
        every,
        lambda rec: (bom + json.dumps(rec), f"{not_json}Unexpected UTF-8 BOM"),
        first=False,
    )
    yield Fault("two records", every, lambda rec: (json.dumps(rec) * 2, f"{not_json}Extra data)."))
    yield Fault("trailing text", every, lambda rec: (json.dumps(rec) + " x", f"{not_json}Extra data)."))
    yield Fault("Python repr", every, lambda rec: (repr(rec), f"{not_json}Expecting property name"))
    yield Fault(
        "trailing comma",
        every,
        lambda rec: (json.dumps(rec)[:-1] + ",}", f"{not_json}Expecting property name"),
    )
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    yield Fault("nested 100,000 deep", every, lambda rec: (deep, f"{not_json}nested too deeply to read)."))
    long_int = '{"prompt": "1+1=", "answer": ' + "9" * 5000 + "}"
    yield Fault(
        "5000-digit number", every, lambda rec: (long_int, f"{not_json}Exceeds the limit (4300 digits)")
    )


# ---- reading as a run reads ----------------------------------------------------------------------------


def read(spec: str, way: str, count: int, eval_train: str = "") -> list[Example]:
    """The examples of ``spec`` the ``way`` a run takes them, through its config: ``train`` (``opd sft`` /
    ``opd distill``: the whole file, read before the first step), ``stream`` (``data.streaming``: one epoch of
    ``count`` records, then the next's first, so the first epoch's size is learnt), ``eval``
    (``data.eval_file``, beside the training file ``eval_train``: every answer required)."""
    overrides = {
        "train": [f"data.train_file={spec}"],
        "stream": [f"data.train_file={spec}", "data.streaming=true", "data.shuffle_buffer=3"],
        "eval": [f"data.train_file={eval_train}", f"data.eval_file={spec}"],
    }[way]
    task = task_from_config(load_config(None, overrides).data, seed=0)
    if way == "eval":
        return task.test
    if way == "train":
        assert isinstance(task.train, ExampleStream)
        return task.train.examples
    stream = task.train
    assert isinstance(stream, LazyExampleStream)
    examples = [stream[i] for i in range(count)]
    stream[count]  # the next epoch's first: the first epoch has ended and counted its records
    assert stream.length == count, f"an epoch of {stream.length} records, not {count}"
    return examples


def failure(spec: str, way: str, count: int, eval_train: str, expected: str) -> str | None:
    """None when reading ``spec`` fails with a UserError that starts with ``expected`` (a regular expression);
    else what happened."""
    try:
        got = read(spec, way, count, eval_train)
    except UserError as err:
        return None if re.match(expected, str(err)) else f"UserError {str(err)[:400]!r}"
    except Exception as err:  # the bug this file hunts: anything but a UserError
        return f"{type(err).__name__}: {str(err)[:400]}"
    return f"loaded {len(got)} examples"


def ways(kind: str, fault: Fault) -> tuple[str, ...]:
    if fault.eval_only:
        return ("eval",)
    return ("train", "stream") if kind == "sft" else ("train", "stream", "eval")  # SFT data has no answers


@pytest.fixture
def eval_train(tmp_path) -> str:
    """A good training file, beside which an evaluation file is read."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return str(path)


# ---- JSONL ----------------------------------------------------------------------------------------------


def as_line(record: Any) -> bytes:
    if isinstance(record, bytes):
        return record
    return (record if isinstance(record, str) else json.dumps(record)).encode()


def write_lines(path: Path, lines: list[bytes], rng: random.Random) -> list[int]:
    """``lines`` as a JSONL file with LF or CRLF endings and blank lines here and there; each one's number."""
    newline, out, numbers = rng.choice([b"\n", b"\r\n"]), [], []
    for line in lines:
        while rng.random() < 0.15:
            out.append(rng.choice([b"", b"  ", b"\t"]))
        out.append(line)
        numbers.append(len(out))
    path.write_bytes(b"".join(line + newline for line in out))
    return numbers


def jsonl_cases() -> list[tuple[Fault, str]]:
    faults = [*line_faults(), *record_faults(), *null_faults(strict=True)]
    return [(fault, kind) for fault in faults for kind in fault.kinds]


def test_a_malformed_jsonl_line_is_named_by_file_line_and_field(tmp_path, eval_train, tally):
    """Every line fault, record fault and null, in each kind of record it applies to, at a seeded random
    line among good ones (LF or CRLF, blank lines between): read whole, streamed and as evaluation data."""
    cases, failures = jsonl_cases(), []
    started = time.perf_counter()
    for number, (fault, kind) in enumerate(cases):
        rng = random.Random(number)
        n = rng.randint(1, 8)  # good records besides the bad one
        at = rng.randint(0 if fault.first else 1, n)
        bad, says = fault.make(good(kind, at))
        lines = [as_line(good(kind, i)) for i in range(n + 1)]
        lines[at] = as_line(bad)
        path = tmp_path / f"{number}.jsonl"
        numbers = write_lines(path, lines, rng)
        expected = re.escape(f"{path}:{numbers[at]}: {says}")
        for way in ways(kind, fault):
            if (got := failure(str(path), way, n + 1, eval_train, expected)) is not None:
                failures.append(f"{fault.name} [{kind}, {way}]: expected {expected!r}, got {got}")
        if fault.eval_only:  # a good training record: nothing about it stops a training run
            assert len(read(str(path), "train", n + 1)) == n + 1, fault.name
        # the good records alone: every one comes back, in order
        write_lines(path, lines[:at] + lines[at + 1 :], rng)
        kept = [example(kind, i) for i in range(n + 1) if i != at]
        if n and read(str(path), "train", n) != kept:
            failures.append(f"{fault.name} [{kind}]: the good records did not all load")
    tally["data_fuzz_cases"] += len(cases)
    print(f"{len(cases)} malformed JSONL files in {time.perf_counter() - started:.1f} s")
    assert len(cases) >= 200
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:30])


# ---- HF datasets ----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as compared with what Arrow gives back: a null struct field is an absent key."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _holds(column_type: Any, value: Any) -> bool:
    """Whether a column of ``column_type`` (None: the type Arrow infers) gives ``value`` back unchanged. Arrow
    turns 1.5 into 1 in an integer list, and cannot hold half a surrogate pair."""
    try:
        back = pa.array([value], type=column_type).to_pylist()[0]
    except Exception:
        return False
    return json.dumps(_plain(back), sort_keys=True) == json.dumps(_plain(value), sort_keys=True)


def typed(kind: str, rows: list[dict[str, Any]], at: int) -> tuple[Any, bool] | None:
    """``rows`` as an Arrow table of ``kind``'s columns, and whether every row is bad; None when Arrow cannot
    hold the bad values. A bad value of another type gets a column of its type, null in the other rows; a
    prompt of another type (no row may lack a prompt) goes in every row, so row 0 is the first bad one."""
    columns, rows, every_row = dict(COLUMNS[kind]), [dict(row) for row in rows], False
    for field, value in list(rows[at].items()):
        if field in columns and _holds(columns[field], value):
            continue
        if not _holds(None, value):
            return None
        columns[field] = pa.array([value]).type
        for i, row in enumerate(rows):
            if field == "prompt":
                row["prompt"] = value
            elif i != at:
                row[field] = None
                if field == "completion":  # token ids without their text are a fault of their own
                    row["completion_ids"] = None
        every_row = every_row or field == "prompt"
    return pa.Table.from_pylist(rows, schema=pa.schema(list(columns.items()))), every_row


def write_dataset(folder: Path, fmt: str, data: Any) -> tuple[str, str]:
    """``data`` (rows for ``json``, else an Arrow table) as a dataset of format ``fmt`` in ``folder``: the
    spec a config names it by, and how errors name its rows."""
    folder.mkdir(parents=True)
    if fmt == "json":  # one JSON array, a row a line
        path = folder / "d.json"
        path.write_text("[\n" + ",\n".join(json.dumps(row) for row in data) + "\n]\n")
        return str(path), str(path)
    if fmt == "saved":  # Dataset.save_to_disk: one table, no splits
        datasets.Dataset(data).save_to_disk(str(folder / "saved"))
        return str(folder / "saved"), str(folder / "saved")
    if fmt == "arrow":
        path = folder / "d.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, data.schema) as writer:
            writer.write_table(data)
        return str(path), f"{path} [train]"
    path = folder / ("d.parquet" if fmt == "parquet" else "files/train.parquet")  # a file, a directory
    path.parent.mkdir(exist_ok=True)
    pq.write_table(data, path)
    spec = str(path if fmt == "parquet" else path.parent)
    return spec, f"{spec} [train]"


def dataset_cases() -> list[tuple[Fault, str]]:
    faults = [*record_faults(), *null_faults(strict=False)]
    return [(fault, kind) for fault in faults for kind in fault.kinds]


def test_a_malformed_dataset_row_is_named_by_dataset_row_and_field(tmp_path, eval_train, tally):
    """Every record fault of JSONL, and nulls, in datasets: each case in one of the five formats in turn; a
    value Arrow cannot hold in the format's typed columns goes in the JSON array, which holds anything."""
    cases, failures, formats = dataset_cases(), [], Counter()
    started = time.perf_counter()
    for number, (fault, kind) in enumerate(cases):
        rng = random.Random(number)
        n = rng.randint(1, 8)
        at = rng.randint(0, n)
        bad, says = fault.make(good(kind, at))
        rows = [good(kind, i) for i in range(n + 1)]
        rows[at] = bad
        fmt, table, every_row = FORMATS[number % len(FORMATS)], None, False
        if fmt != "json" and (made := typed(kind, rows, at)) is not None:
            table, every_row = made
        fmt = fmt if table is not None else "json"
        formats[fmt] += 1
        spec, where = write_dataset(tmp_path / str(number), fmt, rows if table is None else table)
        # a stream meets first whichever bad row its shuffle puts first
        expected = re.escape(f"{where} row ") + (r"\d+" if every_row else str(at)) + re.escape(f": {says}")
        for way in ("eval",) if fault.eval_only else ("train", "stream"):
            if (got := failure(spec, way, n + 1, eval_train, expected)) is not None:
                failures.append(f"{fault.name} [{kind}, {fmt}, {way}]: expected {expected!r}, got {got}")
        if every_row or not n:  # a prompt column of another type, or no other row
            continue
        # the good rows alone: every one comes back
        keep = [i for i in range(n + 1) if i != at]
        rest = [rows[i] for i in keep] if table is None else table.take(keep)
        spec, _ = write_dataset(tmp_path / str(number) / "good", fmt, rest)
        if len(got := read(spec, "train", n)) != n:
            failures.append(f"{fault.name} [{kind}, {fmt}]: {len(got)} of the {n} good rows loaded")
    tally["data_fuzz_cases"] += len(cases)
    print(f"{len(cases)} malformed datasets ({dict(formats)}) in {time.perf_counter() - started:.1f} s")
    assert len(cases) >= 150 and min(formats[fmt] for fmt in FORMATS) >= 20
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:30])


def json_array_faults(n: int, at: int) -> Iterator[tuple[str, bytes, str]]:
    """Faults of a JSON array file as text: (name, the file, a regular expression for what its error says
    after the spec). The array holds records 0..n, record k on line k + 2; ``at`` < n is broken."""
    lines = [json.dumps(good("qa", i)) for i in range(n + 1)]

    def array(*rows: str, end: str = "\n]\n", separator: str = ",\n") -> bytes:
        text = "[\n" + separator.join(rows) + end
        return text.encode("utf-8", "surrogateescape")

    before, after = lines[:at], lines[at + 1 :]
    for text in ("3", "null", '"x"', "[]", f"[{lines[at]}]"):
        says = f" row {at}: each row must be a JSON object with a 'prompt' field."
        yield f"element {text}", array(*before, text, *after), re.escape(says)
    at_line = re.escape(f":{at + 2}:") + r"\d+: not valid JSON \("
    yield "cut", array(*before, lines[at][: len(lines[at]) // 2], end=""), at_line
    yield "comma doubled", array(*before, lines[at] + ",", *after), at_line + re.escape("Expecting value).")
    missing = array(*before, lines[at] + "\n" + after[0], *after[1:])
    yield (
        "comma missing",
        missing,
        re.escape(f":{at + 3}:") + r"\d+: " + re.escape("not valid JSON (Expecting ',' "),
    )
    not_utf8 = lines[at].replace("+", "+\udcff", 1)
    yield "not UTF-8", array(*before, not_utf8, *after), re.escape(f":{at + 2}: not valid UTF-8 (byte 0xff).")
    deep = "[" * 100_000 + "]" * 100_000
    yield (
        "nested too deep",
        array(*before, deep, *after),
        re.escape(": not valid JSON (nested too deeply to read)."),
    )


def csv_faults(n: int, at: int) -> Iterator[tuple[str, bytes, str, bool]]:
    """Faults of a CSV file's rows 0..n as (name, the file, a regular expression for what its error says after
    the spec, whether only evaluation minds). A file that cannot be parsed fails at the first row of the block
    the parser read, which is row ``at`` or one before it."""
    rows = [f"{i}+{i}=,{2 * i}" for i in range(n + 1)]

    def table(bad: str) -> bytes:
        text = "prompt,answer\n" + "\n".join([*rows[:at], bad, *rows[at + 1 :]]) + "\n"
        return text.encode("utf-8", "surrogateescape")

    row = re.escape(f" [train] row {at}: ")
    yield "empty prompt", table(f",{2 * at}"), row + re.escape(_prompt_says("''")), False
    yield "blank prompt", table(f"   ,{2 * at}"), row + re.escape(_prompt_says("only whitespace")), False
    yield "empty answer", table(f"{at}+{at}=,"), row + re.escape("field 'answer' is missing;"), True
    yield "no answer cell", table(f"{at}+{at}="), row + re.escape("field 'answer' is missing;"), True
    up_to_at = "(" + "|".join(str(i) for i in range(at + 1)) + ")"
    unreadable = re.escape(" [train] row ") + up_to_at + re.escape(": cannot read it or a row after it (")
    yield "stray quote", table(f'"{at}+{at}=,{2 * at}'), unreadable, False
    # (an extra field in the first row would make pandas shift every column: it is looked for before)
    extra = re.escape(" [train] row 0: 3 fields, but the header names 2.") if at == 0 else unreadable
    yield "extra field", table(f"{at}+{at}=,{2 * at},x"), extra, False
    yield "not UTF-8", table(f"{at}+\udcff{at}=,{2 * at}"), unreadable, False


def test_a_malformed_json_array_or_csv_file_is_named_by_line_or_row(tmp_path, eval_train, tally):
    """Faults of the file's text, each at a seeded random record: a JSON array's by line (and row), a CSV
    file's by row."""
    failures, count = [], 0
    for number in range(12):
        rng = random.Random(number)
        n = rng.randint(1, 8)
        at = rng.randint(0, n - 1)
        cases = [(name, "json", data, says, False) for name, data, says in json_array_faults(n, at)]
        cases += [(name, "csv", data, says, eval_only) for name, data, says, eval_only in csv_faults(n, at)]
        for name, suffix, data, says, eval_only in cases:
            path = tmp_path / f"{number}-{count}.{suffix}"
            path.write_bytes(data)
            count += 1
            for way in ("eval",) if eval_only else ("train", "stream"):
                expected = re.escape(str(path)) + says
                if (got := failure(str(path), way, n + 1, eval_train, expected)) is not None:
                    failures.append(
                        f"{name} [{suffix}, {way}, record {at}]: expected {expected!r}, got {got}"
                    )
    tally["data_fuzz_cases"] += count
    assert not failures, f"{len(failures)} of {count}:\n" + "\n".join(failures[:30])


# ---- good files: every example back, whatever the layout --------------------------------------------------

BIG = "9" * 1_000_000 + "+1="  # a 1 MB prompt: read like any other (rendering.encode_prompts may cut it)
ODD_TEXT = "Ωmega ✓ 😀 \u202eRTL\u202c e\u0301 \x00 \\n \u2028"  # what text may hold: NUL, U+2028, ...


def good_records(kind: str, n: int, rng: random.Random) -> tuple[list[dict[str, Any]], list[Example]]:
    """n good records of a kind, one with a 1 MB prompt and one with odd text, and the examples they are."""
    records, examples = [good(kind, i) for i in range(n)], [example(kind, i) for i in range(n)]
    for text in (BIG, ODD_TEXT):
        i = rng.randrange(n)
        if kind == "chat":
            records[i]["prompt"][-1]["content"] = text
            examples[i] = dataclasses.replace(examples[i], prompt=(("system", "add"), ("user", text)))
        else:
            records[i]["prompt"] = text
            examples[i] = dataclasses.replace(examples[i], prompt=text)
    return records, examples


def test_a_good_file_gives_back_every_example_whatever_its_layout(tmp_path, eval_train):
    """JSONL with a byte order mark, LF, CRLF or CR endings, blank and whitespace-only lines (skipped: not
    records), no newline at the end, integer answers; datasets with other columns, extra message fields and
    null optional values (ignored); each read whole, streamed and as evaluation data: every example, once."""
    for number, (kind, fmt) in enumerate((kind, fmt) for kind in KINDS for fmt in ("jsonl", *FORMATS)):
        rng = random.Random(number)
        n = rng.randint(2, 12)
        records, expected = good_records(kind, n, rng)
        if fmt == "jsonl":
            path = tmp_path / f"{number}.jsonl"
            newline = rng.choice(["\n", "\r\n", "\r"])
            lines = [json.dumps({**r, "answer": int(r["answer"])} if "answer" in r else r) for r in records]
            for _ in range(rng.randint(1, 4)):
                lines.insert(rng.randint(0, len(lines)), rng.choice(["", "  ", "\t \t"]))
            path.write_bytes(("\ufeff" + newline.join(lines)).encode())  # no newline at the end
            spec = str(path)
        else:
            for r in records:
                r.update({"source": "gen", "privileged": None})  # another column; an optional one, null
                for message in r["prompt"] if kind == "chat" else []:
                    message["name"] = "x"  # a message field beyond role and content
            columns = {**COLUMNS[kind], "source": pa.string(), "privileged": pa.string()}
            if kind == "chat":
                columns["prompt"] = pa.list_(pa.struct([*MESSAGE, pa.field("name", pa.string())]))
            table = pa.Table.from_pylist(records, schema=pa.schema(list(columns.items())))
            spec, _ = write_dataset(tmp_path / str(number), fmt, records if fmt == "json" else table)
        for way in ("train", "stream") if kind == "sft" else ("train", "stream", "eval"):
            got = read(spec, way, n, eval_train)
            assert (Counter(got) if way == "stream" else got) == (
                Counter(expected) if way == "stream" else expected
            ), f"{kind} {fmt} {way}"


def test_an_empty_file_holds_no_examples(tmp_path, eval_train, tally):
    """Empty in every way a file can be: no bytes, blank lines, a byte order mark alone, an empty JSON array,
    a CSV header alone, tables of no rows. (An empty ``save_to_disk`` directory or directory of data files
    fails inside ``datasets``: a UserError naming it, with ``datasets``' reason.)"""
    empty = pa.table({"prompt": pa.array([], pa.string())})
    files: dict[str, bytes | Any] = {
        "a.jsonl": b"",
        "b.jsonl": b"\n\n",
        "c.jsonl": b" \n\t\r\n",
        "d.jsonl": b"\xef\xbb\xbf",
        "e.jsonl": b"\xef\xbb\xbf\n",
        "f.json": b"[]",
        "g.json": b"\xef\xbb\xbf [\n]\n",
        "h.json": b"",
        "i.csv": b"",
        "j.csv": b"prompt,answer\n",
        "k.parquet": b"",
        "l.arrow": b"",
        "m.parquet": empty,
        "n.arrow": empty,
    }
    specs = {}  # spec -> what its error must say (a regular expression)
    for name, data in files.items():
        if isinstance(data, bytes):
            (tmp_path / name).write_bytes(data)
            spec = str(tmp_path / name)
        else:
            spec, _ = write_dataset(tmp_path / name.replace(".", "-"), name.split(".")[1], data)
        specs[spec] = re.escape(f"data file {spec}") + r"( \[train\])? holds no examples\."
    for fmt in ("saved", "dir"):
        spec, _ = write_dataset(tmp_path / f"empty-{fmt}", fmt, empty)
        specs[spec] = ".*" + re.escape(spec)
    failures = []
    for spec, says in specs.items():
        for way in ("train", "stream", "eval"):
            if (got := failure(spec, way, 0, eval_train, says)) is not None:
                failures.append(f"{spec} [{way}]: {got}")
    tally["data_fuzz_cases"] += len(specs)
    assert not failures, "\n".join(failures)


def test_a_csv_cell_is_read_as_the_text_it_is(tmp_path):
    """Left to pandas, "007" became 7, "2" 2.0 in a column with an empty cell, "NA", "None" and "null" absent
    values, and a first row with a field too many made the first column an index, every value moving left."""
    path = tmp_path / "d.csv"
    path.write_text("id,prompt,answer\n007,1+1=,2\nNA,None,\nnull,2+2=,4.50\n")
    assert read_examples(str(path)) == [
        Example(prompt="1+1=", answer="2", id="007"),
        Example(prompt="None", id="NA"),
        Example(prompt="2+2=", answer="4.50", id="null"),
    ]
    path.write_text("prompt,answer\n1+1=,2,x\n2+2=,4\n")
    with pytest.raises(UserError) as err:
        read_examples(str(path))
    assert str(err.value) == f"{path} [train] row 0: 3 fields, but the header names 2."


def test_a_corrupt_memory_mapped_dataset_is_an_error_not_a_crash(tmp_path, tally):
    """A save_to_disk table whose string offsets point past its data. Arrow maps it unchecked: reading it
    killed the process (SIGBUS). Read in a forked child, so that a crash fails this test alone."""
    offsets = pa.py_buffer(struct.pack("<4i", 0, 4, 1 << 20, 8))
    corrupt = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"1+1=2+2=")])
    spec, _ = write_dataset(tmp_path / "d", "saved", pa.table({"prompt": corrupt}))
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes the error's message back, or nothing
        try:
            read_examples(spec)
        except UserError as err:
            os.write(writable, str(err).encode())
        finally:
            os._exit(0)
    os.close(writable)
    with os.fdopen(readable, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the reader died of signal {os.WTERMSIG(status)}"
    assert message.startswith(f"{spec} row 0: cannot read it or a row after it (Column 0: "), message
    tally["data_fuzz_cases"] += 1


def test_token_ids_past_the_vocabulary_are_an_error_not_an_overflow(tokenizer):
    """Reading takes any id >= 0 (the vocabulary is the model's); the SFT target refuses one the tokenizer
    lacks, even one past a C long, which decoding cannot take."""
    for ids in ([len(tokenizer)], [2**70]):
        record = {"prompt": "1+1=", "completion": "2", "completion_ids": ids}
        example = parse_record(record, "d.jsonl:1")
        with pytest.raises(UserError, match="its completion_ids do not decode to its completion"):
            completion_target(tokenizer, example)


# ---- nothing half-written ------------------------------------------------------------------------------


class FailingMidway(list):
    """Examples whose writing fails half-way through with ``error``, as a full disk or Ctrl-C would."""

    def __init__(self, examples: list[Example], error: BaseException):
        super().__init__(examples)
        self.error = error

    def __iter__(self) -> Iterator[Example]:
        for i, ex in enumerate(super().__iter__()):
            if i == len(self) // 2:
                raise self.error
            yield ex


@pytest.mark.parametrize("before", ["old", "none"])
def test_write_jsonl_leaves_the_whole_new_file_or_the_old_one(tmp_path, before, tally):
    path = tmp_path / "out.jsonl"
    old = [Example(prompt="1+1=", answer="2")]
    if before == "old":
        write_jsonl(old, path)
    # 200 kB: the half written before each failure has left the write buffer for the disk
    examples = [Example(prompt=f"{i}+{i}=" + " " * 2000, answer=str(2 * i)) for i in range(100)]
    unserialisable = Example(prompt="x", answer=cast(str, object()))
    full_disk = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    failing = [
        (examples[:50] + [unserialisable] + examples[50:], TypeError),
        (FailingMidway(examples, full_disk), UserError),
        (FailingMidway(examples, KeyboardInterrupt()), KeyboardInterrupt),
    ]
    for bad, raised in failing:
        with pytest.raises(raised) as err:
            write_jsonl(bad, path)
        if raised is UserError:
            assert str(err.value) == f"cannot write {path} (No space left on device); it is left as it was."
        assert sorted(os.listdir(tmp_path)) == (["out.jsonl"] if before == "old" else [])  # no temporary left
        assert before == "none" or read_examples(str(path)) == old
    write_jsonl(examples, path)
    assert read_examples(str(path)) == examples and os.listdir(tmp_path) == ["out.jsonl"]
    tally["data_fuzz_cases"] += len(failing)


# ---- the slow tier: random mutations --------------------------------------------------------------------

# what a mutated node becomes: every JSON type, edge values, chat roles, text that is not text
VALUES: list[Any] = [None, True, False, 0, -1, 2**70, 1.5, float("nan"), float("inf")]
VALUES += ["", " ", "x", SURROGATE, "user", "assistant", "robot", "A" * 999]
VALUES += [[], {}, [1], {"role": "user"}, [{"role": "user", "content": "x"}]]
KEYS = ["answr", "role", "content", "prompt", "name", "completion_ids", "answer", ""]  # keys a mutant adds
# bytes a mutant inserts: JSON's punctuation, line ends, invalid and odd UTF-8, escapes, a 5000-digit number
INSERTS = [bytes([byte]) for byte in b'\x00\xff\xc3\n\r"{}[],:\\ \t']
INSERTS += [b"\r\n", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\\u", b"\\ud800", b"NaN", b"null"]
INSERTS += [b"1e999", b"9" * 5000]


def mutate_value(value: Any, rng: random.Random) -> Any:
    """``value`` with one node of its JSON tree replaced by a value of any type, removed, or added to."""
    if isinstance(value, dict | list) and value and rng.random() < 0.75:
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key, op = rng.choice(keys), rng.random()
        items: dict[Any, Any] = dict(value) if isinstance(value, dict) else dict(enumerate(value))
        if op < 0.2:
            del items[key]
        elif op < 0.3:
            items[rng.choice(KEYS) if isinstance(value, dict) else len(items)] = rng.choice(VALUES)
        else:
            items[key] = mutate_value(items[key], rng)
        return items if isinstance(value, dict) else list(items.values())
    return rng.choice(VALUES)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a byte changed, bytes inserted, a span deleted or repeated, or the end cut off."""
    i, op = rng.randrange(len(data) + 1), rng.randrange(5)
    if op == 0 and data:
        i = min(i, len(data) - 1)
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if op == 1:
        return data[:i] + rng.choice([*INSERTS, bytes([rng.randrange(256)])]) + data[i:]
    if op == 2:
        return data[:i] + data[i + rng.randint(1, 16) :]
    if op == 3:
        return data[:i]
    j = rng.randrange(len(data) + 1)
    return data[:j] + data[i : i + rng.randint(1, 64)] + data[j:]


def jsonl_lines(data: bytes) -> list[str]:
    """The lines of a JSONL file as its reader splits them (LF, CRLF or CR; a byte order mark dropped)."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="surrogateescape")
    return [line.rstrip("\r\n") for line in text]


def located(message: str, spec: str) -> bool:
    """Whether an error says where: the record (``SPEC:LINE``, ``SPEC row N``) or, for a fault of the whole
    file (it cannot be read, holds nothing, lacks a column), the file."""
    records = (f"{spec}:", f"{spec} row ", f"{spec} [train] row ")
    return message.startswith(
        (*records, f"data file {spec} ", f"dataset {spec} ", f"cannot load dataset {spec}")
    )


def outcome(spec: str) -> tuple[list[Example] | None, str]:
    """The examples of ``spec``, or None and the UserError's message; any other exception propagates."""
    try:
        return read_examples(spec), ""
    except UserError as err:
        return None, str(err)


def check_jsonl(path: Path, data: bytes) -> str | None:
    """None when ``data``, read as a JSONL file, gives one example per non-blank line, or fails at the first
    line that does not load by itself, and says so; else the problem."""
    path.write_bytes(data)
    lines = jsonl_lines(data)
    records = [line for line in lines if line.strip()]
    got, message = outcome(str(path))
    if got is not None:
        return None if len(got) == len(records) else f"{len(got)} examples of {len(records)} records"
    if not records:
        return None if message == f"data file {path} holds no examples." else f"empty: {message!r}"
    named = re.match(re.escape(str(path)) + r":(\d+): ", message)
    if named is None:
        return f"no line named: {message!r}"
    line = int(named[1])
    alone, before = path.with_suffix(".alone"), path.with_suffix(".before")
    alone.write_bytes(lines[line - 1].encode("utf-8", "surrogateescape"))
    before.write_bytes("\n".join(lines[: line - 1]).encode("utf-8", "surrogateescape"))
    earlier = [line for line in lines[: line - 1] if line.strip()]
    if outcome(str(alone))[0] is not None:
        return f"line {line} loads by itself: {message!r}"
    if earlier and len(outcome(str(before))[0] or []) != len(earlier):
        return f"lines before {line} do not all load: {message!r}"
    return None


def arrow_table(rows: list[Any]) -> Any:
    """``rows`` as an Arrow table of the types it infers, or None when it cannot hold them as they are (rows
    that are not objects, values of several types in a column, a key some rows lack: Arrow's null there)."""
    try:
        table = pa.Table.from_pylist(rows)
    except Exception:
        return None
    whole = all(isinstance(row, dict) and set(row) == set(table.column_names) for row in rows)
    return table if whole and all(_holds(None, row) for row in rows) else None


def json_length(data: bytes) -> int | None:
    """How many elements the JSON array ``data`` holds, if it is one: how many rows it must load."""
    with contextlib.suppress(ValueError, RecursionError):
        array = json.loads(data.decode("utf-8-sig"))
        return len(array) if isinstance(array, list) else None
    return None


def check_dataset(
    spec: str, fmt: str, count: int | None, rows: Any = None, table: Any = None, folder: Path = Path()
) -> str | None:
    """None when the dataset loads ``count`` examples (None: unknown), or fails naming it; else the problem.
    Given the ``rows`` (and ``table``) written, a record's fault must be named at the first row that does not
    load by itself, the rows before it loading."""
    got, message = outcome(spec)
    if got is not None:
        return None if count is None or len(got) == count else f"{len(got)} examples of {count} rows"
    if not located(message, spec):
        return f"no location: {message!r}"
    named = re.match(re.escape(spec) + r"( \[train\])? row (\d+): (?!cannot read)", message)
    if rows is None or named is None:
        return None
    at = int(named[2])
    part = (lambda a, b: rows[a:b]) if fmt == "json" else (lambda a, b: table.slice(a, b - a))
    alone, _ = write_dataset(folder / "alone", fmt, part(at, at + 1))
    if outcome(alone)[0] is not None:
        return f"row {at} loads by itself: {message!r}"
    if at:
        before, _ = write_dataset(folder / "before", fmt, part(0, at))
        if len(outcome(before)[0] or []) != at:
            return f"rows before {at} do not all load: {message!r}"
    return None


def jsonl_mutant(number: int, folder: Path) -> str | None:
    """Mutant ``number`` of a good JSONL file, checked (``check_jsonl``): half have bytes changed, half have
    records changed and are written with raw UTF-8 or escapes."""
    rng = random.Random(number)
    kind, n = rng.choice(KINDS), rng.randint(1, 8)
    records = [good(kind, i) for i in range(n)]
    if rng.random() < 0.5:
        data = b"\n".join(json.dumps(r).encode() for r in records) + b"\n"
        for _ in range(rng.randint(1, 3)):
            data = mutate_bytes(data, rng)
    else:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(n)
            records[i] = mutate_value(records[i], rng)
        ascii_only = rng.random() < 0.5  # else raw UTF-8, where half a surrogate pair is not valid
        lines = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") for r in records]
        data = b"\n".join(lines)
    problem = check_jsonl(folder / f"{number}.jsonl", data)
    return problem and f"jsonl {number}: {problem}; file {data[:300]!r}"


def dataset_mutant(number: int, folder: Path) -> tuple[str, str | None]:
    """Mutant ``number`` of a good dataset (a JSON array, parquet, Arrow, save_to_disk, CSV), checked
    (``check_dataset``): half have rows changed (in a JSON array when Arrow cannot hold them; CSV holds only
    text), half have the bytes of one of their files changed. Its format, and the problem."""
    rng = random.Random(number)
    kind, n = rng.choice(KINDS), rng.randint(1, 8)
    fmt = rng.choice(("json", "parquet", "arrow", "saved", "csv" if kind == "qa" else "json"))
    rows, folder, table = [good(kind, i) for i in range(n)], folder / f"d{number}", None
    if rng.random() < 0.5 and fmt != "csv":  # the rows
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(n)
            rows[i] = mutate_value(rows[i], rng)
        if fmt != "json":
            table = arrow_table(rows)
            fmt = fmt if table is not None else "json"
        try:
            spec, _ = write_dataset(folder, fmt, rows if table is None else table)
        except pa.ArrowNotImplementedError:  # parquet holds no struct without fields: {}
            fmt, table, folder = "json", None, folder / "json"
            spec, _ = write_dataset(folder, fmt, rows)
        problem = check_dataset(spec, fmt, n, rows, table, folder)
    else:  # the bytes of a good file
        if fmt == "csv":
            folder.mkdir()
            spec = str(folder / "d.csv")
            Path(spec).write_text(
                "id,prompt,answer\n" + "".join(f"{r['id']},{r['prompt']},{r['answer']}\n" for r in rows)
            )
        else:
            table = pa.Table.from_pylist(rows, schema=pa.schema(list(COLUMNS[kind].items())))
            spec, _ = write_dataset(folder, fmt, rows if fmt == "json" else table)
        files = [p for p in Path(spec).rglob("*") if p.is_file()] if Path(spec).is_dir() else [Path(spec)]
        target = rng.choice(files)
        data = target.read_bytes()
        for _ in range(rng.randint(1, 3)):
            data = mutate_bytes(data, rng)
        target.write_bytes(data)
        count = {"json": json_length(data), "csv": None}.get(fmt, n)  # CSV: pandas decides what a row is
        problem = check_dataset(spec, fmt, count)
    return fmt, problem and f"{fmt} {number}: {problem}"


@pytest.mark.slow
def test_random_mutations_load_whole_or_fail_where_they_are(tmp_path, tally):
    """6,000 seeded mutations of good files: 4,000 JSONL (``jsonl_mutant``), 2,000 datasets
    (``dataset_mutant``). Each must load one example per record, or fail with a UserError that says where; a
    record's fault is named at the first record that does not load by itself, and the records before it
    load. Never another exception, never a crash."""
    problems, played, started = [], Counter(), time.perf_counter()
    for number in range(4000):
        played["jsonl"] += 1
        problems.append(jsonl_mutant(number, tmp_path))
    for number in range(2000):
        fmt, problem = dataset_mutant(100_000 + number, tmp_path)
        played[fmt] += 1
        problems.append(problem)
    problems = [problem for problem in problems if problem]
    tally["data_fuzz_cases"] += sum(played.values())
    print(f"{dict(played)} mutants in {time.perf_counter() - started:.0f} s")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
