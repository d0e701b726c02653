"""Benchmark: Hessian-diagonal estimators — accuracy against the exact diagonal, and cost.

Regenerate benchmarks/results/saps_estimators.json (read into benchmarks/results/saps.md) with

    .venv/bin/python benchmarks/saps_estimators.py --out benchmarks/results/saps_estimators.json

Optional: BackPACK (``pip install backpack-for-pytorch unfoldNd einconv``) adds its DiagGGNExact /
DiagGGNMC / DiagHessian rows; without it those rows are skipped and the file says so.

Three measurements, all at trained weights, all on real data:
1. a tiny ReLU CNN (SmallCNN at channels 4/8, hidden 16; 6.6k parameters) on 1,000 Fashion-MNIST images, where
   the exact diagonal (one double-backward per parameter) is affordable;
2. a tiny character LSTM (4.5k parameters; tanh/sigmoid gates, so the network has curvature of its own) on
   200 windows of Python's pydoc text;
3. cost on the default SmallCNN (0.42 M parameters) over 10,000 images, in seconds and in multiples of a
   per-sample squared-gradient Fisher pass; its reference is ``ggn_exact``, which part 1 shows equals the
   exact diagonal for a ReLU network (each weight enters a piecewise-linear network linearly, so the
   network's own second derivative along a single coordinate vanishes).
Errors are ‖ĥ − h‖₂ / ‖h‖₂ over all parameters; "top-1 % overlap" is the fraction of the exact top-1 % entries
that the estimate also puts in its top 1 % (what SAPS's selection depends on).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from excise import selection
from excise.data import load_fashion_mnist
from excise.data.text import Vocab, TextWindows, load_text
from excise.importance import fisher, hessian_diag
from excise.models import build_model
from excise.tasks import ClassificationTask, LanguageModelTask
from excise.training import TrainRecipe, train
from excise.types import Scores


def rel_err(est, ref) -> float:
    num = sum(float((est[n].float() - ref[n].float()).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].float().pow(2).sum()) for n in ref)
    return (num / den) ** 0.5


def overlap(est, ref, k=0.01) -> float:
    a, b = selection.topk(Scores(est), k), selection.topk(Scores(ref), k)
    inter = sum(int((a[n] & b[n]).sum()) for n in b)
    return inter / max(1, b.count())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def backpack_diag(model, loader, task, ext_name):
    """Σ over batches of BackPACK's per-batch diagonal (loss summed), divided by N. Works on a deep copy: BackPACK
    hooks the modules it extends."""
    from backpack import backpack, extend
    from backpack import extensions as E

    ext = {"DiagGGNExact": E.DiagGGNExact, "DiagGGNMC": E.DiagGGNMC, "DiagHessian": E.DiagHessian}[ext_name]()
    attr = {"DiagGGNExact": "diag_ggn_exact", "DiagGGNMC": "diag_ggn_mc", "DiagHessian": "diag_h"}[ext_name]
    m = extend(copy.deepcopy(model).eval(), use_converter=True)
    lossf = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in m.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    total = 0
    for x, y in loader:
        m.zero_grad()
        with backpack(ext):
            lossf(m(x), y).backward()
        for a, p in zip(acc, params):
            a.add_(getattr(p, attr))
        total += len(x)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: a / total for n, a in zip(names, acc)}


def backpack_rows(rows, net, model, loader, task, ref, t_fisher, exts):
    for ext in exts:
        try:
            est, t = timed(lambda: backpack_diag(model, loader, task, ext))
        except NotImplementedError as e:  # BackPACK lacks a module extension: record it, as a user would meet it
            rows.append(dict(net=net, estimator=f"BackPACK {ext}", options={}, rel_err=None, top1_overlap=None,
                             seconds=None, x_fisher=None, error=str(e).split(" for ")[-1]))
        else:
            rows.append(dict(net=net, estimator=f"BackPACK {ext}", options={}, rel_err=rel_err(est, ref),
                             top1_overlap=overlap(est, ref), seconds=t, x_fisher=t / t_fisher))
        print(rows[-1], flush=True)


def tiny_cnn_part(rows, use_backpack):
    tr = load_fashion_mnist("train")
    task = ClassificationTask()
    torch.manual_seed(0)
    model = build_model("smallcnn", tr.input_shape, tr.num_classes, channels=(4, 8), hidden=16)
    fit = DataLoader(Subset(tr, range(5000)), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    train(model, fit, TrainRecipe(epochs=2), seed=0, progress=False)
    loader = DataLoader(Subset(tr, range(1000)), batch_size=250)
    n_params = sum(p.numel() for p in model.parameters())
    exact, t_exact = timed(lambda: hessian_diag(model, loader, task, "exact"))
    _, t_fisher = timed(lambda: fisher(model, loader, task, mode="per_sample"))
    ests = [("exact", {}), ("ggn_exact", {}), ("ggn_mc", dict(mc_samples=1)), ("ggn_mc", dict(mc_samples=10)),
            ("hutchinson", dict(probes=10)), ("hutchinson", dict(probes=100))]
    for name, kw in ests:
        est, t = (exact, t_exact) if name == "exact" else timed(lambda: hessian_diag(model, loader, task, name, **kw))
        rows.append(dict(net=f"tiny ReLU CNN ({n_params} params, 1,000 images)", estimator=name, options=kw,
                         rel_err=rel_err(est, exact), top1_overlap=overlap(est, exact), seconds=t,
                         x_fisher=t / t_fisher))
        print(rows[-1], flush=True)
    if use_backpack:
        backpack_rows(rows, f"tiny ReLU CNN ({n_params} params, 1,000 images)", model, loader, task, exact, t_fisher,
                      ("DiagHessian", "DiagGGNExact", "DiagGGNMC"))


def tiny_lstm_part(rows):
    text = load_text()[:60_000]
    vocab = Vocab(text)
    ids = vocab.encode(text)
    task = LanguageModelTask()
    windows = TextWindows(ids, list(range(0, len(ids) - 33, 32)), 32, "bench-lstm")
    torch.manual_seed(0)
    model = build_model("char_lstm", (32,), len(vocab), embed=8, hidden=16)
    fit = DataLoader(windows, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    train(model, fit, TrainRecipe(epochs=3, lr=0.01, optimizer="adam"), seed=0, progress=False, task=task)
    loader = DataLoader(Subset(windows, range(200)), batch_size=100)
    n_params = sum(p.numel() for p in model.parameters())
    exact, t_exact = timed(lambda: hessian_diag(model, loader, task, "exact"))
    _, t_fisher = timed(lambda: fisher(model, loader, task, mode="per_sample"))
    for name, kw in [("exact", {}), ("ggn_mc", dict(mc_samples=1)), ("ggn_mc", dict(mc_samples=10)),
                     ("hutchinson", dict(probes=10)), ("hutchinson", dict(probes=100))]:
        est, t = (exact, t_exact) if name == "exact" else timed(lambda: hessian_diag(model, loader, task, name, **kw))
        rows.append(dict(net=f"tiny char-LSTM ({n_params} params, 200 windows × 32 chars)", estimator=name,
                         options=kw, rel_err=rel_err(est, exact), top1_overlap=overlap(est, exact), seconds=t,
                         x_fisher=t / t_fisher))
        print(rows[-1], flush=True)


def smallcnn_cost_part(rows, use_backpack):
    tr = load_fashion_mnist("train")
    task = ClassificationTask()
    torch.manual_seed(0)
    model = build_model("smallcnn", tr.input_shape, tr.num_classes)
    fit = DataLoader(Subset(tr, range(20000)), batch_size=128, shuffle=True,
                     generator=torch.Generator().manual_seed(0))
    train(model, fit, TrainRecipe(epochs=1), seed=0, progress=False)
    loader = DataLoader(Subset(tr, range(10000)), batch_size=256)
    n_params = sum(p.numel() for p in model.parameters())
    _, t_fisher = timed(lambda: fisher(model, loader, task, mode="per_sample"))
    ref, t_ref = timed(lambda: hessian_diag(model, loader, task, "ggn_exact"))
    net = f"SmallCNN ({n_params} params, 10,000 images; reference ggn_exact)"
    rows.append(dict(net=net, estimator="fisher (per-sample, true labels)", options={}, rel_err=None,
                     top1_overlap=None, seconds=t_fisher, x_fisher=1.0))
    rows.append(dict(net=net, estimator="ggn_exact", options={}, rel_err=0.0, top1_overlap=1.0, seconds=t_ref,
                     x_fisher=t_ref / t_fisher))
    for name, kw in [("ggn_mc", dict(mc_samples=1)), ("hutchinson", dict(probes=10))]:
        est, t = timed(lambda: hessian_diag(model, loader, task, name, **kw))
        rows.append(dict(net=net, estimator=name, options=kw, rel_err=rel_err(est, ref),
                         top1_overlap=overlap(est, ref), seconds=t, x_fisher=t / t_fisher))
        print(rows[-1], flush=True)
    if use_backpack:
        backpack_rows(rows, net, model, loader, task, ref, t_fisher, ("DiagGGNExact", "DiagGGNMC"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/saps_estimators.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        import backpack  # noqa: F401
        use_backpack = True
    except ImportError:
        use_backpack = False
    rows = []
    tiny_cnn_part(rows, use_backpack)
    tiny_lstm_part(rows)
    smallcnn_cost_part(rows, use_backpack)
    meta = dict(command="python benchmarks/saps_estimators.py --out " + args.out, torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), backpack=use_backpack)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
