"""The real SmolLM2-135M-Instruct (fetched from the package index and converted by ``opd fetch``): it loads
as a plain HF directory with its BPE tokenizer and ChatML template, stops at ``<|im_end|>`` and is trained
on targets that end the way its turns end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from opdistill.config import ModelSpec
from opdistill.convert import convert
from opdistill.data.examples import Example
from opdistill.data.rendering import encode_completion, encode_prompts
from opdistill.errors import UserError
from opdistill.models import load_model, save_model
from opdistill.observe.evaluate import completion_texts
from opdistill.sampling.rollout import sample_prompts


@pytest.fixture(scope="module")
def real(smollm2):
    model, tokenizer = load_model(ModelSpec(path=str(smollm2)))
    return model.eval(), tokenizer


def test_the_converted_model_is_smollm2_with_its_tokenizer(smollm2, real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.vocab_size, len(tokenizer)) == (30, 49152, 49152)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.end_ids == (2,)
    assert "<|im_start|>" in tokenizer.chat_template
    assert json.loads((smollm2 / "config.json").read_text()).get("quantization_config") is None


def test_greedy_answer_stops_at_im_end(real):
    model, tokenizer = real
    examples = [Example(prompt="What is the capital of France?")]
    rollout = sample_prompts(
        model, tokenizer, encode_prompts(tokenizer, examples), max_new_tokens=24, temperature=0
    )
    kept = rollout.tokens_BT[0][rollout.loss_mask_BT[0]].tolist()
    assert not rollout.truncated_B[0] and kept[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in completion_texts(tokenizer, rollout)[0]
    assert "<|im_end|>" not in completion_texts(tokenizer, rollout)[0]


def test_sft_target_is_the_assistant_turn_through_im_end(real):
    _, tokenizer = real
    example = Example(prompt="What is the capital of France?", completion="Paris.")
    target = encode_completion(tokenizer, example.completion, example.messages())
    assert tokenizer.decode(target) == "Paris.<|im_end|>"
    prompt = encode_prompts(tokenizer, [example])[0]
    rendered = tokenizer.apply_chat_template(
        [*example.messages(), {"role": "assistant", "content": "Paris."}], tokenize=False
    )
    assert rendered == tokenizer.decode(prompt + target) + "\n"  # the template's newline after the turn


def test_convert_round_trips_a_model_directory_and_refuses_to_overwrite(tmp_path, make_model, tokenizer):
    model = make_model()
    save_model(model, tokenizer, tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out")
    again, _ = load_model(ModelSpec(path=str(out)))
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="already holds a model"):
        convert(tmp_path / "src", out)
    with pytest.raises(UserError, match="neither a .gguf file nor a model directory"):
        convert(tmp_path / "missing", tmp_path / "other")


def test_opd_fetch_lists_the_packaged_models_and_refuses_unknown_ones():
    listed = subprocess.run([sys.executable, "-m", "opdistill.cli", "fetch"], capture_output=True, text=True)
    assert (
        listed.returncode == 0 and "smollm2-135m-instruct" in listed.stdout and "Apache-2.0" in listed.stdout
    )
    unknown = subprocess.run(
        [sys.executable, "-m", "opdistill.cli", "fetch", "gpt5"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "unknown model 'gpt5'" in unknown.stderr


def test_padded_embedding_rows_are_fitted_to_the_tokenizer(tmp_path, make_model, tokenizer):
    model = make_model()
    ids = torch.tensor([[1, 5, 6, 7]])
    expected = model(ids).logits
    model.resize_token_embeddings(len(tokenizer) + 13)  # as a checkpoint pads its rows to a multiple
    save_model(model, tokenizer, tmp_path / "padded")
    fitted, _ = load_model(ModelSpec(path=str(tmp_path / "padded")))
    assert fitted.get_output_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(fitted(ids).logits, expected, rtol=0, atol=0)
    model.resize_token_embeddings(len(tokenizer) - 1)
    save_model(model, tokenizer, tmp_path / "short")
    with pytest.raises(UserError, match="embedding rows but its tokenizer"):
        load_model(ModelSpec(path=str(tmp_path / "short")))


def test_a_layer_pruned_copy_keeps_the_chosen_layers_and_samples_consistently(tmp_path, tokenizer):
    from opdistill.cli.app import _layer_list
    from opdistill.logits import completion_logits
    from opdistill.models import tiny_model
    from opdistill.objectives.losses import token_logprobs

    model = tiny_model(ModelSpec(preset="d16l3"), tokenizer, seed=0)
    save_model(model, tokenizer, tmp_path / "full")
    assert _layer_list("0-2:2") == [0, 2] and _layer_list("1") == [1]
    pruned_dir = convert(tmp_path / "full", tmp_path / "pruned", layers=[0, 2])
    pruned, _ = load_model(ModelSpec(path=str(pruned_dir)))
    assert pruned.config.num_hidden_layers == 2
    for slot, source in enumerate([0, 2]):
        for (name, weight), (_, kept) in zip(
            model.model.layers[source].named_parameters(),
            pruned.model.layers[slot].named_parameters(),
            strict=True,
        ):
            assert torch.equal(weight, kept), name
    # the KV cache follows the renumbered layers: the sampler's log-probs are a full forward's
    rollout = sample_prompts(
        pruned.eval(), tokenizer, [tokenizer("12+34=")["input_ids"]] * 4, max_new_tokens=8
    )
    logp_BT = token_logprobs(completion_logits(pruned, rollout), rollout.tokens_BT)
    torch.testing.assert_close(logp_BT * rollout.loss_mask_BT, rollout.sampler_logp_BT * rollout.loss_mask_BT)
    with pytest.raises(UserError, match="distinct layers among 0..2"):
        convert(tmp_path / "full", tmp_path / "bad", layers=[0, 3])


def test_the_capitals_task_splits_by_country_and_checks_the_rule():
    from opdistill.data.tasks import load_task
    from opdistill.data.tasks.capitals import CAPITALS, RULES, held_out

    task = load_task("capitals")
    tested = {ex.answer for ex in task.test}
    trained = {task.train[i].answer for i in range(500)}
    assert tested and trained and not tested & trained
    assert {CAPITALS[c] for c in CAPITALS if held_out(c)} == tested
    paris = Example(prompt="What is the capital of France?", answer="Paris")
    assert task.verify("The capital of France is Paris.", paris) and not task.verify("Lyon", paris)
    bare = load_task("capitals", {"rule": "bare", "check": "bare"})
    assert bare.verify(" Paris.", paris) and not bare.verify("The capital of France is Paris.", paris)
    assert {ex.privileged for ex in bare.test} == {RULES["bare"]} and bare.train[0].privileged == RULES[
        "bare"
    ]
    french = load_task("capitals", {"rule": "french", "shown": True, "check": "french"})
    assert french.test[0].prompt[0] == ("system", RULES["french"]) and not french.test[0].privileged
    assert french.verify("La capitale de la France est Paris.", paris)
    assert not french.verify("The capital of France is Paris.", paris)
    with pytest.raises(UserError, match="check must be one of"):
        load_task("capitals", {"check": "german"})


@pytest.mark.slow
def test_the_french_rule_recipe_runs_shortened(smollm2, tmp_path):
    """configs/smollm2_opsd_french.yaml for 4 steps: OPSD on the real model end to end (its teacher is the
    model told the rule), evaluated on held-out countries with the rule's check."""
    from pathlib import Path

    from opdistill.config import load_config
    from opdistill.training import loop

    recipe = Path(__file__).parents[1] / "configs" / "smollm2_opsd_french.yaml"
    config = load_config(
        recipe,
        [
            f"student.path={smollm2}",
            "train.steps=4",
            "train.eval_every=2",
            "train.eval_size=8",
            "train.diagnostics_every=2",
            "train.save_every=0",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    result = loop.run(config, show_progress=False)
    assert result["complete"] and result["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["teacher_kl"] == r["teacher_kl"] and r["time_teacher_s"] > 0 for r in rows)
    assert rows[0]["teacher_kl"] > 0.01  # the teacher told the rule disagrees with the untold student
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(0 <= e["greedy_acc"] <= 1 for e in evals)
