"""Load and save HF causal LMs and tokenizers; build fresh tiny models with a character tokenizer.

Fresh models go through the same HF APIs real checkpoints use (``PreTrainedTokenizerFast`` with a
chat template, ``AutoModelForCausalLM``, ``save_pretrained`` in safetensors), so every feature that
works on the demo works on a real model directory. A LoRA student (PEFT, optional) is saved as its adapter
plus the merged weights, so what it writes loads as a plain model too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
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

from opdistill.attention import NAME as ATTENTION_AUTO
from opdistill.config import LoraConfig, ModelSpec, parse_preset
from opdistill.data.rendering import end_ids
from opdistill.errors import UserError

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# user turn, then the assistant's reply closed by EOS; the generation prompt adds nothing.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def char_tokenizer(texts: Iterable[str], size: int = 0) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is the special tokens plus every character in
    ``texts``, and with ``size`` unused tokens ``<unused_i>`` after them up to that many ids (a real model's
    vocabulary width, for benchmarks)."""
    seen: set[str] = set()
    for text in texts:  # text by text: a streamed corpus is never held whole
        seen.update(text)
    chars = sorted(seen)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    return _wrapped(backend)


def bpe_tokenizer(texts: Iterable[str], merges: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer learnt on ``texts``: the special tokens, every character, and ``merges`` merged
    tokens (the most frequent pairs, across symbols too: "12", "+3", "=1"), with ``char_tokenizer``'s chat
    template — the same text as a character model's, in other tokens."""
    texts = list(texts)
    chars = sorted(set("".join(texts)))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(chars) + merges,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=chars,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return _wrapped(backend)


def _wrapped(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A tokenizers backend as a left-padding HF tokenizer with ``SPECIAL_TOKENS`` and the chat template."""
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
    """A fresh randomly initialised model of ``spec.preset`` size (4 heads, SwiGLU ff = 4 x hidden, tied
    embeddings)."""
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
    return set_attention(model.to(getattr(torch, spec.dtype)), spec.attention)


def set_attention(model, attention: str):
    """``model`` with ``attention`` as its attention implementation (ModelSpec.attention): ``auto`` is
    attention.py's, for models that take transformers' attention functions (others keep their own)."""
    if attention == "auto":
        if not model._supports_attention_backend:
            return model
        attention = ATTENTION_AUTO
    try:
        model.set_attn_implementation(attention)
    except (ValueError, KeyError, ImportError) as err:
        raise UserError(f"attention={attention!r} does not work for this model: {err}") from None
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model directory, left-padding, with a pad token (EOS where it has none) and
    ``end_ids`` (see ``end_ids``) that include the directory's ``generation_config.json`` end ids. Code in
    the directory runs only with ``trust_remote_code``."""
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} holds no tokenizer (expected tokenizer.json / tokenizer_config.json).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {path}: {err}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    declared = []
    if (path / "generation_config.json").is_file():
        declared = json.loads((path / "generation_config.json").read_text()).get("eos_token_id") or []
    tokenizer.end_ids = end_ids(tokenizer, declared if isinstance(declared, list) else [declared])
    return tokenizer


def load_model(spec: ModelSpec, corpus: Iterable[str] = (), seed: int = 0):
    """(model, tokenizer) from ``spec.path``, or a fresh tiny model with the tokenizer of ``spec.tokenizer``
    (a tokenizer directory) or a character tokenizer over ``corpus``. Weights load from safetensors only
    (pickled ones can run code when read), and Python code in the directory runs only with
    ``spec.trust_remote_code``, which warns."""
    trust = spec.trust_remote_code
    if trust:
        print(
            f"opd: warning: trust_remote_code is on: Python code in {spec.path or spec.tokenizer} will run; "
            "set it only for a source you trust.",
            file=sys.stderr,
        )
    if not spec.path:
        tokenizer = load_tokenizer(spec.tokenizer, trust) if spec.tokenizer else char_tokenizer(corpus)
        return tiny_model(spec, tokenizer, seed), tokenizer
    path = Path(spec.path)
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} does not exist or holds no config.json.")
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"{path} holds no .safetensors weights: opd loads only those, since pickled weights (.bin, .pt) "
            f"can run code when read. If you trust them, `opd convert {path} OUT` writes safetensors."
        )
    tokenizer = load_tokenizer(path, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, spec.dtype), use_safetensors=True, trust_remote_code=trust
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from {path}: {err}") from None
    return set_attention(fit_vocabulary(model, tokenizer, path), spec.attention), tokenizer


def check_context(model, new_tokens: int, what: str) -> None:
    """A UserError when ``new_tokens`` (a completion length) exceed the positions ``model`` was built for."""
    limit = getattr(model.config, "max_position_embeddings", 0)
    if limit and new_tokens > limit:
        raise UserError(f"{what}={new_tokens} is longer than the model's context of {limit} positions.")


def fit_vocabulary(model, tokenizer, path: Path):
    """``model`` with exactly one logit row per token of ``tokenizer``. Checkpoints often pad their
    embedding rows (Qwen2.5 0.5B-3B have 151,936, 7B and up 152,064, for 151,665 tokens): the padding rows
    are dropped, so every model sharing the tokenizer has the same logit width, no padding row is ever
    sampled, and a teacher's top-K ids always index the student's logits. A model saved after training
    keeps the fitted width. Fewer rows than tokens is an error: those tokens could never be scored."""
    rows, tokens = model.get_input_embeddings().weight.shape[0], len(tokenizer)
    if rows < tokens:
        raise UserError(
            f"{path}: the model has {rows} embedding rows but its tokenizer {tokens} tokens; they do not "
            "belong together."
        )
    if rows > tokens:
        model.resize_token_embeddings(tokens)
    return model


def load_student(
    spec: ModelSpec,
    lora: LoraConfig,
    corpus: Iterable[str] = (),
    seed: int = 0,
    checkpoint: Path | None = None,
):
    """(model, tokenizer) to train: ``load_model(spec, corpus, seed)``, with LoRA adapters if ``lora.rank``.

    Resuming from ``checkpoint``, full fine-tuning continues from its weights. LoRA rebuilds the base as the
    run started — ``spec.path``, or the same fresh model from the checkpoint's tokenizer and ``seed`` — and
    loads the checkpoint's adapter into it: the merged weights beside it are never the base, so the frozen
    and the trainable weights are exactly the saved ones."""
    if checkpoint is None:
        model, tokenizer = load_model(spec, corpus, seed)
        return apply_lora(model, lora, seed), tokenizer
    if not lora.rank:
        if (checkpoint / ADAPTER_DIR).is_dir():
            raise UserError(
                f"checkpoint {checkpoint} holds a LoRA adapter: resume with the lora.* settings it was "
                "trained with."
            )
        return load_model(dataclasses.replace(spec, path=str(checkpoint)), (), seed)
    if spec.path:
        base, tokenizer = load_model(spec)
    else:
        tokenizer = load_tokenizer(checkpoint)
        base = tiny_model(spec, tokenizer, seed)
    model = apply_lora(base, lora)
    load_lora_adapter(model, checkpoint)
    return model, tokenizer


def save_model(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """HF ``save_pretrained`` layout; ``state_dict`` (a sharded model's full weights) overrides the model's.

    A LoRA model (``apply_lora``) is saved twice: its adapter in ``path/adapter/`` (PEFT layout, what
    ``load_lora_adapter`` restores, with a digest of the base weights) and the merged weights in ``path``, so
    every consumer loads ``path`` as a plain model. The live model is not changed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        state = model.state_dict() if state_dict is None else state_dict
        model.save_pretrained(path / ADAPTER_DIR, state_dict=state, safe_serialization=True)
        base = {"base_sha256": base_fingerprint(state)}
        (path / ADAPTER_DIR / BASE_FILE).write_text(json.dumps(base) + "\n")
        merged = _merged_state_dict(model, state)
        model.get_base_model().save_pretrained(path, state_dict=merged, safe_serialization=True)
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapter, beside the merged model
BASE_FILE = "opdistill_base.json"  # in ADAPTER_DIR: the digest of the base weights the adapter was trained on
PEFT_PREFIX = "base_model.model."  # a PEFT model's parameter names = this + the base model's


def apply_lora(model, lora: LoraConfig, seed: int = 0):
    """``model`` with LoRA adapters (PEFT) on the linear layers ``lora.target_modules`` names: only the
    adapters require grad, and as PEFT initialises B = 0 the wrapped model computes exactly what ``model``
    did; A's random initialisation is a function of ``seed``. ``lora.rank == 0``: ``model`` itself."""
    if not lora.rank:
        return model
    try:
        import peft
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise UserError("lora.rank > 0 needs the peft package: pip install 'opdistill[lora]'") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())} if tied else set()
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # pyright: ignore[reportArgumentType]  (PEFT types it int; any number works)
        lora_dropout=lora.dropout,
        target_modules=lora.modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT calls a transformers API that transformers has deprecated
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`")  # refused below
        torch.manual_seed(seed)
        try:
            wrapped = peft.get_peft_model(model, config)
        except ValueError as err:  # e.g. a target module name the model does not have
            raise UserError(
                f"cannot apply LoRA to lora.target_modules={lora.target_modules!r}: {err}"
            ) from None
    for name, module in wrapped.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if id(module.get_base_layer()) in embeddings:
            raise UserError(
                f"lora.target_modules reaches {name}, an embedding tied to the LM head, whose merged weights "
                "could not be saved tied: leave it out (all-linear does)."
            )
        if not isinstance(module, LoraLinear):
            raise UserError(f"lora.target_modules reaches {name}, which is not a linear layer: leave it out.")
    return wrapped


def is_lora(model) -> bool:
    """Whether ``model`` is wrapped by ``apply_lora`` (a PEFT model: none exists unless peft is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def load_lora_adapter(model, path: str | Path) -> None:
    """Load into ``model`` — ``apply_lora`` of the run's own base model, with the same ``LoraConfig`` — the
    adapter ``save_model`` wrote to ``path/adapter/``, bit for bit. With the base reloaded from where the run
    started (never from the merged weights), the trainable state is exactly the saved one. Another base
    model or LoRA config is refused."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = Path(path) / ADAPTER_DIR
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path} holds no LoRA adapter (expected {weights}).")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    live = model.peft_config["default"]
    for key, name in (("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if saved.get(key) != getattr(live, key):
            raise UserError(
                f"the adapter in {adapter} has lora.{name}={saved.get(key)}, this run {getattr(live, key)}: "
                "resume with the LoRA config it was trained with."
            )
    if sorted(saved.get("target_modules") or []) != sorted(live.target_modules):
        raise UserError(
            f"the adapter in {adapter} adapts other modules than this run's lora.target_modules: resume with "
            "the LoRA config it was trained with."
        )
    if (adapter / BASE_FILE).is_file():
        trained_on = json.loads((adapter / BASE_FILE).read_text())["base_sha256"]
        if trained_on != base_fingerprint(model.state_dict()):
            raise UserError(
                f"the adapter in {adapter} was trained on other base weights than this run's student: resume "
                "with the same student.path (and train.seed, for a fresh model)."
            )
    state = load_file(weights)
    if set(state) != set(get_peft_model_state_dict(model)):
        raise UserError(f"the adapter in {adapter} does not fit this model (its tensors have other names).")
    set_peft_model_state_dict(model, state)


def base_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of the frozen base weights in a LoRA model's state dict."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if "lora_" not in name:
            digest.update(name.encode())
            tensor = state[name].detach().cpu().contiguous().reshape(-1)
            digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


@torch.no_grad()
def _merged_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights, under its own names, with each adapted weight W replaced by
    W + scaling·BA — what PEFT's ``merge_and_unload`` computes, without touching the live model: only the
    adapted weights are copied. ``state`` is the LoRA model's state dict (full, even when it is sharded)."""
    from peft.tuners.lora import Linear as LoraLinear

    merged = {
        name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): tensor
        for name, tensor in state.items()
        if "lora_" not in name
    }
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLinear):  # the only kind apply_lora makes
            continue
        key = f"{name}.weight"
        weight = merged[key]
        total = weight.float()
        for adapter in module.active_adapters:
            a = state[f"{PEFT_PREFIX}{name}.lora_A.{adapter}.weight"].float()
            b = state[f"{PEFT_PREFIX}{name}.lora_B.{adapter}.weight"].float()
            delta = (b @ a) * module.scaling[adapter]
            total = total + (delta.T if module.fan_in_fan_out else delta)
        merged[key] = total.to(weight.dtype)
    return merged


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable digest of what decides token ids: the vocabulary and the special tokens."""
    payload = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
