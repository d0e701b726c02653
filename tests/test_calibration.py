"""Oracle-free calibration (excise.calibration): unlearn(..., calibrate=True) and method="auto"."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import excise.api as api
import excise.methods.registry as registry
from excise import UnlearningRequest, unlearn
from excise.calibration import CalibrationError, auc, good_enough
from excise.evaluation.accuracy import accuracy


def _digits_class(committed):
    from excise.data import ForgetSpec
    from excise.protocol import Setup
    from excise.training import TrainRecipe

    setup = Setup(dataset="digits", arch="mlp", recipe=TrainRecipe(epochs=40, batch_size=32), seed=0,
                  importance_batch=64, forget=ForgetSpec.parse("class:3"))
    prep = committed(setup)
    req = prep.request()
    return prep, UnlearningRequest(forget=req.forget, retain=req.retain, train=req.train, holdout=prep.loaders["val"])


def test_a_class_request_is_recognised_and_forgotten_within_the_utility_bound(committed):
    prep, req = _digits_class(committed)
    res = unlearn(prep.original, req, "ssd", calibrate=True)
    cal = res.info["calibration"]
    assert cal["intent"] == "class" and cal["classes"] == [3] and cal["knob"] == "alpha"
    assert good_enough(res), cal["why"]
    assert accuracy(res.model, req.forget) <= 2.0  # a model that never saw the class scores 0 on it
    assert accuracy(res.model, req.retain) >= accuracy(prep.original, req.retain) - 2.0
    for t in cal["trials"]:  # every trial with its criteria
        assert {"forget_acc", "retain_acc", "holdout_forgotten_acc", "holdout_other_acc"} <= set(t["metrics"])
        assert {"forget_score", "utility_loss", "feasible", "on_target"} <= set(t["judgement"])
    assert cal["trials"][0]["alpha"] == registry.get_method("ssd").defaults["alpha"]  # the default first


@pytest.mark.slow
def test_the_fmnist_cnn_is_calibrated_to_the_oracle(fmnist_small, committed):
    """On this model SSD leaves ≥ 6 % of the class recognised wherever it keeps retain accuracy within 4 points
    (test_ssd_real), so auto goes on to LFSSD, whose calibrated α forgets within 2 points: the oracle's result."""
    from excise.data import ForgetSpec
    from excise.protocol import Setup
    from excise.training import TrainRecipe

    setup = Setup(dataset="fmnist-small", arch="smallcnn", recipe=TrainRecipe(epochs=3),
                  forget=ForgetSpec.parse("class:9"), seed=0)
    prep = committed(setup, fmnist_small)
    req = prep.request()
    req = UnlearningRequest(forget=req.forget, retain=req.retain, train=req.train, holdout=prep.loaders["val"])
    res = unlearn(prep.original, req, "auto")
    assert res.info["auto"]["tried"][0] == "ssd"
    assert good_enough(res), res.info["calibration"]["why"]
    assert accuracy(res.model, req.forget) <= 2.0
    assert accuracy(res.model, prep.loaders["test"]) >= accuracy(prep.oracle, prep.loaders["test"]) - 3.0


def _memorised(seed):
    """A linear model that memorises each training sample through a code of its own (a one-hot input only that
    sample has, as a secret a model learns by heart) beside features shared by its class."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_tr, n_ho, d = 300, 400, 10
    y = torch.randint(0, 4, (n_tr + n_ho,), generator=g)
    feats = (torch.randn(4, d, generator=g) * 0.8)[y] + torch.randn(n_tr + n_ho, d, generator=g)
    codes = torch.zeros(n_tr + n_ho, n_tr)
    codes[torch.arange(n_tr), torch.arange(n_tr)] = 1.0
    x = torch.cat([feats, codes], 1)
    model = nn.Linear(d + n_tr, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n_tr]), y[:n_tr]).backward()
        opt.step()
    ds = TensorDataset(x, y)

    def loader(idx):
        return DataLoader(Subset(ds, list(idx)), batch_size=32)

    return model, UnlearningRequest(forget=loader(range(60)), retain=loader(range(60, n_tr)),
                                    train=loader(range(n_tr)), holdout=loader(range(n_tr, n_tr + n_ho)))


def _losses(model, loader):
    with torch.no_grad():
        return torch.cat([nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in loader])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sample_request_meets_the_holdout_target(seed):
    model, req = _memorised(seed)
    before = auc(_losses(model, req.forget), _losses(model, req.holdout))
    assert accuracy(model, req.forget) == 100.0 and before > 0.65  # memorised: the attack tells them apart
    res = unlearn(model, req, "ssd", calibrate=True)
    cal = res.info["calibration"]
    assert cal["intent"] == "sample"
    assert good_enough(res), cal["why"]
    after = auc(_losses(res.model, req.forget), _losses(res.model, req.holdout))
    assert abs(after - 0.5) < abs(before - 0.5) / 2
    assert accuracy(res.model, req.retain) >= accuracy(model, req.retain) - 2.0
    assert accuracy(res.model, req.holdout) >= accuracy(model, req.holdout) - 2.0


def test_an_original_that_already_looks_unseen_is_reported_as_such():
    """Forget samples the model never trained on look like held-out data: calibration says the original already
    meets the target (not "nothing was forgotten: lower alpha")."""
    import warnings

    from excise.checks import ExciseWarning

    model, req = _memorised(0)
    # the held-out samples themselves as the forget set: exactly as accurate as the holdout, AUC exactly 0.5
    unseen = UnlearningRequest(forget=req.holdout, retain=req.retain, holdout=req.holdout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = unlearn(model, unseen, "ssd", calibrate=True)
    cal = res.info["calibration"]
    assert cal["intent"] == "sample" and cal["original_judgement"]["on_target"], cal["original_judgement"]
    assert cal["why"].startswith("the original model already meets the forget target")
    for w in caught:  # a no-op or unmoved forget accuracy is explained, not blamed on alpha
        if issubclass(w.category, ExciseWarning) and w.category.__name__ in ("NothingChangedWarning",
                                                                             "NothingForgottenWarning"):
            assert "already meets the forget target" in str(w.message)
    from excise.checks import judge  # the messages themselves (pure), whatever the edit did on this machine

    probe = {"samples": 16, "acc_before": 90.0, "acc_after": 90.0, "top_share_before": 0.3, "top_share_after": 0.3}
    numbers = {"entries_changed": 0, "forget": probe, "retain": probe}
    plain, explained = judge("ssd", numbers, 0), judge("ssd", numbers, 0, original_on_target=True)
    assert [c for c, _ in plain] == [c for c, _ in explained] and len(plain) == 1
    assert "lower alpha" in plain[0][1] and "already meets the forget target" in explained[0][1]
    # the memorised forget set of the same model is not on target before the edit
    assert not unlearn(model, req, "ssd", calibrate={"trials": 1}).info["calibration"]["original_judgement"][
        "on_target"]


def test_a_sample_request_without_holdout_is_refused_before_any_work(monkeypatch):
    model, req = _memorised(0)
    runs = []
    monkeypatch.setattr(api, "_execute", lambda *a, **k: runs.append(1))
    no_holdout = UnlearningRequest(forget=req.forget, retain=req.retain, train=req.train)
    with pytest.raises(CalibrationError, match="holdout"):
        unlearn(model, no_holdout, "ssd", calibrate=True)
    with pytest.raises(ValueError, match="holdout"):  # CalibrationError is a ValueError
        unlearn(model, no_holdout, "auto")
    assert runs == []


@pytest.mark.parametrize("trials", [1, 3])
def test_the_trial_budget_is_respected(committed, monkeypatch, trials):
    prep, req = _digits_class(committed)
    runs = []
    real = api._execute
    monkeypatch.setattr(api, "_execute", lambda *a, **k: runs.append(1) or real(*a, **k))
    res = unlearn(prep.original, req, "lfssd", calibrate={"trials": trials})
    assert 1 <= len(runs) <= trials
    assert res.info["calibration"]["trials_run"] == len(runs) == len(res.info["calibration"]["trials"])


def test_auto_takes_the_cheapest_method_that_meets_the_targets(committed):
    prep, req = _digits_class(committed)
    res = unlearn(prep.original, req, "auto")
    assert res.info["auto"]["tried"][0] == "ssd" and res.method == res.info["auto"]["chosen"]
    assert good_enough(res)
    assert accuracy(res.model, req.forget) <= 2.0


def test_bad_calibration_requests_fail_before_any_work(committed, monkeypatch):
    prep, req = _digits_class(committed)
    runs = []
    monkeypatch.setattr(api, "_execute", lambda *a, **k: runs.append(1))
    with pytest.raises(ValueError, match="retrain: declares no strength"):
        unlearn(prep.original, req, "retrain", calibrate=True)
    with pytest.raises(ValueError, match="trials must be an integer"):
        unlearn(prep.original, req, "ssd", calibrate={"trials": 0})
    with pytest.raises(ValueError, match="unknown calibration options"):
        unlearn(prep.original, req, "ssd", calibrate={"budget": 3})
    with pytest.raises(ValueError, match="cannot start from alpha='auto'"):
        unlearn(prep.original, req, "ssd", calibrate=True, alpha="auto")
    with pytest.raises(ValueError, match="auto chooses each method's hyperparameters|pass none"):
        unlearn(prep.original, req, "auto", alpha=3.0)
    assert runs == []


def test_auc_is_the_rank_statistic():
    assert auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0])) == 1.0  # members: lower loss
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5  # ties


def test_evaluate_takes_the_users_own_loaders_and_an_optional_oracle(committed):
    import excise

    prep, req = _digits_class(committed)
    res = unlearn(prep.original, req, "ssd", calibrate=True)
    loaders = {"forget": req.forget, "retain": req.retain, "test": prep.loaders["test"],
               "test_retain": prep.loaders["test_retain"]}
    alone = excise.evaluate(res.model, loaders, original=prep.original)
    assert set(alone) == {"model", "original"} and alone["model"]["forget_acc"] <= 2.0
    assert alone["original"]["forget_acc"] > 90
    scored = excise.evaluate(res.model, loaders, oracle=prep.oracle, original=prep.original)
    assert scored["gaps"]["model"]["avg_gap"] < scored["gaps"]["original"]["avg_gap"]  # closer to retraining
    assert scored["gaps"]["model"]["avg_gap"] <= 3.0
    with pytest.raises(ValueError, match="missing: test"):
        excise.evaluate(res.model, {"forget": req.forget, "retain": req.retain})
    with pytest.raises(ValueError, match="your own data"):
        excise.evaluate(res.model, "mnist")


def test_the_search_stops_at_a_trial_that_is_clearly_on_target(committed, monkeypatch):
    prep, req = _digits_class(committed)
    runs = []
    real = api._execute
    monkeypatch.setattr(api, "_execute", lambda *a, **k: runs.append(1) or real(*a, **k))
    res = unlearn(prep.original, req, "assd", calibrate={"trials": 10})
    cal = res.info["calibration"]
    last = cal["trials"][-1]["judgement"]
    assert last["forget_score"] <= 0.5 and last["utility_loss"] <= cal["delta"] / 2 and last["feasible"]
    assert len(runs) == cal["trials_run"] < 10
    assert all(not (t["judgement"]["forget_score"] <= 0.5 and t["judgement"]["utility_loss"] <= cal["delta"] / 2
                    and t["judgement"]["feasible"]) for t in cal["trials"][:-1])


def test_a_trial_that_returns_weights_already_measured_is_not_evaluated_again(committed, monkeypatch):
    """A no-op edit (the original's weights every trial) costs no evaluation; the search still runs its budget
    and reports what it measured."""
    import copy

    import excise.calibration as cal
    from excise.methods.registry import get_method
    from excise.types import UnlearningResult

    prep, req = _digits_class(committed)
    spec = get_method("ssd")
    evaluator = cal.prepare(prep.original, req)
    measured = []
    real = evaluator._measure
    monkeypatch.setattr(evaluator, "_measure", lambda m: measured.append(1) or real(m))

    def no_op(hp):
        return UnlearningResult(model=copy.deepcopy(prep.original), method="ssd", hparams=hp)

    res = cal.calibrate(prep.original, req, spec, dict(spec.defaults), no_op, trials=4, evaluator=evaluator)
    info = res.info["calibration"]
    assert info["trials_run"] == 4 and info["evaluations"] == 0 and measured == []
    assert all(t["metrics"] == info["original"] for t in info["trials"])
    assert not good_enough(res)  # the class is still there: the no-op never meets the target


def test_a_calibration_that_misses_its_target_says_so(committed, monkeypatch):
    """A calibrated result whose best trial is off target is not silent: OffTargetWarning, in result.warnings; a
    result on target issues none."""
    import copy
    import warnings

    from excise.checks import OffTargetWarning, off_target
    from excise.types import UnlearningResult

    prep, req = _digits_class(committed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good = unlearn(prep.original, req, "ssd", calibrate=True)
    assert good_enough(good) and not any(issubclass(w.category, OffTargetWarning) for w in caught)
    assert "OffTargetWarning" not in [w["warning"] for w in good.warnings]

    monkeypatch.setattr(api, "_execute", lambda spec, model, *a, **k: UnlearningResult(
        model=copy.deepcopy(model), method=spec.name, hparams=a[-1]))  # an edit that never forgets the class
    with pytest.warns(OffTargetWarning, match="no trial met the forget target"):
        res = unlearn(prep.original, req, "ssd", calibrate={"trials": 2})
    assert not good_enough(res) and "OffTargetWarning" in [w["warning"] for w in res.warnings]
    with pytest.warns(OffTargetWarning, match="method='auto' tried ssd, lfssd"):
        unlearn(prep.original, req, "auto")
    # the message of a result that broke the utility bound (pure)
    cal = {"knob": "lr", "delta": 2.0, "trials_run": 3, "winner": 1,
           "trials": [{"trial": 1, "judgement": {"feasible": False, "on_target": True, "collapsed": False,
                                                 "utility_loss": 7.5, "forget_error": 0.0, "forget_score": 0.0}}]}
    (cls, msg), = off_target("salun", cal)
    assert cls is OffTargetWarning and "every trial broke the utility bound" in msg and "7.5 points" in msg
    assert off_target("ssd", {}) == []
