"""Load and save HF causal LMs and tokenizers; build fresh tiny models with a character tokenizer.

Fresh models go through the same HF APIs real checkpoints use (``PreTrainedTokenizerFast`` with a
chat template, ``AutoModelForCausalLM``, ``save_pretrained`` in safetensors), so every feature that
works on the demo works on a real model directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from opdistill.config import ModelSpec, parse_preset
from opdistill.errors import UserError

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# user turn, then the assistant's reply closed by EOS; the generation prompt adds nothing.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is the special tokens plus every character in ``texts``."""
    chars = sorted(set("".join(texts)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


def tiny_model(spec: ModelSpec, tokenizer, seed: int) -> torch.nn.Module:
    """A fresh randomly initialised model of ``spec.preset`` size (4 heads, SwiGLU ff = 4 x hidden, tied embeddings)."""
    parsed = parse_preset(spec.preset)
    assert parsed is not None  # ModelSpec validated it
    hidden, layers = parsed
    heads = 4 if hidden % 4 == 0 and hidden >= 32 else 2
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if spec.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.to(getattr(torch, spec.dtype))


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} holds no tokenizer (expected tokenizer.json / tokenizer_config.json).")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, corpus: Iterable[str] = (), seed: int = 0):
    """(model, tokenizer) from ``spec.path``, or a fresh tiny model with a character tokenizer over ``corpus``."""
    if not spec.path:
        tokenizer = char_tokenizer(corpus)
        return tiny_model(spec, tokenizer, seed), tokenizer
    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} does not exist or holds no config.json.")
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec.dtype))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from {path}: {err}") from None
    return model, tokenizer


def save_model(model, tokenizer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable digest of what decides token ids: the vocabulary and the special tokens."""
    import hashlib

    payload = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Teacher and student must map text to the same ids; say how they differ when they do not."""
    if tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(teacher_tok):
        return
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
    only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
    detail = f"vocab sizes {len(s_vocab)} vs {len(t_vocab)}"
    if only_s or only_t:
        detail += f"; student-only tokens {only_s}, teacher-only tokens {only_t}"
    else:
        detail += "; same tokens but different ids or special tokens"
    raise UserError(
        f"teacher and student tokenizers differ ({detail}); on-policy distillation here needs one shared tokenizer."
    )


def completion_logits(model, rollout) -> torch.Tensor:
    """Logits that predict each completion token: position P-1+t of prompt ⊕ completion predicts token t.

    Returns [B, T, V]; only the last T+1 positions are projected onto the vocabulary.
    """
    attention_BL = rollout.attention_mask.long()
    position_BL = (attention_BL.cumsum(-1) - 1).clamp(min=0)
    T = rollout.tokens_BT.shape[1]
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=attention_BL,
        position_ids=position_BL,
        use_cache=False,
        logits_to_keep=T + 1,
    )
    return out.logits[:, :-1]
