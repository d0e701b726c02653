import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from excise import UnlearningRequest, unlearn
from excise.data import flip_labels, load_digits
from excise.evaluation import accuracy
from excise.methods.saps import correction_gradient
from excise.models import build_model
from excise.training import TrainRecipe, seeded_loader, train

from helpers import toy_loader


def _request(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 3))
    retain = toy_loader(n=40, seed=1)
    wrong = toy_loader(n=6, seed=2)
    x, y = next(iter(DataLoader(wrong.dataset, batch_size=6)))
    fixed = DataLoader(TensorDataset(x, (y + 1) % 3), batch_size=8)
    return model, UnlearningRequest(forget=wrong, retain=retain, corrected=fixed)


def test_correction_gradient_is_the_difference_of_summed_gradients():
    model, req = _request()
    g = correction_gradient(model, req)
    model.zero_grad()
    x, y = req.forget.dataset.tensors
    xc, yc = req.corrected.dataset.tensors
    (nn.functional.cross_entropy(model(xc), yc, reduction="sum")
     - nn.functional.cross_entropy(model(x), y, reduction="sum")).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6)


def test_first_order_update_formula_and_frozen_entries():
    model, req = _request()
    g = correction_gradient(model, req)
    res = unlearn(model, req, "saps", update="first_order", tau=0.05, selector="grad_magnitude", k=0.2)
    assert res.mask.count() == round(0.2 * sum(p.numel() for p in model.parameters()))
    for n, p in model.named_parameters():
        m, q = res.mask[n], dict(res.model.named_parameters())[n]
        assert torch.equal(q[~m], p[~m])
        torch.testing.assert_close(q[m], p[m] - 0.05 * g[n][m])


@pytest.mark.parametrize("update", ["first_order", "diagonal", "second_order", "steps"])
@pytest.mark.parametrize("selector", ["hessian", "random", "last_layer", "grad_magnitude"])
def test_every_update_touches_only_the_mask(update, selector):
    model, req = _request()
    res = unlearn(model, req, "saps", update=update, selector=selector, k=0.1, estimator="ggn_exact",
                  epochs=2, batch_size=8)
    changed = 0
    for n, p in model.named_parameters():
        m, q = res.mask[n], dict(res.model.named_parameters())[n]
        assert torch.equal(q[~m], p[~m]), (n, update, selector)
        changed += int((q[m] != p[m]).sum())
    assert changed > 0
    if selector == "last_layer":
        assert set(n for n, m in res.mask.items() if m.any()) <= {"3.weight", "3.bias"}


def test_second_order_matches_a_dense_newton_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    retain, wrong = toy_loader(n=30, seed=1), toy_loader(n=5, seed=2)
    x, y = wrong.dataset.tensors
    fixed = DataLoader(TensorDataset(x, (y + 1) % 3), batch_size=8)
    req = UnlearningRequest(forget=wrong, retain=retain, corrected=fixed)
    delta = 0.05
    res = unlearn(model, req, "saps", update="second_order", selector="all", delta=delta, cg_iters=500)
    # dense: θ − (H + δI)⁻¹ G / N with H the Hessian of the mean loss over D̃ = retain ∪ Z̃
    xs = torch.cat([retain.dataset.tensors[0], x])
    ys = torch.cat([retain.dataset.tensors[1], (y + 1) % 3])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def unflat(v):
        out, off = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = v[off:off + k].view(s)
            off += k
        return out

    def mean_loss(v):
        return nn.functional.cross_entropy(functional_call(model.double(), unflat(v), (xs.double(),)), ys)

    H = torch.autograd.functional.hessian(mean_loss, flat)
    model.float()
    g = correction_gradient(model, req)
    G = torch.cat([g[n].reshape(-1) for n in names]).double()
    step = torch.linalg.solve(H + delta * torch.eye(len(flat), dtype=torch.float64), G / len(ys))
    expected = unflat(flat - step)
    for n, p in res.model.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], rtol=1e-3, atol=1e-5)


def test_bad_arguments():
    model, req = _request()
    with pytest.raises(ValueError, match="saps: hyperparameter selector must be one of 'hessian'"):
        unlearn(model, req, "saps", selector="magic")
    with pytest.raises(ValueError, match="saps: hyperparameter update must be one of"):
        unlearn(model, req, "saps", update="leap")
    with pytest.raises(ValueError, match="retain"):
        unlearn(model, UnlearningRequest(forget=req.forget, corrected=req.corrected), "saps")


def test_flip_labels():
    ds = load_digits("train")
    flipped, idx = flip_labels(ds, 50, seed=1)
    assert len(idx) == 50 and (flipped.targets[idx] != ds.targets[idx]).all()
    others = torch.ones(len(ds), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(flipped.targets[others], ds.targets[others])
    t, tidx = flip_labels(ds, 20, source=3, target=8)
    assert (ds.targets[tidx] == 3).all() and (t.targets[tidx] == 8).all()
    with pytest.raises(ValueError, match="cannot flip"):
        flip_labels(ds, 10_000)


@pytest.mark.slow
def test_label_correction_restores_the_flipped_samples():
    """Digits with 150 wrong labels: the model memorises them; SAPS (masked steps on D̃) restores them."""
    clean = load_digits("train")
    noisy, idx = flip_labels(clean, 150, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", clean.input_shape, 10)
    train(model, seeded_loader(noisy, None, 32, shuffle=True), TrainRecipe(epochs=40, lr=0.05), progress=False)
    rest = sorted(set(range(len(clean))) - set(idx))
    req = UnlearningRequest(forget=seeded_loader(noisy, idx, 64), retain=seeded_loader(clean, rest, 64),
                            corrected=seeded_loader(clean, idx, 64))
    fixed_truth = seeded_loader(clean, idx, 256)
    before = accuracy(model, fixed_truth)
    res = unlearn(model, req, "saps", update="steps", k=0.05, lr=0.05, epochs=5, estimator="ggn_mc")
    after = accuracy(res.model, fixed_truth)
    test = seeded_loader(load_digits("test"), None, 256)
    assert before < 40, before  # the wrong labels were learnt
    assert after > before + 25, (before, after)
    assert accuracy(res.model, test) > accuracy(model, test) - 3


def test_cg_on_a_subsample_and_the_curvature_is_cached():
    from excise.importance import ImportanceCache

    model, req = _request()
    cache = ImportanceCache()
    a = unlearn(model, req, "saps", update="second_order", cg_samples=10, k=0.2, importance_cache=cache)
    assert a.info["cg_samples"] == 10 and a.info["curvature_samples"] == 46
    assert a.info["curvature_cache"] == "miss" and a.counters.importance_cache_misses == 1
    b = unlearn(model, req, "saps", update="diagonal", k=0.2, importance_cache=cache)
    assert b.info["curvature_cache"] == "hit"
    assert b.counters.importance_cache_hits == 1 and b.counters.importance_cache_misses == 0
    assert torch.equal(torch.cat([m.flatten() for m in a.mask.values()]),
                       torch.cat([m.flatten() for m in b.mask.values()]))  # same curvature → same selection
    full = unlearn(model, req, "saps", update="second_order", k=0.2, importance_cache=cache)
    assert full.info["cg_samples"] == 46
    changed = [not torch.equal(p, q) for p, q in zip(a.model.parameters(), full.model.parameters())]
    assert any(changed)  # a different curvature sample gives a different Newton step
    with pytest.raises(ValueError, match="cg_samples"):
        unlearn(model, req, "saps", update="second_order", cg_samples=0)


def test_steps_with_a_correction_term():
    model, req = _request()
    plain = unlearn(model, req, "saps", update="steps", k=0.3, lr=0.05, max_steps=5)
    pushed = unlearn(model, req, "saps", update="steps", k=0.3, lr=0.05, max_steps=5, correction_weight=2.0)
    fixed_x, fixed_y = next(iter(DataLoader(req.corrected.dataset, batch_size=100)))
    loss = lambda m: float(nn.functional.cross_entropy(m(fixed_x), fixed_y))  # noqa: E731
    assert loss(pushed.model) < loss(plain.model)  # the correction term pulls toward Z̃'s labels
    for res in (plain, pushed):  # frozen entries stay bit-identical
        for (n, p), q in zip(res.model.named_parameters(), model.parameters()):
            m = res.mask[n]
            assert torch.equal(p[~m], q[~m])
    with pytest.raises(ValueError, match="correction_weight"):
        unlearn(model, req, "saps", update="steps", correction_weight=-1.0)
