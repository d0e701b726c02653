import math

import numpy as np
import pytest
import torch
from torch import nn

from excise import Scope, Scores, Mask, UnlearningRequest, unlearn
from excise import selection
from excise.edit import dampen

from helpers import tiny_cnn, toy_loader


def _two_param_model():
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        m.bias.copy_(torch.tensor([0.5, -0.5]))
    return m


def test_ratio_selection_is_strict():
    i_f = Scores({"w": torch.tensor([1.0, 10.0, 30.0, 0.0])})
    i_d = Scores({"w": torch.tensor([1.0, 1.0, 1.0, 0.0])})
    assert selection.ratio(i_f, i_d, 10)["w"].tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="alpha"):
        selection.ratio(i_f, i_d, 0)
    with pytest.raises(ValueError, match="different parameters"):
        selection.ratio(i_f, Scores({"v": torch.ones(4)}), 1)


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


def test_ratio_percentile_is_assd_alpha():
    i_f = Scores({"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0])})
    i_r = Scores({"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([1.0, 0.5])})
    # finite ratios: 1, 2, 4, 10 (3/0 left out)
    assert selection.ratio_percentile(i_f, i_r, 50) == pytest.approx(np.percentile([1, 2, 4, 10], 50))
    assert selection.ratio_percentile(i_f, i_r, 100) == pytest.approx(10.0)


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


def test_scope_by_module_type_and_pattern():
    model = tiny_cnn()
    assert Scope().names(model) == {"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"}
    assert Scope.parse("no-norm").names(model) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert Scope.parse("weights").names(model) == {"0.weight", "4.weight"}
    assert Scope(include_types=("linear",)).names(model) == {"4.weight", "4.bias"}
    assert Scope.parse(r"pattern:^0\.").names(model) == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="no eligible"):
        Scope.parse("pattern:nothing-matches").names(model)
    with pytest.raises(ValueError, match="alias"):
        Scope(include_types=("lstm",)).names(model)
    req = UnlearningRequest(forget=toy_loader(n=16, seed=1), retain=toy_loader(seed=2))
    res = unlearn(model, req, "ssd", alpha=0.5, scope="no-norm")
    assert set(res.mask) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert torch.equal(res.model[1].weight, model[1].weight)


def test_topk_and_percentile():
    s = Scores({"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([4.0, 2.0])})
    m = selection.topk(s, 0.4)
    assert m["a"].tolist() == [True, False, False] and m["b"].tolist() == [True, False]
    assert selection.topk(s, 0.4, largest=False)["a"].tolist() == [False, True, False]
    assert selection.percentile(s, 50)["a"].tolist() == [True, False, False]


def test_mask_and_scores_save_load(tmp_path):
    m = Mask({"x": torch.tensor([True, False])})
    m.save(tmp_path / "m.safetensors")
    assert torch.equal(Mask.load(tmp_path / "m.safetensors")["x"], m["x"])
    s = Scores({"x": torch.tensor([1.5, 2.0])})
    s.save(tmp_path / "s.safetensors")
    assert torch.equal(Scores.load(tmp_path / "s.safetensors")["x"], s["x"])


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
