"""The edits (excise.edit): projection, re-initialisation, the masked optimiser and SGD loop, dampening,
conjugate gradients."""

import itertools

import pytest
import torch
from torch import nn

from excise import Mask, Scope, Scores, selection
from excise.edit import dampen, masked_optimizer, project, project_one, reinit, solve_dual_qp, train_mode
from excise.edit.linalg import conjugate_gradient
from excise.importance import sensitivity
from excise.models import build_model

from helpers import Attending, tiny_cnn, toy_loader


def test_projection_removes_conflict_with_margin_and_minimum():
    g_o = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([-2.0, 1.0, 0.0])  # conflicts: <g, g_o> = -2
    out = project_one(g, g_o, margin=0.5)
    v = max(0.5, 2.0 / (1.0 + 1e-3))
    assert torch.allclose(out, g + v * g_o, atol=1e-6)
    # with ε > 0 the constraint holds up to a factor ε / (‖g_o‖² + ε)
    assert torch.dot(out, g_o) >= -2.0 * 1e-3 / (1 + 1e-3) - 1e-7
    exact = project_one(g, g_o, margin=0.0, eps=0.0)
    assert torch.dot(exact, g_o).abs() < 1e-6 and torch.allclose(exact, torch.tensor([0.0, 1.0, 0.0]))


def test_projection_uses_margin_when_the_coefficient_is_smaller():
    g_o = torch.tensor([10.0, 0.0])
    g = torch.tensor([-1.0, 3.0])  # unconstrained coefficient 1/100.001 < margin
    out = project_one(g, g_o, margin=0.5)
    assert torch.allclose(out, g + 0.5 * g_o)
    assert torch.dot(out, g_o) > 0


def test_projection_leaves_non_conflicting_gradients_alone():
    g_o = torch.tensor([1.0, 1.0])
    g = torch.tensor([1.0, -0.5])
    assert project_one(g, g_o) is g
    assert project(g, g_o.unsqueeze(0)) is g
    assert project(g, torch.stack([g_o, torch.tensor([0.0, 1.0])])) is not g  # second memory conflicts


def _brute_force_qp(P, q, lower):
    """Enumerate active sets of min ½vᵀPv + qᵀv s.t. v ≥ lower; return the feasible KKT point."""
    t = P.shape[0]
    best, best_val = None, float("inf")
    for active in itertools.product([False, True], repeat=t):
        v = torch.full((t,), lower, dtype=P.dtype)
        free = [i for i in range(t) if not active[i]]
        if free:
            fixed = [i for i in range(t) if active[i]]
            rhs = -q[free] - (P[free][:, fixed] @ v[fixed] if fixed else 0)
            v[free] = torch.linalg.solve(P[free][:, free], rhs)
        if (v >= lower - 1e-9).all():
            val = float(0.5 * v @ P @ v + q @ v)
            if val < best_val:
                best, best_val = v, val
    return best


def test_multi_memory_qp_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        G = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        P = G @ G.T + 1e-3 * torch.eye(3, dtype=torch.float64)
        q = G @ g
        for lower in (0.0, 0.5):
            v = solve_dual_qp(P, q, lower)
            assert torch.allclose(v, _brute_force_qp(P, q, lower), atol=1e-6)
    # margin 0: the projected gradient satisfies every constraint (up to ε) and is the closest such point
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([-1.0, -2.0, 3.0], dtype=torch.float64)
    out = project(g, G, margin=0.0, eps=0.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64), atol=1e-8)


# ---- reinit (Scissorhands' trim) ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "smallcnn", "resnet18"])
def test_trim_touches_exactly_the_selected_entries(arch):
    torch.manual_seed(0)
    model = build_model(arch, (1, 16, 16), 4, **({"width": 4} if arch == "resnet18" else {}))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 1, 16, 16),
                                                                        torch.randint(0, 4, (16,))), batch_size=8)
    s = sensitivity(model, loader)
    eligible = Scope.parse("no-norm").names(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in model.named_modules()
                   if any(f"{n}.{p}" in eligible for p in ("weight", "bias")))
    mask = selection.topk(s, 0.05, eligible)
    expected = round(0.05 * sum(s[n].numel() for n in eligible))
    assert mask.count() == expected
    out = reinit(model, mask, seed=1)
    changed = 0
    for n, p in model.named_parameters():
        q = dict(out.named_parameters())[n]
        m = mask.get(n, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(q[~m], p[~m]), n  # outside the mask: bit-identical (norm layers included)
        changed += int((q[m] != p[m]).sum())
    assert changed >= 0.9 * expected  # a fresh draw (zero biases may coincide with zero weights rarely)
    for k, v in model.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]) or k in mask


def test_reinit_bias_is_zero_and_weights_follow_the_layer_init():
    lin = nn.Linear(200, 50)
    mask = Mask({"weight": torch.ones(50, 200, dtype=torch.bool), "bias": torch.ones(50, dtype=torch.bool)})
    out = reinit(lin, mask, seed=3)
    assert torch.equal(out.bias, torch.zeros(50))
    bound = 1 / 200 ** 0.5  # PyTorch's default: kaiming_uniform(a=√5) → U(−1/√fan_in, 1/√fan_in)
    assert out.weight.abs().max() <= bound and out.weight.abs().max() > 0.9 * bound
    assert not torch.equal(out.weight, lin.weight)


# ---- masked optimiser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
                                         (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
                                         (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))])
def test_masked_optimizer_keeps_frozen_entries_bit_identical(opt_cls, kw):
    torch.manual_seed(0)
    model = tiny_cnn()
    gen = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters()})
    del mask["1.weight"]  # absent from the mask: frozen entirely
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = masked_optimizer(model, mask, opt_cls, **kw)
    loader = toy_loader(n=64, batch_size=16)
    for _ in range(5):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    moved = 0
    for n, p in model.named_parameters():
        m = mask.get(n, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~m], before[n][~m]), n
        moved += int((p[m] != before[n][m]).sum())
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert (v[~m] == 0).all(), (n, k)  # optimiser state of frozen entries never moved
    assert moved > 0.9 * mask.count()


def test_unmasked_optimizer_moves_weight_decay_on_zero_grad_entries():
    """The failure the masked optimiser prevents: plain gradient masking still lets weight decay move weights."""
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    model(torch.randn(3, 4)).sum().backward()
    model.weight.grad.zero_()
    opt.step()
    assert not torch.equal(model.weight, before)


def test_train_mode_norm_stats():
    model = tiny_cnn()
    train_mode(model, "freeze")
    assert model.training and not model[1].training
    train_mode(model, "update")
    assert model[1].training
    with pytest.raises(ValueError, match="update' or 'freeze"):
        train_mode(model, "sometimes")


# ---- conjugate gradients, dampening, the masked SGD loop ----------------------------------------------

def test_cg_matches_a_dense_solve():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    A = a @ a.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    x, iters, resid = conjugate_gradient(lambda v: A @ v, b, iters=100, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert iters <= 13 and resid < 1e-10
    with pytest.raises(ValueError, match="non-positive curvature"):
        conjugate_gradient(lambda v: -v, b)


def _two_param_model():
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        m.bias.copy_(torch.tensor([0.5, -0.5]))
    return m


def test_dampening_formula_on_a_hand_built_case():
    model = _two_param_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    i_f = Scores({"weight": torch.tensor([[4.0, 1.0], [8.0, 2.0]]), "bias": torch.tensor([5.0, 1.0])})
    i_d = Scores({"weight": torch.tensor([[1.0, 1.0], [0.5, 1.0]]), "bias": torch.tensor([1.0, 1.0])})
    mask = selection.ratio(i_f, i_d, alpha=1.5)  # weight[0,0] (4>1.5), weight[1,0] (8>0.75), weight[1,1] (2>1.5), bias[0]
    assert mask.count() == 4
    out = dampen(model, mask, i_f, i_d, lam=2.0)
    # factor = min(λ·I_D / I_f, 1): 2·1/4 = 0.5; 2·0.5/8 = 0.125; 2·1/2 = 1 (capped); 2·1/5 = 0.4
    expected_w = torch.tensor([[1.0 * 0.5, -2.0], [3.0 * 0.125, 4.0]])
    assert torch.equal(out.weight, expected_w)
    assert torch.equal(out.bias, torch.tensor([0.5 * 0.4, -0.5]))
    # the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_masked_sgd_moves_only_the_mask_and_guards_against_nan():
    from excise.edit import Schedule, masked_sgd
    from excise.tasks import get_task
    from excise.types import Counters

    task = get_task(None)
    model, loader = tiny_cnn(), toy_loader(n=40, batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = model[1].running_mean.clone()
    mask = Mask({"4.weight": torch.rand(model[4].weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3})
    counters = Counters()
    schedule = Schedule(lr=0.1, epochs=3, max_steps=7, momentum=0.9, weight_decay=5e-4, norm_stats="freeze")
    steps = masked_sgd(model, loader, lambda b, s, t: task.loss(model, b), schedule, task=task, mask=mask,
                       counters=counters, desc="t")
    assert steps == 7 and counters.forward_passes == 7 and counters.samples_seen == 7 * 8
    moved = model[4].weight.detach() != before["4.weight"]
    assert moved.any() and not (moved & ~mask["4.weight"]).any()  # frozen entries bit-identical
    for n, p in model.named_parameters():
        if n != "4.weight":
            assert torch.equal(p, before[n]), n
    assert torch.equal(model[1].running_mean, bn_before) and not model.training  # stats frozen, eval after
    with pytest.raises(FloatingPointError, match="step 0; try less"):
        masked_sgd(model, loader, lambda b, s, t: task.loss(model, b) * float("nan"), Schedule(lr=0.1), task=task,
                   desc="t", hint="try less")


def test_reinit_uses_each_modules_own_initialiser_and_zeroes_a_bare_parameter():
    from excise.edit import without_initialiser

    torch.manual_seed(0)
    model = Attending()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(5.0)  # "trained" values, far from any initialiser's
    assert without_initialiser(model) == ["pos"]
    mask = Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
                 for n, p in model.named_parameters()})
    out = reinit(model, mask, seed=0)
    for n, p in out.named_parameters():
        old, sel = model.get_parameter(n), mask[n]
        assert torch.equal(p[~sel], old[~sel]), n  # outside the mask: bit-identical
    assert torch.equal(out.pos[mask["pos"]], torch.zeros(int(mask["pos"].sum())))
    w = out.attn.in_proj_weight[mask["attn.in_proj_weight"]]  # MultiheadAttention's xavier_uniform draw
    assert w.abs().max() <= (6 / (8 + 24)) ** 0.5 and w.abs().max() > 0
    assert torch.equal(out.attn.in_proj_bias[mask["attn.in_proj_bias"]],
                       torch.zeros(int(mask["attn.in_proj_bias"].sum())))
