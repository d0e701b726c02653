"""SSD, LFSSD and ASSD (excise.methods.ssd) on small synthetic models: what they edit, their α rules, the
paper's preset, label-free data, the API's errors."""

import math

import numpy as np
import pytest
import torch

from excise import UnlearningRequest, unlearn

from helpers import tiny_cnn, toy_loader




def test_ssd_leaves_unselected_entries_bit_identical_and_caller_untouched():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = UnlearningRequest(forget=toy_loader(n=16, seed=1), retain=toy_loader(seed=2))
    res = unlearn(model, req, "ssd", alpha=1.0)
    assert 0 < res.mask.count() < sum(p.numel() for p in model.parameters())
    after = dict(res.model.named_parameters())
    for name, p in model.named_parameters():
        m = res.mask[name]
        assert torch.equal(after[name][~m], p[~m])  # bit-identical outside the mask
        assert (after[name][m].abs() <= p[m].abs()).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert res.counters.params_touched == res.mask.count()
    assert res.seconds > 0 and set(res.timings) == {"importance_ref", "importance_forget", "select", "edit"}


def test_assd_alpha_formula_end_to_end():
    model = tiny_cnn()
    forget, retain = toy_loader(n=10, seed=1), toy_loader(n=90, seed=2)
    res = unlearn(model, UnlearningRequest(forget=forget, retain=retain), "assd", fisher_mode="batch")
    p = 100 - math.log(1 + 100 * 10 / 100)
    assert res.info["percentile"] == pytest.approx(p)
    from excise.importance import fisher

    i_f, i_r = fisher(model, forget), fisher(model, retain)
    ratios = torch.cat([(i_f[n] / i_r[n]).flatten() for n in i_f])
    ratios = ratios[torch.isfinite(ratios)].double().numpy()
    assert res.info["alpha"] == pytest.approx(np.percentile(ratios, p), rel=1e-5)
    assert res.mask.count() == pytest.approx((1 - p / 100) * len(ratios), abs=2)


def test_api_errors():
    model = tiny_cnn()
    req = UnlearningRequest(forget=toy_loader(n=8), retain=toy_loader())
    with pytest.raises(ValueError, match="unknown method"):
        unlearn(model, req, "nonexistent")
    with pytest.raises(ValueError, match="does not take"):
        unlearn(model, req, "ssd", alhpa=3)
    with pytest.raises(ValueError, match="no preset"):
        unlearn(model, req, "ssd", preset="nope")
    with pytest.raises(TypeError, match="nn.Module"):
        unlearn("model", req, "ssd")
    with pytest.raises(ValueError, match="forget"):
        UnlearningRequest(forget=None)
    with pytest.raises(ValueError, match="retain"):
        unlearn(model, UnlearningRequest(forget=toy_loader(n=8)), "assd")
    with pytest.raises(TypeError, match="labels"):
        unlearn(model, UnlearningRequest(forget=toy_loader(n=8, labels=False), retain=toy_loader(labels=False)), "ssd")


def test_paper_preset_is_available():
    from excise.methods import get_method

    spec = get_method("ssd")
    assert spec.presets["paper"] == {"alpha": 10.0, "lam": 1.0, "fisher_mode": "batch"}


def test_lfssd_runs_without_labels():
    model = tiny_cnn()
    req = UnlearningRequest(forget=toy_loader(n=16, seed=1, labels=False), retain=toy_loader(seed=2, labels=False))
    res = unlearn(model, req, "lfssd", alpha=1.0)
    assert res.mask.count() > 0
    assert not torch.equal(res.model[4].weight, model[4].weight)


def test_ssd_auto_alpha_uses_the_percentile_rule_on_d():
    model = tiny_cnn()
    forget, train = toy_loader(n=10, seed=1), toy_loader(n=100, seed=3)
    res = unlearn(model, UnlearningRequest(forget=forget, train=train), "ssd", alpha="auto")
    p = 100 - math.log(1 + 100 * 10 / 100)  # |D| = the reference D itself (it already holds D_f)
    assert res.info["percentile"] == pytest.approx(p)
    assert res.hparams["alpha"] == "auto" and res.info["alpha"] > 0
    with pytest.raises(ValueError, match="'auto'"):
        unlearn(model, UnlearningRequest(forget=forget, train=train), "ssd", alpha="big")
