import json
import math

import numpy as np
import pytest
import torch

from excise.evaluation.agreement import js_divergence, kl_divergence, prediction_agreement
from excise.evaluation.evaluate import gaps
from excise.evaluation.mia import (features, mia_loss_cv_scores, mia_lr_entropy_scores, mia_svc_scores,
                                   modified_entropy)
from excise.evaluation.report import Report


def test_svc_attack_separable_and_identical():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.uniform(0.9, 1.0, 400), rng.uniform(0.0, 0.1, 300)
    # targets that look like members are never called non-member; like non-members, always
    assert mia_svc_scores(members, nonmembers, rng.uniform(0.9, 1.0, 50))["value"] == 0.0
    assert mia_svc_scores(members, nonmembers, rng.uniform(0.0, 0.1, 50))["value"] == 100.0
    # members are subsampled to the number of non-members (the attack's definition), and the row says so
    assert mia_svc_scores(members, nonmembers, members[:5])["members_used"] == 300
    same = mia_svc_scores(rng.uniform(size=2000), rng.uniform(size=2000), rng.uniform(size=2000))["value"]
    assert 20 < same < 80


def test_svc_attack_on_a_grid_merges_ties_exactly():
    rng = np.random.default_rng(3)
    # overlapping, confidence-like features already on a 1e-3 grid: rounding is a no-op, so only the merging
    # of equal points into weighted ones differs from the plain fit, and the SVM is the same
    members = np.round(1 - rng.exponential(0.05, 1500).clip(0, 1), 3)
    nonmembers = np.round(1 - rng.exponential(0.08, 1500).clip(0, 1), 3)
    targets = np.linspace(0, 1, 2001)
    exact = mia_svc_scores(members, nonmembers, targets)["value"]
    assert 1 < exact < 99  # a boundary inside the grid, so the comparison means something
    assert mia_svc_scores(members, nonmembers, targets, resolution=1e-3)["value"] == pytest.approx(exact, abs=0.1)
    # on raw (unrounded) features the 1e-4 grid moves each point by at most 5e-5: same decisions
    raw_m, raw_n = 1 - rng.exponential(0.05, 1500).clip(0, 1), 1 - rng.exponential(0.08, 1500).clip(0, 1)
    assert mia_svc_scores(raw_m, raw_n, targets, resolution=1e-4)["value"] == pytest.approx(
        mia_svc_scores(raw_m, raw_n, targets)["value"], abs=0.1)
    with pytest.raises(ValueError, match="resolution"):
        mia_svc_scores(members, nonmembers, targets, resolution=0)


def test_lr_entropy_attack_separable_and_identical():
    rng = np.random.default_rng(1)
    m, n = rng.uniform(0, 0.1, 500), rng.uniform(1.0, 2.0, 500)
    assert mia_lr_entropy_scores(m, n, rng.uniform(0, 0.1, 100)) == 1.0
    assert mia_lr_entropy_scores(m, n, rng.uniform(1.0, 2.0, 100)) == 0.0
    same = mia_lr_entropy_scores(rng.normal(size=3000), rng.normal(size=3000), rng.normal(size=3000))
    assert 0.2 < same < 0.8


def test_loss_cv_attack():
    rng = np.random.default_rng(2)
    assert mia_loss_cv_scores(rng.uniform(0, 0.1, 200), rng.uniform(1, 2, 500))["value"] == 1.0
    res = mia_loss_cv_scores(rng.normal(size=2000), rng.normal(size=800))
    assert abs(res["value"] - 0.5) < 0.06 and res["per_class"] == 800
    with pytest.raises(ValueError, match="at least"):
        mia_loss_cv_scores(np.ones(3), np.ones(100))


def test_modified_entropy_hand_value():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    y = torch.tensor([0])
    expected = -(1 - 0.7) * math.log(0.7) - (0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    assert modified_entropy(p, y).item() == pytest.approx(expected, rel=1e-6)
    y1 = torch.tensor([1])
    expected1 = -(1 - 0.2) * math.log(0.2) - (0.7 * math.log(0.3) + 0.1 * math.log(0.9))
    assert features(p, y1, "modified_entropy")[0] == pytest.approx(expected1, rel=1e-6)
    with pytest.raises(ValueError, match="unknown attack feature"):
        features(p, y, "vibes")


def test_agreement_and_divergences():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    q = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    assert prediction_agreement(p, q) == 50.0
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    kl = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    kl2 = 0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3)
    assert kl_divergence(p, q) == pytest.approx((kl + kl2) / 2)
    assert 0 < js_divergence(p, q) <= math.log(2)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))


def test_avg_gap_on_a_hand_made_pair():
    oracle = {"UA": 100.0, "RA": 92.0, "TA": 81.0, "mia_svc_confidence": 60.0}
    row = {"UA": 96.0, "RA": 90.0, "TA": 80.0, "mia_svc_confidence": 40.0}
    g = gaps(row, oracle)
    assert g["gap_UA"] == 4.0 and g["gap_mia_svc_confidence"] == 20.0
    assert g["avg_gap"] == pytest.approx((4 + 2 + 1 + 20) / 4)


def _report(seed_rows, protocol=None):
    rep = Report(protocol or {"dataset": "x", "seeds": [0, 1]})
    for method, seed, m, s in seed_rows:
        rep.add(method, seed, m, seconds=s)
    return rep.finalize()


def test_report_summary_gaps_round_trip_and_refusal(tmp_path):
    base = {"UA": 100.0, "RA": 90.0, "TA": 80.0, "mia_svc_confidence": 50.0}
    rows = [("retrain", 0, base, 100.0), ("retrain", 1, base, 120.0),
            ("ssd", 0, {**base, "UA": 90.0}, 2.0), ("ssd", 1, {**base, "UA": 94.0}, 3.0)]
    rep = _report(rows)
    ssd = [r for r in rep.rows if r["method"] == "ssd"]
    assert [r["avg_gap"] for r in ssd] == [2.5, 1.5]
    assert [r["speedup"] for r in ssd] == [50.0, 40.0]
    mean, std, n = rep.summary()["ssd"]["UA"]
    assert (mean, n) == (92.0, 2) and std == pytest.approx(math.sqrt(8))
    md = rep.to_markdown()
    assert "| ssd | 92.00 ± 2.83" in md and "45×" in md
    files = rep.save(tmp_path, plots=True)
    back = Report.load(files["json"])
    assert back.rows == json.loads(json.dumps(rep.rows)) and back.protocol_hash == rep.protocol_hash
    assert "method,seed,UA" in (tmp_path / "report.csv").read_text().splitlines()[0]
    other = _report(rows, protocol={"dataset": "y", "seeds": [0, 1]})
    with pytest.raises(ValueError, match="different protocols"):
        rep.merge(other)
    assert len(rep.merge(back).rows) == 8
    d = json.loads(files["json"].read_text())
    d["protocol"]["dataset"] = "tampered"
    files["json"].write_text(json.dumps(d))
    with pytest.raises(ValueError, match="does not match"):
        Report.load(files["json"])


def test_relearn_probe_trains_a_copy_and_records_the_curve():
    from excise.evaluation import accuracy
    from excise.evaluation.relearn import relearn_probe

    from helpers import tiny_cnn, toy_loader

    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = toy_loader(n=24, batch_size=8)
    curve = relearn_probe(model, loader, lambda m: accuracy(m, loader), checkpoints=(0, 30), lr=0.05)
    assert [c["step"] for c in curve] == [0, 30]
    assert curve[1]["value"] > curve[0]["value"]  # fitting the probe data raises accuracy on it
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="checkpoints"):
        relearn_probe(model, loader, lambda m: 0.0, checkpoints=())


def test_predict_refuses_a_model_whose_outputs_overflow():
    from excise.evaluation.accuracy import accuracy, predict

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.ones(6, 1, 2, 2)
    x[:2] = 0.0  # the first two samples see only the bias
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long)),
                                         batch_size=4)
    assert predict(model, loader)[0].shape == (6, 3)
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # finite (float32 max ≈ 3.4e38), but 4 of them summed overflow to inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(FloatingPointError, match="not finite on 4 of 6 samples"):
        predict(model, loader)
    with pytest.raises(FloatingPointError):
        accuracy(model, loader)


def test_plot_labels_of_coinciding_points_do_not_overlap(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.text import Text

    from excise.evaluation.plots import _place_labels

    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2], "o")
    _place_labels(ax, [("salun", 1.5, 1.5), ("random_labels", 1.5, 1.5), ("neggrad_plus", 1.5, 1.5)])
    offsets = [a.xyann for a in ax.texts]
    assert len(offsets) == 3 and len(set(offsets)) == 3  # three different places around the one point
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text alone, without a leader line
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(3) for j in range(i + 1, 3))
    plt.close(fig)


def test_plot_labels_side_by_side_keep_a_space_between_them(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from excise.evaluation.plots import _place_labels

    fig, ax = plt.subplots()
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    fig.canvas.draw()
    scale = 72.0 / fig.dpi
    probe = ax.text(0, 0, "first_label", fontsize=7)
    w = probe.get_window_extent(fig.canvas.get_renderer()).width * scale
    probe.remove()
    # B's first choice (right of B, a little above) starts exactly where A's label ends, 1.5 points lower
    ax_pt = ax.transData.transform((50, 50)) * scale
    bx, by = ax.transData.inverted().transform((ax_pt + [w, -1.5]) / scale)
    _place_labels(ax, [("first_label", 50, 50), ("second", bx, by)])
    fig.canvas.draw()
    a, b = (t.get_window_extent() for t in ax.texts)
    apart_x = max(b.x0 - a.x1, a.x0 - b.x1) * scale
    apart_y = max(b.y0 - a.y1, a.y0 - b.y1) * scale
    assert max(apart_x, apart_y) >= 1.0  # not touching: "saps" ran into "l1_sparse" before
    plt.close(fig)


def test_plot_labels_stay_inside_the_axes_near_an_edge(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from excise.evaluation.plots import _place_labels

    fig, ax = plt.subplots()
    ax.plot([0, 10], [0, 10], "o")
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    _place_labels(ax, [("a_rather_long_label", 9.9, 5.0), ("top", 5.0, 9.95)])
    fig.canvas.draw()
    inner = ax.get_window_extent()
    for t in ax.texts:  # the right-edge label goes left of its point, the top one below
        b = t.get_window_extent()
        assert inner.x0 <= b.x0 and b.x1 <= inner.x1 and inner.y0 <= b.y0 and b.y1 <= inner.y1, t.get_text()
    plt.close(fig)


def test_plot_labels_keep_off_other_markers_and_the_legend(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.text import Text

    from excise.evaluation.plots import _place_labels

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    # B sits where A's first choice (right of A, a little above) would put A's label; C sits under the legend's
    # corner-right spot; a crowd around D pushes one label out to a leader line
    pts = [("label_a", 3.0, 5.0), ("b", 3.6, 5.15), ("c", 8.0, 8.6), ("d1", 5.0, 2.0), ("d2", 5.0, 2.0),
           ("d3", 5.0, 2.0), ("d4", 5.0, 2.0), ("d5", 5.0, 2.0), ("d6", 5.0, 2.0), ("d7", 5.0, 2.0),
           ("d8", 5.0, 2.0), ("d9", 5.0, 2.0)]
    for _, x, y in pts:
        ax.plot([x], [y], "o", label="points" if _ == "b" else None)
    ax.legend(loc="upper right")
    _place_labels(ax, pts)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    texts = {t.get_text(): t for t in ax.texts}
    for name, x, y in pts:
        box = Text.get_window_extent(texts[name])  # the text alone, without a leader line
        assert not box.overlaps(legend), name
        for other, ox, oy in pts:
            if (ox, oy) != (x, y):
                px, py = ax.transData.transform((ox, oy))
                assert not box.contains(px, py), (name, other)
    boxes = [Text.get_window_extent(t) for t in ax.texts]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes)))
    assert any(texts[f"d{i}"].arrow_patch is not None for i in range(1, 10))  # the crowd needed a leader line
    assert texts["label_a"].arrow_patch is None  # a label that fits next to its point gets none
    plt.close(fig)


def test_class_forgetting_uses_salun_roles_for_ta_and_the_svc_attack():
    """With the other classes' test samples (test_retain), TA is their accuracy and they are the SVC attack's
    non-members: the forgotten class's test samples, which sit where the forget set does, are left out."""
    from excise.evaluation.evaluate import metrics_from_predictions

    g = torch.Generator().manual_seed(0)

    def probs(n, label, conf):
        p = torch.full((n, 3), (1 - conf) / 2)
        p[:, label] = conf
        return p + 1e-3 * torch.rand(n, 3, generator=g)

    # the model forgot class 2 on its training samples (confidence 0.2) and also on its test samples
    forget = (probs(60, 2, 0.2), torch.full((60,), 2))
    retain = (torch.cat([probs(60, 0, 0.99), probs(60, 1, 0.99)]), torch.cat([torch.zeros(60), torch.ones(60)]).long())
    test_retain = (torch.cat([probs(30, 0, 0.9), probs(30, 1, 0.9)]), torch.cat([torch.zeros(30), torch.ones(30)]).long())
    test_forget = (probs(30, 2, 0.2), torch.full((30,), 2))
    test = (torch.cat([test_retain[0], test_forget[0]]), torch.cat([test_retain[1], test_forget[1]]))
    preds = {"forget": forget, "retain": retain, "test": test, "test_forget": test_forget}
    full = metrics_from_predictions(preds)
    roles = metrics_from_predictions({**preds, "test_retain": test_retain})
    assert roles["TA"] == pytest.approx(100.0) and roles["TA_all"] == pytest.approx(full["TA"])
    assert full["TA"] < 70  # the whole test set counts the forgotten class's test samples as errors
    # non-members = the other classes' test samples (confident): the forget set (unconfident) looks unseen
    assert roles["mia_svc_confidence"] == pytest.approx(100.0)
    assert "TA_all" not in full


def test_tuner_validation_drops_the_forgotten_class_on_class_requests(committed):
    from excise.data import ForgetSpec
    from excise.protocol import Setup
    from excise.training import TrainRecipe
    from excise.tuning import _validation_loaders

    setup = Setup(dataset="digits", arch="mlp", recipe=TrainRecipe(epochs=40, batch_size=32),
                  forget=ForgetSpec.parse("class:3"), seed=0, importance_batch=64)
    prep = committed(setup)
    val = _validation_loaders(prep, 0)["val"]
    labels = torch.cat([y for _, y in val])
    full = torch.cat([y for _, y in prep.loaders["val"]])
    assert (full == 3).any() and not (labels == 3).any() and len(labels) == int((full != 3).sum())


def test_outputs_without_gradients_run_in_parts_on_the_cpu_with_the_same_values():
    """Task.output: eval mode, no gradient, CPU, more than CPU_PART samples → parts; else the batch whole."""
    from torch import nn

    from excise.tasks import CPU_PART, ClassificationTask

    class Seen(nn.Module):
        def __init__(self, out=None):
            super().__init__()
            self.lin, self.sizes, self.out = nn.Linear(5, 3), [], out

        def forward(self, x):
            self.sizes.append(len(x))
            return self.lin(x) if self.out is None else self.out

    torch.manual_seed(0)
    x = torch.randn(2 * CPU_PART + 7, 5)
    task, model = ClassificationTask(), Seen().eval()
    with torch.no_grad():
        parted = task.output(model, (x, None))
        assert model.sizes == [CPU_PART, CPU_PART, 7]
        torch.testing.assert_close(parted, model.lin(x))
    model.sizes.clear()
    task.output(model, (x, None))  # with gradients: whole (training keeps its batch, e.g. BatchNorm statistics)
    model.train()
    with torch.no_grad():
        task.output(model, (x, None))  # train mode: whole
    assert model.sizes == [len(x), len(x)]
    odd = Seen(out=torch.zeros(())).eval()  # not one output row per sample: the batch runs whole after all
    with torch.no_grad():
        task.output(odd, (x, None))
    assert odd.sizes == [CPU_PART, len(x)]
