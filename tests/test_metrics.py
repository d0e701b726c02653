"""The metric registry (excise.evaluation.metrics): built-in metrics on synthetic predictions with known answers,
and a metric added from a test file reaching evaluation, gaps and the bench's rows."""

import pytest
import torch

from excise.evaluation import metrics as M
from excise.evaluation.evaluate import gaps, metrics_from_predictions


def _onehot(pred, classes=3, conf=0.8):
    p = torch.full((len(pred), classes), (1 - conf) / (classes - 1))
    p[torch.arange(len(pred)), torch.tensor(pred)] = conf
    return p


def _preds():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1] * 2)
    right = _onehot(y.tolist())
    half = _onehot([0, 1, 2, 0, 2, 0, 1, 2] * 2)  # half right: class 0 2/3, class 1 1/3, class 2 1/2
    return {"forget": (half, y), "retain": (right, y), "test": (half, y), "val": (right[:4], y[:4])}


@pytest.fixture()
def registry(monkeypatch):
    """A private copy of the registry: what a test registers is gone afterwards."""
    monkeypatch.setattr(M, "_METRICS", dict(M._METRICS))
    return M


def test_builtin_metrics_have_their_closed_form_values():
    out = metrics_from_predictions(_preds())
    assert out["forget_acc"] == 50.0 and out["UA"] == 50.0 and out["RA"] == 100.0 and out["TA"] == 50.0
    assert out["VA"] == 100.0 and "TA_all" not in out and "corrected_acc" not in out
    assert out["per_class_test_acc"] == pytest.approx([200.0 / 3, 100.0 / 3, 50.0])
    assert 0.0 <= out["mia_svc_confidence"] <= 100.0 and out["mia_svc_members_used"] <= 16


def test_test_retain_takes_ta_and_the_whole_test_set_is_ta_all():
    p = _preds()
    p["test_retain"] = p["retain"]
    out = metrics_from_predictions(p)
    assert out["TA"] == 100.0 and out["TA_all"] == 50.0


def test_agreement_needs_the_oracle_and_is_perfect_against_itself():
    p = _preds()
    assert "agree_forget" not in metrics_from_predictions(p)
    out = metrics_from_predictions(p, oracle_preds=p)
    assert out["agree_forget"] == out["agree_test"] == 100.0
    assert out["kl_forget"] == pytest.approx(0.0, abs=1e-12) and out["js_test"] == pytest.approx(0.0, abs=1e-12)


def test_naming_a_metric_whose_splits_are_missing_is_an_error_unless_skipped():
    p = M.Predictions({"forget": _preds()["forget"]})
    with pytest.raises(ValueError, match="needs the splits"):
        M.compute(p, ["RA"])
    assert M.compute(p, ["UA", "RA"], skip_missing=True) == {"UA": 50.0}
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute(p, ["nope"])


def test_a_metric_is_one_function_and_one_registration(registry):
    @registry.register_metric("mean_confidence_forget", needs=("forget",), direction="lower = more forgotten")
    def mean_confidence_forget(p):
        probs, labels = p.preds["forget"]
        return 100.0 * float(probs.gather(1, labels.view(-1, 1)).mean())

    p = _preds()
    out = metrics_from_predictions(p)
    assert out["mean_confidence_forget"] == pytest.approx(45.0)
    oracle = dict(p, forget=p["retain"])
    g = gaps(out, metrics_from_predictions(oracle))
    assert g["gap_mean_confidence_forget"] == pytest.approx(80.0 - 45.0)
    assert "mean_confidence_forget" in registry.describe() and "mean_confidence_forget" in registry.metric_names()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_metric("UA", needs=("forget",), direction="x")(lambda p: 0.0)


def test_avg_gap_is_over_the_registry_s_avg_gap_metrics():
    assert M.avg_gap_metrics() == ("UA", "RA", "TA", "mia_svc_confidence")
    from excise.evaluation.report import TABLE_COLUMNS

    assert [t for _, t in TABLE_COLUMNS[:4]] == ["UA", "RA", "TA", "MIA (svc)"]


def test_the_bench_recomputes_cached_rows_when_a_metric_is_added(registry, tmp_path):
    from excise.bench import run_bench

    from test_bench import TINY

    proto = tmp_path / "tiny.toml"
    proto.write_text(TINY)
    first = run_bench(str(proto), methods=["assd"], seeds=1, progress=False)
    again = run_bench(str(proto), methods=["assd"], seeds=1, progress=False)
    assert all(r["from_cache"] for r in again.rows)

    @registry.register_metric("forget_size", needs=("forget",), direction="samples in D_f", gap=False)
    def forget_size(p):
        return int(len(p.preds["forget"][1]))

    third = run_bench(str(proto), methods=["assd"], seeds=1, progress=False)
    assert not any(r["from_cache"] for r in third.rows)
    assert all(r["forget_size"] > 0 for r in third.rows if not r.get("diverged"))
    assert [r["UA"] for r in third.rows] == [r["UA"] for r in first.rows]
