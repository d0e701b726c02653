"""Do hyperparameters tuned on validation data carry over to test data? Runs ``excise bench`` on a protocol
twice — the methods at their defaults, then with the shipped tuned table (``--tuned``) — and writes one
Markdown table: Avg Gap (test-side metrics: UA, RA, TA, MIA against the oracle) at defaults and tuned, with
the validation objective each reached during tuning.

    python benchmarks/tuned_vs_defaults.py --protocol fmnist-smallcnn-class --seed 0 --device cpu \
        --out benchmarks/results/tuned_vs_defaults.md

Rows are cached by ``excise bench``, so a re-run only computes what is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cell(summ, m, key):
    v = summ.get(m, {}).get(key)
    if v is None:
        return "—"
    return f"{v[0]:.2f} ± {v[1]:.2f}" if v[2] > 1 else f"{v[0]:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", action="append", required=True, help="repeatable")
    ap.add_argument("--seed", type=int, nargs="+", default=None, help="protocol seeds (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(RESULTS / "tuned_vs_defaults.md"))
    ap.add_argument("--notes", default=None, help="a Markdown file appended after the tables (where it ran, reading)")
    args = ap.parse_args(argv)

    from excise import __version__
    from excise.bench import load_protocol, run_bench
    from excise.tuned import load_tuned, tuned_table_path

    cmd = "python benchmarks/tuned_vs_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Tuned on validation, measured on test", "",
             f"Written by `{cmd}` (excise {__version__}). For each protocol: `excise bench` with the methods' "
             "defaults, then with `--tuned` (the shipped table, tuned by `excise tune` on the validation splits of "
             "the seeds in the 'tuned on' column against their oracles). Avg Gap here is the test-side one (UA, RA, "
             "TA, MIA-svc, mean |Δ to the oracle|); the validation objective is the tuner's (forget accuracy, "
             "validation accuracy, validation-split MIA; the mean over the seeds tuned on).", ""]
    for name in args.protocol:
        proto = load_protocol(name)
        tuned = load_tuned(proto["name"])
        methods = [m for m in proto["methods"] if m in tuned]
        if not methods:
            lines += [f"## {proto['name']}", "", "no tuned methods in the shipped table", ""]
            continue
        t0 = time.perf_counter()
        base = run_bench(name, methods=methods, seeds=args.seed, progress=False, device=args.device)
        tun = run_bench(name, methods=methods, seeds=args.seed, progress=False, device=args.device, tuned=True)
        secs = time.perf_counter() - t0
        sb, st = base.summary(), tun.summary()
        seeds = sorted({r["seed"] for r in tun.rows})
        meta = tomllib.loads(tuned_table_path(proto["name"]).read_text()).get("tuning", {})
        lines += [f"## {proto['name']}", "", f"seeds {seeds}; {secs:.0f} s for both runs (cached rows included)", "",
                  "| method | tuned values | tuned on | validation objective: defaults → tuned | Avg Gap (test), "
                  "defaults | Avg Gap (test), tuned | UA tuned | RA tuned | TA tuned | MIA tuned | seconds tuned |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines.append(f"| retrain (oracle) | — | — | — | 0 | 0 | {_cell(st, 'retrain', 'UA')} | "
                     f"{_cell(st, 'retrain', 'RA')} | {_cell(st, 'retrain', 'TA')} | "
                     f"{_cell(st, 'retrain', 'mia_svc_confidence')} | {_cell(st, 'retrain', 'seconds')} |")
        for m in methods:
            vals = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned[m].items())
            mt = meta.get(m, {})
            obj = f"{mt.get('default_value', float('nan')):.2f} → {mt.get('value', float('nan')):.2f}"
            on = mt.get("seed", "")
            on = ("seeds " + ", ".join(map(str, on))) if isinstance(on, list) else f"seed {on}"
            on += f", {mt.get('trials', '?')} trials"
            div_b = sum(1 for r in base.rows if r["method"] == m and r.get("diverged"))
            div_t = sum(1 for r in tun.rows if r["method"] == m and r.get("diverged"))
            gb = _cell(sb, m, "avg_gap") + (f" (diverged ×{div_b})" if div_b else "")
            gt = _cell(st, m, "avg_gap") + (f" (diverged ×{div_t})" if div_t else "")
            lines.append(f"| {m} | {vals} | {on} | {obj} | {gb} | {gt} | {_cell(st, m, 'UA')} | {_cell(st, m, 'RA')} | "
                         f"{_cell(st, m, 'TA')} | {_cell(st, m, 'mia_svc_confidence')} | {_cell(st, m, 'seconds')} |")
        lines.append("")
    if args.notes:
        lines += [Path(args.notes).read_text().rstrip(), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
