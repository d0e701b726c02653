"""SSD, LFSSD and ASSD on a small CNN trained on real Fashion-MNIST images."""

import math

import pytest
import torch

from excise import unlearn
from excise.data import ForgetSpec
from excise.evaluation.summary import basic_metrics
from excise.protocol import Setup
from excise.training import TrainRecipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def class_forget(fmnist_small, committed):
    """The 8k-image model and its oracle from the committed checkpoints: trained bits differ across CPUs and
    thread counts, and these assertions are about what SSD does to one fixed model."""
    setup = Setup(dataset="fmnist-small", arch="smallcnn", recipe=TrainRecipe(epochs=3),
                  forget=ForgetSpec.parse("class:9"), seed=0)
    return committed(setup, fmnist_small)


def _metrics(prep, model):
    L = prep.loaders
    return basic_metrics(model, L["forget"], L["retain"], L["test"], test_forget=L["test_forget"])


def test_original_learned_and_oracle_never_saw_the_class(class_forget):
    orig, oracle = _metrics(class_forget, class_forget.original), _metrics(class_forget, class_forget.oracle)
    assert orig["forget_acc"] > 85 and orig["TA"] > 75
    assert oracle["forget_acc"] < 5


# The committed model (tests/fixtures) fixes the bits; what is left to vary across CPUs is the summation order
# of the importance passes, which moves only entries whose ratio I_f / I_D lies within float rounding of α.
# SSD's forgetting on this model is not monotone in α. Default estimator (fisher_mode="subset"), measured at 1 and
# 2 threads: α = 30–75 forget (1–15 % left) at a cost of 9–11 points of retain accuracy, α = 100–150 forget (6–10 %
# left) within 4 points, α = 200 leaves 15 %: the test takes α = 130, the middle of that plateau. LFSSD forgets
# (0 %) within 4 points for α = 25–60: its default α = 40. The paper's batch estimator: α = 60–63 and 77–120 leave
# 7–15 % of the class recognised, α = 66–74 and 125–140 leave ≤ 0.7 %: α = 130, the middle of a plateau.
@pytest.mark.parametrize("method,hparams", [("ssd", {"alpha": 130.0}), ("ssd", {"alpha": 130.0, "fisher_mode": "batch"}),
                                            ("lfssd", {})])
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
