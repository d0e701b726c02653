"""SSD, LFSSD and ASSD on a small CNN trained on real Fashion-MNIST images."""

import math

import pytest
import torch

from excise import unlearn
from excise.data import ForgetSpec
from excise.evaluation.summary import basic_metrics
from excise.protocol import Setup, prepare
from excise.training import CheckpointCache, TrainRecipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def class_forget(fmnist_small, tmp_path_factory):
    setup = Setup(dataset="fmnist-small", arch="smallcnn", recipe=TrainRecipe(epochs=3),
                  forget=ForgetSpec.parse("class:9"), seed=0)
    cache = CheckpointCache(tmp_path_factory.mktemp("ckpt"))
    return prepare(setup, cache=cache, progress=False, datasets=fmnist_small)


def _metrics(prep, model):
    L = prep.loaders
    return basic_metrics(model, L["forget"], L["retain"], L["test"], test_forget=L["test_forget"])


def test_original_learned_and_oracle_never_saw_the_class(class_forget):
    orig, oracle = _metrics(class_forget, class_forget.original), _metrics(class_forget, class_forget.oracle)
    assert orig["forget_acc"] > 85 and orig["TA"] > 75
    assert oracle["forget_acc"] < 5


# Measured on this 8k-image model over training seeds 0–3 on one machine (models differ across CPUs, so the
# test must hold for all of them): LFSSD's default α = 7 forgets and keeps retain accuracy on 4/4 seeds; SSD's
# default α = 50 (measured on the 60k-image protocols) forgets on 4/4 but costs ~10 points of retain accuracy on
# 2/4, α = 100 passes on 4/4; ASSD's automatic α forgets on 0/4 (see test_assd_on_a_small_model below).
# On another machine (2026-11-25, seed 0) the same code at α = 100 left 12.1 % of the class's train samples
# recognised (test samples: 6.9 %; α = 80–120 gave 8.5–12.1 %, α = 150 none forgotten: 95 %), so the train-side
# bound is 15 %: far below the original's ~96 %, which is what tells a forgetting SSD from one that selects nothing.
@pytest.mark.parametrize("method,hparams", [("ssd", {"alpha": 100.0}), ("lfssd", {})])
def test_class_forgetting_reaches_the_oracle_and_keeps_utility(class_forget, method, hparams):
    prep = class_forget
    orig = _metrics(prep, prep.original)
    before = {k: v.clone() for k, v in prep.original.state_dict().items()}
    res = unlearn(prep.original, prep.request(), method, **hparams)
    after = _metrics(prep, res.model)
    # forgetting: forget accuracy falls from ~90 % to near the oracle's (~0 %), on train and test samples of the class
    assert after["forget_acc"] < 15, after
    assert after["test_forget_acc"] < 10, after
    # utility: retain accuracy within a few points of the original; test accuracy loses at most the
    # forgotten class's share (10 %) plus a few points
    assert after["RA"] > orig["RA"] - 6, (orig, after)
    assert after["TA"] > orig["TA"] - 10 - 6, (orig, after)
    # the original model is not modified
    for k, v in prep.original.state_dict().items():
        assert torch.equal(v, before[k])


def test_assd_on_a_small_model_leaves_utility_and_the_original_alone(class_forget):
    """ASSD's α (the p = 100 − ln(1 + 100·|D_f|/|D|) percentile of I_f / I_retain) under-forgets this 8k-image
    model (forget accuracy 59–97 % over four training seeds; on the 60k protocol it forgets: ssd.md). What holds
    on every model: α is the stated percentile, the dampened share is about 100 − p %, utility is kept."""
    prep = class_forget
    orig = _metrics(prep, prep.original)
    before = {k: v.clone() for k, v in prep.original.state_dict().items()}
    res = unlearn(prep.original, prep.request(), "assd")
    n_f, n = len(prep.splits.forget), len(prep.splits.train)
    p = 100 - math.log(1 + 100 * n_f / n)
    assert res.info["percentile"] == pytest.approx(p)
    assert res.info["alpha"] > 1.0
    assert 0.3 * (100 - p) < 100 * res.info["selected_fraction"] < 1.5 * (100 - p)
    after = _metrics(prep, res.model)
    assert after["RA"] > orig["RA"] - 6 and after["forget_acc"] <= orig["forget_acc"] + 1
    for k, v in prep.original.state_dict().items():
        assert torch.equal(v, before[k])


def test_paper_preset_differs_from_default(class_forget):
    prep = class_forget
    paper = unlearn(prep.original, prep.request(), "ssd", preset="paper")
    ours = unlearn(prep.original, prep.request(), "ssd")
    assert paper.hparams["alpha"] == 10.0
    assert paper.mask.count() != ours.mask.count()
