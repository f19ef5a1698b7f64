"""Several processes through torchrun and DistributedDataParallel (NCCL on CUDA, gloo on CPU).

    torchrun --nproc_per_node 8 -m ipasdctl train --recipe recipes/imagenet_resnet18_ipasd.yaml --data /data
    ipasdctl train --nproc 2 ...      # the same, launched for you on one machine

Choices, and why:
- The recipe's `train.batch_size` is the global batch; each of W ranks trains on its 1/W share of every
  global batch (a contiguous share; sizes differ by at most one), so a recipe means the same optimisation
  whatever the process count: the learning rate is not rescaled. A final global batch smaller than W is left
  out of its epoch (it cannot give every rank a sample); a batch size below W is an error.
- One process group, "cpu:gloo,cuda:nccl" where CUDA exists (else gloo): collectives on CUDA tensors go
  through NCCL, those on CPU tensors (object broadcasts, barriers, CPU training) through gloo.
- Per-sample memories (IPASD, PS-KD) are replicated: every rank holds the full N x K tables, exactly what
  one process would hold. Each rank writes the rows of its own sub-batch, and the (indices, rows) of all
  ranks are all-gathered and written everywhere, one collective per memory write. Replication costs memory
  on every rank but keeps reads local and free (no gather on use), and any rank's tables are the whole state:
  the checkpoint (written by rank 0) holds full memories, so a run resumes on any number of processes.
  Sharding by index would save memory at ImageNet scale but needs a gather on every read; with float16
  tables (2.6 GB each for ImageNet) replication fits a modern GPU. The gather reads no size from the device:
  every rank pads its rows to the epoch's largest per-rank batch (agreed once per epoch) by repeating its
  last (index, row) pair, and writing one row twice to the same index is harmless.
- Prototype class sums and counts stay per rank during an epoch and are all-reduced (summed) when they are
  used: at the end of the epoch, and in a checkpoint (which therefore holds the global sums; on resume
  rank 0 restores them and the other ranks start from zero, so the next reduction counts them once).
- IPASD's adaptive blend counts (a_S, a_L) are per-rank sub-batch, as the single-process method counts them
  per batch: the blend stays a local, synchronisation-free statistic of the samples at hand (a W-process run
  blends like a one-process run whose batches are the rank sub-batches).
- DLB's stored logits of the previous step are local (a rank's repeated samples are its own previous new
  share, see data/samplers.py); a checkpoint gathers them in rank order (= the previous new chunk in order)
  and a resumed rank takes its share of them for the number of processes it runs with.
- Metrics (loss terms, accuracy, evaluation sums) are summed over ranks before they are read; evaluation is
  sharded by test batch (batch i on rank i mod W) after rank 0's BatchNorm buffers are broadcast, so every
  rank evaluates the model that rank 0 checkpoints (image-file data sets still decode every test batch on
  every rank: the data protocol has no sharded test loader; the forwards are shared out). Only rank 0 writes
  the run folder.
- Stops are agreed: the SIGINT/SIGTERM flag and the non-finite-loss flag are all-reduced at the points where
  the loop checks them (every step on CPU, every `FINITE_CHECK_STEPS` steps on CUDA, where a per-step host
  read would stall the GPU), so every rank checkpoints and stops at the same step.

The contract with the methods is explicit: a method's state talks to the other ranks only through the
`Collectives` object in its MethodContext (methods/base.py: one process, every call the identity); under
several processes the trainer hands it `DistributedCollectives` (below):
- `gather_rows(indices, rows)` -> every rank's (indices, rows), for an idempotent index write (a rank's rows
  may be followed by repeats of its last pair); reads nothing from the device. SampleMemory.
- `all_gather_rows(indices, rows)` -> every rank's (indices, rows) exactly, in rank order (reads the sizes:
  for checkpoints only). DLB's stored logits.
- `all_reduce_sum(*tensors)`: sums in place over ranks. Prototypes.
- `rank`, `world_size`: which part of restored state this rank keeps. Prototypes, DLB's stored logits.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..data.base import step_seed
from ..errors import UserError
from ..methods import Collectives


SYNC_BN_NEEDS_CUDA = ("--sync-bn (train.sync_bn) needs CUDA: nn.SyncBatchNorm has no CPU implementation; "
                      "drop --sync-bn on CPU")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The ranks torchrun set in the environment (a single process when none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def current() -> DistContext:
    """This process's place: from the initialised process group, else from the environment."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))
    return context_from_env()


def init_process_group(ctx: DistContext) -> bool:
    """Join the process group torchrun describes; True when this call created it."""
    if not ctx.enabled or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        if ctx.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(ctx.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def session(clean_exits: tuple = ()) -> Iterator[DistContext]:
    """The process group for one training run under torchrun, taken down after it if this call set it up:
    after a normal end or an exception in `clean_exits` (a stop every rank agreed on), not after another
    error (a rank that failed alone must not wait for the others)."""
    ctx = context_from_env()
    created = init_process_group(ctx)
    clean = False
    try:
        yield current()
        clean = True
    except clean_exits:
        clean = True
        raise
    finally:
        if created and clean and dist.is_initialized():
            dist.destroy_process_group()


def device_for_rank(device: torch.device, ctx: DistContext) -> torch.device:
    """Under several processes, CUDA means cuda:LOCAL_RANK (one GPU per process)."""
    if not ctx.enabled or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank:
        raise UserError(f"--device {device}: with several processes each uses cuda:LOCAL_RANK; use --device cuda")
    if ctx.local_rank >= torch.cuda.device_count():
        raise UserError(f"process {ctx.local_rank} on this machine has no GPU ({torch.cuda.device_count()} found); "
                        "start at most one process per GPU")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def rank_seed(seed: int, ctx: DistContext) -> int:
    """The augmentation seed of this rank: the run's seed on one process; otherwise one per rank, so the
    ranks' sub-batches of a step are not augmented with the same crops and flips."""
    if not ctx.enabled:
        return seed
    return step_seed(seed, 0, ctx.rank, 97)


# ------------------------------------------------------------------------------------------------ collectives


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if _active():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_rows(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (indices, rows), concatenated in rank order; sub-batches may differ in size (even be
    empty). Reads the sizes from the device: for checkpoints, not for training steps."""
    if not _active():
        return indices, rows
    world = dist.get_world_size()
    size = torch.tensor([indices.numel()], device=indices.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts) - indices.numel()
    padded_idx = torch.cat([indices, indices.new_full((pad,), -1)])
    padded_rows = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(all_idx, padded_idx)
    dist.all_gather(all_rows, padded_rows)
    idx = torch.cat([i[:n] for i, n in zip(all_idx, counts)])
    out = torch.cat([r[:n] for r, n in zip(all_rows, counts)])
    return idx, out


class DistributedCollectives(Collectives):
    """The Collectives of a method's state under several processes (see the module docstring).

    `gather_rows` pads each rank's rows to `capacity` (the largest per-rank batch of the epoch, set by the
    trainer once per epoch) by repeating its last pair; the repeats write a row that is written anyway."""

    def __init__(self, ctx: DistContext):
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.capacity = 0

    def gather_rows(self, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not _active():
            return indices, rows
        count = indices.shape[0]  # a shape: known on the host
        if not 0 < count <= self.capacity:
            raise RuntimeError(f"a memory write of {count} rows on one rank, outside 1..{self.capacity} (the "
                               "largest per-rank batch of the epoch): every rank must write rows of its own batch")
        pad = self.capacity - count
        if pad:
            indices = torch.cat([indices, indices[-1:].expand(pad)])
            rows = torch.cat([rows, rows[-1:].expand(pad, *rows.shape[1:])])
        world = dist.get_world_size()
        all_idx = [torch.empty_like(indices) for _ in range(world)]
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(all_idx, indices.contiguous())
        dist.all_gather(all_rows, rows.contiguous())
        return torch.cat(all_idx), torch.cat(all_rows)

    def all_gather_rows(self, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return all_gather_rows(indices, rows)

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        all_reduce_sum(*tensors)


def collectives_for(ctx: DistContext) -> Collectives:
    """What a method's state uses to reach the other ranks: the identity on one process."""
    return DistributedCollectives(ctx) if ctx.enabled else Collectives()


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# ------------------------------------------------------------------------------------------------ batches


def shard_batches(plan: Callable[[int], list[torch.Tensor]], ctx: DistContext) -> Callable[[int], list[torch.Tensor]]:
    """This rank's batches. A plan with `sharded(epoch, rank, world)` (batches made of parts, such as class
    pairs or overlapping halves) shards itself; otherwise each global batch is split into W contiguous shares
    and rank r trains on share r. Every rank gets the same number of steps; a final global batch smaller
    than W is dropped (it cannot give every rank a sample)."""
    if not ctx.enabled:
        return plan
    if hasattr(plan, "sharded"):
        return lambda epoch: plan.sharded(epoch, ctx.rank, ctx.world_size)

    def sharded(epoch: int) -> list[torch.Tensor]:
        return [batch.tensor_split(ctx.world_size)[ctx.rank] for batch in plan(epoch)
                if batch.numel() >= ctx.world_size]

    return sharded


# ------------------------------------------------------------------------------------------------ objects


def broadcast_object(value, ctx: DistContext):
    """Rank 0's value on every rank."""
    if not ctx.enabled:
        return value
    holder = [value if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(ctx: DistContext, action: Callable[[], object]):
    """Run `action` on rank 0 only and give its result to every rank; a UserError it raises is raised on
    every rank (so no rank waits for one that failed)."""
    if not ctx.enabled:
        return action()
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("ok", action())
        except UserError as exc:
            outcome = ("error", str(exc))
    kind, value = broadcast_object(outcome, ctx)
    if kind == "error":
        raise UserError(value)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
