import pytest
import torch
from torch import nn
from torch.func import functional_call

from excise.importance import hessian_diag

from helpers import toy_loader


def _mlp(seed=0, hidden=True):
    torch.manual_seed(seed)
    if hidden:
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 4), nn.Tanh(), nn.Linear(4, 3))
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))


def _brute_force_diag(model, loader):
    """Diagonal of the Hessian of the mean per-sample loss, from the full Hessian of a flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    xs = torch.cat([x for x, _ in loader])
    ys = torch.cat([y for _, y in loader])

    def loss(flat):
        params, off = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.tensor(s).prod())
            params[n] = flat[off:off + k].view(s)
            off += k
        return nn.functional.cross_entropy(functional_call(model, params, (xs,)), ys)

    diag = torch.diagonal(torch.autograd.functional.hessian(loss, flat0))
    out, off = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.tensor(s).prod())
        out[n] = diag[off:off + k].view(s)
        off += k
    return out


def _rel_err(a, b):
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b)
    den = sum(float(b[n].pow(2).sum()) for n in b)
    return (num / den) ** 0.5


def test_exact_matches_the_full_hessian_with_unequal_batches():
    model = _mlp()
    loader = toy_loader(n=21, batch_size=8)  # batches of 8, 8, 5: weighting by batch size matters
    exact = hessian_diag(model, loader, method="exact")
    ref = _brute_force_diag(model, loader)
    for n in ref:
        torch.testing.assert_close(exact[n], ref[n], rtol=1e-4, atol=1e-6)


def test_ggn_equals_the_hessian_for_a_linear_model():
    model = _mlp(hidden=False)
    loader = toy_loader(n=20, batch_size=7)
    exact = hessian_diag(model, loader, method="exact")
    ggn = hessian_diag(model, loader, method="ggn_exact")
    for n in exact:
        torch.testing.assert_close(ggn[n], exact[n], rtol=1e-4, atol=1e-6)


def test_hutchinson_and_ggn_mc_converge():
    model = _mlp()
    loader = toy_loader(n=16, batch_size=16)
    exact = hessian_diag(model, loader, method="exact")
    hutch = hessian_diag(model, loader, method="hutchinson", probes=4000, seed=1)
    assert _rel_err(hutch, exact) < 0.15
    few = hessian_diag(model, loader, method="hutchinson", probes=5, seed=1)
    assert _rel_err(few, exact) > _rel_err(hutch, exact)
    ggn = hessian_diag(model, loader, method="ggn_exact")
    mc = hessian_diag(model, loader, method="ggn_mc", mc_samples=2000, seed=2)
    assert _rel_err(mc, ggn) < 0.1
    assert all((v >= 0).all() for v in ggn.values())  # the GGN is positive semi-definite


def test_bad_estimator_arguments():
    model, loader = _mlp(), toy_loader(n=8)
    with pytest.raises(ValueError, match="unknown Hessian-diagonal estimator"):
        hessian_diag(model, loader, method="kfac")
    with pytest.raises(ValueError, match="probe"):
        hessian_diag(model, loader, method="hutchinson", probes=0)
    with pytest.raises(ValueError, match="mc_samples"):
        hessian_diag(model, loader, method="ggn_mc", mc_samples=0)


def test_backpack_backend_agrees_with_torch_func():
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(40, 1, 6, 6)
    y = torch.randint(0, 3, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    before = [p.clone() for p in model.parameters()]
    ref = hessian_diag(model, loader, method="ggn_exact")
    bp = hessian_diag(model, loader, method="ggn_exact", backend="backpack")
    for n in ref:
        torch.testing.assert_close(bp[n], ref[n], rtol=1e-4, atol=1e-7)
    exact = hessian_diag(model, loader, method="exact")  # a ReLU net: the GGN diagonal is the Hessian diagonal
    for n in ref:
        torch.testing.assert_close(ref[n], exact[n], rtol=1e-4, atol=1e-7)
    mc = hessian_diag(model, loader, method="ggn_mc", mc_samples=400, backend="backpack", seed=3)
    assert _rel_err(mc, ref) < 0.15
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the caller's model is untouched
    assert not any(hasattr(m, "_backpack_extend") for m in model.modules())
    with pytest.raises(ValueError, match="backpack"):
        hessian_diag(model, loader, method="hutchinson", backend="backpack")
    with pytest.raises(ValueError, match="unknown backend"):
        hessian_diag(model, loader, method="ggn_mc", backend="jax")


@pytest.mark.parametrize("shared", [False, True])
def test_ggn_mc_with_one_sample_is_unbiased_through_the_module_local_pass(shared):
    """mc_samples=1 (SAPS's default) runs the module-local per-sample pass with each part's labels drawn from its
    output; a model that pass cannot serve (a layer used twice) takes the vmap route. Either way: the same draws
    as the vmap route on the CPU (same parts, same generator), and on average over seeds the exact GGN."""
    from excise.importance.common import squared_sample_grads
    from excise.tasks import ClassificationTask

    model = _mlp()
    if shared:
        lin = nn.Linear(36, 36)
        model = nn.Sequential(nn.Flatten(), lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(36, 3))
    loader = toy_loader(n=40, batch_size=16)
    task = ClassificationTask()
    one = hessian_diag(model, loader, method="ggn_mc", seed=4)
    gen = torch.Generator().manual_seed(4)
    by_vmap = squared_sample_grads(model, loader, task, lambda x, y, out: [(task.sample_targets(out, gen), None)],
                                   None, False, "v")
    for n in by_vmap:
        torch.testing.assert_close(one[n], by_vmap[n], rtol=1e-5, atol=1e-10)
    exact = hessian_diag(model, loader, method="ggn_exact")
    mean = {n: sum(hessian_diag(model, loader, method="ggn_mc", seed=s)[n] for s in range(300)) / 300 for n in exact}
    assert _rel_err(mean, exact) < 0.1
