"""Multi-turn episodes: a model's turns and an environment's, through the chat template, laid out as one
``Rollout`` whose loss mask covers the model's tokens only (docs/agents.md).

The completion region of an episode row is turn ⊕ observation ⊕ turn ⊕ ... : each turn exactly as the
model sampled it (through its end-of-turn token), each observation as the chat template renders the
environment's reply and the next generation prompt after that end token. ``Rollout.observed_BT`` marks the
observations: every model attends to them (the teacher scores the student's turns in the full context), no
loss, no normaliser, no diagnostic sees them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opdistill.data.examples import Example, left_pad, right_pad
from opdistill.data.rendering import encode_completion, encode_prompts, end_ids
from opdistill.envs import EnvFactory, Environment
from opdistill.errors import UserError
from opdistill.sampling.refine import prefix_cuts
from opdistill.sampling.rollout import Guide, sample_prompts
from opdistill.types import Rollout


@dataclass(frozen=True)
class EpisodeSpec:
    """How episodes are played: fresh environments from ``make_env`` and the budgets (``env.*``)."""

    make_env: EnvFactory
    max_turns: int
    max_tokens: int
    mask_observations: bool = True


@dataclass
class Episode:
    env: Environment
    prompt_ids: list[int]
    messages: list[dict[str, str]]  # the conversation so far, as the chat template renders it
    head: int = 1  # how many of ``messages`` the prompt holds (a system turn, earlier turns, the first)
    ids: list[int] = field(default_factory=list)  # the completion region: turns and observations
    mine: list[bool] = field(default_factory=list)  # True on the model's own tokens
    logps: list[float] = field(default_factory=list)  # log-prob under its sampler (0: not sampled)
    starts: list[int] = field(default_factory=list)  # where in ``ids`` each of the model's turns starts
    reward: float = 0.0
    turns: int = 0
    done: bool = False  # the environment ended it
    truncated: bool = False  # it ran out of turns or tokens, or a turn hit max_new_tokens

    @property
    def over(self) -> bool:
        return self.done or self.truncated


def start(tokenizer, examples: Sequence[Example], make_env: EnvFactory) -> list[Episode]:
    """A fresh episode per example: its environment reset, the first user turn rendered as the prompt."""
    if not tokenizer.chat_template:
        raise UserError(
            "multi-turn episodes (env.name) render turns through the tokenizer's chat template, and this "
            "tokenizer has none."
        )
    episodes = []
    for example in examples:
        env = make_env()
        first = env.reset(example)
        messages = [*example.messages()[:-1], {"role": "user", "content": first}]
        view = dataclasses.replace(example, prompt=tuple((m["role"], m["content"]) for m in messages))
        episodes.append(Episode(env, encode_prompts(tokenizer, [view])[0], messages, len(messages)))
    return episodes


def observation_ids(tokenizer, messages: list[dict[str, str]], turn: str, observation: str) -> list[int]:
    """The tokens that follow a model's turn (after its end-of-turn token) when the environment answers
    ``observation``: the chat template's rendering of the reply and of the next generation prompt."""
    settings = getattr(tokenizer, "opd_template_kwargs", {})
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **settings)
    after = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": turn}, {"role": "user", "content": observation}],
        tokenize=False,
        add_generation_prompt=True,
        **settings,
    )
    if not after.startswith(before):
        raise UserError(
            "the chat template does not render a conversation as a prefix of its continuation, which "
            "multi-turn episodes need (each turn is appended as it was sampled)."
        )
    rest = after[len(before) :]
    markers = [tokenizer.convert_ids_to_tokens(i) for i in end_ids(tokenizer)]
    cuts = [rest.find(m) + len(m) for m in markers if m and rest.find(m) >= 0]
    if not cuts:
        raise UserError("the chat template ends an assistant turn with none of the tokenizer's end tokens.")
    return tokenizer.encode(rest[min(cuts) :], add_special_tokens=False)


def play(
    model,
    tokenizer,
    episodes: list[Episode],
    *,
    max_turns: int,
    max_new_tokens: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    guide: Guide | None = None,
) -> list[Episode]:
    """Continue ``episodes`` with ``model`` taking the turns, all open ones batched each turn, until each is
    done or out of budget: ``max_turns`` of the model per episode, ``max_new_tokens`` per turn,
    ``max_tokens`` in its completion region (turns and observations). Episodes are updated in place."""
    ends = set(end_ids(tokenizer))
    while True:
        open_ = [e for e in episodes if not e.over]
        if not open_:
            return episodes
        rollout = sample_prompts(
            model,
            tokenizer,
            [e.prompt_ids + e.ids for e in open_],
            max_new_tokens=min(max_new_tokens, max(max_tokens - len(e.ids) for e in open_)),
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            guide=guide,
        )
        logps = rollout.sampler_logp_BT.tolist()
        for episode, ids, row in zip(open_, rollout.completion_ids(), logps, strict=True):
            ids = ids[: max(0, max_tokens - len(episode.ids))]
            _take_turn(episode, ids, row[: len(ids)])
            if not ids or ids[-1] not in ends:  # the turn hit its token budget
                episode.truncated = True
                continue
            text = tokenizer.decode([i for i in ids if i not in ends], skip_special_tokens=True)
            observed = _answer(tokenizer, episode, text)
            if episode.over:
                continue
            if episode.turns >= max_turns or len(episode.ids) + len(observed) >= max_tokens:
                episode.truncated = True
                continue
            _observe(episode, observed)


def _answer(tokenizer, episode: Episode, turn: str) -> list[int]:
    """The environment's step on ``turn``: the reward added, the conversation extended, and the tokens of its
    observation returned ([] when it ended the episode)."""
    outcome = episode.env.step(turn)
    episode.reward += outcome.reward
    episode.done = outcome.done
    observed = [] if outcome.done else observation_ids(tokenizer, episode.messages, turn, outcome.observation)
    episode.messages.append({"role": "assistant", "content": turn})
    if not outcome.done:
        episode.messages.append({"role": "user", "content": outcome.observation})
    return observed


def _take_turn(episode: Episode, ids: list[int], logps: list[float]) -> None:
    episode.starts.append(len(episode.ids))
    episode.ids += ids
    episode.mine += [True] * len(ids)
    episode.logps += logps
    episode.turns += 1


def _observe(episode: Episode, observed: list[int]) -> None:
    episode.ids += observed
    episode.mine += [False] * len(observed)
    episode.logps += [0.0] * len(observed)


def demonstrated(tokenizer, episodes: list[Episode], turns: Sequence[Sequence[str]]) -> list[Episode]:
    """``episodes`` played with given turns (an environment's demonstrations), each rendered as the chat
    template writes an assistant turn; for SFT, as a dataset completion is."""
    for episode, texts in zip(episodes, turns, strict=True):
        for text in texts:
            if episode.over:
                break
            ids = encode_completion(tokenizer, text, episode.messages)
            _take_turn(episode, ids, [0.0] * len(ids))
            _observe(episode, _answer(tokenizer, episode, text))
    return episodes


def outcomes(
    model,
    tokenizer,
    examples: Sequence[Example],
    spec: EpisodeSpec,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
    seed: int = 0,
    batch_tokens: int = 65536,
) -> tuple[list[str], list[bool]]:
    """``n`` episodes per example (grouped per example), in batches of at most ``batch_tokens`` prompt +
    episode tokens: their transcripts and whether each was solved (reward > 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [ex for ex in examples for _ in range(n)]
    longest = max((len(p) for p in encode_prompts(tokenizer, list(examples))), default=0) + spec.max_tokens
    size = max(1, batch_tokens // longest)
    texts, solved = [], []
    for first in range(0, len(rows), size):
        played = play(
            model,
            tokenizer,
            start(tokenizer, rows[first : first + size], spec.make_env),
            max_turns=spec.max_turns,
            max_new_tokens=max_new_tokens,
            max_tokens=spec.max_tokens,
            temperature=temperature,
            generator=generator,
        )
        texts += [transcript(e) for e in played]
        solved += [e.reward > 0.5 for e in played]
    return texts, solved


def cut_at_turn(episode: Episode, turn: int, make_env: EnvFactory, example: Example) -> Episode:
    """``episode`` up to the start of its model turn ``turn`` (0 = only the prompt), in a fresh environment
    brought to the same state by replaying the kept turns (environments are deterministic in their turns)."""
    env = make_env()
    env.reset(example)
    head = episode.head
    kept = Episode(env, episode.prompt_ids, episode.messages[: head + 2 * turn], head)
    for message in kept.messages[head::2]:  # the model's turns; the environment's answers follow each
        kept.reward += env.step(message["content"]).reward
    end = episode.starts[turn] if turn < len(episode.starts) else len(episode.ids)
    kept.ids, kept.mine, kept.logps = episode.ids[:end], episode.mine[:end], episode.logps[:end]
    kept.starts, kept.turns = episode.starts[:turn], turn
    return kept


def take_over(
    teacher,
    tokenizer,
    played: list[Episode],
    rows: Sequence[Example],
    make_env: EnvFactory,
    *,
    cut_topk: int,
    verified: bool,
    **settings,
) -> tuple[list[Episode], dict[str, float]]:
    """Teacher takeover of failed episodes (the agentic form of TRD, docs/agents.md): each episode with reward
    ≤ 0.5 is cut at the start of its first turn with a token outside the teacher's top-``cut_topk`` (its last
    turn when the teacher accepted every token), and the teacher plays on from there (``settings`` are
    ``play``'s). With ``verified`` the corrected episode replaces the student's only if it is solved. Its
    teacher-written tokens get loss and no sampler log-prob."""
    failed = [b for b, e in enumerate(played) if e.reward <= 0.5]
    metrics = {
        "takeover_tried": len(failed) / len(played),
        "takeover_solved": 0.0,
        "takeover_kept_turns": 0.0,
    }
    if not failed:
        return played, metrics
    pad_id = tokenizer.pad_token_id
    cuts = prefix_cuts(teacher, as_rollout([played[b] for b in failed], pad_id), cut_topk).tolist()
    resumed = []
    for b, cut in zip(failed, cuts, strict=True):
        episode = played[b]
        if cut < len(episode.ids):  # the turn the first rejected token is in
            turn = sum(start <= cut for start in episode.starts) - 1
        else:  # the teacher accepted every token: it redoes the last turn
            turn = len(episode.starts) - 1
        resumed.append(cut_at_turn(episode, max(turn, 0), make_env, rows[b]))
    kept_turns = [e.turns for e in resumed]
    lengths = [len(e.ids) for e in resumed]
    play(teacher, tokenizer, resumed, **settings)
    out, solved = list(played), 0
    for b, episode, length in zip(failed, resumed, lengths, strict=True):
        episode.logps[length:] = [0.0] * (len(episode.logps) - length)  # the teacher's tokens: not sampled
        if episode.reward > 0.5 or not verified:
            out[b], solved = episode, solved + (episode.reward > 0.5)
    metrics["takeover_solved"] = solved / len(played)
    metrics["takeover_kept_turns"] = sum(kept_turns) / len(kept_turns)
    return out, metrics


def as_rollout(
    episodes: Sequence[Episode],
    pad_id: int,
    device: torch.device | str = "cpu",
    mask_observations: bool = True,
) -> Rollout:
    """Episodes as one batch: left-padded prompts, right-padded completion regions, the loss mask on the
    model's tokens and ``observed_BT`` on the environment's. ``mask_observations=False`` is the ablation that
    gives the environment's tokens loss too, as if the model had written them."""
    ids_BP, mask_BP = left_pad([e.prompt_ids for e in episodes], pad_id)
    tokens_BT, real_BT = right_pad([e.ids for e in episodes], pad_id)
    width = tokens_BT.shape[1]
    mine_BT = torch.tensor([e.mine + [False] * (width - len(e.mine)) for e in episodes], dtype=torch.bool)
    if not mask_observations:
        mine_BT = real_BT.clone()
    logp_BT = torch.tensor([e.logps + [0.0] * (width - len(e.logps)) for e in episodes])
    return Rollout(
        prompt_ids_BP=ids_BP,
        prompt_mask_BP=mask_BP,
        tokens_BT=tokens_BT,
        loss_mask_BT=mine_BT.view(len(episodes), width),
        sampler_logp_BT=logp_BT.view(len(episodes), width).float(),
        truncated_B=torch.tensor([e.truncated for e in episodes]),
        observed_BT=real_BT & ~mine_BT,
    ).to(torch.device(device))


def transcript(episode: Episode) -> str:
    """An episode as text, the model's turns and the environment's replies (for logs and shown samples)."""
    turns = [f"{m['role']}: {m['content']}" for m in episode.messages[episode.head - 1 :]]
    return " | ".join(turns)
