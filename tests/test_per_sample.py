"""Per-sample gradient statistics from one backward pass (excise.importance.per_sample), SSD's default estimator
(fisher_mode="subset") and its loader invariance."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from excise import UnlearningRequest, unlearn
from excise.importance import ImportanceCache, gradient_moments, subset_importance
from excise.importance.common import trainable
from excise.importance.per_sample import _Fallback, _hooked, _owners, _vmapped, per_sample_sums
from excise.methods.ssd import SSD_DEFAULTS
from excise.tasks import ClassificationTask

from helpers import per_sample_squares


class _Scale(nn.Module):  # a custom module with its own parameter: served by the generic (vmap-vjp) route
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x * self.scale


class _Mixed(nn.Module):
    """Every route: Conv2d, Conv1d without bias, eval BatchNorm, in-place ReLU on a hooked output, LayerNorm,
    Linear on (N, T, in), a custom module, and a parameter the root module uses itself."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, bias=False)
        self.ln, self.odd, self.seq, self.head = nn.LayerNorm(8), _Scale(), nn.Linear(8, 8), nn.Linear(8, 5)
        self.offset = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = self.relu(self.bn(self.c1(x))).mean(2)
        h = self.seq(self.odd(self.ln(self.c2(h).transpose(1, 2))))
        return self.head(torch.relu(h).mean(1)) + self.offset


def _mixed():
    torch.manual_seed(0)
    m = _Mixed()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    x, y = torch.randn(50, 1, 6, 6), torch.randint(0, 5, (50,))
    return m, DataLoader(TensorDataset(x, y), batch_size=16)


def _both_routes(model, loader, reduce="square"):
    """(hooked sums, hooked means, whole-model vmap sums, vmap means, the trainable parameters)."""
    task = ClassificationTask()

    def losses(out, b):
        return task.loss_from_output(out, task.targets(b), reduction="none")

    named = trainable(model)
    fast, fast_mean = _hooked(model, loader, task, losses, reduce, _owners(model, named), named, None, False, "t")
    ref, ref_mean = _vmapped(model, loader, task, losses, reduce, named, None, False, "t")
    return fast, fast_mean, ref, ref_mean, named


@pytest.mark.parametrize("reduce", ["square", "abs"])
def test_hooked_sums_equal_whole_model_vmap(reduce):
    model, loader = _mixed()
    fast, fast_mean, ref, ref_mean, named = _both_routes(model, loader, reduce)
    assert set(fast) == {n for n, _ in named} and fast.samples == ref.samples == 50
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fast_mean[n], ref_mean[n], rtol=1e-4, atol=1e-7)


class _Convs(nn.Module):
    """The convolution routes: columns (few input channels; a strided one), shifted windows at stride 1 (a dilated,
    non-square, asymmetrically padded kernel, an unpadded one, Conv1d with dilation) and one with ≥ 2^16 weights
    (one sample at a time); and BatchNorm1d on (N, C)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), dilation=(2, 1))
        self.b = nn.Conv2d(8, 8, 3, bias=False)
        self.c = nn.Conv2d(8, 1024, 3, stride=2, padding=1)  # 73,728 weights
        self.d = nn.Conv1d(1024, 4, 3, dilation=2, padding=2)
        self.norm = nn.BatchNorm1d(4)  # on (N, C): no positions to sum over
        self.norm.running_mean.normal_().mul_(3)
        self.norm.running_var.uniform_(0.5, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.stem(x))))
        h = self.c(torch.tanh(self.b(h)))
        return self.head(self.norm(self.d(torch.tanh(h).flatten(2)).mean(2)))


@pytest.mark.parametrize("reduce", ["square", "abs"])
def test_every_convolution_route_and_batch_parts_equal_whole_model_vmap(reduce):
    torch.manual_seed(2)
    model = _Convs().eval()
    # batches of 150: cut into parts on the CPU (the sums are per sample, so parts change nothing)
    loader = DataLoader(TensorDataset(torch.randn(170, 2, 9, 20), torch.randint(0, 3, (170,))), batch_size=150)
    fast, fast_mean, ref, ref_mean, _ = _both_routes(model, loader, reduce)
    assert fast.samples == ref.samples == 170
    for n in ref:
        assert bool(ref[n].any())
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fast_mean[n], ref_mean[n], rtol=1e-4, atol=1e-7)


def test_a_shared_parameter_falls_back_to_exact_vmap():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)  # one module called twice
    loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 4, (12,))), batch_size=5)
    task = ClassificationTask()

    def losses(out, b):
        return task.loss_from_output(out, task.targets(b), reduction="none")

    named = trainable(model)
    with pytest.raises(_Fallback):
        _hooked(model, loader, task, losses, "square", _owners(model, named), named, None, False, "t")
    got = per_sample_sums(model, loader, task, losses, "square", None, False, "t")
    ref, _ = _vmapped(model, loader, task, losses, "square", named, None, False, "t")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])



class _Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM, **kw):
        super().__init__()
        self.batch_first = kw.setdefault("batch_first", True)
        self.rnn = cell(3, 5, **kw)
        self.head = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 2)

    def forward(self, x):
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1))[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("kw", [{}, {"batch_first": False, "num_layers": 2}, {"bidirectional": True, "num_layers": 2},
                                {"bias": False}])
def test_lstms_and_grus_are_served_by_their_written_out_recurrence(cell, kw):
    """nn.LSTM and nn.GRU return tuples and their fused kernels have no batching rule (whole-model vmap ran the
    LSTM sample by sample and fails on the GRU): the module-local route writes the recurrence out and forms each
    sample's gradients from the gates'. The sums equal per-sample backward's (and the LSTM's, vmap's); the
    module's own forward is back afterwards."""
    torch.manual_seed(0)
    model = _Recurrent(cell, **kw).eval()
    x, y = torch.randn(10, 4, 3), torch.randint(0, 2, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    task = ClassificationTask()

    def losses(out, b):
        return task.loss_from_output(out, task.targets(b), reduction="none")

    named = trainable(model)
    second, mean = _hooked(model, loader, task, losses, "square", _owners(model, named), named, None, False, "t")
    ref_second, ref_mean = _vmapped(model, loader, task, losses, "square", named, None, False, "t",
                                    looped=cell is nn.GRU)
    by_hand = per_sample_squares(model, x, y)
    for n in ref_second:
        torch.testing.assert_close(second[n], ref_second[n], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(mean[n], ref_mean[n], rtol=1e-5, atol=1e-7)  # means cancel: float noise
        torch.testing.assert_close(second[n], by_hand[n], rtol=1e-5, atol=1e-9)
    assert "forward" not in model.rnn.__dict__
    unbatched = DataLoader(TensorDataset(x[0]), batch_size=4)  # a (T, features) sequence: the route gives up
    with pytest.raises(_Fallback):
        _hooked(model, unbatched, task, lambda out, b: out.sum(-1), "square", _owners(model, named), named, None,
                False, "t")
    assert "forward" not in model.rnn.__dict__ and all(p.requires_grad for p in model.parameters())


def test_vmaps_batching_rule_message_is_not_passed_on():
    """nn.MultiheadAttention takes three inputs: whole-model vmap, whose attention op has no batching rule; torch's
    "performance drop … batching rule" message is not passed on to the user (the sums are exact)."""
    import warnings

    from excise import importance
    from helpers import Attending

    torch.manual_seed(0)
    model = Attending().eval()
    x, y = torch.randn(6, 32), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, second = importance.gradient_moments(model, DataLoader(TensorDataset(x, y), batch_size=3))
    assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
    by_hand = per_sample_squares(model, x, y)
    for n in by_hand:
        torch.testing.assert_close(second[n], by_hand[n], rtol=1e-5, atol=1e-9)


class _TwiceGRU(_Recurrent):
    """One GRU over the sequence and over its reverse: a module called twice, which the module-local route
    cannot serve, and a kernel vmap cannot run."""

    def __init__(self):
        super().__init__(nn.GRU)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1] + self.rnn(x.flip(1))[0][:, -1])


@pytest.mark.parametrize("make", [_TwiceGRU, lambda: _Recurrent(nn.GRU)])
def test_a_model_vmap_cannot_run_gets_one_backward_per_sample(make):
    """nn.GRU's kernel fails under vmap (a shape error inside it): where the module-local route gives up, the
    moments come from one ordinary backward per sample instead, and so does the GGN diagonal (always vmap) —
    the same sums."""
    from excise import importance

    torch.manual_seed(0)
    model = make().eval()
    x, y = torch.randn(10, 4, 3), torch.randint(0, 2, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    _, second = importance.gradient_moments(model, loader)
    by_hand = per_sample_squares(model, x, y)
    for n in by_hand:
        torch.testing.assert_close(second[n], by_hand[n], rtol=1e-5, atol=1e-9)
    ggn = importance.hessian_diag(model, loader, method="ggn_exact")
    exact = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # Σ_c p_c (∇ℓ(x, c))², by hand
    for i in range(len(x)):
        probs = torch.softmax(model(x[i:i + 1]), -1).detach()[0]
        for c in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), torch.tensor([c])).backward()
            for n, p in model.named_parameters():
                exact[n] += probs[c] * p.grad.pow(2) / len(x)
    for n in ggn:
        torch.testing.assert_close(ggn[n], exact[n], rtol=1e-5, atol=1e-9)


def _digits_request(committed, batch, shuffle=False, seed=0):
    from excise.data import ForgetSpec
    from excise.protocol import Setup
    from excise.training import TrainRecipe

    setup = Setup(dataset="digits", arch="mlp", recipe=TrainRecipe(epochs=40, batch_size=32), seed=0,
                  importance_batch=64, forget=ForgetSpec.parse("class:3"))
    prep = committed(setup)
    req = prep.request()
    g = torch.Generator().manual_seed(seed)

    def again(loader):
        return DataLoader(loader.dataset, batch_size=batch, shuffle=shuffle, generator=g if shuffle else None)

    return prep, UnlearningRequest(forget=again(req.forget), retain=again(req.retain), train=again(req.train))


def test_ssd_default_mask_is_the_same_for_any_batch_size_and_order(committed):
    """The batch-mode Fisher selected 0 to 3,656 entries by loader batch size; the default may differ
    only where an entry's ratio lies within float rounding of α."""
    masks, ratios = {}, None
    for batch, shuffle in ((16, False), (64, False), (256, False), (64, True)):
        prep, req = _digits_request(committed, batch, shuffle)
        res = unlearn(prep.original, req, "ssd", importance_cache=False, checks=False)
        masks[(batch, shuffle)] = torch.cat([v.flatten() for v in res.mask.values()])
        if ratios is None:
            fm, fs = gradient_moments(prep.original, req.forget)
            rm, rs = gradient_moments(prep.original, req.retain)
            i_f, i_ref = subset_importance(fm, fs, rm, rs)
            ratios = torch.cat([(i_f[k] / i_ref[k]).flatten() for k in res.mask])
    base = masks[(16, False)]
    assert base.sum() > 0  # it selects something
    near = (ratios / SSD_DEFAULTS["alpha"] - 1).abs() < 1e-3
    for key, m in masks.items():
        assert torch.equal(m[~near], base[~near]), key


def test_batch_mode_depends_on_the_batch_size_the_default_does_not(committed):
    counts = {}
    for batch in (16, 256):
        prep, req = _digits_request(committed, batch)
        batch_res = unlearn(prep.original, req, "ssd", fisher_mode="batch", alpha=10.0, importance_cache=False,
                            checks=False)
        counts[batch] = batch_res.mask.count()
    assert counts[16] != counts[256]  # the paper's estimator moves with the loader: why it is not the default


def test_a_random_forget_set_scores_about_one():
    """α's meaning: a random forget set's I_f / I_ref averages about 1 whatever its size (below, at and above the
    comparison batch b = min(|D_f|, 256)), so α = 100 is far out in its tail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    n = 1200
    ds = TensorDataset(torch.randn(n, 10), torch.randint(0, 3, (n,)))
    for size in (5, 40, 400):
        ratios = []
        for seed in range(12):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            fm, fs = gradient_moments(model, DataLoader(Subset(ds, perm[:size]), batch_size=64))
            rm, rs = gradient_moments(model, DataLoader(Subset(ds, perm[size:]), batch_size=64))
            i_f, i_ref = subset_importance(fm, fs, rm, rs)
            ratios.append(torch.cat([(i_f[k] / i_ref[k]).flatten() for k in i_f]))
        r = torch.stack(ratios)
        assert 0.7 < float(r.mean()) < 1.3, (size, float(r.mean()))
        assert float((r > 100).float().mean()) < 1e-3


def test_a_parameter_only_the_forget_set_moves_stands_out():
    """A parameter the retain set never moves: its ratio is (|D| / |D_f|)² when the forget samples pull it the
    same way (bounded by D's mean gradient, which holds their pull), far above the rest at a 1 % forget set."""
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=False)
    x = torch.randn(400, 6)
    x[:, 5] = 0.0
    x[:4, 5] = 1.0  # feature 5 is on for the four forget samples only
    ds = TensorDataset(x, torch.zeros(400, dtype=torch.long))
    fm, fs = gradient_moments(model, DataLoader(Subset(ds, range(4)), batch_size=8))
    rm, rs = gradient_moments(model, DataLoader(Subset(ds, range(4, 400)), batch_size=8))
    i_f, i_ref = subset_importance(fm, fs, rm, rs)
    ratio = i_f["weight"] / i_ref["weight"]
    torch.testing.assert_close(ratio[:, 5], torch.full((2,), (400 / 4) ** 2), rtol=1e-3, atol=0)
    assert float(ratio[:, :5].max()) < 100


def test_moments_are_cached_by_content_not_by_batching(tmp_path):
    from helpers import tiny_cnn, toy_loader

    model = tiny_cnn()
    cache = ImportanceCache(root=tmp_path)
    forget = toy_loader(n=16, seed=1)
    first = unlearn(model, UnlearningRequest(forget=forget, retain=toy_loader(n=40, seed=2),
                                             train=toy_loader(n=56, seed=3, batch_size=8)), "ssd",
                    importance_cache=cache, checks=False)
    other = unlearn(model, UnlearningRequest(forget=forget, retain=toy_loader(n=40, seed=2),
                                             train=toy_loader(n=56, seed=3, batch_size=20)), "ssd",
                    importance_cache=ImportanceCache(root=tmp_path), checks=False)
    assert first.info["ref_importance_cache"] == "miss" and other.info["ref_importance_cache"] == "hit"
    for k in first.mask:
        assert torch.equal(first.mask[k], other.mask[k])


def test_a_module_whose_output_is_unused_scores_zero_without_a_fallback():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.used, self.unused = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            self.unused(h)  # an auxiliary head the loss never sees
            return self.used(h)

    model = Heads()
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), batch_size=7)
    fast, _, ref, _, _ = _both_routes(model, loader)
    assert not bool(fast["unused.weight"].any())
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-7)


class _Tokens(nn.Module):
    """Integer inputs (an embedding starts the graph), a frozen layer between trained ones, an in-place ReLU on a
    leaf's copy."""

    def __init__(self):
        super().__init__()
        self.emb, self.frozen, self.relu = nn.Embedding(11, 6), nn.Linear(6, 6), nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        return self.head(self.frozen(self.relu(self.emb(tokens))).mean(1))


class _FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.relu = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, stride=2, dilation=2), nn.ReLU(True)
        self.head = nn.Linear(4, 3)
        self.stem.requires_grad_(False)

    def forward(self, x):
        return self.head(self.relu(self.conv(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("make", ["tokens", "frozen-stem"])
def test_graphs_started_inside_the_model_match_vmap_and_leave_requires_grad_as_it_was(make):
    torch.manual_seed(1)
    if make == "tokens":
        model, x = _Tokens(), torch.randint(0, 11, (30, 5))
    else:
        model, x = _FrozenStem(), torch.randn(30, 1, 11, 11)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 3, (30,))), batch_size=8)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fast, fast_mean, ref, ref_mean, named = _both_routes(model, loader)
    assert set(fast) == {n for n, _ in named} and "frozen.weight" not in fast and "stem.weight" not in fast
    for n in ref:
        assert bool(ref[n].any())
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fast_mean[n], ref_mean[n], rtol=1e-4, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_requires_grad_is_restored_when_the_hooked_route_gives_up():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.randint(0, 4, (6,))), batch_size=3)
    task = ClassificationTask()
    named = trainable(model)
    with pytest.raises(_Fallback):
        _hooked(model, loader, task, lambda o, b: task.loss_from_output(o, task.targets(b), reduction="none"),
                "square", _owners(model, named), named, None, False, "t")
    assert all(p.requires_grad for p in model.parameters())
