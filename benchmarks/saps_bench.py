"""Benchmark: SAPS on label correction and secret removal, against the retrained oracle.

    .venv/bin/python benchmarks/saps_bench.py correction   # → benchmarks/results/saps_correction.json
    .venv/bin/python benchmarks/saps_bench.py relearn      # re-runs only its relearn probes (cached models)
    .venv/bin/python benchmarks/saps_bench.py secret       # → benchmarks/results/saps_secret.json
    .venv/bin/python benchmarks/saps_bench.py write        # → benchmarks/results/saps.md (with saps_estimators.json)

Label correction: Fashion-MNIST, SmallCNN (3 epochs), a targeted flip of 2,500 Coats to Pullover; the oracle
is trained on the true labels. (2,500 *random* wrong labels are not a correction task under this recipe: the
original does not learn them — accuracy on them with true labels 91.0 % vs the oracle's 92.0 %.) Secret removal: a character LSTM on Python's
pydoc text with "my pin is 47163" inserted 20 times; the oracle is trained without it. One seed (0).
Seconds are the unlearning step alone (evaluation excluded); the curvature diagonal over D̃ is computed once
per model and reused by later runs (``importance_cache``), as in a service answering several requests:
the first row that needs it pays for it ("seconds" then includes it; its cost is also listed separately).
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
from excise.evaluation.accuracy import accuracy
from excise.evaluation.relearn import relearn_probe
from excise.importance import ImportanceCache, hessian_diag
from excise.methods import get_method
from excise.protocol import CanarySetup, Setup, prepare, prepare_canary
from excise.training import TrainRecipe, seeded_loader

RESULTS = Path("benchmarks/results")
SPECS = ["relabel:2500:Coat->Pullover"]
SELECTORS = ["hessian", "grad_magnitude", "random", "last_layer", "all"]
KS = [0.001, 0.01, 0.05]
UPDATES = [dict(update="first_order", tau=1e-4), dict(update="first_order", tau=1e-5),
           dict(update="first_order", tau=1e-6), dict(update="diagonal", delta=0.1), dict(update="diagonal", delta=1.0),
           dict(update="second_order", delta=1.0), dict(update="steps"), dict(update="steps", max_steps=300),
           dict(update="second_order")]
PROBE_STEPS = (0, 1, 2, 5, 10, 25)
PROBE_LR = 0.001  # at lr 0.01 every model, the oracle included, relearns the flipped Coats within 5 steps


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _meta(cmd: str):
    return dict(command=f"python benchmarks/saps_bench.py {cmd}", torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), machine=platform.machine(),
                saps_defaults=get_method("saps").defaults)


# Secret removal: the one-shot updates and plain masked steps leave the memorised canary at maximal exposure
# (measured), so the update rows add masked steps with the correction term, and the ablation uses one of them.
SECRET_UPDATES = [dict(update="first_order", tau=1e-2), dict(update="first_order", tau=1e-1),
                  dict(update="second_order"), dict(update="steps"),
                  dict(update="steps", correction_weight=1.0, lr=0.01), dict(update="steps", correction_weight=1.0, lr=0.02),
                  dict(update="steps", correction_weight=1.0, lr=0.05)]
SECRET_ABLATION = dict(update="steps", correction_weight=1.0, lr=0.02)
SECRET_PROBE_STEPS = (0, 5, 25)


def _run_grid(original, req, metrics, cache, extra=None, updates=None):
    """Update comparison at the default selector and k, then the selector × k ablation at the default update
    (or at ``extra``)."""
    rows = []
    d = get_method("saps").defaults
    t = time.perf_counter()
    from excise.methods.saps import _subsample
    hessian_diag(original, _subsample(_dtilde(req), d["curvature_samples"], d["seed"]), req.task, d["estimator"])
    curvature_seconds = time.perf_counter() - t
    runs = [("update", dict(u)) for u in (updates or UPDATES)]
    runs += [("ablation", dict(extra or {}, selector=s, k=k)) for k in KS for s in SELECTORS
             if not (s == "all" and k != KS[0])]
    for part, hp in runs:
        res = unlearn(original, req, "saps", importance_cache=cache, **hp)
        row = dict(part=part, hparams=res.hparams, seconds=res.seconds,
                   selected=100 * res.info["selected_fraction"], **metrics(res.model))
        rows.append(row)
        print({k: v for k, v in row.items() if k != "hparams"}, hp, flush=True)
    return rows, curvature_seconds


def _dtilde(req):
    from torch.utils.data import ConcatDataset, DataLoader

    return DataLoader(ConcatDataset([req.retain.dataset, req.corrected.dataset]), batch_size=req.retain.batch_size)


def correction(args):
    out = {"meta": _meta("correction"), "protocols": []}
    for spec in SPECS:
        setup = Setup(arch="smallcnn", recipe=TrainRecipe(epochs=3), forget=ForgetSpec.parse(spec), seed=0)
        prep = prepare(setup, progress=True)
        L = prep.loaders

        def metrics(m):
            return dict(corrected_acc=accuracy(m, L["corrected"]), wrong_acc=accuracy(m, L["forget"]),
                        TA=accuracy(m, L["test"]), RA=accuracy(m, L["retain"]))

        req = prep.request()
        rows, curv_s = _run_grid(prep.original, req, metrics, ImportanceCache())
        probes = _correction_probes(prep, req)
        out["protocols"].append(dict(spec=spec, n_forget=len(prep.splits.forget), curvature_seconds=curv_s,
                                     original=metrics(prep.original), retrain=metrics(prep.oracle),
                                     retrain_seconds=prep.oracle_meta["train_seconds"], rows=rows, relearn=probes,
                                     relearn_settings=dict(lr=PROBE_LR, steps=list(PROBE_STEPS), samples=250,
                                                           batch=32)))
        _write(Path(args.out or RESULTS / "saps_correction.json"), out)


def _correction_probes(prep, req):
    """Relearn probe: fine-tune on 250 of the wrongly labelled samples; how fast do the wrong labels return?"""
    L = prep.loaders
    probe = seeded_loader(prep.original_ds, prep.splits.forget[:250], 32, shuffle=True, seed=0)
    default = unlearn(prep.original, req, "saps").model
    return {name: relearn_probe(m, probe, lambda mm: accuracy(mm, L["forget"]), PROBE_STEPS, lr=PROBE_LR)
            for name, m in (("original", prep.original), ("retrain", prep.oracle), ("saps", default))}


def relearn(args):
    """Re-run only the relearn probes of saps_correction.json (the models come from the caches)."""
    path = Path(args.out or RESULTS / "saps_correction.json")
    out = json.loads(path.read_text())
    for p in out["protocols"]:
        setup = Setup(arch="smallcnn", recipe=TrainRecipe(epochs=3), forget=ForgetSpec.parse(p["spec"]), seed=0)
        prep = prepare(setup, progress=False)
        p["relearn"] = _correction_probes(prep, prep.request())
        p["relearn_settings"] = dict(lr=PROBE_LR, steps=list(PROBE_STEPS), samples=250, batch=32)
    _write(path, out)


def secret(args):
    prep = prepare_canary(CanarySetup(), progress=True)
    req = prep.request()
    rows, curv_s = _run_grid(prep.original, req, prep.metrics, ImportanceCache(), SECRET_ABLATION, SECRET_UPDATES)
    probe = seeded_loader(prep.corpus.train, prep.corpus.forget[:4], 4, shuffle=True, seed=0)
    chosen = unlearn(prep.original, req, "saps", **SECRET_ABLATION).model
    probes = {name: relearn_probe(m, probe, lambda mm: prep.metrics(mm)["exposure"], SECRET_PROBE_STEPS, lr=0.01,
                                  task=req.task)
              for name, m in (("original", prep.original), ("retrain", prep.oracle), ("saps (ablation setting)", chosen))}
    out = dict(meta=_meta("secret"), setup=str(prep.setup), n_forget=len(prep.corpus.forget),
               n_train=len(prep.corpus.train), curvature_seconds=curv_s, original=prep.metrics(prep.original),
               retrain=prep.metrics(prep.oracle), retrain_seconds=prep.oracle_meta["train_seconds"],
               original_seconds=prep.original_meta["train_seconds"], rows=rows, relearn=probes,
               relearn_settings=dict(lr=0.01, steps=list(SECRET_PROBE_STEPS), samples=4, batch=4),
               ablation_setting=SECRET_ABLATION)
    _write(Path(args.out or RESULTS / "saps_secret.json"), out)


def _hp(row):
    h = row["hparams"]
    if row["part"] == "update":
        keep = {"first_order": ["tau"], "diagonal": ["delta"], "second_order": ["delta", "cg_iters", "cg_samples"],
                "steps": ["lr", "max_steps"] + (["correction_weight"] if h.get("correction_weight") else [])}[h["update"]]
        return h["update"] + " (" + ", ".join(f"{k}={h[k]}" for k in keep) + ")"
    return f"{h['selector']}, k={100 * h['k']:g} %" if h["selector"] != "all" else "all (k ignored)"


def write(args):
    lines = ["# SAPS: estimators, label correction, secret removal", "",
             "Regenerate: `benchmarks/saps_estimators.py`, then `benchmarks/saps_bench.py correction`, "
             "`… secret`, `… write` (commands in each script's docstring). One seed (0); CPU, 2 threads.", ""]
    est_path, cor_path, sec_path = (RESULTS / f for f in ("saps_estimators.json", "saps_correction.json",
                                                          "saps_secret.json"))
    if est_path.exists():
        est = json.loads(est_path.read_text())
        lines += ["## (a) Hessian-diagonal estimators: accuracy against the exact diagonal, and cost", "",
                  "Relative error ‖ĥ − h‖₂/‖h‖₂ over all parameters; top-1 % overlap = share of the exact top-1 % "
                  "entries the estimate also ranks top-1 % (what selection needs); × Fisher = seconds over a "
                  "per-sample squared-gradient Fisher pass on the same data. BackPACK rows: backpack-for-pytorch "
                  f"(installed for the run: {est['meta']['backpack']}).", ""]
        net = None
        for r in est["rows"]:
            if r["net"] != net:
                net = r["net"]
                lines += ["", f"**{net}**", "", "| estimator | rel. error | top-1 % overlap | seconds | × Fisher |",
                          "|---|---:|---:|---:|---:|"]
            opt = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            name = r["estimator"] + (f" ({opt})" if opt else "")
            if r.get("error"):
                lines.append(f"| {name} | not supported: {r['error']} | | | |")
                continue
            f = (lambda x, s: "—" if x is None else s.format(x))
            lines.append(f"| {name} | {f(r['rel_err'], '{:.3g}')} | {f(r['top1_overlap'], '{:.2f}')} | "
                         f"{f(r['seconds'], '{:.2f}')} | {f(r['x_fisher'], '{:.1f}')} |")
        lines.append("")
    if cor_path.exists():
        cor = json.loads(cor_path.read_text())
        lines += ["## (b) Label correction on Fashion-MNIST (SmallCNN)", "",
                  "corrected = accuracy on the relabelled samples with their *true* labels (↑, oracle's value is "
                  "the target); wrong = agreement with the wrong labels (↓); TA / RA = test / retain accuracy. "
                  f"SAPS defaults: `{json.dumps(cor['meta']['saps_defaults'])}`.", ""]
        for p in cor["protocols"]:
            lines += [f"### `{p['spec']}` — {p['n_forget']} relabelled samples", "",
                      f"Curvature diagonal over D̃ (default estimator): {p['curvature_seconds']:.1f} s; "
                      f"retraining: {p['retrain_seconds']:.1f} s.", "",
                      "| run | corrected | wrong | TA | RA | selected % | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name in ("original", "retrain"):
                m = p[name]
                sec = f"{p['retrain_seconds']:.1f}" if name == "retrain" else "—"
                lines.append(f"| {name} | {m['corrected_acc']:.1f} | {m['wrong_acc']:.1f} | {m['TA']:.1f} | "
                             f"{m['RA']:.1f} | — | {sec} |")
            for r in p["rows"]:
                lines.append(f"| {_hp(r)} | {r['corrected_acc']:.1f} | {r['wrong_acc']:.1f} | {r['TA']:.1f} | "
                             f"{r['RA']:.1f} | {r['selected']:.2f} | {r['seconds']:.1f} |")
            ps = p.get("relearn_settings", dict(lr=0.01, steps=[0, 5, 10, 25, 50]))
            lines += ["", f"Relearn probe (c): SGD (lr {ps['lr']}, momentum 0.9, batch 32) on 250 of the wrongly "
                      "labelled samples; wrong-label agreement on all of them after s steps:", "",
                      "| model | " + " | ".join(f"s={s}" for s in ps["steps"]) + " |",
                      "|---|" + "---:|" * len(ps["steps"])]
            for name, curve in p["relearn"].items():
                lines.append(f"| {name} | " + " | ".join(f"{c['value']:.1f}" for c in curve) + " |")
            lines.append("")
    if sec_path.exists():
        sec = json.loads(sec_path.read_text())
        lines += ["## (b) Secret removal (character LSTM, pydoc text)", "",
                  f"{sec['n_forget']} of {sec['n_train']} windows hold the canary. exposure = log2(10⁵) − log2 rank "
                  "of the secret among all 10⁵ five-digit candidates (max 16.6; ↓, the oracle's value is the "
                  "target); held-out ppl = per-character perplexity on a held-out tail of the text (utility, ↓); "
                  "Z̃ ppl = perplexity on the corrected windows.", "",
                  f"Curvature diagonal over D̃: {sec['curvature_seconds']:.1f} s; training the original "
                  f"{sec['original_seconds']:.0f} s, retraining {sec['retrain_seconds']:.0f} s. The ablation rows "
                  f"(selector, k) use `{json.dumps(sec.get('ablation_setting', {}))}`.", "",
                  "| run | exposure | held-out ppl | Z̃ ppl | selected % | seconds |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("original", "retrain"):
            m = sec[name]
            lines.append(f"| {name} | {m['exposure']:.1f} | {m['heldout_ppl']:.3f} | {m['corrected_ppl']:.3f} | — | "
                         + (f"{sec['retrain_seconds']:.0f}" if name == "retrain" else "—") + " |")
        for r in sec["rows"]:
            lines.append(f"| {_hp(r)} | {r['exposure']:.1f} | {r['heldout_ppl']:.3f} | {r['corrected_ppl']:.3f} | "
                         f"{r['selected']:.2f} | {r['seconds']:.1f} |")
        ps = sec.get("relearn_settings", dict(lr=0.01, steps=[0, 5, 10, 25, 50]))
        lines += ["", f"Relearn probe (c): SGD (lr {ps['lr']}, momentum 0.9) on 4 of the canary windows; exposure "
                  "after s steps:", "",
                  "| model | " + " | ".join(f"s={s}" for s in ps["steps"]) + " |", "|---|" + "---:|" * len(ps["steps"])]
        for name, curve in sec["relearn"].items():
            lines.append(f"| {name} | " + " | ".join(f"{c['value']:.1f}" for c in curve) + " |")
        lines.append("")
    out = Path(args.out or RESULTS / "saps.md")
    reading = ""
    if out.exists() and "\n## Reading\n" in out.read_text():  # keep the hand-written reading
        reading = "## Reading\n" + out.read_text().split("\n## Reading\n", 1)[1]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + ("\n" + reading if reading else ""))
    tmp.replace(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["correction", "relearn", "secret", "write"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    {"correction": correction, "relearn": relearn, "secret": secret, "write": write}[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
