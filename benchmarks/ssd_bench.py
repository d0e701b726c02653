"""Benchmark: SSD / LFSSD / ASSD against retraining on the shipped Fashion-MNIST protocols.

Regenerate benchmarks/results/ssd.md with (about an hour on 2 CPU cores, most of it ResNet-18 training;
trained models and importances are cached under $EXCISE_CACHE or ~/.cache/excise):

    .venv/bin/python benchmarks/ssd_bench.py --out benchmarks/results/ssd.md

Every number is one seed (0). Seconds are wall time of the unlearning step alone (importance + selection +
dampening; evaluation excluded); the retrain row is the oracle's training time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from excise import unlearn
from excise.data import ForgetSpec
from excise.evaluation.summary import basic_metrics
from excise.importance import ImportanceCache
from excise.methods import get_method
from excise.protocol import Setup, prepare
from excise.training import TrainRecipe

PROTOCOLS = {"full class (Ankle boot)": "class:9", "sub-class (Shirt, coarse labels)": "subclass:Shirt",
             "10 % random": "random:0.1"}
RUNS = [("ssd", None), ("ssd", "paper"), ("lfssd", None), ("assd", None)]


def fmt(x):
    return "—" if x is None else f"{x:.1f}"


def run(arch: str, epochs: int, spec: str, width: int):
    setup = Setup(dataset="fashion-mnist-coarse" if spec.startswith("subclass") else "fashion-mnist", arch=arch,
                  arch_kwargs={"width": width} if arch == "resnet18" else {}, recipe=TrainRecipe(epochs=epochs),
                  forget=ForgetSpec.parse(spec), seed=0)
    prep = prepare(setup, progress=True)
    L = prep.loaders

    def metrics(m):
        return basic_metrics(m, L["forget"], L["retain"], L["test"], test_forget=L.get("test_forget"))

    rows = [dict(method="original", **metrics(prep.original), seconds=None, selected=None),
            dict(method="retrain", **metrics(prep.oracle), seconds=prep.oracle_meta["train_seconds"], selected=None)]
    req = prep.request()
    for name, preset in RUNS:
        cache = ImportanceCache()  # fresh: the first request pays the pass over D
        cold = unlearn(prep.original, req, name, preset=preset, importance_cache=cache, progress=True)
        warm = unlearn(prep.original, req, name, preset=preset, importance_cache=cache)
        assert warm.info["ref_importance_cache"] == "hit"
        label = name + (f" ({preset})" if preset else "")
        rows.append(dict(method=label, **metrics(cold.model), seconds=cold.seconds, warm_seconds=warm.seconds,
                         selected=100 * cold.info["selected_fraction"], hparams=cold.hparams,
                         alpha=cold.info.get("alpha")))
        print(label, {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return prep, rows


def table(rows, retrain_s):
    out = ["| method | UA | RA | TA | test acc. on forgotten (sub)class | MIA | selected % | seconds (D-importance not cached) | seconds (cached) | speed-up vs retrain (cached) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        warm = r.get("warm_seconds")
        sel = "—" if r["selected"] is None else f"{r['selected']:.2f}"
        out.append(f"| {r['method']} | {fmt(r['UA'])} | {fmt(r['RA'])} | {fmt(r['TA'])} | {fmt(r.get('test_forget_acc'))} | "
                   f"{fmt(r['mia_lr_entropy'])} | {sel} | "
                   f"{fmt(r['seconds'])} | {fmt(warm)} | {'—' if not warm else f'{retrain_s / warm:.0f}×'} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["smallcnn", "resnet18"])
    ap.add_argument("--epochs", nargs="+", type=int, default=[3, 2], help="training epochs, one per arch")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS.values()))
    ap.add_argument("--out", default="benchmarks/results/ssd.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    sections, raw = [], {}
    t_all = time.perf_counter()
    for arch, epochs in zip(args.archs, args.epochs):
        for spec in args.protocols:
            title = next((k for k, v in PROTOCOLS.items() if v == spec), spec)
            prep, rows = run(arch, epochs, spec, args.width)
            name = f"{arch}{'-w' + str(args.width) if arch == 'resnet18' else ''}"
            sizes = prep.splits.sizes()
            sections.append(f"### {name}, {title} — `{spec}`, {epochs} training epochs\n\n"
                            f"|D| = {sizes['train']}, |D_f| = {sizes['forget']}, |test| = {sizes['test']}; "
                            f"split hash `{prep.splits.hash[:12]}`\n\n" + table(rows, prep.oracle_meta["train_seconds"]))
            raw[f"{name}/{spec}"] = rows
    defaults = {m: get_method(m).defaults for m in ("ssd", "lfssd", "assd")}
    text = [
        "# SSD, LFSSD and ASSD vs retraining on Fashion-MNIST",
        "",
        "Regenerate: `.venv/bin/python benchmarks/ssd_bench.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU. "
        f"One seed (0). Total wall time {(time.perf_counter() - t_all) / 60:.0f} min.",
        "",
        "Columns: UA = 100 − forget-set accuracy; RA / TA = retain / test accuracy; 'test acc. on forgotten' = test",
        "samples of the forgotten (sub)class; MIA = % of the forget set called member by the SSD paper's attack",
        "(logistic regression on softmax entropy, retain vs test). All in %. Seconds = the unlearning step alone",
        "(importance + selection + dampening, evaluation excluded); 'not cached' includes the importance pass over",
        "the full training set D, 'cached' reuses it (the normal case for a second request on the same model).",
        "Retrain seconds = the oracle's training time. Importance passes use batch 256 (batch-mode Fisher).",
        "",
        f"excise defaults: `{json.dumps(defaults)}`; `ssd (paper)` = the published α = 10, λ = 1.",
        "",
        *[s + "\n" for s in sections],
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
