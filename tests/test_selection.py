"""Selection (excise.selection): the ratio and percentile rules, scopes, top-k; Mask and Scores I/O."""

import numpy as np
import pytest
import torch

from excise import Scope, Scores, Mask, UnlearningRequest, unlearn
from excise import selection

from helpers import tiny_cnn, toy_loader




def test_ratio_selection_is_strict():
    i_f = Scores({"w": torch.tensor([1.0, 10.0, 30.0, 0.0])})
    i_d = Scores({"w": torch.tensor([1.0, 1.0, 1.0, 0.0])})
    assert selection.ratio(i_f, i_d, 10)["w"].tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="alpha"):
        selection.ratio(i_f, i_d, 0)
    with pytest.raises(ValueError, match="different parameters"):
        selection.ratio(i_f, Scores({"v": torch.ones(4)}), 1)


def test_ratio_percentile_is_assd_alpha():
    i_f = Scores({"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0])})
    i_r = Scores({"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([1.0, 0.5])})
    # finite ratios: 1, 2, 4, 10 (3/0 left out)
    assert selection.ratio_percentile(i_f, i_r, 50) == pytest.approx(np.percentile([1, 2, 4, 10], 50))
    assert selection.ratio_percentile(i_f, i_r, 100) == pytest.approx(10.0)


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
