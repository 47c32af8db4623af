"""Two tokenizations of one text, grouped into spans on the boundaries both share (docs/math.md §18): the
student's sampled tokens and the teacher's encoding of their decoded text. Tokenizer-level logic only, no
model: teachers/cross.py turns it into a teacher signal at the student's positions.

A token's end is a character offset into the text: the length of the decoded prefix through it, when that
decoding is a prefix of the text. A token that ends inside a character (one byte of a multi-byte UTF-8
character, as byte-level BPEs cut them) has no end of its own and never closes a span."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from opdistill.data.rendering import turn_end


def decode(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """Each row of ids as text, special tokens left out, spaces as they are (by the fast tokenizer's Rust
    backend: HF's ``batch_decode`` spends most of its time checking its arguments)."""
    return tokenizer.backend_tokenizer.decode_batch([list(row) for row in rows], skip_special_tokens=True)


def token_ends(tokenizer, ids: Sequence[int], text: str) -> list[int | None]:
    """Where in ``text`` each of ``ids`` ends (a character offset), or None for a token that ends inside a
    character or adds no text (a special token); the last token ends at ``len(text)`` (the ids encode the
    whole text). One streaming decode, linear in the row's length; once the decoding stops matching
    ``text`` (a tokenizer that normalises), no later token has an end of its own."""
    stream, backend = DecodeStream(skip_special_tokens=True), tokenizer.backend_tokenizer
    ends: list[int | None] = []
    written, matching = 0, True
    for token in ids:
        piece = stream.step(backend, token)
        if piece and matching and text.startswith(piece, written):
            written += len(piece)
            ends.append(written)
        else:
            matching = matching and not piece
            ends.append(None)
    if ends:
        ends[-1] = len(text)
    return ends


def span_index(ends: Sequence[int | None], boundaries: set[int]) -> list[int]:
    """Each token's span: a span closes at the first token that ends on one of ``boundaries`` beyond the last
    closed one; tokens after the last closure (they add no text) join the last span."""
    spans = max(len(boundaries), 1)
    out, span, closed = [], 0, 0
    for end in ends:
        out.append(min(span, spans - 1))
        if end is not None and end in boundaries and end > closed:
            span, closed = span + 1, end
    return out


def align(
    student_ends: Sequence[int | None], teacher_ends: Sequence[int | None], length: int
) -> tuple[list[int], list[int]]:
    """The span of each student token and of each teacher token of one text of ``length`` characters: spans
    end where both tokenizations have a token ending, so span j covers the same characters on both sides and
    starts from the same text. The same tokenization on both sides gives one token per span."""
    shared = {end for end in student_ends if end} & {end for end in teacher_ends if end}
    boundaries = {end for end in shared if end <= length} | ({length} if length else set())
    return span_index(student_ends, boundaries), span_index(teacher_ends, boundaries)


def token_keys(tokenizer) -> list[tuple[bool, str]]:
    """Each id's identity across vocabularies: whether it is a special token, and its text decoded alone."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [(i in special, text) for i, text in enumerate(texts)]


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids), pairwise the same token: ids with the same key (``token_keys``) on both
    sides that no other id of either vocabulary has (so not "" and not a lone byte's "\ufffd"), and the two
    turn-ending tokens (``turn_end``) with each other. Sorted by student id; one tokenizer against itself
    pairs every id with itself."""

    def unique(keys: list[tuple[bool, str]]) -> dict[tuple[bool, str], int]:
        counts = Counter(keys)
        return {
            key: i for i, key in enumerate(keys) if counts[key] == 1 and key[1] and "\ufffd" not in key[1]
        }

    student, teacher = unique(token_keys(student_tokenizer)), unique(token_keys(teacher_tokenizer))
    ends = turn_end(student_tokenizer), turn_end(teacher_tokenizer)
    pairs = {student[key]: teacher[key] for key in student.keys() & teacher.keys()}
    pairs = {mine: theirs for mine, theirs in pairs.items() if ends[0] != mine and ends[1] != theirs}
    pairs[ends[0]] = ends[1]
    ids = sorted(pairs)
    return ids, [pairs[i] for i in ids]


def unwritable(student_tokenizer, teacher_tokenizer) -> list[str]:
    """The texts of the student's tokens that the teacher's tokenizer can only write as its unknown token."""
    unknown = teacher_tokenizer.unk_token_id
    if unknown is None:
        return []
    texts = [text for special, text in token_keys(student_tokenizer) if text and not special]
    encoded = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [text for text, ids in zip(texts, encoded, strict=True) if unknown in ids]


def prefix_projection(student_tokenizer, teacher_tokenizer) -> list[int]:
    """Each teacher id's student id under the prefix projection (math.md §18.3): the longest student token
    whose text begins the teacher token's text (the lowest id among equals); special tokens by name, the end
    tokens to each other; -1 where no student token begins it."""
    student: dict[tuple[bool, str], int] = {}
    for i, key in enumerate(token_keys(student_tokenizer)):
        if key[1]:
            student.setdefault(key, i)
    longest = max((len(text) for _, text in student), default=0)
    out = []
    for special, text in token_keys(teacher_tokenizer):
        if special:
            out.append(student.get((True, text), -1))
            continue
        prefixes = (student.get((False, text[:n]), -1) for n in range(min(len(text), longest), 0, -1))
        out.append(next((i for i in prefixes if i >= 0), -1))
    out[turn_end(teacher_tokenizer)] = turn_end(student_tokenizer)
    return out
