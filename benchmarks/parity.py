"""Refactoring parity: every registered method at its defaults on the committed fixtures, its metrics and a hash
of the weights it returns — to show that a refactor changed no method behaviour and no metric value.

    python benchmarks/parity.py record LABEL     # → benchmarks/results/parity.json (one entry per label)
    python benchmarks/parity.py compare A B      # → benchmarks/results/parity.md: A against B, row by row

One torch thread, the test suite's committed checkpoints (tests/fixtures): on one machine the numbers are bit for
bit reproducible, so any difference between two labels is a behaviour change. Across CPUs they are not: compare
labels recorded on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
RESULTS = ROOT / "benchmarks" / "results"
FILE = RESULTS / "parity.json"
# paths the defaults do not take: (label, method, hyperparameters)
VARIANTS = [("steps", "saps", {"update": "steps", "max_steps": 20}),
            ("diagonal", "saps", {"update": "diagonal"}),
            ("no projection, 2 epochs", "scissorhands", {"projection": False, "epochs": 2}),
            ("max_steps", "neggrad", {"max_steps": 7}),
            ("batch Fisher", "ssd", {"fisher_mode": "batch", "alpha": 10.0}),
            ("scope", "salun", {"scope": "weights"})]


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def record(label: str) -> dict:
    from checkpoints import fixture_setups, load_prepared

    import excise
    from excise.evaluation.evaluate import evaluate_metrics
    from excise.methods import available

    torch.set_num_threads(1)
    rows = []
    for setup in (fixture_setups()[2],):  # digits / MLP / class 3: every method runs on it in seconds
        prep = load_prepared(setup)
        loaders = {k: prep.loaders[k] for k in ("forget", "retain", "test", "val", "test_forget", "test_retain")
                   if prep.loaders.get(k) is not None}
        from excise.methods import get_method

        runs = [(m, m, {}) for m in available() if get_method(m).applies_to(prep.request().task)] + \
            [(f"{m} ({v})", m, hp) for v, m, hp in VARIANTS]
        for name, method, hp in runs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = excise.unlearn(prep.original, prep.request(), method, importance_cache=False, **hp)
                metrics = evaluate_metrics(res.model, loaders, prep.oracle)
            rows.append({"setup": f"{setup.dataset}/{setup.arch}/{setup.forget.kind}:"
                                  f"{','.join(map(str, setup.forget.classes))}", "method": name, "weights": _weights_hash(res.model),
                         "metrics": {k: _round(v) for k, v in sorted(metrics.items())
                                     if isinstance(v, (int, float))}})
            print(name, rows[-1]["weights"], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    data = json.loads(FILE.read_text()) if FILE.exists() else {}
    data[label] = {"commit": commit, "machine": f"{platform.processor() or platform.machine()}, 1 thread",
                   "torch": torch.__version__, "rows": rows}
    FILE.write_text(json.dumps(data, indent=1) + "\n")
    return data[label]


def compare(a: str, b: str) -> str:
    data = json.loads(FILE.read_text())
    ra, rb = ({(r["setup"], r["method"]): r for r in data[x]["rows"]} for x in (a, b))
    lines = [f"# Refactoring parity: `{a}` ({data[a]['commit']}) against `{b}` ({data[b]['commit']})", "",
             f"Written by `python benchmarks/parity.py compare {a} {b}` from `benchmarks/results/parity.json` "
             f"(each label recorded by `python benchmarks/parity.py record LABEL`; {data[b]['machine']}, "
             f"torch {data[b]['torch']}). Every method at its defaults, and the variants in `VARIANTS`, on the committed "
             "digits/MLP fixture, class 3 forgotten.", "",
             "| setup | method | weights (sha256) | same weights | metrics | same metrics |",
             "|---|---|---|---|---:|---|"]
    same_all = True
    for key in sorted(set(ra) | set(rb)):
        x, y = ra.get(key), rb.get(key)
        if x is None or y is None:
            lines.append(f"| {key[0]} | {key[1]} | only in {'b' if x is None else 'a'} | — | — | — |")
            same_all = False
            continue
        sw = x["weights"] == y["weights"]
        shared = set(x["metrics"]) & set(y["metrics"])
        sm = all(x["metrics"][k] == y["metrics"][k] for k in shared) and set(x["metrics"]) == set(y["metrics"])
        same_all &= sw and sm
        lines.append(f"| {key[0]} | {key[1]} | {y['weights']} | {'yes' if sw else 'NO'} | {len(shared)} | "
                     f"{'yes' if sm else 'NO'} |")
    lines += ["", f"All the same: {'yes' if same_all else 'NO'}."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "parity.md").write_text(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        print(compare(sys.argv[2], sys.argv[3]))
    else:
        print(__doc__)
        sys.exit(2)
