import itertools

import pytest
import torch
from torch import nn

from excise import UnlearningRequest, unlearn
from excise.importance import sensitivity

from helpers import tiny_cnn, toy_loader


def test_sensitivity_is_abs_weight_times_summed_abs_gradient():
    model, loader = tiny_cnn(), toy_loader(batch_size=8)
    s = sensitivity(model, loader, n_batches=2)
    model.eval()
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in itertools.islice(loader, 2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.abs()
    for n, p in model.named_parameters():
        torch.testing.assert_close(s[n], p.detach().abs() * ref[n])


def test_scissorhands_runs_and_counts():
    model = tiny_cnn()
    req = UnlearningRequest(forget=toy_loader(n=16, seed=1), retain=toy_loader(n=48, seed=2))
    res = unlearn(model, req, "scissorhands", k=0.1, epochs=2, batch_size=8)
    assert res.mask.count() == round(0.1 * sum(p.numel() for n, p in model.named_parameters() if n in res.mask))
    assert "1.weight" not in res.mask  # BatchNorm excluded by the default scope
    assert set(res.timings) >= {"importance_forget", "select", "edit", "repair"}
    assert res.info["projections"] >= 0 and res.counters.backward_passes > 0
    with pytest.raises(ValueError, match="retain"):
        unlearn(model, UnlearningRequest(forget=toy_loader(n=8)), "scissorhands")


def test_the_repair_can_use_adam_and_only_sgd_or_adam():
    model = tiny_cnn()
    req = UnlearningRequest(forget=toy_loader(n=16, seed=1), retain=toy_loader(n=48, seed=2))
    sgd = unlearn(model, req, "scissorhands", k=0.1, batch_size=8, checks=False)
    adam = unlearn(model, req, "scissorhands", k=0.1, batch_size=8, optimizer="adam", lr=1e-3, checks=False)
    assert torch.equal(sgd.mask["0.weight"], adam.mask["0.weight"])  # the same trim
    assert any(not torch.equal(p, q) for p, q in zip(sgd.model.parameters(), adam.model.parameters()))
    assert adam.hparams["optimizer"] == "adam" and sgd.hparams["optimizer"] == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        unlearn(model, req, "scissorhands", optimizer="rmsprop")
