"""How prompts and targets become token ids for a model: its chat template (or a base model's plain
text), the tokens that end its turns, and the settings a run gives them (docs/data.md, "How prompts and
targets are rendered")."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opdistill.data.examples import Example
from opdistill.errors import UserError

# End-of-turn tokens of the chat templates in use (ChatML / Qwen / SmolLM, Llama 3, Gemma, Phi-3): a chat
# model ends its turn with one, whatever its tokenizer calls EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def end_ids(tokenizer, declared: Iterable[int] = ()) -> tuple[int, ...]:
    """Every token id that ends a completion, EOS first: the tokenizer's EOS, ``declared`` ids (a model's
    ``generation_config.eos_token_id``, which may be a list), and each end-of-turn token of ``END_OF_TURN``
    that the tokenizer has and its chat template writes. A tokenizer from ``load_tokenizer`` carries the
    answer as ``tokenizer.end_ids``, which is returned as it is."""
    if getattr(tokenizer, "end_ids", None) and not declared:
        return tokenizer.end_ids
    ids = [tokenizer.eos_token_id, *declared]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    turn_ends = [token for token in END_OF_TURN if token in template]
    if turn_ends:
        vocab = tokenizer.get_vocab()
        ids += [vocab[token] for token in turn_ends if token in vocab]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def first_end(ids: Sequence[int], ends: Sequence[int]) -> int | None:
    """The position of the first of ``ends`` in ``ids``, or None."""
    return next((t for t, i in enumerate(ids) if i in ends), None)


def use_chat_settings(tokenizer, template_kwargs: Mapping[str, Any], max_prompt_tokens: int) -> None:
    """Settings every rendering of a prompt or target with ``tokenizer`` then uses (``data.*``): extra chat
    template variables (e.g. Qwen3's ``enable_thinking``) and the longest prompt, beyond which a prompt
    keeps its last ``max_prompt_tokens`` tokens (the turn being answered and the generation prompt)."""
    tokenizer.opd_template_kwargs = dict(template_kwargs)
    tokenizer.opd_max_prompt_tokens = max_prompt_tokens


def plain_text(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation for a model without a chat template (a base model): a lone user turn as its text;
    otherwise every turn as ``Role: text``, blank-line separated, then ``Assistant:`` for the reply."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def encode_prompts(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    """Render prompts with the tokenizer's chat template (generation prompt added), or as ``plain_text``;
    with the settings of ``use_chat_settings``."""
    if tokenizer.chat_template:  # one batched render and one batched encode: this runs every step
        texts = tokenizer.apply_chat_template(
            [ex.messages() for ex in examples],
            tokenize=False,
            add_generation_prompt=True,
            **getattr(tokenizer, "opd_template_kwargs", {}),
        )
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        rows = tokenizer([plain_text(ex.messages()) for ex in examples])["input_ids"]
    limit = getattr(tokenizer, "opd_max_prompt_tokens", 0)
    if limit and any(len(row) > limit for row in rows):
        longest = max(len(row) for row in rows)
        warnings.warn(
            f"a prompt of {longest} tokens keeps its last data.max_prompt_tokens={limit}", stacklevel=2
        )
        rows = [row[-limit:] for row in rows]
    return rows


def completion_target(tokenizer, example: Example) -> list[int]:
    """The tokens an SFT step trains ``example``'s completion as: its ``completion_ids`` where it carries
    them (what the model sampled), else ``encode_completion`` of its text after its prompt. Ids that do not
    decode to the text (made with another tokenizer) are an error."""
    if example.completion_ids:
        ids, ends = list(example.completion_ids), end_ids(tokenizer)
        in_vocabulary = max(ids) < len(tokenizer)  # checked first: decoding fails on an id past a C long
        decoded = in_vocabulary and tokenizer.decode(
            [i for i in ids if i not in ends], skip_special_tokens=True
        )
        if decoded != example.completion:
            raise UserError(
                f"example {example.id or example.prompt!r}: its completion_ids do not decode to its "
                "completion with this tokenizer (made with another model's?); drop the field to train on "
                "the text."
            )
        return ids
    return encode_completion(tokenizer, example.completion, example.messages())


def turn_end(tokenizer) -> int:
    """The token that ends the model's own turn: what ends an empty reply as ``encode_completion`` writes it
    (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``; EOS without a chat template)."""
    return encode_completion(tokenizer, "", [{"role": "user", "content": "?"}])[-1]


def encode_completion(tokenizer, text: str, messages: Sequence[Mapping[str, str]] = ()) -> list[int]:
    """A target completion as the model must write it, ending the way its own turns end.

    With a chat template and the prompt's ``messages``, the reply is rendered as the template renders an
    assistant turn after them: its tokens are what follows the generation prompt, through the first end
    token (``end_ids``; ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``). A
    template whose finished turn does not extend its generation prompt (Qwen3's with thinking off adds an
    empty think block to the prompt only) gives the text, then what the template writes after it through
    the end token. Without a template (a base model's ``plain_text``): the text's tokens, then EOS."""
    if tokenizer.chat_template and messages:
        settings = getattr(tokenizer, "opd_template_kwargs", {})
        prompt = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True, **settings
        )
        turn = [*messages, {"role": "assistant", "content": text}]
        full = tokenizer.apply_chat_template(turn, tokenize=False, **settings)
        ends = end_ids(tokenizer)
        if full.startswith(prompt):
            ids = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
        else:
            at = full.rfind(text.strip())
            tail = full[at + len(text.strip()) :] if at >= 0 else ""
            ids = tokenizer.encode(text, add_special_tokens=False) + tokenizer.encode(
                tail, add_special_tokens=False
            )
        at_end = first_end(ids, ends)
        if at_end is not None:
            return ids[: at_end + 1]
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
