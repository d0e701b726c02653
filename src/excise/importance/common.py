"""Shared mechanics of importance passes: which parameters, eval mode, one pass over a loader."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..tasks import Task, model_device, unsqueezed
from ..types import Counters, Scores
from .. import distributed
from ..progress import progress  # noqa: F401  (the importance passes' bars; re-exported)


def batches(loader, show: bool, desc: str):
    """The batches of an importance pass that this rank computes — all of them in one process, batch i on rank
    i mod R under torch.distributed (:func:`excise.distributed.shard`) — with a progress bar on rank 0."""
    return progress(distributed.shard(loader, desc), show, desc)


class NonFinite:
    """A pass's guard against a non-finite loss: in one process :meth:`seen` raises at once; under
    torch.distributed it remembers (the caller skips the batch), and :meth:`check`, after the loop, raises on
    every rank — a rank raising alone would leave the others waiting in the pass's all-reduce."""

    def __init__(self, message: str):
        self.message = message
        self.bad = False

    def seen(self) -> None:
        if not distributed.active():
            raise FloatingPointError(self.message)
        self.bad = True

    def check(self) -> None:
        if not distributed.all_true(not self.bad):
            raise FloatingPointError(self.message)


def summed(tensors, *counts: float):
    """Sum ``tensors`` (in place) and ``counts`` over the ranks of a sharded pass; returns the counts' totals
    (a tuple). The identity in a single process."""
    distributed.all_reduce_(list(tensors))
    return tuple(distributed.total(c) if isinstance(c, float) else int(distributed.total(c)) for c in counts)


def trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Parameters that require grad, with their names (BatchNorm affine and biases included)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad: nothing to score")
    return named


@contextlib.contextmanager
def quiet_vmap() -> Iterator[None]:
    """torch.func.vmap over an op without a batching rule (an LSTM's, attention's) runs it sample by sample and
    says "There is a performance drop because we have not yet implemented the batching rule …" to the user, who
    can do nothing about it; the results are exact. excise's per-sample passes run their vmap inside this."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                                  "the batching rule", category=UserWarning)
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block and restore each module's own mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes.items():
            m.training = was


def accumulate_grads(model: nn.Module, loader, task: Task, batch_loss: Callable, reduce: Callable,
                     counters: Optional[Counters], show: bool, desc: str, average: bool = True) -> Scores:
    """Σ over batches of ``reduce(grad)`` for ``grad = ∇θ batch_loss(model, batch)``, divided by #batches
    when ``average``.

    Gradients come from ``torch.autograd.grad``, so the model's ``.grad`` fields are left alone.
    """
    named = trainable(model)
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = model_device(model)
    n_batches = 0
    finite = torch.ones((), dtype=torch.bool, device=device)  # every batch's loss finite (one sync at the end)
    with eval_mode(model):
        for batch in batches(loader, show, desc):
            batch = task.to(batch, device)
            loss = batch_loss(model, batch)
            finite &= torch.isfinite(loss.detach()).all()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(reduce(g.float()))
            n_batches += 1
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += 1
                counters.samples_seen += task.batch_size(batch)
    n_batches, = summed(acc, n_batches)
    if n_batches == 0:
        raise ValueError(f"{desc}: the loader yielded no batch")
    if not distributed.all_true(bool(finite)):
        raise FloatingPointError(_non_finite_loss(desc, task))
    return check_finite(Scores({n: a.div_(n_batches) if average else a for (n, _), a in zip(named, acc)}), desc, task)


def _non_finite_loss(desc: str, task: Task) -> str:
    return (f"{desc}: the {getattr(task, 'name', type(task).__name__)} loss is not finite on this data (labels all "
            "ignored, e.g. -100? inputs with NaN?): its importance would be meaningless")


def check_finite(scores: Scores, desc: str, task: Task) -> Scores:
    """Raise a FloatingPointError when an importance pass produced NaN or Inf (e.g. a loss that averages over no
    valid target, such as cross-entropy with every label = ignore_index): never a silent no-op."""
    bad = [n for n, v in scores.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(
            f"{desc}: non-finite importance in {len(bad)} parameter tensors ({', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}): the {getattr(task, 'name', type(task).__name__)} loss "
            "on this data is not finite (labels all ignored, e.g. -100? inputs with NaN?)")
    return scores


def as_dict(scores: Dict[str, torch.Tensor]) -> Scores:
    return scores if isinstance(scores, Scores) else Scores(scores)


def squared_sample_grads(model: nn.Module, loader, task: Task, target_sets: Callable, counters: Optional[Counters],
                         show: bool, desc: str, chunk_size: int = 64) -> Scores:
    """(1/N) Σ_i Σ_(t, w) w_i · (∇θ ℓ(x_i, t_i))² over every sample, with per-sample gradients (torch.func).

    ``target_sets(x, y, output)`` returns pairs ``(targets, weights)`` for a chunk: the targets whose loss
    gradient is squared, and per-sample weights (None = 1). The true labels give the empirical Fisher; labels
    drawn from the model give a Monte-Carlo GGN; every class weighted by its probability, the exact GGN.
    A model vmap cannot run (nn.GRU's kernel fails under it) gets one backward per sample instead.
    """
    try:
        return _squared_sample_grads(model, loader, task, target_sets, counters, show, desc, chunk_size, False)
    except (RuntimeError, NotImplementedError, ValueError):  # vmap cannot run this model or batch container; a
        # genuine error recurs below
        return _squared_sample_grads(model, loader, task, target_sets, counters, show, desc, chunk_size, True)


def _squared_sample_grads(model, loader, task, target_sets, counters, show, desc, chunk_size, looped) -> Scores:
    from torch.func import functional_call, grad, vmap

    named = trainable(model)
    params = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device = model_device(model)

    def sample_loss(p, x, t):
        out = task.read_output(functional_call(model, {**p, **frozen, **buffers}, (unsqueezed(x),)))
        return task.loss_from_output(out, t.unsqueeze(0))

    def one_by_one(p, xs, targets):  # what the vmap gives, from one ordinary backward per sample
        live = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        rows = []
        for i in range(targets.shape[0]):
            xi = distributed.cut(xs, i, i + 1, targets.shape[0])
            out = task.read_output(functional_call(model, {**live, **frozen, **buffers}, (xi,)))
            rows.append(torch.autograd.grad(task.loss_from_output(out, targets[i:i + 1]), list(live.values()),
                                            allow_unused=True))
        return {k: torch.stack([r[j] if r[j] is not None else torch.zeros_like(live[k]) for r in rows])
                for j, k in enumerate(live)}

    per_sample_grad = one_by_one if looped else vmap(grad(sample_loss), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    total = 0
    guard = NonFinite(_non_finite_loss(desc, task))
    with eval_mode(model), quiet_vmap():
        for batch in batches(loader, show, desc):
            batch = task.to(batch, device)
            x = task.inputs(batch)
            y = task.targets(batch) if _has_targets(batch) else None
            size = int(task.batch_size(batch))
            for s in range(0, size, chunk_size):
                xs = distributed.cut(x, s, min(s + chunk_size, size), size)
                with torch.no_grad():
                    out = task.read_output(functional_call(model, {**params, **frozen, **buffers}, (xs,)))
                for targets, weights in target_sets(xs, None if y is None else y[s:s + chunk_size], out):
                    with torch.no_grad():
                        if not bool(torch.isfinite(task.loss_from_output(out, targets, reduction="none")).all()):
                            guard.seen()
                            continue
                    g = per_sample_grad(params, xs, targets)
                    if counters is not None:
                        counters.backward_passes += 1
                    for n in acc:
                        sq = g[n].float().pow(2)
                        if weights is not None:
                            sq = sq * weights.float().view(-1, *([1] * (sq.dim() - 1)))
                        acc[n].add_(sq.sum(0))
            total += size
            if counters is not None:
                counters.forward_passes += 1
                counters.samples_seen += size
    guard.check()
    total, = summed(acc.values(), total)
    if total == 0:
        raise ValueError(f"{desc}: the loader yielded no sample")
    return check_finite(Scores({n: a.div_(total) for n, a in acc.items()}), desc, task)


def _has_targets(batch) -> bool:
    return isinstance(batch, (list, tuple)) and len(batch) >= 2
