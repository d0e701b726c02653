"""Per-sample gradient statistics in one ordinary backward pass: Σ_n r(∇θ ℓ_n) with r = square or abs.

The sum over samples of a function of each sample's gradient does not depend on how the samples are batched or
ordered (up to float summation), unlike a statistic of batch-mean gradients. Computing per-sample gradients with
``torch.func.vmap`` is exact for any model but runs a fifth of a training step's throughput on a small CNN; this
module gets the same sums from the activations and output gradients a normal backward pass already has:

- ``nn.Linear`` on (N, in): ∇W ℓ_n = g_n a_nᵀ, so Σ_n r(g_n a_nᵀ) = r(G)ᵀ r(A) for r = square or abs (one matmul);
  on (N, …, in) the per-sample gradient is Σ_t g_{n,t} a_{n,t}ᵀ, formed per sample;
- ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding): ∇W ℓ_n = G_n · unfold(a_n)ᵀ, one batched matmul; at stride 1,
  one batched matmul per kernel offset over a shifted window of the padded input (no column copy);
- ``nn.LSTM`` (no projections) and ``nn.GRU``: the recurrence written out step by step for the pass,
  ∇W_ih ℓ_n = Σ_t G_{n,t} x_{n,t}ᵀ and ∇W_hh ℓ_n = Σ_t H_{n,t} h_{n,t−1}ᵀ from the gradients reaching the
  input and hidden projections;
- any other module that owns parameters (BatchNorm in eval mode, LayerNorm, Embedding, a custom module): the
  vector-Jacobian product of that module alone, vectorised over the samples (``torch.func``), from its input and
  output gradient.

The loss of the pass is Σ_n ℓ_n, so the gradient that reaches a module's output is each sample's own. A model for
which the module-local route is not exact — a parameter shared by two modules, a module called twice in one
forward, a module with several tensor inputs or outputs (attention) — falls back to whole-model ``vmap``
(exact, slower; torch's "performance drop" message for ops without a batching rule is not passed on), and a
model vmap cannot run at all (nn.GRU's kernel fails under it) to one ordinary backward per sample.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import cut
from ..tasks import CPU_PART, Task, model_device, unsqueezed
from ..types import Counters, Scores
from .common import NonFinite, batches, check_finite, eval_mode, quiet_vmap, summed, trainable

REDUCERS = {"square": lambda t: t.pow(2), "abs": torch.abs}
_INPLACE = {"square": torch.Tensor.square_, "abs": torch.Tensor.abs_}
_CHUNK = 32  # samples per batched matmul of per-sample gradients (bounds memory)
# On the CPU a convolution with at least this many weights forms its per-sample gradients one sample at a time
# into one buffer and adds their squares into sums that stay in cache, instead of writing a chunk of them to
# memory, squaring in place and summing (2x faster for a 128x128x3x3 convolution on 4x4 maps on this project's CPU)
_BY_SAMPLE = 1 << 16


class _Fallback(Exception):
    """The module-local route is not exact for this model; use whole-model vmap."""


def _owners(model: nn.Module, named: List[Tuple[str, nn.Parameter]]) -> Dict[nn.Module, Dict[str, str]]:
    """module → {local name: full name} for the parameters that require grad. Raises _Fallback for a parameter
    that more than one module owns (tied weights)."""
    wanted = {id(p): n for n, p in named}
    owners: Dict[nn.Module, Dict[str, str]] = {}
    seen: Dict[int, int] = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in wanted:
                seen[id(p)] = seen.get(id(p), 0) + 1
                owners.setdefault(module, {})[local] = wanted[id(p)]
    if any(c > 1 for c in seen.values()):
        raise _Fallback("a parameter is shared by several modules")
    return owners


def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, r, out: Dict[str, Tuple]) -> None:
    if a.dim() == 2:
        out["weight"] = (r(g).t() @ r(a), g.t() @ a)
        if module.bias is not None:
            out["bias"] = (r(g).sum(0), g.sum(0))
        return
    a3, g3 = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    w = torch.bmm(g3.transpose(1, 2), a3)
    out["weight"] = (r(w).sum(0), w.sum(0))
    if module.bias is not None:
        b = g3.sum(1)
        out["bias"] = (r(b).sum(0), b.sum(0))


def _columns(a: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """``F.unfold(a, k, dilation=d, padding=p, stride=s)`` as one strided copy of the padded input (the same
    (N, C·k·k, L) layout; faster than unfold's im2col on CPU)."""
    a = F.pad(a, (p[1], p[1], p[0], p[0])) if any(p) else a
    n, c, h, w = a.shape
    ho, wo = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
    sn, sc, sh, sw = a.stride()
    view = a.as_strided((n, c, k[0], k[1], ho, wo), (sn, sc, sh * d[0], sw * d[1], sh * s[0], sw * s[1]))
    return view.reshape(n, c * k[0] * k[1], ho * wo)


def _add_samples(per: torch.Tensor, dim: int, inplace, w, plain):
    """``(w + Σ r(per), plain + Σ per)`` over the samples' axis ``dim`` of per-sample gradients (``per`` is
    overwritten; ``w``/``plain`` None at the first chunk)."""
    total = per.sum(dim)
    plain = total if plain is None else plain.add_(total)
    part = inplace(per).sum(dim)
    return (part if w is None else w.add_(part)), plain


def _squares_by_sample(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor, plain: Optional[torch.Tensor]) -> None:
    """``w += Σ_j (g_j a_j)²`` (and ``plain += Σ_j g_j a_j`` unless None) over the samples j of ``g`` (N, O, L) and
    ``a`` (N, L, K), one sample at a time into one buffer: its gradient and the sums stay in cache (the CPU's
    route for large weights)."""
    buf = torch.empty_like(w)
    for j in range(g.shape[0]):
        torch.mm(g[j], a[j], out=buf)
        w.addcmul_(buf, buf)
        if plain is not None:
            plain.add_(buf)


def _shifted(a: torch.Tensor, g: torch.Tensor, k, d, p, inplace) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stride-1 convolution's per-sample weight gradients, one kernel offset at a time, with no column copy:
    (r-summed, summed), both (O, C, k, k). With the input padded and flattened row by row (width Wp) and the output
    gradient padded to width Wp, offset (u, v) is a contiguous window of the flattened input starting at
    d_h·u·Wp + d_w·v, so ∇W[:, :, u, v] of each sample is one batched matmul of (O, Ho·Wp) by (Ho·Wp, C); the
    padding columns of the output gradient are zero and cancel the window's wrap-around entries."""
    ap = F.pad(a, (p[1], p[1], p[0], p[0])) if any(p) else a
    wp = ap.shape[3]
    ho, wo = g.shape[2], g.shape[3]
    flat = F.pad(ap.flatten(2), (0, d[1] * (k[1] - 1)))  # (N, C, Hp·Wp + the last window's overhang)
    gp = F.pad(g, (0, wp - wo)).flatten(2) if wp != wo else g.flatten(2)  # (N, O, Ho·Wp)
    q = ho * wp
    n_all, o, c = a.shape[0], g.shape[1], a.shape[1]
    w = plain = None
    for i in range(0, n_all, _CHUNK):
        n = min(_CHUNK, n_all - i)
        per = torch.empty(k[0] * k[1], n, o, c, dtype=gp.dtype, device=gp.device)
        for u in range(k[0]):
            for v in range(k[1]):
                off = d[0] * u * wp + d[1] * v
                torch.bmm(gp[i:i + n], flat[i:i + n, :, off:off + q].transpose(1, 2), out=per[u * k[1] + v])
        w, plain = _add_samples(per, 1, inplace, w, plain)
    # (k·k, O, C) → (O, C, k, k)
    return tuple(t.permute(1, 2, 0).reshape(o, c, k[0], k[1]) for t in (w, plain))


def _columned(a: torch.Tensor, gf: torch.Tensor, k, d, p, s, inplace, by_sample: bool):
    """Any convolution's per-sample weight gradients as G_n · columns(a_n)ᵀ, a batched matmul per chunk of
    samples: (r-summed, summed), both (O, C·k·k)."""
    w = plain = None
    chunk = _CHUNK // 2 if by_sample else _CHUNK
    for i in range(0, a.shape[0], chunk):
        cols = _columns(a[i:i + chunk], k, d, p, s)  # (n, C·k·k, L)
        if by_sample:
            if w is None:
                w, plain = gf.new_zeros(gf.shape[1], cols.shape[1]), gf.new_zeros(gf.shape[1], cols.shape[1])
            _squares_by_sample(gf[i:i + chunk], cols.transpose(1, 2), w, plain)
            continue
        w, plain = _add_samples(torch.bmm(gf[i:i + chunk], cols.transpose(1, 2)), 0, inplace, w, plain)
    return w, plain


def _conv(module: nn.Module, a: torch.Tensor, g: torch.Tensor, r, out: Dict[str, Tuple]) -> None:
    if isinstance(module, nn.Conv1d):
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
    else:
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    gf = g.flatten(2)  # (N, O, L)
    square = r is REDUCERS["square"]
    inplace = _INPLACE["square" if square else "abs"]
    # (on an accelerator a loop per sample would be launches; its memory bandwidth serves the chunked form)
    by_sample = square and module.weight.numel() >= _BY_SAMPLE and a.device.type == "cpu"
    # shifted windows pay where the column copy is dear against the matmul (its cost relative to it falls with the
    # output channels), the windows' matmuls are wide enough (their width is the input channels) and the padding
    # columns they also multiply are few (Wp − Wo of every Wp; at most a quarter more)
    wide = a.shape[-1] + 2 * p[1] <= 1.25 * g.shape[-1]
    if not by_sample and all(v == 1 for v in s) and a.shape[1] >= max(g.shape[1], 8) and wide:
        w, plain = _shifted(a, g, k, d, p, inplace)
    else:
        w, plain = _columned(a, gf, k, d, p, s, inplace, by_sample)
    out["weight"] = (w.view_as(module.weight), plain.view_as(module.weight))
    if module.bias is not None:
        b = gf.sum(2)
        out["bias"] = (r(b).sum(0), b.sum(0))


def _batchnorm(module: nn.Module, a: torch.Tensor, g: torch.Tensor, r, out: Dict[str, Tuple]) -> None:
    """Eval-mode BatchNorm, x̂ = (a − μ)·s with the running statistics: ∇γ ℓ_n = s·(Σ g_n·a_n − μ·Σ g_n) and
    ∇β ℓ_n = Σ g_n over the positions, without forming x̂ (one product of the size of the activation, not three)."""
    gs = g.flatten(2).sum(2) if g.dim() > 2 else g  # (N, C)
    if module.weight is not None:
        ga = (g * a).flatten(2).sum(2) if a.dim() > 2 else g * a
        w = (ga - module.running_mean.float() * gs) * torch.rsqrt(module.running_var.float() + module.eps)
        out["weight"] = (r(w).sum(0), w.sum(0))
    if module.bias is not None:
        out["bias"] = (r(gs).sum(0), gs.sum(0))


def _layernorm(module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, r, out: Dict[str, Tuple]) -> None:
    """∇γ ℓ_n = Σ g_n·x̂_n and ∇β ℓ_n = Σ g_n over every axis but the sample's and the normalised ones."""
    trailing = len(module.normalized_shape)
    dims = tuple(range(a.dim() - trailing, a.dim()))
    xhat = (a - a.mean(dims, keepdim=True)) * torch.rsqrt(a.var(dims, unbiased=False, keepdim=True) + module.eps)

    def per_sample(t):
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - trailing:]).sum(1)

    if module.weight is not None:
        w = per_sample(g * xhat)
        out["weight"] = (r(w).sum(0), w.sum(0))
    if module.bias is not None:
        b = per_sample(g)
        out["bias"] = (r(b).sum(0), b.sum(0))


def _recurrent_served(module: nn.Module) -> bool:
    """An ``nn.LSTM`` (without projections) or ``nn.GRU``: the recurrences written out below reproduce them (any
    layers, directions, batch_first, bias)."""
    return type(module) is nn.LSTM and module.proj_size == 0 or type(module) is nn.GRU


def _recurrent_forward(module: nn.Module, calls: list, leaves: List[torch.Tensor]) -> Callable:
    """A stand-in for an LSTM's or GRU's ``forward`` during the pass: the recurrence written out step by step in
    nn.LSTM's gate order (i, f, g, o) or nn.GRU's (r, z, n), the same values up to float rounding. For each layer
    and direction it records the input sequence x, the hidden state h_{t−1} before each step, and by hooks the
    gradient G reaching the input projection x_t·W_ihᵀ + b_ih and — for the GRU, whose hidden projection enters
    its candidate gate through r — H reaching the hidden projection h_{t−1}·W_hhᵀ + b_hh (for the LSTM the two
    are the gates' pre-activation gradient). Then ∇W_ih ℓ_n = Σ_t G_{n,t} x_{n,t}ᵀ, ∇W_hh ℓ_n = Σ_t H_{n,t}
    h_{n,t−1}ᵀ, ∇b_ih ℓ_n = Σ_t G_{n,t}, ∇b_hh ℓ_n = Σ_t H_{n,t} (:func:`_recurrent_sums`). (The fused kernels
    have no vmap batching rule: whole-model vmap ran the LSTM sample by sample, 53x the batch Fisher's time on
    excise's character LSTM, and fails on the GRU.)"""
    gru = type(module) is nn.GRU

    def as_leaf(t: torch.Tensor) -> torch.Tensor:  # nothing upstream carries a gradient: the graph starts here
        if t.requires_grad:
            return t
        leaf = t.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()

    def forward(x, hx=None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise _Fallback(f"{type(module).__name__} on packed or unbatched sequences")
        seq = x if module.batch_first else x.transpose(0, 1)
        n, steps = seq.shape[0], seq.shape[1]
        dirs = 2 if module.bidirectional else 1
        if hx is None:
            h0 = seq.new_zeros(module.num_layers * dirs, n, module.hidden_size)
            c0 = torch.zeros_like(h0)
        else:
            h0, c0 = (hx, None) if gru else hx
        record: Dict[Tuple[int, int], Dict[str, object]] = {}
        calls.append(record)
        inp, h_last, c_last = seq, [], []
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_hh = getattr(module, "weight_hh" + sfx)
                b_ih, b_hh = (getattr(module, "bias_ih" + sfx), getattr(module, "bias_hh" + sfx)) if module.bias \
                    else (None, None)
                xs = inp.flip(1) if d else inp
                xw = xs @ getattr(module, "weight_ih" + sfx).t()
                if module.bias:
                    xw = xw + b_ih if gru else xw + b_ih + b_hh
                xw = as_leaf(xw)
                keep: Dict[str, object] = {"x": xs.detach(), "g": None, "gh": [None] * steps if gru else None}
                xw.register_hook(lambda g, keep=keep: keep.__setitem__("g", g.detach()))
                h = h0[layer * dirs + d]
                c = None if gru else c0[layer * dirs + d]
                hs, before = [], []
                for t in range(steps):
                    before.append(h)
                    if gru:
                        hw = h @ w_hh.t()
                        hw = as_leaf(hw + b_hh if module.bias else hw)
                        hw.register_hook(lambda g, keep=keep, t=t: keep["gh"].__setitem__(t, g.detach()))
                        xr, xz, xn = xw[:, t].chunk(3, 1)
                        hr, hz, hn = hw.chunk(3, 1)
                        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                        h = (1 - z) * torch.tanh(xn + r * hn) + z * h
                    else:
                        i, f, g, o = (xw[:, t] + h @ w_hh.t()).chunk(4, 1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = torch.sigmoid(o) * torch.tanh(c)
                    hs.append(h)
                keep["h"] = torch.stack(before, 1).detach()
                record[(layer, d)] = keep
                out = torch.stack(hs, 1)
                outs.append(out.flip(1) if d else out)
                h_last.append(h)
                c_last.append(c)
            inp = torch.cat(outs, -1) if dirs == 2 else outs[0]  # (dropout between layers: none in eval mode)
        out = inp if module.batch_first else inp.transpose(0, 1)
        return (out, torch.stack(h_last)) if gru else (out, (torch.stack(h_last), torch.stack(c_last)))

    return forward


def _recurrent_sums(module: nn.Module, record, inplace, out: Dict[str, Tuple]) -> None:
    """Per-sample weight gradients of each layer and direction from what :func:`_recurrent_forward` recorded."""
    for (layer, d), keep in record.items():
        if keep["g"] is None:  # this direction's output never reached the loss
            continue
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        g = keep["g"].float()
        gh = g if keep["gh"] is None else torch.stack(
            [t if t is not None else torch.zeros_like(g[:, 0]) for t in keep["gh"]], 1).float()
        for name, grad, a in (("weight_ih", g, keep["x"]), ("weight_hh", gh, keep["h"])):
            a, gt = a.float(), grad.transpose(1, 2)  # (N, T, in), (N, gates, T)
            plain = grad.reshape(-1, grad.shape[-1]).t() @ a.reshape(-1, a.shape[-1])  # Σ_n: one matmul
            if inplace is torch.Tensor.square_ and plain.numel() >= _BY_SAMPLE and a.device.type == "cpu":
                w = torch.zeros_like(plain)
                _squares_by_sample(gt, a, w, None)
            else:
                w = sum(inplace(torch.bmm(gt[i:i + _CHUNK], a[i:i + _CHUNK])).sum(0)
                        for i in range(0, gt.shape[0], _CHUNK))
            out[name + sfx] = (w, plain)
        if module.bias:
            for name, grad in (("bias_ih", g), ("bias_hh", gh)):
                b = grad.sum(1)  # (N, gates)
                out[name + sfx] = (inplace(b.clone()).sum(0), b.sum(0))


def _closed_form(module: nn.Module) -> Optional[Callable]:
    if type(module) is nn.Linear:
        return _linear
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not module.training \
            and module.running_mean is not None:
        return _batchnorm
    if type(module) is nn.LayerNorm:
        return _layernorm
    if type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        return _conv
    return None


def _generic(module: nn.Module, local: Dict[str, str], a: torch.Tensor, g: torch.Tensor, r,
             out: Dict[str, Tuple]) -> None:
    """The vector-Jacobian product of ``module`` alone, per sample (torch.func), for its own parameters."""
    from torch.func import functional_call, vjp, vmap

    params = {k: getattr(module, k).detach() for k in local}

    def one(x, go):
        _, pull = vjp(lambda p: functional_call(module, p, (x.unsqueeze(0),), strict=False), params)
        return pull(go.unsqueeze(0))[0]

    with quiet_vmap():
        grads = vmap(one)(a, g)
    for k in local:
        out[k] = (r(grads[k].float()).sum(0), grads[k].float().sum(0))


def per_sample_sums(model: nn.Module, loader, task: Task, sample_losses: Callable, reduce: str,
                    counters: Optional[Counters], show: bool, desc: str) -> Scores:
    """(1/N) Σ_n r(∇θ ℓ_n) over every sample of ``loader``, for every parameter that requires grad, in eval mode.

    ``sample_losses(output, batch)`` returns the per-sample losses ℓ_n (shape (N,)); ``reduce``: 'square' (the
    empirical Fisher diagonal for ℓ = the task's loss) or 'abs'. The result's ``samples`` attribute is N.
    """
    return _moments(model, loader, task, sample_losses, reduce, counters, show, desc)[0]


def module_local_sums(model: nn.Module, loader, task: Task, sample_losses: Callable, counters: Optional[Counters],
                      show: bool, desc: str) -> Optional[Scores]:
    """(1/N) Σ_n (∇θ ℓ_n)² by the module-local route alone; None for a model it cannot serve (the caller then
    takes its own route: ``sample_losses`` may draw random targets, which a vmap route would draw again)."""
    named = trainable(model)
    try:
        return _hooked(model, loader, task, sample_losses, "square", _owners(model, named), named, counters, show,
                       desc)[0]
    except _Fallback:  # noqa: a model the module-local route cannot serve exactly
        return None


def sample_moments(model: nn.Module, loader, task: Task, sample_losses: Callable, counters: Optional[Counters],
                   show: bool, desc: str) -> Tuple[Scores, Scores]:
    """``(mean, second)``: the per-sample gradients' mean (1/N) Σ_n ∇θ ℓ_n and second moment (1/N) Σ_n (∇θ ℓ_n)²,
    from one pass (the mean comes free with the backward pass the second moment needs). Both have ``samples``."""
    second, mean = _moments(model, loader, task, sample_losses, "square", counters, show, desc)
    return mean, second


def _moments(model: nn.Module, loader, task: Task, sample_losses: Callable, reduce: str,
             counters: Optional[Counters], show: bool, desc: str) -> Tuple[Scores, Scores]:
    """``((1/N) Σ_n r(∇θ ℓ_n), (1/N) Σ_n ∇θ ℓ_n)``."""
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {sorted(REDUCERS)}, got {reduce!r}")
    named = trainable(model)
    try:
        owners = _owners(model, named)
        return _hooked(model, loader, task, sample_losses, reduce, owners, named, counters, show, desc)
    except _Fallback:  # noqa: the hooks found a model the module-local route cannot serve exactly
        try:
            return _vmapped(model, loader, task, sample_losses, reduce, named, counters, show, desc)
        except (RuntimeError, NotImplementedError, ValueError):  # vmap cannot run this model (nn.GRU's kernel
            # fails under it; a batch in a container vmap does not know, e.g. a UserDict): one backward per
            # sample, exact for anything that runs on a batch of one (a genuine error is raised from there)
            return _vmapped(model, loader, task, sample_losses, reduce, named, counters, show, desc, looped=True)


def _hooked(model, loader, task, sample_losses, reduce, owners, named, counters, show, desc) -> Scores:
    """The module-local route. The parameters are taken out of autograd for the pass (``requires_grad`` off,
    restored after), so the backward computes only the gradients that flow between modules — not the weight
    gradients, which the per-sample forms give, summed, for free. A module whose input carries no gradient (the
    first layer, an embedding) has its output made a leaf of the graph, and the backward runs to those leaves."""
    r = REDUCERS[reduce]
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    gsum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    inputs: Dict[nn.Module, list] = {m: [] for m in owners}
    grads: Dict[nn.Module, list] = {m: [] for m in owners}
    leaves: List[torch.Tensor] = []

    collecting = [True]  # off while the per-module sums re-run modules (the generic route)

    def capture(module):
        return lambda g: grads[module].append(g.detach())

    def fwd(module, args, output):
        if not collecting[0]:
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise _Fallback(f"{type(module).__name__} takes or returns more than one tensor")
        inputs[module].append(args[0].detach())
        if not output.is_floating_point():
            raise _Fallback(f"{type(module).__name__} returns a tensor of {output.dtype}")
        replaced = None
        if not output.requires_grad:  # nothing upstream carries a gradient: start the graph here, on a copy that
            # later in-place operations (a ReLU) may modify without touching the leaf
            leaf = output.detach().requires_grad_(True)
            leaves.append(leaf)
            output = replaced = leaf.clone()
        # a tensor hook sees the gradient of this value even if a later op (an in-place ReLU) modifies it; a
        # module full-backward hook would forbid that in-place op
        output.register_hook(capture(module))
        return replaced

    handles = []
    device = model_device(model)
    total = 0
    guard = NonFinite(_non_finite(desc, task))
    detached = [p for _, p in named]
    recurrent = {m: m.__dict__.get("forward") for m in owners if _recurrent_served(m)}  # their own forward, if any
    try:
        for prm in detached:
            prm.requires_grad_(False)
        for m in owners:
            if m in recurrent:
                m.forward = _recurrent_forward(m, inputs[m], leaves)
            else:
                handles.append(m.register_forward_hook(fwd))
        with eval_mode(model):
            for batch in _parts(batches(loader, show, desc), task, device):
                for m in owners:
                    inputs[m].clear()
                    grads[m].clear()
                leaves.clear()
                losses = sample_losses(task.output(model, batch), batch)
                if not bool(torch.isfinite(losses.detach()).all()):
                    guard.seen()
                    continue
                if leaves and losses.requires_grad:
                    torch.autograd.grad(losses.float().sum(), leaves, allow_unused=True)
                collecting[0] = False
                for m, local in owners.items():
                    if len(inputs[m]) != 1:
                        raise _Fallback(f"{type(m).__name__} ran {len(inputs[m])} times in one forward")
                    out: Dict[str, Tuple] = {}
                    if m in recurrent:
                        _recurrent_sums(m, inputs[m][0], _INPLACE[reduce], out)
                    elif not grads[m]:  # its output never reached the loss: no gradient for its parameters
                        continue
                    elif len(grads[m]) != 1:
                        raise _Fallback(f"{type(m).__name__}'s output was used in several places")
                    else:
                        a, g = inputs[m][0], grads[m][0]
                        form = _closed_form(m)
                        if form is not None:
                            form(m, a.float(), g.float(), r, out)
                        else:
                            _generic(m, local, a, g, r, out)
                    for k, full in local.items():
                        if k not in out:  # a recurrent direction whose output never reached the loss
                            continue
                        acc[full].add_(out[k][0].to(acc[full].dtype))
                        gsum[full].add_(out[k][1].to(gsum[full].dtype))
                collecting[0] = True
                n = int(losses.shape[0])
                total += n
                if counters is not None:
                    counters.forward_passes += 1
                    counters.backward_passes += 1
                    counters.samples_seen += n
    finally:
        for h in handles:
            h.remove()
        for m, own in recurrent.items():
            if own is None:
                del m.forward
            else:
                m.forward = own
        for prm in detached:
            prm.requires_grad_(True)
    guard.check()
    total, = summed(list(acc.values()) + list(gsum.values()), total)
    return _finish(acc, total, desc, task), _finish(gsum, total, desc, task, check_zero=False)


def _parts(loader_batches, task: Task, device: torch.device):
    """The batches on ``device``; on the CPU, each cut into parts of at most ``tasks.CPU_PART`` samples (whole
    batches of 256 were 1.4x slower on ResNet-18 width 16 here, for the allocator's sake: see there). The sums are
    per sample, so the grouping does not change them (up to float summation); on an accelerator batches run whole."""
    for batch in loader_batches:
        batch = task.to(batch, device)
        n = int(task.batch_size(batch)) if device.type == "cpu" else 0
        if n <= CPU_PART:
            yield batch
            continue
        for lo in range(0, n, CPU_PART):
            yield cut(batch, lo, min(lo + CPU_PART, n), n)


def _vmapped(model, loader, task, sample_losses, reduce, named, counters, show, desc, chunk: int = 64,
             looped: bool = False) -> Scores:
    """Whole-model per-sample gradients: ``torch.func.vmap`` over chunks of samples, or with ``looped`` one
    ordinary backward per sample (a batch of one)."""
    from torch.func import functional_call, grad, vmap

    r = REDUCERS[reduce]
    params = {n: p.detach() for n, p in named}
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update({n: b.detach() for n, b in model.named_buffers()})
    device = model_device(model)

    def one(p, sample):  # one sample of the batch (any structure of tensors), made a batch of one
        batch = unsqueezed(sample)
        out = task.read_output(functional_call(model, {**p, **rest}, (task.inputs(batch),)))
        return sample_losses(out, batch).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0))
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gsum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    total = 0
    guard = NonFinite(_non_finite(desc, task))
    with eval_mode(model), quiet_vmap():
        for batch in batches(loader, show, desc):
            batch = task.to(batch, device)
            n = int(task.batch_size(batch))
            with torch.no_grad():
                losses = sample_losses(task.output(model, batch), batch)
            if not bool(torch.isfinite(losses).all()):
                guard.seen()
                continue
            if looped:
                for i in range(n):
                    one_sample = cut(batch, i, i + 1, n)
                    loss = sample_losses(task.output(model, one_sample), one_sample).sum()
                    for (k, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)):
                        if g is not None:
                            acc[k].add_(r(g.float()))
                            gsum[k].add_(g.float())
            else:
                for s in range(0, n, chunk):
                    g = per_sample(params, cut(batch, s, min(s + chunk, n), n))
                    for k in acc:
                        acc[k].add_(r(g[k].float()).sum(0))
                        gsum[k].add_(g[k].float().sum(0))
            total += n
            if counters is not None:
                counters.forward_passes += 1
                counters.backward_passes += 1
                counters.samples_seen += n
    guard.check()
    total, = summed(list(acc.values()) + list(gsum.values()), total)
    return _finish(acc, total, desc, task), _finish(gsum, total, desc, task, check_zero=False)


def _finish(acc, total, desc, task, check_zero: bool = True) -> Scores:
    if total == 0:
        raise ValueError(f"{desc}: the loader yielded no sample")
    scores = check_finite(Scores({n: a.div_(total) for n, a in acc.items()}), desc, task)
    if check_zero and all(not bool(v.any()) for v in scores.values()):
        raise FloatingPointError(
            f"{desc}: the gradient of the {getattr(task, 'name', type(task).__name__)} loss is zero for every "
            "sample (labels all ignored, e.g. -100?): an importance of all zeros is meaningless")
    scores.samples = total
    return scores


def _non_finite(desc: str, task: Task) -> str:
    return (f"{desc}: the {getattr(task, 'name', type(task).__name__)} loss is not finite on this data "
            "(inputs with NaN?): its importance would be meaningless")
