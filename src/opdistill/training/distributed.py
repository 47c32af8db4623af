"""torch.distributed under ``torchrun``: process group, the step's prompts sharded, gradient sync, reductions.

A run started by ``torchrun --nproc_per_node=N`` has N ranks; each samples, has the teacher score, and trains
on its contiguous share of the step's prompts. The student is replicated with DDP or sharded with FSDP2
(``fully_shard``, ``train.parallel``); both average gradients over ranks, and the loss is normalised by the
step's global token count, so each rank's loss is scaled by N: the update is the same as one process's on the
whole batch. Rank 0 alone writes logs and checkpoints. Without torchrun the world is one rank and every
collective here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from opdistill.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's GPU under torchrun when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def share(self, total: int) -> tuple[int, int]:
        """(first, count) of this rank's contiguous share of ``total`` items (``total`` divisible by size)."""
        count = total // self.size
        return self.rank * count, count

    def all_finished(self, finished: bool) -> bool:
        """True when ``finished`` holds on every rank."""
        if self.size == 1:
            return finished
        flag = torch.tensor([float(finished)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def shard(self, items: Sequence[T]) -> tuple[list[T], int]:
        """This rank's contiguous share of ``items``, padded with repeats of the first item to the same length
        on every rank (the ranks of an FSDP2-sharded model run the same forwards), and how many are real."""
        per = -(-len(items) // self.size)
        share = list(items[self.rank * per : (self.rank + 1) * per])
        real = len(share)
        return share + [items[0]] * (per - real) * bool(items), real

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        if self.size == 1:
            return items
        parts: list[list[T]] = [[] for _ in range(self.size)]
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]


ONE_PROCESS = World()


def init(prompts_per_step: int) -> World:
    """The process group of a ``torchrun`` launch (gloo on CPU, NCCL on GPUs), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ONE_PROCESS
    if prompts_per_step % size:
        raise UserError(
            f"train.prompts_per_step={prompts_per_step} must divide evenly across {size} ranks (torchrun)."
        )
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.device)
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30)
        )
    return world


def shutdown(finished: bool) -> None:
    """Tear the process group down. A rank that ``finished`` first waits for every rank, so no rank closes
    its connections while a peer still works (once, in CI, a gloo rank aborted at exit while its peer was
    still writing); a rank leaving on an error does not wait for peers that may never come."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, parallel: str, precision: str = "fp32") -> torch.nn.Module:
    """The module the loss runs through: the model itself (one rank), DDP around it, or the model sharded in
    place by FSDP2 (each decoder layer, then the whole); with ``precision="bf16"`` FSDP2 gathers bf16 copies
    of the fp32 shards for each forward and reduces gradients in fp32 (its ``MixedPrecisionPolicy``)."""
    if world.size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in _decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 shards in place: the model is its own unwrap)."""
    return getattr(model, "module", model)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one backward: with ``sync`` False, gradients only accumulate locally (the step's last
    backward syncs them all at once)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def all_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return float(tensor)


def reduce_metrics(record: dict[str, Any], world: World, summed: tuple[str, ...]) -> dict[str, Any]:
    """One record for the whole step from every rank's: ``summed`` keys (counters) add up, ``*_min``/``*_max``
    take the extreme, other numbers (and lists of numbers, element-wise, skipping None) average over ranks —
    each rank holds the same number of sequences, so a mean of per-rank means is the batch mean for
    sequence-level metrics and close to it for token-weighted ones."""
    if world.size == 1:
        return record
    gathered: list[dict[str, Any]] = [{} for _ in range(world.size)]
    dist.all_gather_object(gathered, record)
    reduced: dict[str, Any] = {}
    for key, value in record.items():
        values = [part[key] for part in gathered if key in part]
        if key in summed:
            reduced[key] = sum(values)
        elif key.endswith("_min"):
            reduced[key] = min(values)
        elif key.endswith("_max"):
            reduced[key] = max(values)
        elif isinstance(value, list):
            reduced[key] = [_mean(column) for column in zip(*values, strict=True)]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            reduced[key] = _mean(values)
        else:
            reduced[key] = value
    return reduced


def _mean(values) -> float | None:
    """The mean of the numbers among ``values`` (None marks a rank with nothing in that bucket)."""
    numbers = [v for v in values if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """The full (unsharded) optimizer state dict, keyed by parameter name, and under FSDP2 the model's full
    state dict too (None otherwise: the model saves its own weights). A collective under FSDP2: every rank
    calls it, rank 0 receives the tensors, on the CPU."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    model = unwrap(model)
    weights = None
    if isinstance(model, FSDPModule):
        weights = get_model_state_dict(model, options=options)
        # a tied weight (lm_head = embeddings) is listed under both names: keep the one the model saves
        unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        weights = {name: tensor for name, tensor in weights.items() if name in unique}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def adamw(
    model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (LoRA: the adapters only), fused into one kernel per parameter (as
    TRL's default ``adamw_torch_fused``) where PyTorch has that kernel, else its multi-tensor loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict written by ``full_state`` (every rank reads it from the
    checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (``model.model.layers`` for Llama, Qwen and most others; of the
    base model inside a LoRA-wrapped one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(
            "train.parallel=fsdp shards the decoder layers at model.model.layers, which "
            f"{type(model).__name__} does not have; use train.parallel=ddp."
        )
    return list(layers)
