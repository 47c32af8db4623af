"""The run configuration's sections: frozen dataclasses, each field with a default and a comment (``Literal``
fields list their choices), validated in ``__post_init__`` with messages that say what to change. loading.py
reads them from YAML and overrides; docs/configuration.md is generated from them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from opdistill.data.examples import EXAMPLE_FIELDS
from opdistill.envs import builtin_task
from opdistill.errors import UserError
from opdistill.objectives.losses import TopKVariant
from opdistill.objectives.registry import OBJECTIVES, names_where
from opdistill.types import SignalRequest


@dataclass(frozen=True)
class ModelSpec:
    path: str = ""  # HF model directory (save_pretrained layout); empty = a fresh tiny model (students only)
    preset: str = "d32l2"  # fresh tiny model "d{hidden}l{layers}", e.g. d32l2 (34k params), d64l2, d128l4
    arch: Literal["llama", "qwen2"] = "llama"  # architecture of a fresh tiny model
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype
    attention: str = "auto"  # auto: math attention for short sequences on CPU, else SDPA; or sdpa, eager, ...
    url: str = ""  # remote teacher: opd serve-teacher / vLLM base URL (then path is not loaded here)
    api: Literal["opd", "vllm"] = "opd"  # remote teacher protocol: opd serve-teacher | vLLM completions
    served_model: str = ""  # api=vllm: model name sent to vLLM (empty = the one model it serves)
    timeout_s: float = 60.0  # remote teacher: seconds per HTTP request before it is retried
    retries: int = 5  # remote teacher: retries after a failed request (backoff 0.5 s, doubling)
    tokenizer: str = ""  # tokenizer dir: a fresh model's (else characters); a remote teacher's, if not ours
    trust_remote_code: bool = False  # run Python code shipped in the model directory (auto_map): trusted only

    def __post_init__(self):
        if not (0 < self.timeout_s <= 86400 and 0 <= self.retries <= 1000):
            raise UserError(
                f"a teacher's timeout_s must be in (0, 86400] seconds and retries in [0, 1000]; got "
                f"{self.timeout_s:g} and {self.retries}."
            )
        if not self.path and not parse_preset(self.preset):
            raise UserError(
                f"model preset {self.preset!r} is not of the form d<hidden>l<layers>, e.g. d32l2."
            )


def parse_preset(preset: str) -> tuple[int, int] | None:
    """'d64l2' -> (64, 2); None when malformed."""
    head, sep, layers = preset.lower().removeprefix("d").partition("l")
    if not (preset.lower().startswith("d") and sep and head.isdigit() and layers.isdigit()):
        return None
    return int(head), int(layers)


SftTargets = Literal["dataset", "teacher", "teacher_pool"]
Route = Literal["all", "failed_only", "correct_only"]
Window = Literal["first", "last", "random"]
TopKSupport = Literal["student", "teacher", "union", "intersect"]
RankBy = Literal["teacher", "verifier", "verifier+teacher"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum", "constant"]


@dataclass(frozen=True)
class DataConfig:
    task: str = "addition"  # built-in task (see `opd tasks`); unused when train_file is given
    task_options: dict[str, Any] = field(default_factory=dict)  # task parameters, e.g. {digits: 4}
    train_file: str = ""  # JSONL, .parquet/.csv/.json, save_to_disk dir or hf:NAME[:SPLIT] (replaces task)
    eval_file: str = ""  # the same, held out for evaluation (built-in tasks have their own test split)
    columns: dict[str, str] = field(default_factory=dict)  # field -> column, e.g. {prompt: question}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    max_prompt_tokens: int = 0  # longer prompts keep their last N tokens, with a warning (0 = no limit)
    streaming: bool = False  # read train_file lazily, shuffled in a buffer (large sets; resume re-reads)
    shuffle_buffer: int = 10000  # streaming: examples held to shuffle among (bigger = nearer a full shuffle)
    n_train_prompts: int = 0  # restrict training to the first N prompts (0 = all / unlimited)
    answer_regex: str = r"-?\d+(?:\.\d+)?"  # user data: the answer is the last match (group 1 if any)
    verifier: str = ""  # user data: "module:function(completion, example) -> bool", overrides the regex
    completions: SftTargets = "dataset"  # SFT on: dataset | teacher (fresh each step) | teacher_pool (reused)
    pool_size: int = 4096  # teacher_pool: prompts in the cached pool (teacher = fresh samples every step)
    teacher_temperature: float = 0.0  # teacher / teacher_pool completions: 0 = greedy
    curriculum: bool = False  # SEAD's competence gate: train on prompts no harder than c(step) (math.md §7.7)
    curriculum_samples: int = 8  # curriculum: samples of the initial student per pool prompt (difficulty)
    curriculum_start: float = 0.3  # curriculum: c(0); c rises linearly to 1 at 70% of train.steps
    select_fraction: float = 0.0  # teacher-aligned prompt selection (math.md §11.3): keep this top share
    select_topk: int = 16  # selection: k of the step-0 student-teacher top-k overlap that scores a prompt
    select_mix: float = 0.5  # selection: share of each step's prompts drawn at random from the pool instead

    def __post_init__(self):
        if self.curriculum_samples < 1 or not 0 <= self.curriculum_start <= 1:
            raise UserError("data.curriculum_samples must be >= 1 and data.curriculum_start in [0, 1].")
        if self.max_prompt_tokens < 0:
            raise UserError(f"data.max_prompt_tokens={self.max_prompt_tokens} must be >= 0 (0 = no limit).")
        if self.train_file:  # the user's file replaces the default task; the resolved config says so
            object.__setattr__(self, "task", "")
        elif not self.task:
            raise UserError(
                "give data.task (a built-in task, see `opd tasks`) or data.train_file (JSONL or a dataset)."
            )
        unknown = sorted(set(self.columns) - set(EXAMPLE_FIELDS))
        if unknown or not all(isinstance(c, str) and c for c in self.columns.values()):
            raise UserError(
                f"data.columns maps example fields ({', '.join(EXAMPLE_FIELDS)}) to column names, e.g. "
                f"{{prompt: question}}; got {self.columns!r}."
            )
        if self.shuffle_buffer < 1 or self.pool_size < 1:
            raise UserError("data.shuffle_buffer and data.pool_size must be at least 1.")
        if self.n_train_prompts < 0 or self.teacher_temperature < 0:
            raise UserError("data.n_train_prompts and data.teacher_temperature must be 0 or more.")
        if not 0 <= self.select_fraction <= 1 or not 0 <= self.select_mix <= 1 or self.select_topk < 1:
            raise UserError(
                "data.select_fraction and data.select_mix must be in [0, 1] and data.select_topk at least 1."
            )


@dataclass(frozen=True)
class RolloutConfig:
    n_per_prompt: int = 1  # G: completions sampled per prompt
    temperature: float = 1.0  # sampling temperature (the loss uses the untempered model)
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 64  # completions stop at EOS or here (then counted as truncated)
    on_policy_fraction: float = 1.0  # GKD λ: share of steps on student samples (else data.completions)
    skd_topk: int = -1  # SKD (math.md §9.2): resample tokens outside the teacher's top-K (-1 off, 0 all)
    engine: Literal["builtin", "vllm"] = "builtin"  # who samples the student: this sampler | colocated vLLM
    sync_every: int = 1  # engine=vllm: push the student's weights into vLLM every N optimizer steps
    engine_memory: float = 0.3  # engine=vllm on a GPU: share of its memory vLLM may take (weights + KV cache)

    def __post_init__(self):
        if self.n_per_prompt < 1 or self.max_new_tokens < 1:
            raise UserError("rollout.n_per_prompt and rollout.max_new_tokens must be at least 1.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("rollout.temperature must be >= 0 and rollout.top_p in (0, 1].")
        if not 0 <= self.on_policy_fraction <= 1:
            raise UserError("rollout.on_policy_fraction must be in [0, 1].")
        if self.skd_topk < -1:
            raise UserError("rollout.skd_topk must be -1 (off), 0 (teacher sampling) or a top-K width.")
        if self.sync_every < 1:
            raise UserError("rollout.sync_every must be at least 1 (push the weights every N steps).")
        if not 0 < self.engine_memory < 1:
            raise UserError("rollout.engine_memory must be in (0, 1): the share of GPU memory vLLM may take.")
        if self.engine == "vllm" and self.skd_topk >= 0:
            raise UserError(
                "rollout.skd_topk has the teacher verify every token inside the built-in sampler: not with "
                "rollout.engine=vllm."
            )


@dataclass(frozen=True)
class ObjectiveConfig:
    type: str = "full_rkl"  # what the student minimises: `opd objectives` lists them all
    jsd_beta: float = 0.5  # β of type=jsd: 0 = forward KL, 1 = reverse KL (TRL convention)
    cross_vocab: Literal["prefix", "shared"] = "prefix"  # L2 across tokenizers: math.md §18.3
    topk: int = 16  # K of topk_rkl and of the top-K baseline (ids per position)
    topk_variant: TopKVariant = "sg"  # topk_rkl: raw (T1, biased) | sg | renorm | tail | pg | fkl, see docs
    topk_support: TopKSupport = "student"  # topk_rkl ids: student's top-K | teacher's | union | intersect
    temperature: float = 1.0  # loss temperature τ on both student and teacher logits (full-vocabulary types)
    token_clip: float = 0.0  # full-vocabulary and top-K types: clip each token's divergence at c (0 = off)
    token_clip_soft: bool = False  # c·tanh(D/c) instead of min(D, c): bounded, but keeps a gradient
    kl_coef: float = 1.0  # c_KL: scale of the sampled reverse-KL advantage
    discount: float = 0.0  # γ: 0 = per-token (myopic) advantage, 1 = full reward-to-go
    baseline: Literal["none", "vopd"] = "none"  # sampled_rkl: vopd = minus the exact RKL (math.md §10)
    baseline_topk: int = 0  # vopd baseline over the student's top-K, renormalised (0 = full vocabulary)
    pg_clip: float = 0.0  # policy-gradient types: PPO clip ε (0 = plain importance sampling), e.g. 0.2
    pg_clip_high: float = 0.0  # sampled_rkl: upper ε if different from pg_clip (0 = same)
    dual_clip: float = 0.0  # with pg_clip: cap negative-advantage token losses at c·|A| (0 = off), e.g. 3
    grpo_coef: float = 0.0  # RLVR hybrid c_R: add c_R x GRPO advantage of the verifier reward (math.md §12)
    route_opd: Route = "all"  # which samples get the teacher term: all | failed_only | correct_only
    route_rl: Route = "all"  # which samples get the GRPO term
    scope_tau: float = 1.0  # scope: temperature of the perplexity weights
    dasd_beta: float = 1.0  # dasd: β, scale of the direction-adaptive teacher term
    dasd_rho: float = 0.2  # dasd: share of highest-entropy (forking) tokens pushed away from the teacher
    rank_by: RankBy = "teacher"  # teacher_pick, dpo: rank samples by teacher likelihood | verifier | both
    dpo_beta: float = 0.1  # dpo: β of -log σ(β (Δ_best - Δ_worst))
    ref_kl_coef: float = 0.0  # StableOPD β: k3 KL to the initial student on sampled tokens, e.g. 1e-3
    sft_coef: float = 0.0  # SFT-stabiliser: add coef x CE on data.completions of the prompts (math.md §5.5)
    aggregation: Aggregation = "token-mean"  # per-token losses -> one number: see docs/objectives.md
    aggregation_constant: float = 1.0  # divisor of aggregation=constant

    def __post_init__(self):
        if self.type not in OBJECTIVES:
            choices = ", ".join(repr(name) for name in OBJECTIVES)
            close = difflib.get_close_matches(self.type, OBJECTIVES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"objective.type must be one of {choices}; got {self.type!r}.{hint}")
        record = OBJECTIVES[self.type]

        def hybrid(r):
            return r.rlvr_hybrid

        def policy_gradient(r):
            return r.branch in ("PG", "both")

        if not 0 <= self.jsd_beta <= 1 or self.temperature <= 0:
            raise UserError("objective.jsd_beta must be in [0, 1] and objective.temperature above 0.")
        if self.pg_clip < 0 or self.pg_clip_high < 0 or (self.dual_clip and self.dual_clip <= 1):
            raise UserError(
                "objective.pg_clip and pg_clip_high must be >= 0 and objective.dual_clip 0 or above 1."
            )
        if self.dual_clip and not self.pg_clip:
            raise UserError(
                "objective.dual_clip needs objective.pg_clip (dual clip bounds the PPO-clipped loss)."
            )
        if self.baseline == "vopd" and (not record.rlvr_hybrid or self.discount > 0):
            raise UserError(
                "objective.baseline=vopd applies to objective.type=sampled_rkl with objective.discount=0."
            )
        if self.token_clip < 0 or (self.token_clip and not record.clippable):
            raise UserError(
                f"objective.token_clip must be >= 0 and applies to {names_where(lambda r: r.clippable)}."
            )
        if self.topk < 1 or self.baseline_topk < 0:
            raise UserError("objective.topk must be at least 1 and objective.baseline_topk at least 0.")
        if self.sft_coef < 0 or (self.sft_coef and not record.distills):
            raise UserError(
                "objective.sft_coef must be >= 0 and is a term added to a distillation objective."
            )
        if self.aggregation_constant <= 0:
            raise UserError("objective.aggregation_constant must be above 0.")
        if self.grpo_coef < 0 or (self.grpo_coef and not record.rlvr_hybrid):
            raise UserError(
                f"objective.grpo_coef must be >= 0 and applies to objective.type={names_where(hybrid)}."
            )
        if (self.route_opd != "all" or self.route_rl != "all") and not record.rlvr_hybrid:
            raise UserError(
                f"objective.route_opd and route_rl apply to objective.type={names_where(hybrid)}."
            )
        if (self.pg_clip or self.dual_clip) and not policy_gradient(record):
            raise UserError(
                f"objective.pg_clip applies to the policy-gradient types: {names_where(policy_gradient)}."
            )
        if self.temperature != 1 and self.direct_beta is None:
            raise UserError(
                f"objective.temperature applies to {names_where(lambda r: r.beta is not None)} (both sides "
                "at τ); the other types use the untempered distributions. Use temperature=1."
            )
        if self.baseline_topk and self.baseline != "vopd":
            raise UserError(
                "objective.baseline_topk sets the vopd baseline's support: set objective.baseline=vopd."
            )
        if record.check is not None:  # what only this objective's settings must satisfy
            record.check(self)
        if self.rank_by != "teacher" and not record.ranks:
            raise UserError(f"objective.rank_by applies to objective.type={names_where(lambda r: r.ranks)}.")
        if self.dpo_beta <= 0:
            raise UserError("objective.dpo_beta must be above 0 (DPO's β, e.g. 0.1).")
        if self.scope_tau <= 0 or self.dasd_beta < 0 or not 0 < self.dasd_rho < 1 or self.ref_kl_coef < 0:
            raise UserError(
                "objective.scope_tau must be > 0, dasd_beta >= 0, dasd_rho in (0, 1) and ref_kl_coef >= 0."
            )

    @property
    def direct_beta(self) -> float | None:
        """β of the full-vocabulary divergence, or None for the sampled, top-K and SFT objectives."""
        beta = OBJECTIVES[self.type].beta
        return None if beta is None else beta(self)

    @property
    def needs_reward(self) -> bool:
        """Whether each sample needs its verifier outcome (RLVR hybrids, SCOPE, DASD)."""
        record = OBJECTIVES[self.type]
        ranked_by_verifier = record.ranks and self.rank_by != "teacher"
        return bool(self.grpo_coef) or self.route_opd != "all" or record.needs_reward or ranked_by_verifier

    @property
    def needs_reference(self) -> bool:
        """Whether the initial student scores each batch (StableOPD's reference KL, DPO's reference)."""
        return bool(self.ref_kl_coef) or OBJECTIVES[self.type].needs_reference

    @property
    def student_topk(self) -> int:
        """How many of the student's top ids per position the teacher must score (L1s), 0 for none."""
        if self.baseline == "vopd" and self.baseline_topk:
            return self.baseline_topk
        return self.topk if OBJECTIVES[self.type].request(self).at_ids else 0

    @property
    def ppo_clip(self) -> tuple[float, float] | None:
        return (self.pg_clip, self.pg_clip_high or self.pg_clip) if self.pg_clip else None


@dataclass(frozen=True)
class WeightingConfig:
    # Detached per-token weights and masks on any distillation objective (math.md §7-§8): a weight scales the
    # teacher term (the advantage, or the divergence); a mask also leaves the token out of the token count.
    position_decay: float = 0.0  # α of w_t = exp(-α t / rollout.max_new_tokens), Open-OPD (0 = off), e.g. 3
    position_limit: int = 0  # no loss on response positions >= N (0 = off)
    loss_window: int = 0  # loss on N tokens per response only (0 = all); see loss_window_from
    loss_window_from: Window = "first"  # first = prefix-only OPD; last / random: the controls
    iw_opd_gamma: float = 0.0  # IW-OPD γ: weight 1+γ, falling to 1 as |log-ratio| accumulates, e.g. 0.5
    tip_ratio: float = 0.0  # TIP ρ: keep the top ρ of tokens by entropy-or-divergence (0 = all), e.g. 0.5
    eopd_coef: float = 0.0  # EOPD α: add α x teacher top-K forward KL where teacher entropy > τ (0 = off)
    eopd_threshold: float = 0.8  # EOPD τ in nats (teacher entropy gate)
    prune: bool = False  # Prune-OPD: w = ζ^(drift events); a drift event is top-K overlap < η
    prune_eta: float = 0.5  # Prune-OPD η: overlap below it is a drift event
    prune_zeta: float = 0.9  # Prune-OPD ζ: decay per drift event
    prune_max_events: int = 32  # Prune-OPD: weight 0 after this many drift events
    kat: bool = False  # KAT: mask the rest of a response once the KL stays low (the KL agreement trap)
    kat_window: int = 64  # KAT window width W in tokens
    kat_patience: int = 3  # KAT: consecutive low windows P that make a trap
    kat_min_position: int = 256  # KAT: no trap before this response position
    kat_kappa: float = 0.25  # KAT threshold = κ x running median of the per-token KL

    def __post_init__(self):
        if (
            min(self.position_decay, self.position_limit, self.loss_window, self.iw_opd_gamma, self.eopd_coef)
            < 0
        ):
            raise UserError(
                "weighting.position_decay, position_limit, loss_window, iw_opd_gamma, eopd_coef must be >= 0."
            )
        if not 0 <= self.tip_ratio <= 1 or not 0 < self.prune_zeta <= 1 or not 0 <= self.prune_eta <= 1:
            raise UserError("weighting.tip_ratio and prune_eta must be in [0, 1] and prune_zeta in (0, 1].")
        if min(self.kat_window, self.kat_patience, self.prune_max_events) < 1 or self.kat_kappa <= 0:
            raise UserError(
                "weighting.kat_window, kat_patience, prune_max_events must be >= 1, kat_kappa > 0."
            )

    @property
    def needs_student_pass(self) -> bool:
        """Whether the weights need batch-wide student statistics (one extra forward without gradient)."""
        return bool(self.tip_ratio) or self.prune or self.kat


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.0  # peak learning rate (AdamW); 0 = by the student's size (OptimConfig.for_student)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm (0 = off)

    def __post_init__(self):
        if not self.lr >= 0 or self.lr == math.inf:  # also refuses NaN
            raise UserError(f"optim.lr={self.lr} must be positive (or 0: chosen by the student's size).")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise UserError(f"optim.betas={list(self.betas)} must both be in [0, 1), e.g. [0.9, 0.98].")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.grad_clip < math.inf):
            raise UserError("optim.weight_decay and optim.grad_clip must be 0 (off) or positive.")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("optim.warmup_steps must be 0 or more and optim.min_lr_ratio in [0, 1].")

    def for_student(self, parameters: int, lora: bool) -> OptimConfig:
        """The config with ``lr`` chosen where it is 0: 1e-3 for students under 10M parameters (the tiny
        models this was tuned on), 1e-5 for a pretrained LM trained in full (1e-3 wrecks SmolLM2-135M in one
        step), 1e-4 for one trained through LoRA adapters (they take about ten times full training's rate)."""
        if self.lr:
            return self
        lr = 1e-3 if parameters < 10_000_000 else 1e-4 if lora else 1e-5
        return dataclasses.replace(self, lr=lr)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps (the schedule spans them)
    time_budget_s: float = 0.0  # stop after this much training time (eval excluded); 0 = no limit
    budget_flops: float = 0.0  # stop once the counted student + teacher FLOPs reach this (0 = no limit)
    prompts_per_step: int = 64  # prompts per optimizer step (x rollout.n_per_prompt sequences)
    micro_batch_size: int = 0  # sequences per forward/backward (0 = all at once)
    seed: int = 0  # seeds model init, data order and sampling
    eval_every: int = 50  # evaluate every N steps (0 = only at the end)
    eval_every_s: float = 0.0  # or every N seconds of training time (0 = off)
    eval_size: int = 200  # held-out problems per periodic eval (greedy)
    eval_samples: int = 0  # periodic eval also samples n per problem: avg@n, pass@k, diversity (0 = off)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0 = all)
    max_bad_steps: int = 3  # abort after this many non-finite losses in a row
    diagnostics_every: int = 10  # overlap, entropies, per-position KL... every N steps (0 = off)
    tensorboard: bool = False  # also log metrics and evals to RUN_DIR/tensorboard (pip install tensorboard)
    out_dir: str = "runs/run"  # run directory
    threads: int = 0  # torch threads (0 = torch's default)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2-sharded student)
    chunk_tokens: int = 4096  # passes without gradient project at most this many positions onto the vocab
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast forwards, fp32 master weights and loss
    eval_batch_tokens: int = 65536  # evaluation samples this many prompt + completion tokens per batch

    def __post_init__(self):
        if self.steps < 1 or self.prompts_per_step < 1:
            raise UserError("train.steps and train.prompts_per_step must be at least 1.")
        if self.chunk_tokens < 1 or self.eval_batch_tokens < 1:
            raise UserError("train.chunk_tokens and train.eval_batch_tokens must be at least 1.")
        if not (self.time_budget_s >= 0 and self.budget_flops >= 0 and self.eval_every_s >= 0):  # refuses NaN
            raise UserError(
                "train.time_budget_s, train.budget_flops and train.eval_every_s must be 0 (off) or positive."
            )
        counts = ("micro_batch_size", "eval_every", "eval_samples", "save_every", "keep_checkpoints")
        counts += ("max_bad_steps", "diagnostics_every", "threads")
        for name in counts:
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be 0 or more; got {getattr(self, name)}.")
        if self.eval_size < 1:
            raise UserError("train.eval_size must be at least 1: the final evaluation's problems.")
        if self.threads > 1024:
            raise UserError(
                f"train.threads={self.threads} is more threads than any machine has (at most 1024)."
            )


@dataclass(frozen=True)
class LoraConfig:
    # LoRA adapters on the student (PEFT, pip install 'opdistill[lora]'): only the adapters train; checkpoints
    # hold the adapter (adapter/) and the merged model, so every consumer loads a plain HF directory.
    rank: int = 0  # LoRA rank of the student's adapters (0 = train all weights), e.g. 16
    alpha: float = 32.0  # LoRA α: the adapter update BA is scaled by α / rank
    dropout: float = 0.0  # dropout on the adapters' input in training forwards (sampling runs without it)
    target_modules: str = "all-linear"  # every linear layer but the LM head, or names, e.g. q_proj,v_proj

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserError("lora.rank must be >= 0, lora.alpha above 0 and lora.dropout in [0, 1).")
        if not self.modules:
            raise UserError("lora.target_modules must name modules, e.g. all-linear or q_proj,v_proj.")

    @property
    def modules(self) -> str | list[str]:
        """PEFT's ``target_modules``: the string "all-linear", or the list of comma-separated names."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass(frozen=True)
class OpsdConfig:
    # OPSD (math.md §6): the teacher is the student's own weights, shown the example's `privileged` field,
    # which the student never sees; teacher and student scores line up by response position.
    teacher: Literal["off", "frozen", "ema", "live"] = "off"  # frozen: the initial student | ema | live
    ema_decay: float = 0.999  # teacher=ema: teacher <- d x teacher + (1 - d) x student after every step
    template: str = "{privileged}{prompt}"  # the self-teacher's last user turn, from the example's fields
    system: str = ""  # if set, a system turn put first in the self-teacher's prompt, e.g. "{privileged}"

    def __post_init__(self):
        if not 0 <= self.ema_decay < 1:
            raise UserError("opsd.ema_decay must be in [0, 1).")
        for name in ("template", "system"):
            text = getattr(self, name)
            try:
                text.format(privileged="", prompt="")
            except (KeyError, IndexError, ValueError) as err:
                raise UserError(
                    f"opsd.{name}={text!r} may use only {{privileged}} and {{prompt}} ({err!r})."
                ) from None
        if "{prompt}" not in self.template:
            raise UserError("opsd.template must contain {prompt}, e.g. '{privileged}{prompt}'.")
        if self.teacher != "off" and "{privileged}" not in self.template + self.system:
            raise UserError(
                "opsd.template or opsd.system must contain {privileged}: what the self-teacher sees."
            )


TRD_TEMPLATE = (
    "{prompt}\n\nA draft answer:\n{draft}\n\nWrite a corrected answer: keep what is right in the draft and "
    "fix it from its first error on.\n"
)


@dataclass(frozen=True)
class TrdConfig:
    # TRD (math.md §9.3): the teacher refines each student rollout and the student distils along the refined
    # trajectory. prefix: keep the student's tokens up to the first one outside the teacher's top-cut_topk,
    # the teacher writes the rest; prompt: the teacher rewrites the whole draft from `template`.
    # takeover: episodes (env.name) — the teacher plays on from a failed episode's first rejected turn
    mode: Literal["off", "prefix", "prompt", "takeover"] = "off"  # prefix | prompt | takeover (episodes)
    cut_topk: int = 4  # prefix: the first student token outside the teacher's top-K ends the kept prefix
    temperature: float = 0.0  # the teacher's sampling temperature for the refinement (0 = greedy)
    template: str = TRD_TEMPLATE  # mode=prompt: the teacher's prompt, from {prompt} and the student's {draft}
    select: Literal["verified", "always"] = "verified"  # verified: keep y_r only if it passes (else y_o)
    max_nll_gap: float = 0.0  # support check: y_r's student NLL/token at most y_o's + this (0 = off)

    def __post_init__(self):
        if self.cut_topk < 1 or self.temperature < 0 or self.max_nll_gap < 0:
            raise UserError("trd.cut_topk must be >= 1, trd.temperature and trd.max_nll_gap >= 0.")
        if self.mode == "prompt" and "{draft}" not in self.template:
            raise UserError("trd.template must contain {draft} (and usually {prompt}).")


@dataclass(frozen=True)
class EnvConfig:
    # Multi-turn episodes (docs/agents.md): the student's turns alternate with an environment's; only the
    # student's tokens get loss. A built-in environment plays on its own task (data.task).
    name: str = ""  # calculator | guess | module:Class of your own ("" = single-turn completions)
    options: dict[str, Any] = field(default_factory=dict)  # the environment's constructor arguments
    max_turns: int = 8  # the student's turns per episode (rollout.max_new_tokens bounds each)
    max_tokens: int = 512  # tokens per episode after the prompt: the student's turns and the observations
    mask_observations: bool = True  # false: the ablation that gives the environment's tokens loss too

    def __post_init__(self):
        if self.max_turns < 1 or self.max_tokens < 1:
            raise UserError("env.max_turns and env.max_tokens must be at least 1.")


@dataclass(frozen=True)
class ColdStartConfig:
    # Off-policy cold start (math.md §11.2): before distillation, SFT the student on validity-filtered
    # teacher samples of the first `samples` training prompts; distillation then never sees those prompts.
    samples: int = 0  # teacher samples to generate and SFT on (0 = no cold start)
    steps: int = 100  # SFT steps on them
    prompts_per_step: int = 64  # SFT batch size
    lr: float = 1e-3  # SFT learning rate (constant after 10 warmup steps)
    temperature: float = 1.0  # teacher sampling temperature (invalid samples are redrawn up to 3 times)
    require: str = ""  # validity: the completion must contain a match of this regex (e.g. \\boxed in YAML)

    def __post_init__(self):
        if self.samples < 0 or self.steps < 1 or self.prompts_per_step < 1 or self.lr <= 0:
            raise UserError(
                "cold_start.samples must be >= 0, cold_start.steps and prompts_per_step >= 1, lr > 0."
            )
        if self.temperature < 0:
            raise UserError("cold_start.temperature must be >= 0.")
        try:
            re.compile(self.require)
        except re.error as err:
            raise UserError(f"cold_start.require={self.require!r} does not compile: {err}.") from None


MAX_SEQUENCES = 1_000_000  # sequences one step (or pool, or cold start) may hold: past it, memory runs out


@dataclass(frozen=True)
class Config:
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(preset="d64l2"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    trd: TrdConfig = field(default_factory=TrdConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    teachers: dict[str, ModelSpec] = field(default_factory=dict)  # more teachers by tag (examples' `teacher`)

    def __post_init__(self):
        objective, weighting, rollout = self.objective, self.weighting, self.rollout
        sizes = {
            "train.prompts_per_step x rollout.n_per_prompt": self.train.prompts_per_step
            * rollout.n_per_prompt,
            "data.pool_size": self.data.pool_size,
            "cold_start.samples": self.cold_start.samples,
            "cold_start.prompts_per_step": self.cold_start.prompts_per_step,
        }
        for name, size in sizes.items():
            if size > MAX_SEQUENCES:
                raise UserError(
                    f"{name} = {size:,} sequences is more than one step holds ({MAX_SEQUENCES:,})."
                )
        # what puts tokens into a batch that the student did not sample
        not_sampled = [
            name
            for name, on in (
                ("rollout.on_policy_fraction < 1", rollout.on_policy_fraction < 1),
                ("rollout.skd_topk", rollout.skd_topk >= 0),
                ("trd.mode", self.trd.mode != "off"),
                ("env.mask_observations=false", bool(self.env.name) and not self.env.mask_observations),
            )
            if on
        ]
        record = OBJECTIVES[objective.type]
        if record.ranks and weighting != WeightingConfig():
            raise UserError(
                f"objective.type={objective.type} weighs whole samples: weighting.* (per-token weights and "
                "masks) does not apply."
            )
        student_samples = record.student_samples or objective.ref_kl_coef
        if student_samples and not_sampled:
            raise UserError(
                f"objective.type={objective.type} (and ref_kl_coef) estimate from the student's own samples; "
                f"with {not_sampled[0]} use a full-vocabulary objective (full_rkl, full_fkl, jsd)."
            )
        if objective.needs_reward and not_sampled:
            raise UserError(
                "verifier rewards (grpo_coef, route_opd, scope, dasd) are computed on the student's own "
                f"samples: not with {not_sampled[0]}."
            )
        teacher_model = [
            name
            for name, on in (
                (f"data.completions={self.data.completions}", self.data.completions != "dataset"),
                ("rollout.skd_topk", rollout.skd_topk >= 0),
                ("trd.mode", self.trd.mode != "off"),
                ("cold_start.samples", self.cold_start.samples > 0),
                ("data.select_fraction", self.data.select_fraction > 0),
            )
            if on
        ]
        if teacher_model and self.teacher.url:
            raise UserError(
                f"{teacher_model[0]} runs the teacher model in this process, and a remote teacher "
                "(teacher.url) only scores: give a local teacher.path."
            )
        if teacher_model and self.teachers:
            raise UserError(f"{teacher_model[0]} uses the one default teacher: not with several teachers.")
        if (objective.grpo_coef or record.needs_group) and rollout.n_per_prompt < 2:
            raise UserError(
                "a GRPO advantage is 0 with one sample per prompt: set rollout.n_per_prompt to 4 or more."
            )
        distill_only = (
            weighting != WeightingConfig()
            or objective.ref_kl_coef
            or self.data.curriculum
            or self.data.select_fraction
            or rollout.skd_topk >= 0
            or self.trd.mode != "off"
            or self.cold_start.samples
        )
        if distill_only and not record.distills:
            raise UserError(
                "weighting.*, objective.ref_kl_coef, data.curriculum, data.select_fraction, "
                "rollout.skd_topk, trd and cold_start apply to distillation objectives, not "
                "objective.type=sft."
            )
        if self.student.dtype == "bfloat16":
            raise UserError(
                "student.dtype=bfloat16 would have AdamW update bf16 weights with no fp32 master copy: keep "
                "student.dtype=float32 and set train.precision=bf16 (bf16 forwards, fp32 weights and "
                "updates)."
            )
        if rollout.engine == "vllm" and (self.lora.rank or not self.student.path):
            raise UserError(
                "rollout.engine=vllm starts vLLM from student.path (an HF directory) and pushes full "
                "weights: it needs student.path and no LoRA (lora.rank=0)."
            )
        if self.data.curriculum and self.data.select_fraction:
            raise UserError("data.curriculum and data.select_fraction each choose the prompts: use one.")
        if (self.data.curriculum or self.data.select_fraction) and rollout.on_policy_fraction < 1:
            raise UserError(
                "data.curriculum and data.select_fraction choose the prompts the student samples on: keep "
                "rollout.on_policy_fraction=1."
            )
        if (weighting.iw_opd_gamma or weighting.kat) and not_sampled:
            raise UserError(
                "weighting.iw_opd_gamma and weighting.kat read the student's sampling log-probs, which "
                f"tokens it did not sample do not have: not with {not_sampled[0]}."
            )
        kat_span = weighting.kat_min_position + weighting.kat_patience * weighting.kat_window
        if weighting.kat and rollout.max_new_tokens < kat_span:
            raise UserError(
                "weighting.kat can only trap responses of at least kat_min_position + kat_patience x "
                f"kat_window = {kat_span} tokens, longer than "
                f"rollout.max_new_tokens={rollout.max_new_tokens}: lower them."
            )

        self._check_opsd()
        self._check_env()

    def _check_env(self) -> None:
        env = self.env.name
        if self.trd.mode == "takeover" and not env:
            raise UserError(
                "trd.mode=takeover is TRD for multi-turn episodes (env.name); single completions take "
                "trd.mode=prefix or prompt."
            )
        if not env:
            return
        task = builtin_task(env)
        if task and self.data.task != task:
            raise UserError(f"env.name={env} plays on the built-in task: set data.task={task}.")
        unsupported = [
            name
            for name, on in (
                ("train.parallel=fsdp", self.train.parallel == "fsdp"),
                ("rollout.engine=vllm", self.rollout.engine == "vllm"),
                (f"trd.mode={self.trd.mode}", self.trd.mode not in ("off", "takeover")),
                ("opsd.teacher", self.opsd.teacher != "off"),
                ("data.completions=teacher_pool", self.data.completions == "teacher_pool"),
                ("cold_start.samples", self.cold_start.samples > 0),
                ("data.curriculum", self.data.curriculum),
                ("data.select_fraction", self.data.select_fraction > 0),
                ("objective.sft_coef", self.objective.sft_coef > 0),
                # weights by response position would count the environment's tokens and every turn's budget
                ("weighting.position_decay", self.weighting.position_decay > 0),
                ("weighting.position_limit", self.weighting.position_limit > 0),
                ("weighting.loss_window", self.weighting.loss_window > 0),
                ("weighting.iw_opd_gamma", self.weighting.iw_opd_gamma > 0),
                ("weighting.kat", self.weighting.kat),
            )
            if on
        ]
        if unsupported:
            raise UserError(
                f"env.name={env} (multi-turn episodes) does not combine with {unsupported[0]} yet "
                "(docs/agents.md lists what does)."
            )

    def _check_opsd(self) -> None:
        opsd = self.opsd.teacher
        if opsd == "off":
            return
        if (
            not OBJECTIVES[self.objective.type].distills
            or self.rollout.on_policy_fraction < 1
            or self.data.completions != "dataset"
        ):
            raise UserError(
                f"opsd.teacher={opsd} scores the student's own samples with its own weights: use a "
                "distillation objective with rollout.on_policy_fraction=1 and data.completions=dataset."
            )
        separate = self.rollout.skd_topk >= 0 or self.trd.mode != "off" or self.cold_start.samples
        if self.teachers or separate or self.data.select_fraction:
            raise UserError(
                f"opsd.teacher={opsd} is the only teacher: it does not combine with teachers, "
                "rollout.skd_topk, trd.mode, cold_start or data.select_fraction (they need a separate "
                "teacher model)."
            )
        if opsd == "ema" and (self.lora.rank or self.train.parallel == "fsdp"):
            raise UserError(
                "opsd.teacher=ema averages full, unsharded weights: use opsd.teacher=frozen with lora.rank "
                "or train.parallel=fsdp."
            )

    def diagnostics_due(self, step: int) -> bool:
        every = self.train.diagnostics_every
        return OBJECTIVES[self.objective.type].distills and bool(every) and step % every == 0

    @property
    def diagnostics_request(self) -> SignalRequest:
        """The teacher request of a diagnostics step: the objective's, plus the teacher's top-k and entropy
        (in the same single pass). The width is ``objective.topk``, so a top-K loss sees the ids it
        expects."""
        return dataclasses.replace(self.teacher_request, topk=self.objective.topk, entropy=True)

    @property
    def teacher_request(self) -> SignalRequest:
        """What the teacher must send (math.md §1.3): L0 always; L2 for full-vocabulary objectives, the exact
        vOPD baseline and TIP; L1 (its top-K) or L1s (at the student's top-K) for the top-K objectives, EOPD
        and Prune-OPD; its entropy for EOPD and SEAD."""
        objective, weighting = self.objective, self.weighting
        own = OBJECTIVES[objective.type].request(objective)
        vopd = objective.baseline == "vopd"
        return SignalRequest(
            topk=objective.topk if own.topk or weighting.eopd_coef or weighting.prune else 0,
            at_ids=own.at_ids or (vopd and bool(objective.baseline_topk)),
            full=own.full or (vopd and not objective.baseline_topk) or bool(weighting.tip_ratio),
            entropy=own.entropy or bool(weighting.eopd_coef),
        )
