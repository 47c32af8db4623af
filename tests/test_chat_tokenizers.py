"""End tokens and SFT targets on tokenizers built in-process with the special-token layouts and (public)
chat templates of Qwen2/3, Llama 3 and Gemma chat models, and on a base model's plain text."""

from __future__ import annotations

import string

import pytest
import torch

from opdistill.config import ModelSpec, load_config
from opdistill.data.examples import Example, rollout_of
from opdistill.data.rendering import encode_completion, encode_prompts, end_ids, plain_text, use_chat_settings
from opdistill.models import char_tokenizer, tiny_model
from opdistill.sampling.rollout import sample_prompts
from opdistill.teachers.cross import CrossTokenizerTeacher
from opdistill.types import SignalRequest, TeacherSignal

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# name: (chat template, BOS, EOS as the tokenizer declares it, the turn's end token, other specials)
LAYOUTS = {
    "qwen": (CHATML, None, "<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
    "llama3": (
        LLAMA3,
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>"],
    ),
    "gemma": (GEMMA, "<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>"]),
}


def chat_tokenizer(layout: str):
    template, bos, eos, turn_end, others = LAYOUTS[layout]
    tokenizer = char_tokenizer([string.ascii_letters + string.digits + " +=?.:<>/\n_|"])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [turn_end, *others, eos, *([bos] if bos else [])]}
    )
    tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = template
    return tokenizer, tokenizer.convert_tokens_to_ids(turn_end)


MESSAGES = [{"role": "user", "content": "what is 2+3?"}]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_end_ids_hold_eos_and_the_templates_end_of_turn(layout):
    tokenizer, turn_end = chat_tokenizer(layout)
    ids = end_ids(tokenizer)
    assert ids[0] == tokenizer.eos_token_id and turn_end in ids and len(ids) == 2
    assert end_ids(tokenizer, [7, tokenizer.eos_token_id]) == (tokenizer.eos_token_id, 7, turn_end)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sft_target_ends_the_way_the_templates_assistant_turn_ends(layout):
    tokenizer, turn_end = chat_tokenizer(layout)
    target = encode_completion(tokenizer, "5.", MESSAGES)
    assert target[-1] == turn_end and tokenizer.eos_token_id not in target
    assert tokenizer.decode(target) == f"5.{tokenizer.convert_ids_to_tokens(turn_end)}"
    # prompt + target is the template's own rendering of the finished conversation, up to the turn's end
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*MESSAGES, {"role": "assistant", "content": "5."}], tokenize=False)
    assert full.startswith(prompt + tokenizer.decode(target))


def test_a_base_model_without_a_template_gets_plain_text_then_eos():
    tokenizer, _ = chat_tokenizer("qwen")
    tokenizer.chat_template = None
    assert end_ids(tokenizer) == (tokenizer.eos_token_id,)
    target = encode_completion(tokenizer, "5.", MESSAGES)
    assert target == tokenizer.encode("5.", add_special_tokens=False) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_sampler_stops_at_every_end_token(layout):
    tokenizer, turn_end = chat_tokenizer(layout)
    model = tiny_model(ModelSpec(preset="d16l1"), tokenizer, seed=0).eval()
    with torch.no_grad():  # make both end tokens likely, so that rows end at each of them
        model.lm_head.bias = None
        model.model.embed_tokens.weight[[turn_end, tokenizer.eos_token_id]] *= 4
    prompts = [tokenizer("what is 2+3?")["input_ids"]] * 64
    rollout = sample_prompts(
        model, tokenizer, prompts, max_new_tokens=24, generator=torch.Generator().manual_seed(0)
    )
    ends = torch.tensor(end_ids(tokenizer))
    ended_at = set()
    for tokens, mask, truncated in zip(
        rollout.tokens_BT, rollout.loss_mask_BT, rollout.truncated_B, strict=True
    ):
        kept = tokens[mask].tolist()
        is_end = torch.isin(torch.tensor(kept), ends).tolist()
        assert not any(is_end[:-1])  # no end token before the last kept one
        assert bool(truncated) == (not is_end[-1])
        if not truncated:
            ended_at.add(kept[-1])
            assert not mask[len(kept) :].any()
    assert ended_at == {turn_end, tokenizer.eos_token_id}


QWEN3_THINKING = CHATML.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}",
)


def test_chat_template_kwargs_reach_every_rendering():
    tokenizer, _ = chat_tokenizer("qwen")
    tokenizer.chat_template = QWEN3_THINKING
    example = Example(prompt="what is 2+3?", completion="5.")
    thinking = tokenizer.decode(encode_prompts(tokenizer, [example])[0])
    use_chat_settings(
        tokenizer,
        load_config(None, ["data.chat_template_kwargs={enable_thinking: false}"]).data.chat_template_kwargs,
        0,
    )
    plain = tokenizer.decode(encode_prompts(tokenizer, [example])[0])
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert tokenizer.decode(encode_completion(tokenizer, "5.", example.messages())) == "5.<|im_end|>"


def test_long_prompts_keep_their_last_tokens_with_a_warning():
    tokenizer, _ = chat_tokenizer("qwen")
    example = Example(prompt="what is 2+3? " * 10)
    full = encode_prompts(tokenizer, [example])[0]
    use_chat_settings(tokenizer, {}, 20)
    with pytest.warns(
        UserWarning, match=f"a prompt of {len(full)} tokens keeps its last data.max_prompt_tokens=20"
    ):
        assert encode_prompts(tokenizer, [example])[0] == full[-20:]


def test_a_base_model_reads_every_turn_as_plain_text():
    tokenizer, _ = chat_tokenizer("qwen")
    tokenizer.chat_template = None
    example = Example(prompt=(("system", "be brief"), ("user", "what is 2+3?")))
    assert (
        tokenizer.decode(encode_prompts(tokenizer, [example])[0])
        == "System: be brief\n\nUser: what is 2+3?\n\nAssistant:"
    )
    assert plain_text(Example(prompt="what is 2+3?").messages()) == "what is 2+3?"


def test_a_model_directory_declaring_several_end_ids_stops_at_each(tmp_path, tokenizer):
    from opdistill.models import load_model, save_model

    model = tiny_model(ModelSpec(preset="d16l1"), tokenizer, seed=0)
    other = tokenizer.convert_tokens_to_ids("=")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, other]  # as Llama 3's lists two
    save_model(model, tokenizer, tmp_path / "model")
    loaded, loaded_tokenizer = load_model(ModelSpec(path=str(tmp_path / "model")))
    assert loaded_tokenizer.end_ids == (tokenizer.eos_token_id, other)
    rollout = sample_prompts(
        loaded.eval(),
        loaded_tokenizer,
        [loaded_tokenizer("12+34")["input_ids"]] * 32,
        max_new_tokens=16,
        generator=torch.Generator().manual_seed(0),
    )
    ends = [
        ids[-1] for ids, cut in zip(rollout.completion_ids(), rollout.truncated_B, strict=True) if not cut
    ]
    assert other in ends and all(i in (tokenizer.eos_token_id, other) for i in ends)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_teacher_with_another_tokenizer_reads_its_own_turn_end_and_names_as_text(layout):
    """Across tokenizers (teachers/cross.py) the teacher scores the student's finished reply ending the
    way its own turns end (not its EOS), and a special token's name the student wrote is text to it."""
    teacher, turn_end = chat_tokenizer(layout)
    student = char_tokenizer([string.ascii_letters + string.digits + " +=?.:<>/\n_|"])
    example = Example(prompt="what is 2+3?")
    written = LAYOUTS[layout][3]  # the teacher's end-of-turn token, spelled out by the student
    rollout = rollout_of(
        encode_prompts(student, [example]), [encode_completion(student, f"5 {written}")], student.pad_token_id
    )

    class Seen:
        def score(self, view, request, ids_BTK=None):
            self.view = view
            return TeacherSignal(token_logp_BT=torch.zeros(view.tokens_BT.shape))

    inner = Seen()
    CrossTokenizerTeacher(inner, student, teacher, 64).score(rollout, SignalRequest(), rows=[example])
    ids = inner.view.tokens_BT[0].tolist()
    assert ids[-1] == turn_end and ids.count(turn_end) == 1
    assert teacher.decode(ids[:-1]) == f"5 {written}"
