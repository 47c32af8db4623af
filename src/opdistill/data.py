"""Examples, JSONL loading with line-precise errors, and the one place text becomes token ids."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdistill.errors import UserError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    prompt: str | tuple[tuple[str, str], ...]  # text, or chat messages as (role, content) pairs
    answer: str = ""  # reference answer for verifiers
    completion: str = ""  # target completion for SFT
    privileged: str = ""  # context only a self-teacher sees
    id: str = ""

    def messages(self) -> Messages:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": role, "content": content} for role, content in self.prompt]

    def text(self) -> str:
        """All text of the example, for building a character vocabulary."""
        parts = [m["content"] for m in self.messages()]
        return "".join(parts + [self.answer, self.completion, self.privileged])


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse a JSONL file; any malformed line is an error naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist.")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{number}"))
    if not examples:
        raise UserError(f"data file {path} holds no examples.")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: each line must be a JSON object with a 'prompt' field.")
    known = {"prompt", "answer", "completion", "privileged", "id"}
    extra = set(obj) - known
    if extra:
        raise UserError(
            f"{where}: unknown field {sorted(extra)[0]!r}; fields are {', '.join(sorted(known))}."
        )
    if "prompt" not in obj:
        raise UserError(f"{where}: field 'prompt' is missing.")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = tuple(_parse_message(m, f"{where}: field 'prompt'[{i}]") for i, m in enumerate(prompt))
        if not prompt:
            raise UserError(f"{where}: field 'prompt' is an empty list of messages.")
    elif not isinstance(prompt, str) or not prompt:
        raise UserError(f"{where}: field 'prompt' must be a non-empty string or a list of chat messages.")
    values: dict[str, Any] = {"prompt": prompt}
    for name in ("answer", "completion", "privileged", "id"):
        value = obj.get(name, "")
        if isinstance(value, int | float) and not isinstance(value, bool) and name in ("answer", "id"):
            value = str(value)
        if not isinstance(value, str):
            raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}.")
        values[name] = value
    return Example(**values)


def _parse_message(message: Any, where: str) -> tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise UserError(f"{where} must be an object with 'role' and 'content' strings.")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise UserError(f"{where}: role must be system, user or assistant, got {role!r}.")
    return role, message["content"]


def write_jsonl(examples: Sequence[Example], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for ex in examples:
            obj: dict[str, Any] = {"prompt": ex.prompt if isinstance(ex.prompt, str) else ex.messages()}
            obj.update(
                {k: getattr(ex, k) for k in ("answer", "completion", "privileged", "id") if getattr(ex, k)}
            )
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


def encode_prompts(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    """Render prompts with the tokenizer's chat template (generation prompt added), or as plain text."""
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template(ex.messages(), tokenize=False, add_generation_prompt=True)
            for ex in examples
        ]
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    return [tokenizer.encode(ex.messages()[-1]["content"]) for ex in examples]


def encode_completion(tokenizer, text: str) -> list[int]:
    """A target completion as the model must write it: its tokens, then EOS."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids_BP, mask_BP)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = True
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids_BT, mask_BT)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask
