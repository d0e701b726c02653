"""Baselines on a small MLP trained on scikit-learn's digits, forgetting one class."""

import math

import pytest
import torch

from excise import unlearn
from excise.data import ForgetSpec
from excise.evaluation import accuracy
from excise.protocol import Setup
from excise.training import TrainRecipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_class(committed):
    """The digits MLP and its oracle from the committed checkpoints (tests/fixtures): the same bits on every CPU."""
    setup = Setup(dataset="digits", arch="mlp", recipe=TrainRecipe(epochs=40, batch_size=32),
                  forget=ForgetSpec.parse("class:3"), seed=0, importance_batch=64)
    return committed(setup)


def _acc(prep, model):
    L = prep.loaders
    return {"forget": accuracy(model, L["forget"]), "test": accuracy(model, L["test"]),
            "test_forget": accuracy(model, L["test_forget"])}


# hyperparameters sized for ~1,300 8×8 images (the defaults are sized for Fashion-MNIST)
CASES = {
    "finetune": dict(epochs=10, batch_size=32, lr=0.1),
    "neggrad": dict(lr=0.01, epochs=10, max_steps=20, batch_size=32),
    "neggrad_plus": dict(epochs=3, batch_size=32, beta=0.95, lr=0.01),
    "random_labels": dict(epochs=3, batch_size=32),
    "salun": dict(epochs=3, batch_size=32),
    "l1_sparse": dict(epochs=10, batch_size=32, lr=0.05, alpha=1e-3),
    "bad_teacher": dict(batch_size=32),
    "scrub": dict(batch_size=32, epochs=4, max_epochs=2, max_lr=0.1),  # a clipped max-step (norm 1) on 130 samples
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_baseline_forgets_without_collapsing(digits_class, method):
    prep = digits_class
    before = _acc(prep, prep.original)
    res = unlearn(prep.original, prep.request(), method, **CASES[method])
    after = _acc(prep, res.model)
    assert before["forget"] > 90
    assert after["forget"] < before["forget"] - 20, (before, after)
    assert after["test"] > before["test"] - 25, (before, after)
    assert res.info["steps"] > 0 and res.seconds > 0


def test_salun_freezes_non_salient_weights_with_momentum_and_weight_decay(digits_class):
    prep = digits_class
    res = unlearn(prep.original, prep.request(), "salun", k=0.3, epochs=2, batch_size=32, weight_decay=5e-3,
                  momentum=0.9)
    assert 0.25 < res.info["selected_fraction"] < 0.35
    orig = dict(prep.original.named_parameters())
    moved = 0
    for n, p in res.model.named_parameters():
        m = res.mask[n]
        assert torch.equal(p[~m], orig[n][~m]), n  # bit-identical outside the mask
        moved += int((p[m] != orig[n][m]).sum())
    assert moved > 0


def test_baselines_are_deterministic_under_a_seed(digits_class):
    prep = digits_class
    a = unlearn(prep.original, prep.request(), "random_labels", epochs=1, batch_size=32, seed=3)
    b = unlearn(prep.original, prep.request(), "random_labels", epochs=1, batch_size=32, seed=3)
    c = unlearn(prep.original, prep.request(), "random_labels", epochs=1, batch_size=32, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in r.model.parameters()]) for r in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_a_seeded_method_does_not_depend_on_the_callers_random_state():
    """Dropout draws from the global generator while a method trains: the method's seed fixes it, whatever the
    caller drew before, and the caller's generator is left as it was."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from excise import UnlearningRequest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    req = UnlearningRequest(forget=DataLoader(TensorDataset(x[:12], y[:12]), batch_size=8),
                            retain=DataLoader(TensorDataset(x[12:], y[12:]), batch_size=8))
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        res = unlearn(model, req, "neggrad_plus", checks=False)
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(torch.cat([p.flatten() for p in res.model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    other = unlearn(model, req, "neggrad_plus", seed=1, checks=False)
    assert not torch.equal(runs[0], torch.cat([p.flatten() for p in other.model.parameters()]))


def test_neggrad_counts_its_work_in_steps_passing_over_the_forget_set_as_often_as_needed(digits_class):
    prep = digits_class
    req = prep.request()
    per_pass = math.ceil(len(req.forget.dataset) / 32)
    long = unlearn(prep.original, req, "neggrad", lr=1e-4, max_steps=2 * per_pass + 3, batch_size=32)
    assert long.info["steps"] == 2 * per_pass + 3  # more than one pass: it loops
    short = unlearn(prep.original, req, "neggrad", lr=1e-4, max_steps=2, batch_size=32)
    assert short.info["steps"] == 2
    by_epochs = unlearn(prep.original, req, "neggrad", lr=1e-4, max_steps=None, epochs=2, batch_size=32)
    assert by_epochs.info["steps"] == 2 * per_pass
    with pytest.raises(ValueError, match="max_steps"):
        unlearn(prep.original, req, "neggrad", max_steps=0)


def test_baseline_errors(digits_class):
    prep = digits_class
    req = prep.request()
    with pytest.raises(ValueError, match="beta"):
        unlearn(prep.original, req, "neggrad_plus", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        unlearn(prep.original, req, "l1_sparse", alpha=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        unlearn(prep.original, req, "bad_teacher", temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        unlearn(prep.original, req, "scrub", temperature=-1.0)
    with pytest.raises(FloatingPointError, match="neggrad"):
        unlearn(prep.original, req, "neggrad", lr=1e6, epochs=20, max_steps=50)
    from excise import UnlearningRequest
    with pytest.raises(ValueError, match="retain"):
        unlearn(prep.original, UnlearningRequest(forget=req.forget), "finetune")


def test_retrain_method_never_sees_the_forget_set(digits_class):
    prep = digits_class
    res = unlearn(prep.original, prep.request(), "retrain", epochs=40, batch_size=32)
    after = _acc(prep, res.model)
    oracle = _acc(prep, prep.oracle)
    assert after["forget"] < 5 and oracle["forget"] < 5  # a class it never saw is never predicted
    assert abs(after["test"] - oracle["test"]) < 5
    assert res.info["steps"] == 40 * math.ceil(len(prep.splits.retain) / 32)


def test_scrub_clip_bounds_the_max_steps(digits_class):
    """The max-step ascends an unbounded KL: without the clip a large max-step lr reaches NaN (a
    FloatingPointError), with the default clip (gradient norm 1) the same lr stays finite and forgets."""
    prep = digits_class
    hp = dict(batch_size=32, epochs=4, max_epochs=2, max_lr=1.0)
    with pytest.raises(FloatingPointError, match="scrub"):
        unlearn(prep.original, prep.request(), "scrub", max_clip=None, **hp)
    res = unlearn(prep.original, prep.request(), "scrub", **hp)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert _acc(prep, res.model)["forget"] < 10
