"""Transfer benchmark: excise on models, data and loaders that no default and no tuned entry was fitted on.

Each setting is what a user brings: their own network (written here, not from excise's zoo, except the ResNet-18
row, which runs excise's ResNet under another recipe and seed), trained with Adam or another recipe, their own
loaders (TensorDatasets, batch sizes 32–256), a validation split the model never trained on (the holdout), and a
forget request. The retrain oracle (the same recipe on the retain set) is trained only to score the rows: no
method and no calibration sees it.

Rows: original, oracle, every SSD-family method at its defaults and calibrated (``calibrate=True``), Scissorhands
and two baselines at their defaults and calibrated (5 trials each: each trial is a full run), ``method="auto"``
(5 trials per method). Scored with ``excise.evaluate`` on the user's loaders against the oracle.

    python benchmarks/transfer.py run [--settings NAME ...]   # resumes: finished settings are kept
    python benchmarks/transfer.py write                       # benchmarks/results/transfer.(md|json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "excise-out" / "transfer"
COMMAND = "python benchmarks/transfer.py run && python benchmarks/transfer.py write"


# ----------------------------------------------------------------------------------------------- user models
class UserMLP(nn.Module):
    def __init__(self, d_in: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.out = nn.Linear(64, classes)

    def forward(self, x):
        return self.out(self.body(x))


class UserCNN(nn.Module):
    """What a user might write for 28×28 images: two conv layers with max-pooling, dropout, a dense head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.drop = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.drop(torch.flatten(x, 1))
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _resnet():
    from excise.models import build_model

    return build_model("resnet18", (1, 28, 28), 10, width=16)


# ----------------------------------------------------------------------------------------------- data
def _fmnist(n_train: int, n_test: int, seed: int):
    from excise.data import load_fashion_mnist

    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(tr), generator=g)[:n_train]
    tidx = torch.randperm(len(te), generator=g)[:n_test]
    return TensorDataset(tr.x[idx], tr.targets[idx]), TensorDataset(te.x[tidx], te.targets[tidx])


def _digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_te = len(x) // 5
    return TensorDataset(x[perm[n_te:]], y[perm[n_te:]]), TensorDataset(x[perm[:n_te]], y[perm[:n_te]])


# ----------------------------------------------------------------------------------------------- settings
SETTINGS: Dict[str, Dict[str, Any]] = {
    "digits-usermlp": dict(data=lambda: _digits(3), model=lambda: UserMLP(64, 10), epochs=30, lr=1e-3, batch=32,
                           opt="adam", seed=3, requests=("class:3", "random:0.1")),
    "fmnist-usercnn": dict(data=lambda: _fmnist(20000, 4000, 5), model=UserCNN, epochs=2, lr=1e-3, batch=64,
                           opt="adam", seed=5, requests=("class:2", "random:0.1"), batch_sizes=(32, 64, 256)),
    "fmnist-usercnn-memorised": dict(data=lambda: _fmnist(3000, 4000, 6), model=UserCNN, epochs=60, lr=1e-3,
                                     batch=64, opt="adam", seed=6, requests=("random:0.1", "class:2")),
    "fmnist-resnet18w16-adam": dict(data=lambda: _fmnist(20000, 4000, 7), model=_resnet, epochs=3, lr=2e-3,
                                    batch=128, opt="adam", seed=7, requests=("class:4", "random:0.1")),
}
VAL_FRACTION = 0.1
DEFAULTS = ("ssd", "lfssd", "assd", "scissorhands", "salun", "neggrad_plus")
CALIBRATED = ("ssd", "lfssd", "assd", "scissorhands", "salun", "neggrad_plus")
TRAINING_TRIALS = 5  # calibration trials for methods whose every trial trains (the SSD family: the default 10)
SSD_FAMILY = ("ssd", "lfssd", "assd")  # calibrated with the default trial budget: their trials share the passes


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def _cached_model(name: str, build: Callable, loader: DataLoader, cfg: Dict[str, Any]):
    from excise.training import load_state, save_state

    path = WORK / "models" / f"{name}.safetensors"
    meta_path = path.with_suffix(".json")
    model = build()
    if path.exists() and meta_path.exists():
        load_state(model, path)
        return model.eval(), json.loads(meta_path.read_text())["seconds"]
    torch.manual_seed(cfg["seed"])
    model = build()
    seconds = _train(model, loader, cfg["epochs"], cfg["lr"], cfg["seed"])
    save_state(model, path)
    meta_path.write_text(json.dumps({"seconds": seconds}))
    return model, seconds


def _split(train: TensorDataset, request: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    perm = torch.randperm(n, generator=g)
    n_val = int(n * VAL_FRACTION)
    val, pool = perm[:n_val], perm[n_val:]
    y = train.tensors[1]
    kind, arg = request.split(":")
    if kind == "class":
        cls = int(arg)
        forget = pool[y[pool] == cls]
    else:
        forget = pool[torch.randperm(len(pool), generator=g)[: int(len(pool) * float(arg))]]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    keep[val] = False
    retain = torch.nonzero(keep).flatten()
    return pool.tolist(), forget.tolist(), retain.tolist(), val.tolist()


SHOWN = ("UA", "RA", "TA", "mia_svc_confidence", "forget_acc")  # the metrics a row keeps


def _row(label: str, res, evaluation: Dict[str, Any], retrain_s: float) -> Dict[str, Any]:
    m, g = evaluation["model"], evaluation["gaps"]["model"]
    row = {"method": label, **{k: m[k] for k in SHOWN}, "avg_gap": g["avg_gap"]}
    if res is not None:
        row.update(seconds=res.seconds, speedup=retrain_s / res.seconds if res.seconds else None,
                   hparams={k: v for k, v in res.hparams.items() if not isinstance(v, (dict, list))},
                   warnings=[w["warning"] for w in res.warnings], selected=res.info.get("selected_fraction"))
        cal = res.info.get("calibration")
        if cal:
            from excise.calibration import winner

            win = winner(res)
            row["calibration"] = {"intent": cal["intent"], "trials_run": cal["trials_run"], "knob": cal["knob"],
                                  "value": res.hparams.get(cal["knob"]), "on_target": win["judgement"]["on_target"],
                                  "feasible": win["judgement"]["feasible"], "why": cal["why"]}
        if "auto" in res.info:
            row["auto"] = res.info["auto"]
    return row


def run_setting(name: str) -> Dict[str, Any]:
    import excise

    cfg = SETTINGS[name]
    train, test = cfg["data"]()
    out: Dict[str, Any] = {"setting": name, "requests": {}, "config": {k: v for k, v in cfg.items()
                                                                       if isinstance(v, (int, float, str, tuple))}}
    pool, _, _, val = _split(train, cfg["requests"][0], cfg["seed"])
    bs = cfg["batch"]

    def loader(idx, batch=bs, ds=train, shuffle=False):
        return DataLoader(Subset(ds, idx), batch_size=batch, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    original, orig_s = _cached_model(f"{name}-original", cfg["model"], loader(pool, shuffle=True), cfg)
    out["original_train_seconds"] = orig_s
    out["train_acc"] = _acc(original, loader(pool))
    out["holdout_acc"] = _acc(original, loader(val))
    for request in cfg["requests"]:
        _, forget, retain, _ = _split(train, request, cfg["seed"])
        oracle, retrain_s = _cached_model(f"{name}-oracle-{request.replace(':', '')}", cfg["model"],
                                          loader(retain, shuffle=True), cfg)
        req = excise.UnlearningRequest(forget=loader(forget), retain=loader(retain), train=loader(pool),
                                       holdout=loader(val))
        yt = test.tensors[1]
        tl = {"forget": loader(forget), "retain": loader(retain), "test": DataLoader(test, batch_size=512)}
        if request.startswith("class"):
            keep = torch.nonzero(yt != int(request.split(":")[1])).flatten().tolist()
            tl["test_retain"] = DataLoader(Subset(test, keep), batch_size=512)
        rows = []
        base = excise.evaluate(original, tl, oracle=oracle)
        rows.append({"method": "original", **{k: base["model"][k] for k in SHOWN},
                     "avg_gap": base["gaps"]["model"]["avg_gap"]})
        rows.append({"method": "retrain (oracle)", **{k: base["oracle"][k] for k in SHOWN},
                     "avg_gap": 0.0, "seconds": retrain_s, "speedup": 1.0})
        plan = [(m, m, False) for m in DEFAULTS]
        plan += [(f"{m} (calibrated)", m, True) for m in CALIBRATED]
        plan += [("auto", "auto", True)]
        for label, method, cal in plan:
            calibrate = False
            if cal:
                calibrate = {"trials": TRAINING_TRIALS} if (method not in SSD_FAMILY) else True
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = excise.unlearn(original, req, method, calibrate=calibrate)
            res.seconds = time.perf_counter() - t0  # the whole request, calibration and all
            ev = excise.evaluate(res.model, tl, oracle=oracle)
            rows.append(_row(label, res, ev, retrain_s))
            print(f"[{time.strftime('%H:%M:%S')}] {name} {request} {label}: avg gap {rows[-1]['avg_gap']:.2f} "
                  f"({res.seconds:.1f} s)", flush=True)
        out["requests"][request] = {"rows": rows, "forget": len(forget), "retain": len(retain), "holdout": len(val),
                                    "retrain_seconds": retrain_s}
    for batch in cfg.get("batch_sizes", ()):  # the same request through loaders of other batch sizes and order
        request = cfg["requests"][0]
        _, forget, retain, _ = _split(train, request, cfg["seed"])
        entry = {}
        for shuffle in (False, True):
            req = excise.UnlearningRequest(forget=loader(forget, batch, shuffle=shuffle),
                                           retain=loader(retain, batch, shuffle=shuffle),
                                           train=loader(pool, batch, shuffle=shuffle))
            for mode in ("subset", "batch"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hp = {"fisher_mode": mode} if mode == "subset" else {"preset": "paper"}
                    res = excise.unlearn(original, req, "ssd", importance_cache=False, **hp)
                entry[f"{mode}{' shuffled' if shuffle else ''}"] = {
                    "selected": res.mask.count(), "forget_acc": _acc(res.model, loader(forget))}
        out.setdefault("batch_sizes", {})[str(batch)] = entry
    return out


def _acc(model, loader) -> float:
    from excise.evaluation.accuracy import accuracy

    return accuracy(model, loader)


def cmd_run(args) -> int:
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    for name in args.settings or list(SETTINGS):
        path = WORK / f"{name}.json"
        if path.exists() and not args.again:
            print(f"{name}: kept ({path})")
            continue
        t0 = time.perf_counter()
        result = run_setting(name)
        result["seconds"] = time.perf_counter() - t0
        result["machine"] = {"cpu": _cpu(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__, "device": "cpu"}
        path.write_text(json.dumps(result, indent=1))
    return 0


def _cpu() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from importance_cost import cpu_name

    return cpu_name()


def _fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def cmd_write(args) -> int:
    import excise

    results = {}
    for name in SETTINGS:
        path = WORK / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    lines = ["# Transfer: settings no default and no tuned entry was fitted on", "",
             f"Written by `{COMMAND}` (excise {excise.__version__}; {_cpu()}, {os.cpu_count()} cores, CPU only; "
             "one seed per "
             "setting: each setting's own). Avg Gap: mean |Δ| to the retrain oracle over UA, RA, TA and MIA "
             "(svc), SalUn's roles for class forgetting. Seconds: the whole request, calibration included; "
             "speed-up: retraining's seconds over the row's.", ""]
    summary = ["| setting | request | forget / retain / holdout | original Avg Gap | best calibrated (Avg Gap) | "
               "auto (Avg Gap, method) | ssd default → calibrated | collapses |", "|---|---|---|---:|---|---|---|---:|"]
    detail: List[str] = []
    for name, res in results.items():
        for request, r in res["requests"].items():
            rows = {x["method"]: x for x in r["rows"]}
            cal = [x for x in r["rows"] if x["method"].endswith("(calibrated)")]
            best = min(cal, key=lambda x: x["avg_gap"]) if cal else None
            auto = rows.get("auto")
            collapses = sum(1 for x in r["rows"] if "CollapseWarning" in x.get("warnings", []))
            summary.append(
                f"| {name} | {request} | {r['forget']} / {r['retain']} / {r['holdout']} | "
                f"{_fmt(rows['original']['avg_gap'])} | {best['method'] if best else '—'} ({_fmt(best['avg_gap']) if best else '—'}) | "
                f"{_fmt(auto['avg_gap']) if auto else '—'} ({auto.get('auto', {}).get('chosen', '—') if auto else '—'}) | "
                f"{_fmt(rows['ssd']['avg_gap'])} → {_fmt(rows.get('ssd (calibrated)', {}).get('avg_gap'))} | {collapses} |")
            detail += [f"### {name}, {request}", "",
                       f"Original: train accuracy {res['train_acc']:.1f} %, holdout {res['holdout_acc']:.1f} %; "
                       f"retraining {r['retrain_seconds']:.1f} s.", "",
                       "| method | UA | RA | TA | MIA (svc) | Avg Gap | seconds | speed-up | selected % | calibration | warnings |",
                       "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            for x in r["rows"]:
                c = x.get("calibration")
                ctext = "—"
                if c:
                    ctext = (f"{c['knob']} = {_fmt(c['value'], 4)}, {c['trials_run']} trials, "
                             f"{'on target' if c['on_target'] else 'off target'}"
                             f"{'' if c['feasible'] else ', utility bound broken'}")
                    if x.get("auto"):
                        ctext = f"{x['auto']['chosen']} of {', '.join(x['auto']['tried'])}: " + ctext
                sel = x.get("selected")
                detail.append(
                    f"| {x['method']} | {_fmt(x['UA'])} | {_fmt(x['RA'])} | {_fmt(x['TA'])} | "
                    f"{_fmt(x['mia_svc_confidence'])} | {_fmt(x['avg_gap'])} | {_fmt(x.get('seconds'), 1)} | "
                    f"{_fmt(x.get('speedup'), 1)} | {_fmt(100 * sel if sel is not None else None, 3)} | {ctext} | "
                    f"{', '.join(w.replace('Warning', '') for w in x.get('warnings', [])) or '—'} |")
            detail.append("")
        if "batch_sizes" in res:
            request = res["config"]["requests"][0]
            detail += [f"### {name}, {request}: the same request through loaders of other batch sizes and order", "",
                       "| loader batch | subset (default): selected, forget acc | shuffled | batch (paper): "
                       "selected, forget acc | shuffled |", "|---:|---|---|---|---|"]
            for b, e in res["batch_sizes"].items():
                cells = [f"{e[k]['selected']}, {e[k]['forget_acc']:.1f} %" for k in
                         ("subset", "subset shuffled", "batch", "batch shuffled")]
                detail.append(f"| {b} | " + " | ".join(cells) + " |")
            detail.append("")
    lines += summary + [""] + detail
    goals = _goals(results)
    lines += ["## Goals", ""] + goals + [""]
    md = "\n".join(lines)
    (RESULTS / "transfer.md").write_text(md + "\n" + _readings())
    (RESULTS / "transfer.json").write_text(json.dumps({"command": COMMAND, "results": results}, indent=1))
    print(md)
    return 0


def _goals(results) -> List[str]:
    out = []
    for name, res in results.items():
        for request, r in res["requests"].items():
            rows = r["rows"]
            orig = next(x for x in rows if x["method"] == "original")
            cal = [x for x in rows if x["method"].endswith("(calibrated)") or x["method"] == "auto"]
            collapse = [x["method"] for x in rows if "CollapseWarning" in x.get("warnings", [])]
            silent = [x["method"] for x in rows if x.get("selected") == 0 and not x.get("warnings")]
            if request.startswith("class"):
                ok = [x["method"] for x in cal if x["avg_gap"] <= 1.0]
                out.append(f"- {name} {request}: calibrated with Avg Gap ≤ 1.0: {', '.join(ok) or 'none'}.")
            else:
                oracle = next(x for x in rows if x["method"] == "retrain (oracle)")
                differs = abs(oracle["forget_acc"] - orig["forget_acc"]) >= 2
                below = [x["method"] for x in cal if x["avg_gap"] < orig["avg_gap"]]
                out.append(f"- {name} {request}: the oracle's forget accuracy differs from the original's by "
                           f"{abs(oracle['forget_acc'] - orig['forget_acc']):.1f} points"
                           f"{'' if differs else ' (< 2: the goal does not apply)'}; calibrated rows below doing "
                           f"nothing: {', '.join(below) or 'none'}.")
            out.append(f"  Collapses: {', '.join(collapse) or 'none'}; silent no-ops: {', '.join(silent) or 'none'}.")
            ssd_cal = next((x for x in rows if x["method"] == "ssd (calibrated)"), None)
            if ssd_cal and ssd_cal.get("speedup"):
                out.append(f"  Calibrated SSD: {ssd_cal['speedup']:.1f}× faster than retraining.")
    return out


def _readings() -> str:
    path = Path(__file__).with_name("transfer_reading.md")
    return path.read_text() if path.exists() else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--again", action="store_true", help="run finished settings again")
    sub.add_parser("write")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_write(args)


if __name__ == "__main__":
    sys.exit(main())
