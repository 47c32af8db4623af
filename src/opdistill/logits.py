"""Logits that predict a rollout's completion tokens: whole, for the loss (with gradient), or a chunk at a
time, for every pass without gradient (teacher scoring, diagnostics, shaping, selection, evaluation).

Why chunks: a [B, T, V] tensor is what runs out of memory first at scale. For the GPU recipe (32 sequences of
2,049 positions, Qwen3's 151,936 ids) one whole-batch forward is 40 GB of fp32 logits, while what its
callers keep is [B, T] or [B, T, K]. ``CompletionLogits.chunks`` runs the decoder over a few rows at a time
and projects at most ``chunk_tokens`` positions onto the vocabulary at once, so the largest tensor of a pass
is [chunk_tokens, V] however large the batch (docs/scaling.md, "Memory"). Models whose logits are not just
the head applied to the decoder's last hidden state (a final soft-cap or scale), and FSDP2-sharded ones
(their weights are gathered by the root module's hooks), are chunked over rows only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from opdistill.types import Rollout

CHUNK_TOKENS = 4096  # positions projected onto the vocabulary at once without gradient (train.chunk_tokens)
# logits that are not head(hidden): these models are chunked over rows only
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def completion_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits that predict each completion token: position P-1+t of prompt ⊕ completion predicts token t.

    Returns [B, T, V]; only the last T+1 positions are projected onto the vocabulary.
    """
    attention_BL, position_BL = _inputs(rollout)
    T = rollout.tokens_BT.shape[1]
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=attention_BL,
        position_ids=position_BL,
        use_cache=False,
        logits_to_keep=T + 1,
    )
    return out.logits[:, :-1]


def _inputs(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    attention_BL = rollout.attention_mask.long()
    return attention_BL, (attention_BL.cumsum(-1) - 1).clamp(min=0)


class CompletionLogits:
    """``model``'s completion logits on ``rollout``, computed when asked: ``chunks`` for a pass without
    gradient, ``tensor()`` for the whole [B, T, V] (a loss micro-batch; computed once, then kept by this
    object). ``logits[rows]`` narrows to some rows without computing anything, which is how a teacher's full
    logits (L2) reach each loss micro-batch without the step's batch ever holding them. ``kept`` is the
    [B, T, V] tensor when it exists already (a batch small enough to score in one chunk)."""

    def __init__(self, model, rollout: Rollout | None, kept: torch.Tensor | None = None):
        self.model, self.rollout, self._kept = model, rollout, kept

    @classmethod
    def of(cls, logits_BTV: torch.Tensor) -> CompletionLogits:
        """Logits that exist already, whole."""
        return cls(None, None, logits_BTV)

    def __getitem__(self, rows: slice | torch.Tensor) -> CompletionLogits:
        kept = None if self._kept is None else self._kept[rows]
        return CompletionLogits(self.model, self.rollout and self.rollout.select(rows), kept)

    @staticmethod
    def routed(parts: list[tuple[torch.Tensor, CompletionLogits]], rows: int) -> RoutedLogits:
        """One batch's logits from several models' over some of its rows each: ``(index_B, logits)`` pairs
        that cover each of the ``rows`` rows once (the teachers of a routed batch)."""
        return RoutedLogits(parts, rows)

    @property
    def shape(self) -> tuple[int, int]:
        B, T = (self._kept if self._kept is not None else self._rollout().tokens_BT).shape[:2]
        return B, T

    def _rollout(self) -> Rollout:
        assert self.rollout is not None, "logits made elsewhere are kept whole"
        return self.rollout

    def chunks_by_position(self) -> bool:
        """Whether ``chunks`` can cut rows into spans of positions (else it yields whole rows)."""
        return self._kept is not None or head_split(self.model) is not None

    def tensor(self) -> torch.Tensor:
        """The whole [B, T, V], without gradient."""
        if self._kept is None:
            with torch.no_grad():
                self._kept = completion_logits(self.model, self._rollout())
        return self._kept

    @torch.no_grad()
    def chunks(
        self, chunk_tokens: int = CHUNK_TOKENS, by_position: bool = True
    ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """(rows, positions, logits [b, t, V]) covering [B, T] once, with b·t ≤ ``chunk_tokens`` where the
        model allows position chunks (``head_split``) and ``by_position``, else whole rows (at least one).
        The chunking depends on [B, T], ``chunk_tokens`` and ``by_position`` only, so two models' chunks over
        rollouts of the same shape line up."""
        B, T = self.shape
        rows_per = max(1, chunk_tokens // max(T, 1))
        split = head_split(self.model) if by_position and self._kept is None else None
        for first in range(0, B, rows_per):
            rows = slice(first, min(first + rows_per, B))
            if self._kept is not None:
                yield from self._kept_chunks(rows, chunk_tokens, by_position)
                continue
            part = self._rollout().select(rows)
            if split is None or (rows.stop - rows.start) * T <= chunk_tokens:
                yield rows, slice(0, T), completion_logits(self.model, part)
                continue
            decoder, head = split
            attention_BL, position_BL = _inputs(part)
            hidden_bLH = decoder(
                input_ids=part.input_ids,
                attention_mask=attention_BL,
                position_ids=position_BL,
                use_cache=False,
            ).last_hidden_state
            hidden_bTH = hidden_bLH[:, -(T + 1) : -1]
            for positions in _spans(T, max(1, chunk_tokens // (rows.stop - rows.start))):
                yield rows, positions, head(hidden_bTH[:, positions])

    def _kept_chunks(self, rows: slice, chunk_tokens: int, by_position: bool):
        assert self._kept is not None
        T = self.shape[1]
        if not by_position or (rows.stop - rows.start) * T <= chunk_tokens:
            yield rows, slice(0, T), self._kept[rows]
            return
        for positions in _spans(T, max(1, chunk_tokens // (rows.stop - rows.start))):
            yield rows, positions, self._kept[rows, positions]


class RoutedLogits(CompletionLogits):
    """A batch's completion logits made by several models, each over its own rows (``routed``):
    narrowed, whole or in chunks of whole rows like ``CompletionLogits``, each row's logits made by its
    own model when asked — never more rows at once than the request covers."""

    def __init__(self, parts: list[tuple[torch.Tensor, CompletionLogits]], rows: int):
        super().__init__(None, None)
        self.parts, self.rows = parts, rows

    def __getitem__(self, rows: slice | torch.Tensor) -> RoutedLogits:
        wanted_N = torch.arange(self.rows)[rows]
        place_B = torch.full((self.rows,), -1, dtype=torch.long)
        place_B[wanted_N] = torch.arange(len(wanted_N))
        parts = []
        for index_B, logits in self.parts:
            place_b = place_B[index_B.cpu()]
            chosen_b = place_b >= 0
            if chosen_b.any():
                parts.append((place_b[chosen_b], logits[chosen_b.nonzero().squeeze(-1)]))
        return RoutedLogits(parts, len(wanted_N))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.parts[0][1].shape[1]

    def chunks_by_position(self) -> bool:
        return False

    def tensor(self) -> torch.Tensor:
        if self._kept is None:
            made = [(index_B, logits.tensor()) for index_B, logits in self.parts]
            first = made[0][1]
            self._kept = first.new_zeros(self.rows, *first.shape[1:])
            for index_B, logits_bTV in made:
                self._kept[index_B.to(first.device)] = logits_bTV
        return self._kept

    @torch.no_grad()
    def chunks(
        self, chunk_tokens: int = CHUNK_TOKENS, by_position: bool = True
    ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        B, T = self.shape
        rows_per = max(1, chunk_tokens // max(T, 1))
        for first in range(0, B, rows_per):
            rows = slice(first, min(first + rows_per, B))
            yield rows, slice(0, T), self[rows].tensor()


def _spans(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def head_split(model) -> tuple[Any, Any] | None:
    """(decoder, head) when ``model``'s logits are ``head(decoder(...).last_hidden_state)`` exactly (an HF
    causal LM without a final logit transform, not FSDP2-sharded), else None."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or head is None or any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    return get_decoder(), head


def reduce_chunks(
    chunks: Iterable[tuple[Any, ...]], shape: tuple[int, int], reduce: Callable[..., dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Apply ``reduce(rows, positions, *logits) -> {name: [b, t, ...]}`` to each chunk ``(rows, positions,
    *logits)`` (one model's, or two models' from ``paired_chunks``) and assemble each name's [B, T, ...]
    result; only one chunk's logits exist at a time."""
    out: dict[str, torch.Tensor] = {}
    for rows, positions, *logits in chunks:
        for name, value in reduce(rows, positions, *logits).items():
            if name not in out:
                out[name] = value.new_zeros(*shape, *value.shape[2:])
            out[name][rows, positions] = value
    return out


def paired_chunks(
    first: CompletionLogits, second: CompletionLogits, chunk_tokens: int = CHUNK_TOKENS
) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Two models' chunks over the same [B, T] (a student and a teacher, the teacher's prompts possibly
    different: OPSD), in lockstep: (rows, positions, first's logits, second's logits). By position only where
    both models allow it."""
    by_position = first.chunks_by_position() and second.chunks_by_position()
    for (rows, positions, a), (_, _, b) in zip(
        first.chunks(chunk_tokens, by_position), second.chunks(chunk_tokens, by_position), strict=True
    ):
        yield rows, positions, a, b


@torch.no_grad()
def topk_ids(model, rollout: Rollout, k: int, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """[B, T, K]: ``model``'s K most likely ids at each completion position, a chunk of logits at a time."""
    logits = CompletionLogits(model, rollout)
    return reduce_chunks(
        logits.chunks(chunk_tokens),
        logits.shape,
        lambda rows, positions, logits_btV: {"ids": logits_btV.topk(k, dim=-1).indices},
    )["ids"]
