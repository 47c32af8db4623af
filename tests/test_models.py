"""Tokenizer, model save/load through HF APIs, logprob alignment, tokenizer mismatch."""

from __future__ import annotations

import pytest
import torch

from opdistill.config import ModelSpec
from opdistill.data.examples import Example, left_pad, right_pad
from opdistill.data.rendering import encode_completion, encode_prompts
from opdistill.errors import UserError
from opdistill.logits import completion_logits
from opdistill.models import load_model, save_model
from opdistill.objectives.losses import token_logprobs
from opdistill.types import Rollout, SignalRequest


def test_char_tokenizer_round_trip_and_chat_template(tokenizer):
    ids = encode_prompts(tokenizer, [Example(prompt="12+34=")])[0]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "12+34="
    completion = encode_completion(tokenizer, "1+4+0=05>46")
    assert completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion, skip_special_tokens=True) == "1+4+0=05>46"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("?", add_special_tokens=False)) == ["<unk>"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_load_through_hf_apis(tmp_path, make_model, tokenizer, arch):
    model = make_model(seed=1, preset="d16l1", arch=arch)
    save_model(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, loaded_tok = load_model(ModelSpec(path=str(tmp_path)))
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab() and loaded_tok.padding_side == "left"


def test_completion_logits_predict_the_next_token_like_cross_entropy(make_model, tokenizer):
    model = make_model(seed=2, preset="d32l2")
    prompts = [encode_prompts(tokenizer, [Example(prompt=p)])[0] for p in ("12+34=", "9=")]
    completions = [encode_completion(tokenizer, c) for c in ("46", "9,9>1")]
    ids_BP, mask_BP = left_pad(prompts, tokenizer.pad_token_id)
    tokens_BT, loss_mask_BT = right_pad(completions, tokenizer.pad_token_id)
    rollout = Rollout(
        ids_BP, mask_BP, tokens_BT, loss_mask_BT, torch.zeros(tokens_BT.shape), torch.zeros(2).bool()
    )
    with torch.no_grad():
        logp_BT = token_logprobs(completion_logits(model, rollout), tokens_BT)
    for row in range(2):  # reference: the unpadded sequence alone, position t predicts token t + 1
        seq = torch.tensor([prompts[row] + completions[row]])
        logits = model(input_ids=seq).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="none")
        n = len(completions[row])
        torch.testing.assert_close(logp_BT[row, :n], -ce[-n:], atol=1e-5, rtol=1e-5)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist or holds no config.json"):
        load_model(ModelSpec(path=str(tmp_path / "nope")))


def test_local_teacher_sends_each_signal_level_only_when_asked(make_model, tokenizer):
    from opdistill.teachers.local import LocalTeacher

    teacher = LocalTeacher(make_model(seed=4))
    ids_BP, mask_BP = left_pad([[1, 5, 6]], tokenizer.pad_token_id)
    tokens_BT, loss_mask_BT = right_pad([[7, 8, tokenizer.eos_token_id]], tokenizer.pad_token_id)
    rollout = Rollout(ids_BP, mask_BP, tokens_BT, loss_mask_BT, torch.zeros(1, 3), torch.zeros(1).bool())
    sampled = teacher.score(rollout, SignalRequest())
    assert all(getattr(sampled, name) is None for name in ("topk_ids_BTK", "given_ids_BTK", "full_logits"))
    asked_ids_BTK = torch.tensor([[[3, 4], [5, 6], [7, 8]]])
    signal = teacher.score(
        rollout, SignalRequest(topk=4, at_ids=True, full=True, entropy=True), asked_ids_BTK
    )
    assert signal.full_logits is not None and signal.full_logits.tensor().shape == (1, 3, len(tokenizer))
    logp_BTV = signal.full_logits.tensor().log_softmax(-1)
    torch.testing.assert_close(logp_BTV.gather(-1, tokens_BT[..., None]).squeeze(-1), sampled.token_logp_BT)
    top_BTK = logp_BTV.topk(4, dim=-1)  # L1: the teacher's own top-K, most likely first
    assert signal.topk_ids_BTK is not None and signal.topk_logp_BTK is not None
    assert torch.equal(signal.topk_ids_BTK, top_BTK.indices)
    torch.testing.assert_close(signal.topk_logp_BTK, top_BTK.values)
    assert signal.given_logp_BTK is not None and signal.entropy_BT is not None  # L1s and the entropy
    torch.testing.assert_close(signal.given_logp_BTK, logp_BTV.gather(-1, asked_ids_BTK))
    torch.testing.assert_close(signal.entropy_BT, -(logp_BTV.exp() * logp_BTV).sum(-1))
