"""Examples from JSONL or HF ``datasets`` with position-precise errors, deterministic (optionally streamed)
example streams, and the one place text becomes token ids."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from opdistill.errors import UserError
from opdistill.types import Rollout

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    prompt: str | tuple[tuple[str, str], ...]  # text, or chat messages as (role, content) pairs
    answer: str = ""  # reference answer for verifiers
    completion: str = ""  # target completion for SFT
    privileged: str = ""  # context only a self-teacher sees
    id: str = ""
    teacher: str = ""  # which teacher scores this example (a key of `teachers`; empty = `teacher`)
    # the completion's token ids as the model sampled them (teacher pools, cold start, opd generate): SFT
    # trains on exactly these rather than on the text re-encoded, which may tokenize differently
    completion_ids: tuple[int, ...] = ()

    def messages(self) -> Messages:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": role, "content": content} for role, content in self.prompt]

    def text(self) -> str:
        """All text of the example, for building a character vocabulary."""
        parts = [m["content"] for m in self.messages()]
        return "".join(parts + [self.answer, self.completion, self.privileged])


def privileged_view(example: Example, template: str, system: str = "") -> Example:
    """The example as an OPSD self-teacher sees it (math.md §6): its last user turn rewritten by ``template``
    (``{privileged}``, ``{prompt}``), and a first system turn from ``system`` when that is not empty."""
    messages = [(m["role"], m["content"]) for m in example.messages()]
    users = [i for i, (role, _) in enumerate(messages) if role == "user"]
    if not users:
        raise UserError(
            f"example {example.id or example.prompt!r} has no user turn to show its privileged context in."
        )
    last = users[-1]
    messages[last] = ("user", template.format(privileged=example.privileged, prompt=messages[last][1]))
    if system:
        messages.insert(0, ("system", system.format(privileged=example.privileged, prompt="")))
    if len(messages) == 1 and isinstance(example.prompt, str):
        return dataclasses.replace(example, prompt=messages[0][1])
    return dataclasses.replace(example, prompt=tuple(messages))


def prompt_key(example: Example) -> str:
    """What makes two prompts the same prompt: its text; for chat messages, a JSON rendering of the
    (role, content) pairs — except a lone user message, which is the same prompt as its text."""
    messages = example.messages()
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


EXAMPLE_FIELDS = ("prompt", "answer", "completion", "privileged", "id", "teacher", "completion_ids")
TRAIN_SPLITS = ("train",)  # the split a dataset with several gives for training, unless one is named
EVAL_SPLITS = ("test", "validation")  # ... and for evaluation: the first of these it has
# file suffix -> the `datasets` builder that reads it (a .json file is JSONL unless it holds one JSON array)
DATASET_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class Source(Protocol):
    """Where examples come from, read lazily in a fixed order: ``records()`` yields (position, raw record),
    ``parse`` turns one into an Example or raises a UserError that names the source, position and field."""

    name: str
    length: int | None  # number of records, when known without reading them all

    def records(self) -> Iterator[tuple[int, Any]]: ...
    def where(self, position: int) -> str: ...
    def parse(self, position: int, raw: Any) -> Example: ...


class JsonlSource:
    """A JSONL file: one object per line; positions are line numbers, blank lines are skipped, and a byte
    order mark opening the file (as Windows editors write one) is dropped."""

    def __init__(self, path: Path, columns: Mapping[str, str] | None = None):
        if not path.is_file():
            raise UserError(f"data file {path} does not exist.")
        self.path, self.name, self.columns = path, str(path), dict(columns or {})
        self.length: int | None = None

    def records(self) -> Iterator[tuple[int, str]]:
        # bytes that are not UTF-8 are kept as lone surrogates, so ``parse`` can name their line
        with self.path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line

    def where(self, position: int) -> str:
        return f"{self.path}:{position}"

    def parse(self, position: int, raw: str) -> Example:
        where = self.where(position)
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as err:
            byte = raw[err.start].encode("utf-8", "surrogateescape")[0]
            raise UserError(
                f"{where}: not valid UTF-8 (byte 0x{byte:02x} at column {err.start + 1})."
            ) from None
        obj = _loads(raw, where)
        if not isinstance(obj, dict):
            raise UserError(f"{where}: each line must be a JSON object with a 'prompt' field.")
        return parse_record(obj, where, self.columns, strict=True)


class DatasetSource:
    """A HF ``datasets`` table: rows are dicts, positions are row indices. Columns other than the example
    fields are ignored (datasets often carry metadata), and a null value counts as an absent field."""

    def __init__(self, name: str, rows, columns: Mapping[str, str] | None = None):
        self.name, self.rows, self.columns = name, rows, dict(columns or {})
        self.length = len(rows) if hasattr(rows, "__len__") else None
        names = getattr(rows, "column_names", None)  # None for a streamed CSV / JSON until it is read
        prompt = self.columns.get("prompt", "prompt")
        if names is not None and prompt not in names:
            raise UserError(
                f"dataset {name} has no column {prompt!r} (columns: {', '.join(names)}); "
                "map one with data.columns, e.g. {prompt: question}."
            )

    def records(self) -> Iterator[tuple[int, dict]]:
        position = 0
        try:
            for row in self._rows():
                yield position, row
                position += 1
        except Exception as err:  # a corrupt file surfaces only when its rows are read, a block at a time
            raise UserError(
                f"{self.where(position)}: cannot read it or a row after it ({str(err).strip()})."
            ) from err

    def _rows(self, block: int = 1000) -> Iterator[dict]:
        """The rows. Those of a memory-mapped Arrow table (``save_to_disk``, the HF cache) are checked a block
        at a time before they are read: Arrow trusts the bytes it maps, and a corrupt file would crash."""
        table = getattr(getattr(self.rows, "data", None), "table", None)
        if table is None or getattr(self.rows, "_indices", None) is not None:  # rows in another order
            yield from self.rows
            return
        batches = self.rows.iter(batch_size=block)
        for start in range(0, table.num_rows, block):
            table.slice(start, block).validate(full=True)
            batch = next(batches)
            yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))

    def where(self, position: int) -> str:
        return f"{self.name} row {position}"

    def parse(self, position: int, raw: dict) -> Example:
        if not isinstance(raw, dict):  # an element of a JSON array
            raise UserError(f"{self.where(position)}: each row must be a JSON object with a 'prompt' field.")
        return parse_record(raw, self.where(position), self.columns, strict=False)


def open_source(
    spec: str, columns: Mapping[str, str] | None = None, splits: Sequence[str] = TRAIN_SPLITS
) -> Source:
    """The Source ``spec`` names (docs/data.md):

    - ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT``: ``datasets.load_dataset`` of a local directory or a
      dataset already in the HF cache — nothing is downloaded;
    - a directory: written by ``save_to_disk``, or data files ``load_dataset`` recognises;
    - a ``.parquet`` / ``.csv`` / ``.arrow`` file;
    - a ``.json`` file holding one JSON array of objects (read whole; each value keeps its own type);
    - any other file: JSONL, with line-precise errors.

    A dataset with several splits gives the first of ``splits`` it has, unless the spec names one.
    """
    if spec.startswith("hf:"):
        name, *rest = spec.removeprefix("hf:").split(":")
        if not name or len(rest) > 2 or not all(rest):
            raise UserError(
                f"dataset {spec!r} must look like hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT."
            )
        config_name = rest[0] if len(rest) == 2 else None
        split = rest[-1] if rest else None
        return _dataset_source(spec, name, config_name, split, splits, columns)
    path = Path(spec)
    if path.is_dir():
        return _dataset_source(spec, spec, None, None, splits, columns)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist (a dataset in the HF cache is written hf:NAME).")
    if path.suffix.lower() == ".json" and _first_char(path) == "[":
        return DatasetSource(spec, _json_array(path, spec), columns)
    builder = DATASET_BUILDERS.get(path.suffix.lower())
    # `datasets` reads an empty file (or a parquet table of no rows) as an error of its own
    if builder and (path.stat().st_size == 0 or builder == "parquet" and _parquet_rows(path) == 0):
        raise UserError(f"data file {spec} holds no examples.")
    if builder:
        options = _csv_options(path, spec) if builder == "csv" else {}
        return _dataset_source(spec, builder, None, None, splits, columns, str(path), options)
    return JsonlSource(path, columns)


def read_examples(
    spec: str,
    columns: Mapping[str, str] | None = None,
    splits: Sequence[str] = TRAIN_SPLITS,
    require_answer: bool = False,
) -> list[Example]:
    """Every example of ``spec`` (see ``open_source``), each checked; ``require_answer``: evaluation data."""
    source = open_source(spec, columns, splits)
    examples = []
    for position, raw in source.records():
        example = source.parse(position, raw)
        if require_answer and not example.answer:
            raise UserError(
                f"{source.where(position)}: field {_label('answer', columns)} is missing; evaluation "
                "compares with it (or name a verifier function that does not need it)."
            )
        examples.append(example)
    if not examples:
        raise UserError(f"data file {spec} holds no examples.")
    return examples


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse a JSONL file; any malformed line is an error naming file, line and field."""
    source = JsonlSource(Path(path))
    examples = [source.parse(position, line) for position, line in source.records()]
    if not examples:
        raise UserError(f"data file {path} holds no examples.")
    return examples


def parse_record(
    obj: dict, where: str, columns: Mapping[str, str] | None = None, strict: bool = True
) -> Example:
    """One example from a mapping whose keys are column names (``columns``: field -> column). ``strict``
    (JSONL): an unknown key is an error; otherwise unknown keys are ignored and null values are absent."""
    columns = columns or {}
    renamed = {field: columns.get(field, field) for field in EXAMPLE_FIELDS}
    if strict:
        extra = set(obj) - set(renamed.values())
        if extra:
            known = ", ".join(sorted(renamed.values()))
            raise UserError(f"{where}: unknown field {sorted(extra)[0]!r}; fields are {known}.")
    values = {field: obj[column] for field, column in renamed.items() if column in obj}
    if not strict:
        values = {field: value for field, value in values.items() if value is not None}
    if "prompt" not in values:
        raise UserError(f"{where}: field {_label('prompt', columns)} is missing.")
    prompt, label = values["prompt"], f"{where}: field {_label('prompt', columns)}"
    if isinstance(prompt, list):
        prompt = tuple(_parse_message(m, f"{label}[{i}]", strict) for i, m in enumerate(prompt))
        if not prompt:
            raise UserError(f"{label} is an empty list of messages.")
        # the model answers the last turn (and an environment's reset replaces it): it must be the user's
        (role, content), last = prompt[-1], f"{label}[{len(prompt) - 1}]"
        if role != "user":
            raise UserError(
                f"{last}: the last message must be the user's, which the model answers, got role {role!r} "
                "(a reply to learn from belongs in completion)."
            )
        if not content.strip():
            raise UserError(f"{last}: the last message, the user's, has no text.")
    elif not isinstance(prompt, str) or not prompt.strip():
        got = type(prompt).__name__ if not isinstance(prompt, str) else "only whitespace" if prompt else "''"
        raise UserError(f"{label} must be a non-empty string or a list of chat messages, got {got}.")
    else:
        _check_text(prompt, label)
    fields: dict[str, Any] = {"prompt": prompt}
    ids = values.get("completion_ids", [])
    if not isinstance(ids, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise UserError(
            f"{where}: field {_label('completion_ids', columns)} must be a list of token ids (integers >= 0)."
        )
    if ids and not values.get("completion"):
        raise UserError(
            f"{where}: field {_label('completion_ids', columns)} needs the completion's text too."
        )
    fields["completion_ids"] = tuple(ids)
    for name in ("answer", "completion", "privileged", "id", "teacher"):
        value, label = values.get(name, ""), f"{where}: field {_label(name, columns)}"
        if isinstance(value, int | float) and not isinstance(value, bool) and name in ("answer", "id"):
            if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN, a float column's gap
                raise UserError(f"{label} must be a string or a finite number, got {value}.")
            value = str(value)
        if not isinstance(value, str):
            raise UserError(f"{label} must be a string, got {type(value).__name__}.")
        _check_text(value, label)
        fields[name] = value
    return Example(**fields)


def _label(field: str, columns: Mapping[str, str] | None) -> str:
    """How an error names a field: its column, and the field it was mapped to."""
    column = (columns or {}).get(field, field)
    return repr(field) if column == field else f"{column!r} (data.columns {field})"


def _parse_message(message: Any, where: str, strict: bool) -> tuple[str, str]:
    """A chat message as (role, content); ``strict`` (JSONL): a key besides those two is an error, as a
    record's unknown field is, rather than dropped."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise UserError(f"{where} must be an object with 'role' and 'content' strings.")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise UserError(f"{where}: role must be system, user or assistant, got {role!r}.")
    extra = sorted(set(message) - {"role", "content"})
    if strict and extra:
        raise UserError(f"{where}: unknown key {extra[0]!r}; a message has only 'role' and 'content'.")
    _check_text(message["content"], where)
    return role, message["content"]


def _check_text(value: str, where: str) -> None:
    """A JSON escape such as ``\\ud800`` makes half a surrogate pair: a string no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(
            f"{where} holds {value[err.start]!r} at character {err.start}, half a surrogate pair: not text."
        ) from None


def _loads(text: str, where: str, lines: bool = False) -> Any:
    """``json.loads``, failing with a UserError at ``where`` (``lines``: then at the line and column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f":{err.lineno}:{err.colno}" if lines else ""
        raise UserError(f"{where}{at}: not valid JSON ({err.msg}).") from None
    except RecursionError:
        raise UserError(f"{where}: not valid JSON (nested too deeply to read).") from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise UserError(f"{where}: not valid JSON ({str(err).split(':')[0]}).") from None


def _json_array(path: Path, spec: str) -> list[Any]:
    """The elements of a ``.json`` file holding one JSON array, as rows of a DatasetSource."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{spec}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x}).") from None
    return _loads(text, spec, lines=True)


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        return handle.read(4096).lstrip()[:1]


def _csv_options(path: Path, spec: str) -> dict[str, Any]:
    """``load_dataset`` options that read every CSV cell as the text it is: left to pandas, "007" would become
    7, "2" 2.0 in a column with an empty cell, and "NA", "null" or "None" an absent value. A first row with
    more fields than the header would make pandas take the first column for an index, moving every other
    column one place left."""
    header, first = [], []
    # a field longer than the csv module allows (128 KiB) ends the look here: pandas reads it
    with (
        contextlib.suppress(csv.Error),
        path.open(encoding="utf-8-sig", errors="replace", newline="") as handle,
    ):
        rows = csv.reader(handle)
        header = next(rows, [])
        first = next(rows, [])
    if len(first) > len(header):
        raise UserError(f"{spec} [train] row 0: {len(first)} fields, but the header names {len(header)}.")
    return {"na_filter": False, "converters": dict.fromkeys(header, str), "index_col": False}


def _parquet_rows(path: Path) -> int | None:
    """The rows a parquet file's footer declares; None when it cannot be read (``load_dataset`` says why)."""
    try:
        import pyarrow.parquet

        return pyarrow.parquet.read_metadata(path).num_rows
    except Exception:
        return None


def _dataset_source(
    spec: str,
    path: str,
    config_name: str | None,
    split: str | None,
    splits: Sequence[str],
    columns: Mapping[str, str] | None,
    data_files: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> DatasetSource:
    """Local data files are streamed straight from disk (nothing is converted or cached); a ``save_to_disk``
    directory and a dataset from the HF cache are memory-mapped Arrow tables. Either way rows are read one
    at a time, so nothing is materialised until an Example is asked for."""
    try:
        import datasets
        from datasets import config as datasets_config
        from huggingface_hub import constants as hub_constants
    except ImportError:
        raise UserError(
            f"reading {spec} needs the datasets package: pip install 'opdistill[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    local = Path(path).is_dir() or data_files is not None
    markers = ("state.json", "dataset_dict.json")  # what save_to_disk writes
    saved = data_files is None and any((Path(path) / marker).is_file() for marker in markers)
    # never download, never wait on a network: a hub name is read from the local cache or refused at once
    offline = datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        if saved:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(
                path, config_name, data_files=data_files, streaming=local, **(options or {})
            )
    except Exception as err:
        where = "" if local else " (a hub name is read from the local HF cache only: download it first)"
        raise UserError(f"cannot load dataset {spec}{where}: {err}") from err
    finally:
        datasets_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = offline
    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        names = [str(name) for name in loaded]
        chosen = split or (names[0] if len(names) == 1 else next((s for s in splits if s in names), None))
        if chosen is None or chosen not in names:
            wanted = split or " or ".join(splits)
            raise UserError(
                f"dataset {spec} has no split {wanted} (splits: {', '.join(names)}); name one as "
                f"hf:{path}:SPLIT."
            )
        rows, spec = loaded[chosen], f"{spec} [{chosen}]" if not split else spec
    elif split:
        raise UserError(f"dataset {spec} holds a single table, not splits: drop ':{split}'.")
    else:
        rows = loaded
    return DatasetSource(spec, rows, columns)


def write_jsonl(examples: Sequence[Example], path: str | Path | None) -> None:
    """Examples as JSONL lines (only the fields they have) into ``path``, or onto stdout when it is None.
    The file is written beside ``path``, then renamed onto it: whole or as it was, never half written."""
    if not path:
        _write_lines(examples, sys.stdout)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            _write_lines(examples, handle)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err}); it is left as it was.") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; after a failure, the partial file


def _write_lines(examples: Sequence[Example], handle) -> None:
    for ex in examples:
        obj: dict[str, Any] = {"prompt": ex.prompt if isinstance(ex.prompt, str) else ex.messages()}
        obj.update({k: getattr(ex, k) for k in EXAMPLE_FIELDS[1:] if getattr(ex, k)})
        if ex.completion_ids:
            obj["completion_ids"] = list(ex.completion_ids)
        handle.write(json.dumps(obj) + "\n")


class ExampleStream:
    """An endless, deterministic sequence of training examples: ``stream[i]`` depends only on (seed, i).

    That is what makes resume exact: step s reads indices [s*n, (s+1)*n) whatever happened before.
    A finite list is walked in a fresh seeded permutation each epoch.
    """

    def __init__(self, examples: Sequence[Example], seed: int):
        self.examples = list(examples)
        self.seed = seed
        self._order: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> Example:
        epoch, offset = divmod(index, len(self.examples))
        if epoch not in self._order:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self.examples[self._order[epoch][offset]]

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


class LazyExampleStream:
    """``ExampleStream``'s contract (``stream[i]`` depends only on (seed, i)) for a source too large to hold.

    Each epoch reads the source in order through a shuffle buffer seeded by (seed, epoch): the buffer holds
    ``buffer`` records, and each new record takes the place of one drawn at random, which is emitted. Every
    record appears once per epoch, but only ``buffer`` records are in memory, and a record can move earlier by
    at most ``buffer`` places (a full shuffle when ``buffer`` >= the source's size).

    Reading forward costs O(1) per example, and records are parsed only when asked for. An index before the
    window of recent records (``max(buffer, 4096)``) is reached again by re-reading from the start of its
    epoch; a resumed run at index i reads up to N + (i mod N) records to get there (just i mod N when the
    source knows its size N). A malformed record is an error when it is first reached, not at start-up.
    """

    def __init__(self, source: Source, seed: int, buffer: int = 10000):
        self.source, self.seed, self.buffer = source, seed, buffer
        self.length = source.length  # N: records per epoch, learnt at the end of the first epoch if unknown
        self._recent: deque[tuple[int, Any]] = deque(maxlen=max(buffer, 4096))  # the last records emitted
        self._records: Iterator[tuple[int, Any]] = iter(())
        self._cursor = 0  # stream index of the next record ``_records`` yields
        self._restart(0)
        self[0]  # fail now on an empty or unreadable source, not at the first step

    def __getitem__(self, index: int) -> Example:
        if index < 0:
            raise IndexError(index)
        if index < self._cursor - len(self._recent):
            self._restart(index // self.length if self.length else 0)
        while self._cursor <= index:
            if self.length and index // self.length > self._cursor // self.length:
                self._restart(index // self.length)  # jump to index's epoch instead of reading up to it
                continue
            self._recent.append(next(self._records))
            self._cursor += 1
        position, raw = self._recent[index - self._cursor]
        return self.source.parse(position, raw)

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]

    def _restart(self, epoch: int) -> None:
        self._records = self._epochs(epoch)
        self._cursor = epoch * (self.length or 0)
        self._recent.clear()

    def _epochs(self, first: int) -> Iterator[tuple[int, Any]]:
        epoch = first
        while True:
            count = 0
            for record in self._shuffled(epoch):
                count += 1
                yield record
            if count == 0:
                raise UserError(f"data file {self.source.name} holds no examples.")
            if self.length is not None and count != self.length:
                raise UserError(
                    f"data file {self.source.name} changed while training: epoch {epoch} read {count} "
                    f"records, not {self.length}; restore it (resume needs the same data)."
                )
            self.length = count
            epoch += 1

    def _shuffled(self, epoch: int) -> Iterator[tuple[int, Any]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        window: list[tuple[int, Any]] = []
        for record in self.source.records():
            if len(window) < self.buffer:
                window.append(record)
                continue
            slot = rng.randrange(self.buffer)
            yield window[slot]
            window[slot] = record
        rng.shuffle(window)
        yield from window


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids_BP, mask_BP)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], dtype=torch.bool)
    return ids.view(len(rows), width), mask.view(len(rows), width)


def rollout_of(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> Rollout:
    """Given prompt and completion ids laid out as the sampler lays them out (prompts left-padded, completions
    right-padded; every completion token receives loss), with no behaviour log-probs and nothing truncated."""
    ids_BP, mask_BP = left_pad(prompts, pad_id)
    tokens_BT, loss_mask_BT = right_pad(completions, pad_id)
    truncated_B = torch.zeros(len(prompts), dtype=torch.bool)
    return Rollout(ids_BP, mask_BP, tokens_BT, loss_mask_BT, torch.zeros(tokens_BT.shape), truncated_B)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids_BT, mask_BT)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], dtype=torch.bool)
    return ids.view(len(rows), width), mask.view(len(rows), width)
