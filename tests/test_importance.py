import copy

import pytest
import torch
import torch.nn.functional as F

from excise import UnlearningRequest, unlearn
from excise.importance import ImportanceCache, fisher, label_free
from excise.types import Counters

from helpers import tiny_cnn, toy_loader


def _prime_bn(model, loader):
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    model.eval()


def test_batch_fisher_matches_hand_loop():
    model, loader = tiny_cnn(), toy_loader()
    _prime_bn(model, loader)
    model.train()  # importance must switch to eval itself and restore this afterwards
    scores = fisher(model, loader, mode="batch")
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # .grad fields left alone
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for x, y in loader:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad ** 2
    assert set(scores) == set(ref)  # BatchNorm weight/bias and biases included
    for n in ref:
        torch.testing.assert_close(scores[n], ref[n] / len(loader))


def test_per_sample_fisher_matches_loop_and_ignores_batching():
    model = tiny_cnn()
    _prime_bn(model, toy_loader())
    model.eval()
    a = fisher(model, toy_loader(batch_size=8), mode="per_sample")
    b = fisher(model, toy_loader(batch_size=13), mode="per_sample")
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y in toy_loader(batch_size=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad ** 2
        count += 1
    for n in ref:
        torch.testing.assert_close(a[n], ref[n] / count, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-7)


def test_label_free_needs_no_labels_and_matches_hand_loop():
    model = tiny_cnn()
    loader = toy_loader(labels=False)
    scores = label_free(model, loader, mode="batch")
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for (x,) in loader:
        model.zero_grad()
        model(x).pow(2).sum(1).mean().backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.abs()
    for n in ref:
        torch.testing.assert_close(scores[n], ref[n] / len(loader))


def test_frozen_parameters_are_not_scored():
    model = tiny_cnn()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in fisher(model, toy_loader())


def test_bad_mode_and_empty_loader():
    with pytest.raises(ValueError, match="mode"):
        fisher(tiny_cnn(), toy_loader(), mode="diag")
    with pytest.raises(ValueError, match="no batch"):
        fisher(tiny_cnn(), [])


def test_reference_importance_is_cached_and_invalidated(tmp_path):
    model = tiny_cnn()
    forget, retain, train = toy_loader(n=16, seed=1), toy_loader(n=40, seed=2), toy_loader(n=56, seed=3)
    req = UnlearningRequest(forget=forget, retain=retain, train=train)
    cache = ImportanceCache(root=tmp_path)
    r1 = unlearn(model, req, "ssd", importance_cache=cache)
    r2 = unlearn(model, req, "ssd", importance_cache=cache)
    assert r1.info["ref_importance_cache"] == "miss" and r2.info["ref_importance_cache"] == "hit"
    # the second request made no pass over D: only the forget batches were seen
    assert r1.counters.forward_passes == len(train) + len(forget)
    assert r2.counters.forward_passes == len(forget)
    assert r2.counters.importance_cache_hits == 1
    # a fresh cache object on the same folder serves it from disk
    r3 = unlearn(model, req, "ssd", importance_cache=ImportanceCache(root=tmp_path))
    assert r3.info["ref_importance_cache"] == "hit"
    torch.testing.assert_close(dict(r3.model.state_dict()), dict(r1.model.state_dict()))
    # changing the weights changes the key
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[4].bias.add_(0.01)
    r4 = unlearn(changed, req, "ssd", importance_cache=cache)
    assert r4.info["ref_importance_cache"] == "miss"
    # so does changing the data
    req2 = UnlearningRequest(forget=forget, retain=retain, train=toy_loader(n=56, seed=4))
    assert unlearn(model, req2, "ssd", importance_cache=cache).info["ref_importance_cache"] == "miss"


def test_unknown_data_is_not_cached():
    model = tiny_cnn()
    plain = [b for b in toy_loader()]  # a list of batches: content unknown to the cache
    req = UnlearningRequest(forget=toy_loader(n=8), train=plain)
    cache = ImportanceCache()
    assert unlearn(model, req, "ssd", importance_cache=cache).info["ref_importance_cache"] == "uncacheable"
    assert cache.hits == cache.misses == 0


def test_counters_count_batches_and_samples():
    c = Counters()
    fisher(tiny_cnn(), toy_loader(n=20, batch_size=8), counters=c)
    assert (c.forward_passes, c.backward_passes, c.samples_seen) == (3, 3, 20)
