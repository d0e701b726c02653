"""What the post-checks (excise.checks) cost against the request they check.

Each method runs on the test suite's committed Fashion-MNIST models (SmallCNN, 8,000 training images, class 9;
tests/fixtures), with the importance cache warm where a method has one, so the request is as short as it gets.
``checks`` = the seconds of the post-checks (sampling 512 forget and 512 retain samples, four forward passes,
the changed-entries count); ``request`` = ``result.seconds`` (the unlearning step alone).

    python benchmarks/postcheck_cost.py            # writes benchmarks/results/postcheck_cost.{md,json}
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

METHODS = {"ssd": {}, "lfssd": {}, "assd": {}, "scissorhands": {}, "salun": {}, "finetune": {"epochs": 1},
           "neggrad": {}, "saps": {}}
REPEATS = 3


def main() -> int:
    from fixtures.checkpoints import fixture_setups, fmnist_small, load_prepared

    from excise import unlearn
    from excise.importance import ImportanceCache

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    prep = load_prepared(fixture_setups()[0], fmnist_small())
    request, cache = prep.request(), ImportanceCache()
    rows = []
    for name, hp in METHODS.items():
        cold = unlearn(prep.original, request, name, importance_cache=cache, **hp)  # first request: fills the cache
        req_s, chk_s = [], []
        for _ in range(REPEATS):
            res = unlearn(prep.original, request, name, importance_cache=cache, **hp)
            req_s.append(res.seconds)
            chk_s.append(res.info["checks"]["seconds"])
        r, c = statistics.median(req_s), statistics.median(chk_s)
        rows.append({"method": name, "cold_request_s": cold.seconds, "cold_checks_s": cold.info["checks"]["seconds"],
                     "cold_checks_pct": 100 * cold.info["checks"]["seconds"] / cold.seconds,
                     "request_s": r, "checks_s": c, "checks_pct": 100 * c / r,
                     "check_samples": res.info["checks"]["forget"]["samples"]})
        print(rows[-1], flush=True)
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "repeats": REPEATS, "command": "python benchmarks/postcheck_cost.py"}
    out = ROOT / "benchmarks" / "results"
    (out / "postcheck_cost.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = ["# Cost of the post-checks", "",
             "| method | first request (s) | its checks | later request (s) | its checks | samples checked |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['cold_request_s']:.2f} | {r['cold_checks_pct']:.1f} % | {r['request_s']:.2f} | "
              f"{r['checks_pct']:.1f} % ({1000 * r['checks_s']:.0f} ms) | {r['check_samples']} |" for r in rows]
    lines += ["", f"`{env['command']}` — the committed SmallCNN of the tests (Fashion-MNIST, 8,000 training images, "
              "forget class 9). First request: the importance cache empty (SSD-family and SAPS pay their pass over "
              f"D or D̃); later request: the cache warm, median of {REPEATS} runs. {env['threads']} CPU threads, "
              f"torch {env['torch']}, CPU only (no GPU in this session). Samples checked: per loader (forget and "
              "retain), on the later request.", "",
              "The checks take n = samples_seen / 40 samples of each loader (16 to 512). Where a request is shortest "
              "— an SSD-family request whose reference importance is cached, a single pass over 720 forget "
              "samples — the 16-sample floor and the fixed work (the changed-entries count over every parameter) "
              "cost more than 5 %; `excise.unlearn(..., checks=False)` skips them.", ""]
    (out / "postcheck_cost.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
