"""Data parallelism over an initialised ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

excise never launches processes: ``torchrun --nproc_per_node=N`` (or ``--nnodes`` with a rendezvous) does, and the
CLI joins the group from torchrun's environment (:func:`init_from_env`); a script calls
``torch.distributed.init_process_group`` itself before :func:`excise.unlearn`. Without a group of two or more
processes every function here is the single-process identity, so the rest of excise calls them unconditionally.

Two ways to spread a loop over a loader across the R ranks, both on loaders that yield the same batches on every
rank (a DataLoader without shuffling, or with a seeded ``generator``; the loaders excise builds itself are
seeded). Every rank reads every batch — data loading is repeated, the model's work is not:

- :func:`shard` — whole batches, batch i on rank i mod R: passes that sum over batches (importance). Summed with
  :func:`all_reduce_`, the result is the one process's, the same batches summed in another order.
- :func:`split` — every batch cut in R contiguous parts, one per rank, with the weight R·n_local/n that turns a
  rank's mean loss into its share of the whole batch's mean: training steps. After :func:`average_grads` each
  rank holds the gradient of the whole batch's mean loss, as one process would compute it (up to float
  summation), and every rank takes the same step. This is what DistributedDataParallel does to a ``backward()``;
  excise reduces the gradients itself because its repairs take gradients with ``torch.autograd.grad`` and
  project them, which DDP's hooks do not see. BatchNorm in train mode normalises each rank's part by its own
  statistics (as under DDP without SyncBatchNorm): such a step is not the one process's.

Both record a checksum of every batch (its size and the sum of its first tensor) and :func:`check_same_batches`
compares them across ranks at the end of a loop: a loader that shuffled differently on two ranks is an error,
never a silently wrong result.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch

from .tasks import first_tensor


def active() -> bool:
    """True inside an initialised process group of two or more processes."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and shows progress."""
    return rank() == 0


def init_from_env(backend: Optional[str] = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), once: NCCL when CUDA is
    available (each process on the GPU of its ``LOCAL_RANK``), gloo otherwise. Returns whether a group is active."""
    import torch.distributed as dist

    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return active()


def shutdown() -> None:
    """Leave the process group: a barrier first, so that no rank tears its connections down while another is
    still using them (gloo aborts the process when a peer disappears mid-shutdown), then destroy it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            barrier()
        dist.destroy_process_group()


def device_for_collectives() -> torch.device:
    """Where tensors must live for the group's collectives (CUDA for NCCL, CPU for gloo)."""
    import torch.distributed as dist

    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one flattened collective per dtype and device)."""
    import torch.distributed as dist

    if not active() or not tensors:
        return
    comm = device_for_collectives()
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in groups.items():
        flat = torch.cat([t.reshape(-1) for t in ts]).to(comm)
        dist.all_reduce(flat)
        flat = flat.to(device)
        at = 0
        for t in ts:
            t.copy_(flat[at:at + t.numel()].view_as(t))
            at += t.numel()


def total(x: float) -> float:
    """A number summed over the ranks (sample counts, batch counts)."""
    if not active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    all_reduce_([t])
    return float(t.item())


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a check every rank must agree on before acting on it)."""
    if not active():
        return bool(flag)
    return total(0.0 if flag else 1.0) == 0.0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; tensors arrive on the CPU)."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [_to_cpu(obj) if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=device_for_collectives())
    return box[0]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def broadcast_module(model: torch.nn.Module) -> float:
    """Make every rank's parameters and buffers rank 0's (what DDP does at construction). Returns the largest
    absolute difference a rank had from rank 0 before (0.0 in a single process)."""
    import torch.distributed as dist

    if not active():
        return 0.0
    comm = device_for_collectives()
    worst = 0.0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            mine = t.detach().to(comm).clone()
            theirs = mine.clone()
            dist.broadcast(theirs, src=0)
            if t.is_floating_point() and t.numel():
                worst = max(worst, float((mine.float() - theirs.float()).abs().max()))
            t.copy_(theirs.to(t.device))
    spread = torch.tensor([worst], dtype=torch.float64, device=comm)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread.item())


def average_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of the parameters that require grad over the ranks. A gradient missing on one rank
    counts as zero there; one missing on every rank stays None (as in one process). Every rank must call this
    with the same parameters, in the same order."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    had = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], dtype=torch.float64)
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_(grads + [had])
    r = world()
    for p, g, h in zip(params, grads, had.tolist()):
        if h == 0.0:
            p.grad = None
        else:
            g.div_(r)


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over the ranks, in place."""
    if not active():
        return
    all_reduce_(tensors)
    for t in tensors:
        t.div_(world())


def weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """A rank's loss scaled by its part's weight (:func:`part`); the loss itself in a single process (no extra
    autograd node: the one-process bits are unchanged)."""
    return loss if weight == 1.0 and not active() else loss * weight


class Batches:
    """The checksums of the batches a rank walked through, compared across ranks by :meth:`check`. Kept as
    tensors where the batches live (no device synchronisation per batch)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.sums: List[torch.Tensor] = []

    def record(self, batch) -> None:
        first = first_tensor(batch)
        if first is None:
            self.sums.append(torch.zeros(2, dtype=torch.float64))
            return
        n = float(first.shape[0]) if first.dim() else 1.0
        s = torch.nan_to_num(first.detach().reshape(-1).to(torch.float64).sum(), nan=0.0)  # a NaN input is the
        # pass's own error to report, not a mismatch between ranks
        self.sums.append(torch.stack([s.new_tensor(n), s]))

    def check(self) -> None:
        """Raise on every rank when the ranks walked through different batches."""
        if not active():
            return
        mine = torch.stack([t.cpu() for t in self.sums]) if self.sums else torch.zeros(0, 2, dtype=torch.float64)
        rank0 = broadcast_object(mine)
        same = rank0.shape == mine.shape and bool(
            ((rank0[:, 0] == mine[:, 0]) & ((rank0[:, 1] - mine[:, 1]).abs() <= 1e-6 * (1 + rank0[:, 1].abs()))).all())
        if not all_true(same):
            raise RuntimeError(
                f"{self.desc}: the loader yielded different batches on different ranks (a shuffled DataLoader "
                "without a seeded generator?). Under torch.distributed every rank must see the same sequence: "
                "pass DataLoader(..., generator=torch.Generator().manual_seed(s)) or do not shuffle")


def check_same_length(loader, desc: str) -> None:
    """Fail fast (before a loop with collectives in every step) when ranks' loaders differ in length."""
    if not active():
        return
    try:
        n = len(loader)
    except TypeError:  # an iterable without a length: the end-of-loop checksum comparison still applies
        return
    if not all_true(broadcast_object(n) == n):
        raise RuntimeError(f"{desc}: the loader has a different number of batches on different ranks")


def shard(batches: Iterable, desc: str = "pass") -> Iterator:
    """This rank's batches of ``batches`` (batch i on rank i mod R); checks at the end that every rank walked
    through the same ones. The identity in a single process."""
    if not active():
        yield from batches
        return
    r, size = rank(), world()
    seen = Batches(desc)
    for i, batch in enumerate(batches):
        seen.record(batch)
        if i % size == r:
            yield batch
    seen.check()


def part(batch, n: Optional[int] = None):
    """This rank's contiguous part of a collated batch (tensors cut along dim 0; other values kept) and its
    weight R·n_local/n. In a single process: ``(batch, 1.0)``. ``n_local`` may be 0 (a batch smaller than R):
    the weight is then 0 and the caller skips the forward pass."""
    if not active():
        return batch, 1.0
    first = first_tensor(batch)
    n = int(first.shape[0]) if n is None else n
    r, size = rank(), world()
    lo, hi = r * n // size, (r + 1) * n // size
    return cut(batch, lo, hi, n), (size * (hi - lo) / n if n else 0.0)


def cut(batch, lo: int, hi: int, n: int):
    """Samples ``lo:hi`` of a collated batch of ``n``: every tensor whose first dimension is ``n`` cut along it
    (through tuples, named tuples, lists and dicts); anything else kept as it is."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):  # a dict, or a dict-like such as a tokenizer's batch
        return type(batch)({k: cut(v, lo, hi, n) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cut(v, lo, hi, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v, lo, hi, n) for v in batch)
    return batch


class split:
    """``for local, weight in split(loader, desc)``: this rank's part of every batch and the part's weight
    (:func:`part`); in a single process ``(batch, 1.0)``. At the end of the loop — or at
    :meth:`finish` for a loop that stops early, which every rank must then do at the same step — it checks that
    every rank saw the same batches. ``len()`` is the loader's."""

    def __init__(self, batches: Iterable, desc: str = "steps"):
        self.batches, self.desc = batches, desc
        self.seen = Batches(desc) if active() else None
        self.done = False
        if self.seen is not None:
            check_same_length(batches, desc)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.seen is None:
                yield batch, 1.0
                continue
            self.seen.record(batch)
            yield part(batch)
        self.finish()

    def finish(self) -> None:
        if self.seen is not None and not self.done:
            self.done = True
            self.seen.check()


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """``with main_writes() as write:`` — ``write`` is True on rank 0 only; every rank waits at the end until rank
    0 has written (so no rank reads a file before it exists)."""
    try:
        yield is_main()
    finally:
        barrier()


def barrier() -> None:
    import torch.distributed as dist

    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
