"""One run across several processes: `torchrun --nproc_per_node=N -m lozo_exp ...`.

A zeroth-order step needs no gradient communication. Every process keeps the whole model,
evaluates its shard of the global batch at θ ± εd, and the two losses are all-reduced as (sum,
count) pairs, so each process holds the mean over the whole batch, which is the mean one
process would compute. Every process then applies the same update from the same keyed draws:
the weights stay identical without being sent. Backprop methods (FT, FT-LoRA) shard weights,
gradients and AdamW state with FSDP2 (`fully_shard`). Evaluation splits the batches across the
processes and gathers the per-row results, so metrics equal the one-process ones.

Only the main process (rank 0) composes the config with Hydra and writes the run directory,
logs and results; it sends each run's config to the others (`send_run`, `receive_run`).

Long runs: the main process alone writes steps.jsonl, checkpoints and final weights; the
others take part where a checkpoint needs them (FSDP's shards are gathered to the main process:
`full_tensors`, `optimizer_state_dict`; and scattered back from it on resume), replay a ZO run's
steps themselves, and stop at the same step as the main process (`agree`).

Outside torchrun every function here works for one process: `shard` keeps the whole batch,
`global_mean` returns the loss, `map_batches` maps, `from_main` calls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lozo_exp.config import ConfigError, RunConfig
from lozo_exp.tracking import resolve_device

if TYPE_CHECKING:
    from lozo_exp.data import Row

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


# -- the process group -----------------------------------------------------------------------


def init() -> None:
    """Join the process group torchrun describes (its environment variables): NCCL for CUDA
    tensors where there are GPUs, gloo for CPU tensors. Each process takes the GPU of its local
    rank (checked against the run's `trainer.device` by `device`)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """The process that writes the run directory, logs and results."""
    return rank() == 0


def send_run(job: tuple[RunConfig, Path, str] | None) -> None:
    """From the main process: the next run (config and output directory) for every process, or
    None when there is no other."""
    dist.broadcast_object_list([job], src=0)


def receive_run() -> tuple[RunConfig, Path, str] | None:
    """In another process: the run the main process sent, None when it has no other."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(make: Callable[[], T]) -> T:
    """`make()` in the main process (which reads the run directory), its value in every
    process; an exception it raises is raised in every process, so all end alike."""
    if world_size() == 1:
        return make()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, make())
        except Exception as err:
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def gather_to_main(value: T) -> list[T]:
    """Every process's `value`, in rank order, in the main process (the others get [])."""
    values: list[Any] = [None] * world_size() if is_main() else []
    dist.gather_object(value, values if is_main() else None, dst=0)
    return values


def agree(due: bool, pending: Sequence[int]) -> tuple[bool, list[int]]:
    """At a step boundary: whether a checkpoint is due in any process (each times its own) and
    the stop signals any process has noted, so all checkpoint and stop at the same step (one
    small all-reduce, on the CPU)."""
    from lozo_exp.signals import STOP_SIGNALS

    if world_size() == 1:
        return due, list(pending)
    flags = torch.tensor([due, *(s in pending for s in STOP_SIGNALS)], dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # gloo: a CPU tensor (`init`)
    return bool(flags[0]), [s for s, f in zip(STOP_SIGNALS, flags[1:].tolist(), strict=True) if f]


# -- checks before anything is loaded ----------------------------------------------------------


def check(cfg: RunConfig) -> None:
    """Reject a run that cannot be split across the processes, in one paragraph."""
    world = world_size()
    if world == 1:
        return
    m = cfg.method
    batch = getattr(m, "batch_size", None)
    bad = []
    if batch is not None and batch < world:
        bad.append(
            f"method.batch_size={batch} is smaller than the {world} processes torchrun started: "
            f"each process evaluates a shard of the global batch, so use method.batch_size >= "
            f"{world} or --nproc_per_node <= {batch}"
        )
    if m.backprop and cfg.model.family == "masked":
        bad.append(
            f"method {m.name} across {world} processes shards the model with FSDP, which needs "
            f"the adapter to call the model's own forward; the masked-LM adapter (RoBERTa) calls "
            f"the encoder and the LM head separately. RoBERTa-large fine-tunes on one GPU: run "
            f"it in one process (several runs at once: hydra/launcher=gpus_local)"
        )
    if bad:
        raise ConfigError("Cannot split this run across processes: " + "; ".join(bad) + ".")


def device(name: str) -> torch.device:
    """This process's device for `trainer.device`: under torchrun, the GPU of its local rank
    ("auto" where there are GPUs, or "cuda"), or the CPU."""
    if world_size() == 1:
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f"trainer.device={name!r}: under torchrun each process uses the GPU of its local "
            f"rank; use trainer.device=auto, cuda or cpu (CUDA_VISIBLE_DEVICES chooses the GPUs)"
        )
    gpus = torch.cuda.device_count()
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if per_host > gpus:
        raise ConfigError(
            f"torchrun started {per_host} processes on this host, which has {gpus} GPU"
            f"{'s' if gpus != 1 else ''} visible: each process needs its own GPU; use "
            f"--nproc_per_node={gpus} or fewer (or trainer.device=cpu)"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


# -- training: shards of the global batch, the global loss -------------------------------------


def split(n: int, part: int, parts: int) -> range:
    """The `part`-th of `parts` contiguous ranges of `range(n)`, sizes differing by at most 1."""
    return range(part * n // parts, (part + 1) * n // parts)


def shard(rows: Sequence[Row]) -> tuple[list[Row], float]:
    """This process's contiguous part of the global batch and its weight in the global mean: 1,
    or 0 for a process left without rows (an epoch's short last batch), which then evaluates the
    first row for nothing, so every process runs the same passes (FSDP gathers weights in them)."""
    mine = [rows[i] for i in split(len(rows), rank(), world_size())]
    return (mine, 1.0) if mine else (list(rows[:1]), 0.0)


def global_mean(loss: Tensor, count: Tensor | float) -> Tensor:
    """The mean over every process's units, given this process's mean `loss` over its `count`
    units (examples or answer tokens, `Adapter.loss_count`): Σ loss·count / Σ count, which is
    the one-process mean over the global batch. Its value is that mean in every process; its
    gradient (backprop) is this process's share times the number of processes, which FSDP's
    gradient averaging turns into the gradient of the global mean."""
    world = world_size()
    if world == 1:
        return loss
    count = torch.as_tensor(count, dtype=loss.dtype, device=loss.device)
    terms = torch.stack([loss.detach() * count, count])
    dist.all_reduce(terms)
    mean = terms[0] / terms[1]
    if not loss.requires_grad:
        return mean
    share = loss * (count * world / terms[1])
    return share + (mean - share).detach()


# -- evaluation: batches split across the processes --------------------------------------------


def map_batches(
    fn: Callable[[T], R], batches: Sequence[T], done: Callable[[int], None] | None = None
) -> list[R]:
    """`[fn(b) for b in batches]` in every process: process k runs batches k, k + N, ... and the
    results are gathered in order. Each process runs the same number of calls (one may repeat a
    batch, its result dropped), as FSDP needs; `done(n)` after each call, n batches done."""
    world, me = world_size(), rank()
    results: list[R] = []
    rounds = -(-len(batches) // world)
    for k in range(rounds):
        i = k * world + me
        if i < len(batches):
            results.append(fn(batches[i]))
        else:
            fn(batches[0])  # in step with the others
        if done is not None:
            done(min(len(batches), (k + 1) * world))
    if world == 1:
        return results
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    return [gathered[i % world][i // world] for i in range(len(batches))]


# -- models: replicated or sharded -------------------------------------------------------------


def broadcast_module(model: nn.Module) -> None:
    """Every process starts from the main process's weights and buffers (a seeded random init
    is the same everywhere already; this makes it a guarantee)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def fully_shard_model(model: nn.Module, compute_dtype: torch.dtype | None) -> nn.Module:
    """Shard weights, gradients and optimizer state across the processes with FSDP2: each
    transformer block (the model's `_no_split_modules`) is one unit, its weights gathered just
    before it runs; the rest of the model (embeddings, tied head) is the root unit: the model
    itself, inside a peft wrapper (whose `generate` calls the model's own). With a
    `compute_dtype` (`trainer.amp`), the weights are gathered in it and the gradients reduced in
    float32 into the float32 shards: the FT recipe's fp32 master weights with fp16/bf16 compute,
    without a full-size fp16 copy of the model that autocast alone would cache."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    base = _unwrapped(model)
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(
            f"cannot shard {type(base).__name__} with FSDP: it names no transformer block class "
            f"(_no_split_modules); run it in one process"
        )
    reduce = torch.float32 if compute_dtype is not None else None
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(base, mp_policy=policy)
    log.info("FSDP: %d blocks and the root sharded across %d processes", len(blocks), world_size())
    return model


def sharded(model: nn.Module) -> bool:
    """Whether FSDP shards `model` across processes (then every process must run each of its
    forward passes: generation steps in sync)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(_unwrapped(model), FSDPModule)


def reshard(model: nn.Module) -> None:
    """After passes without a backward (evaluation), put the sharded weights back in the model:
    FSDP's root unit keeps its gathered weights after a forward until the backward, so the
    parameters read (the best dev state) or written (restoring it) would be full copies."""
    if sharded(model):
        _unwrapped(model).reshard()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper, or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def full_tensors(named: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole tensors, in the main process (its FSDP shards gathered from every process, to
    the CPU; the others get nothing): what a checkpoint or the final weights save."""
    from torch.distributed.tensor import DTensor

    main, out = is_main(), {}
    for name, p in named.items():
        if isinstance(p, DTensor):
            full = p.detach().full_tensor()  # every process takes part
            if main:
                out[name] = full.cpu()
        elif main:
            out[name] = p.detach().contiguous()
    return out


def load_full_tensors_(named: dict[str, Tensor], full: dict[str, Tensor] | None) -> None:
    """Copy the whole tensors `full` (given in the main process; None in the others) into the
    parameters `named`: sharded ones get their part, scattered from the main process."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in named.items():
            if world_size() == 1:
                p.copy_(full[name])
                continue
            shape, dtype, where = p.shape, p.dtype, local(p).device  # a DTensor's: the whole
            source = (
                full[name].to(where, dtype)
                if is_main()
                else torch.empty(shape, dtype=dtype, device=where)
            )
            if isinstance(p, DTensor):
                shard = distribute_tensor(source, p.device_mesh, p.placements, src_data_rank=0)
                p.to_local().copy_(shard.to_local())
            else:
                dist.broadcast(source, src=0)
                p.copy_(source)


def optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """The optimizer's state to save: its own in one process; under FSDP the whole state,
    gathered to the main process's CPU, keyed by parameter name, or None before the first step
    (torch would take a zero step to make one, counting a step AdamW has not taken)."""
    if not sharded(model):
        return optimizer.state_dict()
    if not optimizer.state:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None
) -> None:
    """Load what `optimizer_state_dict` saved (`state` in the main process; under FSDP the
    others pass None and get their shards from it)."""
    if not sharded(model):
        optimizer.load_state_dict(state)
        return
    if not from_main(lambda: state is not None):
        return  # saved before the first step: a fresh optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state if is_main() else {}, options=options)


def local(tensor: Tensor) -> Tensor:
    """This process's part of a parameter: its shard under FSDP, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def grad_scaler(device_type: str, enabled: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler; across processes, one that skips a step in every process when a
    gradient shard overflowed in any."""
    if world_size() == 1:
        return torch.amp.GradScaler(device_type, enabled=enabled)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device_type, enabled=enabled)


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also clips sharded gradients by their global
    norm; returns the norm before clipping."""
    params = list(params)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    full_tensor = getattr(norm, "full_tensor", None)
    if full_tensor is not None:
        norm = full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
