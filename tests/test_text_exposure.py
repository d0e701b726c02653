import math

import numpy as np
import pytest
import torch
from torch import nn

from excise.data.text import Vocab, load_text, make_canary_corpus
from excise.evaluation.exposure import (canary_exposure, exposure_exact, exposure_skewnorm, log_perplexity,
                                        perplexity)
from excise.importance import hessian_diag
from excise.models import build_model
from excise.tasks import LanguageModelTask


def test_exposure_exact_ranks():
    scores = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0]
    assert exposure_exact(scores, 1.0) == pytest.approx(3.0)  # rank 1 of 8
    assert exposure_exact(scores, 4.0) == pytest.approx(math.log2(8) - math.log2(4))
    assert exposure_exact(scores, 8.0) == pytest.approx(0.0)


def test_exposure_skewnorm_agrees_with_enumeration_in_the_bulk():
    rng = np.random.default_rng(0)
    pop = rng.normal(10, 2, 200_000)
    canary = 6.0  # about 2.3 % of candidates score lower
    exact = exposure_exact(np.append(pop, canary), canary)
    est = exposure_skewnorm(rng.choice(pop, 5000), canary)
    assert abs(est - exact) < 0.3


class _Lookup(nn.Module):
    """Logits at each position depend only on the current character: log p(next = c) = log w_c (+ const)."""

    def __init__(self, vocab, weights):
        super().__init__()
        w = torch.full((len(vocab),), 1e-6)
        for c, v in weights.items():
            w[vocab.index[c]] = v
        self.logits = nn.Parameter(torch.log(w / w.sum()))

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


def test_canary_exposure_on_a_hand_made_model():
    vocab = Vocab("my pin is 0123456789")
    weights = {str(d): float(d + 1) for d in range(10)}  # '9' most likely, '0' least
    model = _Lookup(vocab, weights)
    top = canary_exposure(model, vocab, "pin ", "99")
    assert top["method"] == "exact" and top["candidates"] == 100
    assert top["exposure"] == pytest.approx(math.log2(100))  # rank 1
    worst = canary_exposure(model, vocab, "pin ", "00")
    assert worst["exposure"] == pytest.approx(0.0)
    # '98' and '89' tie at rank 2; rank = 1 + #strictly more likely = 2
    assert canary_exposure(model, vocab, "pin ", "98")["exposure"] == pytest.approx(math.log2(100) - 1)
    lp = log_perplexity(model, vocab, ["pin 99", "pin 00"])
    assert lp[1] - lp[0] == pytest.approx(2 * (math.log(10) - math.log(1)), rel=1e-4)
    with pytest.raises(ValueError, match="alphabet"):
        canary_exposure(model, vocab, "pin ", "x9")


def test_canary_corpus_windows():
    text = load_text()[:20_000]
    c = make_canary_corpus(text, canary="my pin is 4716", copies=5, length=32, stride=16)
    assert len(c.forget) >= 5 and not set(c.forget) & set(c.retain)
    assert len(c.forget) + len(c.retain) == len(c.train)
    for k, i in enumerate(c.forget):
        x, _ = c.train[i]
        fx, _ = c.corrected[k]
        assert "4716" not in c.vocab.decode(fx) and "pin is" not in c.vocab.decode(fx)
    assert any("my pin is 4716"[:8] in c.vocab.decode(c.train[i][0]) for i in c.forget)
    assert all("4716" not in c.vocab.decode(c.train[i][0]) for i in c.retain)


def test_language_model_task_and_curvature():
    vocab = Vocab("abc ")
    model = build_model("char_lstm", (8,), len(vocab), embed=4, hidden=8)
    x = torch.randint(0, 4, (6, 8))
    y = torch.randint(0, 4, (6, 8))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    task = LanguageModelTask()
    assert task.loss(model, (x, y), reduction="none").shape == (6,)
    h = hessian_diag(model, loader, task, method="ggn_mc", mc_samples=2)
    assert set(h) == {n for n, _ in model.named_parameters()} and all((v >= 0).all() for v in h.values())
    with pytest.raises(ValueError, match="ggn_mc"):
        hessian_diag(model, loader, task, method="ggn_exact")
    assert perplexity(model, loader) > 1.0


def test_canary_protocol_end_to_end(tmp_path):
    from excise import unlearn
    from excise.protocol import CanarySetup, prepare_canary
    from excise.training import CheckpointCache, TrainRecipe

    setup = CanarySetup(text_chars=12_000, secret="47", copies=4, length=32, stride=16,
                        arch_kwargs={"embed": 8, "hidden": 16},
                        recipe=TrainRecipe(epochs=1, lr=3e-3, optimizer="adam", weight_decay=0.0, batch_size=32))
    cache = CheckpointCache(tmp_path)
    prep = prepare_canary(setup, cache=cache, progress=False)
    c = prep.corpus
    assert len(c.corrected) == len(c.forget) >= 4
    # the oracle's data (retain ∪ Z̃) never contains the canary; the original's does
    assert all("my pin is 47" not in c.vocab.decode(c.train[i][0]) for i in c.retain)
    assert all("my pin is 47" not in c.vocab.decode(c.corrected[k][0]) for k in range(len(c.corrected)))
    m = prep.metrics(prep.original)
    assert set(m) == {"exposure", "canary_log_perplexity", "heldout_ppl", "corrected_ppl"}
    assert 0.0 <= m["exposure"] <= math.log2(100) and m["heldout_ppl"] > 1.0
    again = prepare_canary(setup, cache=cache, progress=False)  # the second call loads from the cache
    assert cache.hits == 2 and torch.equal(next(again.original.parameters()), next(prep.original.parameters()))
    before = {k: v.clone() for k, v in prep.original.state_dict().items()}
    res = unlearn(prep.original, prep.request(), "saps", k=0.05, update="second_order", cg_iters=3,
                 curvature_samples=64, cg_samples=64)
    assert res.info["cg_iterations"] >= 1 and 0 < res.info["selected_fraction"] <= 0.06
    changed = sum(int((p != before[n]).sum()) for n, p in res.model.named_parameters())
    assert 0 < changed <= res.mask.count()
    assert all(torch.equal(v, before[k]) for k, v in prep.original.state_dict().items())
    with pytest.raises(ValueError, match="alphabet"):
        prepare_canary(CanarySetup(secret="4x"), cache=cache, progress=False)
