"""Scissorhands on a small CNN trained on real Fashion-MNIST images."""

import pytest

from excise import unlearn
from excise.data import ForgetSpec
from excise.evaluation.summary import basic_metrics
from excise.protocol import Setup
from excise.training import TrainRecipe

pytestmark = pytest.mark.slow


def _prepare(fmnist_small, committed, spec):
    """The original and the oracle from the committed checkpoints (tests/fixtures): the same bits on every CPU."""
    setup = Setup(dataset="fmnist-small", arch="smallcnn", recipe=TrainRecipe(epochs=3), forget=ForgetSpec.parse(spec))
    return committed(setup, fmnist_small)


def _m(prep, model):
    L = prep.loaders
    return basic_metrics(model, L["forget"], L["retain"], L["test"])


def test_full_class(fmnist_small, committed):
    prep = _prepare(fmnist_small, committed, "class:9")
    orig, oracle = _m(prep, prep.original), _m(prep, prep.oracle)
    res = unlearn(prep.original, prep.request(), "scissorhands", epochs=2)
    after = _m(prep, res.model)
    assert orig["forget_acc"] > 85 and oracle["forget_acc"] < 5
    assert after["forget_acc"] < 10, after
    assert after["RA"] > orig["RA"] - 8 and after["TA"] > orig["TA"] - 10 - 8, (orig, after)
    assert res.info["repair_steps"] > 0


def test_random_ten_percent(fmnist_small, committed):
    prep = _prepare(fmnist_small, committed, "random:0.1")
    orig, oracle = _m(prep, prep.original), _m(prep, prep.oracle)
    res = unlearn(prep.original, prep.request(), "scissorhands", epochs=2)
    after = _m(prep, res.model)
    # the original fits its training data better than the oracle fits unseen forget samples
    assert orig["forget_acc"] > oracle["forget_acc"]
    # forgetting moves forget accuracy down toward (or past) the oracle's, test accuracy stays close
    assert after["forget_acc"] < orig["forget_acc"], (orig, after, oracle)
    assert abs(after["forget_acc"] - oracle["forget_acc"]) < abs(orig["forget_acc"] - oracle["forget_acc"]) + 3
    assert after["TA"] > orig["TA"] - 4, (orig, after)
