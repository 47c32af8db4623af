"""LoRA students (PEFT): only adapters train, the merged checkpoint loads as a plain model, exact resume."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import LoraConfig, ModelSpec, load_config
from opdistill.errors import UserError
from opdistill.models import apply_lora, is_lora, load_lora_adapter, load_model, load_student, save_model

pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14, 4, 6]])
LORA = LoraConfig(rank=4, alpha=8.0)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(model, steps: int = 3, seed: int = 0) -> None:
    """A few AdamW steps on next-token cross-entropy over IDS, trainable parameters only."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        logits = model(input_ids=IDS).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_only_adapters_train_and_the_wrapped_model_starts_as_the_base(make_model):
    base = make_model(seed=1, preset="d32l2")
    before = _logits(base)
    model = apply_lora(base, LORA)
    assert is_lora(model) and not is_lora(base)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every projection of both layers, none of the (tied) embeddings: rank x (fan_in + fan_out) each
    hidden, ff, layers = 32, 128, 2
    expected = layers * LORA.rank * (4 * (hidden + hidden) + 3 * (hidden + ff))
    assert sum(trainable.values()) == expected == model.get_nb_trainable_parameters()[0]
    assert not any("embed" in n or "lm_head" in n for n in trainable)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # B = 0 at initialisation


def test_the_adapters_initialisation_is_a_function_of_the_seed(make_model):
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed)  # whatever the global RNG holds, the seed decides
        model = apply_lora(make_model(seed=1), LORA, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first if ".lora_A." in n)


def test_training_moves_the_adapters_and_nothing_else(make_model):
    model = apply_lora(make_model(seed=1), LORA)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _logits(model)
    _train(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    assert not torch.allclose(_logits(model), before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_writes_the_adapter_and_a_merged_model_that_computes_the_same(
    tmp_path, make_model, tokenizer, arch
):
    model = apply_lora(make_model(seed=2, arch=arch), LORA)
    _train(model)
    live = _logits(model)
    save_model(model, tokenizer, tmp_path / "ckpt")
    adapter = tmp_path / "ckpt" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert torch.equal(_logits(model), live) and is_lora(model)  # saving neither merged nor unloaded it
    merged, merged_tokenizer = load_model(ModelSpec(path=str(tmp_path / "ckpt")))
    assert not is_lora(merged) and merged_tokenizer.get_vocab() == tokenizer.get_vocab()
    torch.testing.assert_close(_logits(merged), live, rtol=1e-5, atol=1e-5)
    # a sharded run hands in its gathered full state dict (tensors not shared): the same weights come out
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    save_model(model, tokenizer, tmp_path / "gathered", state_dict=state)
    gathered, _ = load_model(ModelSpec(path=str(tmp_path / "gathered")))
    assert torch.equal(_logits(gathered), _logits(merged))
    assert load_file(tmp_path / "gathered" / "adapter" / "adapter_model.safetensors").keys() == (
        load_file(adapter / "adapter_model.safetensors").keys()
    )


def test_resume_restores_the_adapter_bit_for_bit(tmp_path, make_model, tokenizer):
    model = apply_lora(make_model(seed=3), LORA)
    _train(model)
    save_model(model, tokenizer, tmp_path)
    resumed = apply_lora(make_model(seed=3), LORA)  # the run's own base, as at the start, not the merged one
    load_lora_adapter(resumed, tmp_path)
    saved, loaded = model.state_dict(), resumed.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(_logits(resumed), _logits(model))
    _train(model, steps=2, seed=7)  # and training on continues identically
    _train(resumed, steps=2, seed=7)
    assert torch.equal(_logits(resumed), _logits(model))


@pytest.mark.parametrize("from_path", [False, True])
def test_load_student_resumes_a_lora_run_exactly(tmp_path, tokenizer, from_path):
    """What ``--resume`` does: the base as the run started (fresh, or ``student.path``) + the adapter."""
    spec = ModelSpec(preset="d16l1")
    corpus = ["0123456789+=,>"]
    if from_path:
        base, _ = load_model(spec, corpus, seed=5)
        save_model(base, tokenizer, tmp_path / "base")
        spec = ModelSpec(path=str(tmp_path / "base"))
    model, model_tokenizer = load_student(spec, LORA, corpus, seed=5)
    _train(model)
    save_model(model, model_tokenizer, tmp_path / "ckpt")
    resumed, resumed_tokenizer = load_student(spec, LORA, seed=5, checkpoint=tmp_path / "ckpt")
    assert resumed_tokenizer.get_vocab() == model_tokenizer.get_vocab()
    saved, loaded = model.state_dict(), resumed.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(UserError, match="holds a LoRA adapter"):
        load_student(spec, LoraConfig(), seed=5, checkpoint=tmp_path / "ckpt")
    full, _ = load_student(spec, LoraConfig(), corpus, seed=5)  # rank 0: plain load, plain resume
    assert not is_lora(full)


def test_resume_refuses_another_base_or_lora_config(tmp_path, make_model, tokenizer):
    save_model(apply_lora(make_model(seed=3), LORA), tokenizer, tmp_path)
    with pytest.raises(UserError, match="other base weights"):
        load_lora_adapter(apply_lora(make_model(seed=4), LORA), tmp_path)
    with pytest.raises(UserError, match="lora.rank=4, this run 2"):
        load_lora_adapter(apply_lora(make_model(seed=3), LoraConfig(rank=2)), tmp_path)
    with pytest.raises(UserError, match="other modules"):
        load_lora_adapter(
            apply_lora(make_model(seed=3), LoraConfig(rank=4, alpha=8, target_modules="q_proj")), tmp_path
        )
    with pytest.raises(UserError, match="holds no LoRA adapter"):
        load_lora_adapter(apply_lora(make_model(seed=3), LORA), tmp_path / "nowhere")


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=-1", "lora.rank must be >= 0"),
        ("lora.alpha=0", "lora.alpha above 0"),
        ("lora.dropout=1", "lora.dropout in [0, 1)"),
        ("lora.target_modules=' , '", "lora.target_modules must name modules"),
    ],
)
def test_bad_lora_config_names_the_fix(override, message):
    with pytest.raises(UserError) as err:
        load_config(None, ["lora.rank=8", override])
    assert message in str(err.value)


def test_lora_config_choices_reach_peft(make_model):
    assert load_config(None, ["lora.target_modules=q_proj, v_proj"]).lora.modules == ["q_proj", "v_proj"]
    base = make_model()
    assert apply_lora(base, LoraConfig()) is base  # rank 0: full fine-tuning, peft not needed
    model = apply_lora(make_model(), LoraConfig(rank=2, target_modules="q_proj,v_proj", dropout=0.1))
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n
    }
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match="cannot apply LoRA"):
        apply_lora(make_model(), LoraConfig(rank=2, target_modules="no_such_proj"))
    with pytest.raises(UserError, match="tied to the LM head"):
        apply_lora(make_model(), LoraConfig(rank=2, target_modules="q_proj,lm_head"))


def test_missing_peft_is_a_clear_error(make_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without the extra looks like
    with pytest.raises(UserError, match=r"pip install 'opdistill\[lora\]'"):
        apply_lora(make_model(), LORA)
