"""``excise leaderboard`` (and ``python benchmarks/leaderboard.py``): the leaderboard: every registered method (but ``retrain``, which is the oracle row) on every shipped
Fashion-MNIST protocol, through ``excise bench``, then one Markdown file and one plot.

    excise leaderboard tune  [--protocols P ...] [--methods M ...] [--budget N] [--jobs J]
    excise leaderboard run   [--protocols P ...] [--seeds N] [--device D] [--jobs J] [--tuned]
    excise leaderboard write [--runs DIR] [--tuned] [--out FILE]  (default: results/leaderboard.md
                                           with --tuned, results/leaderboard-defaults.md without)
    excise leaderboard coverage [--protocols P ...] [--journals DIR]   (what the tuned tables hold)
    excise leaderboard check [--protocols P ...] [--rel 0.01] [--md stability.md]

``tune`` runs ``excise tune METHOD PROTOCOL --write`` for every method with a search space on every protocol
(``--jobs`` at a time; resumable journals under ``--journals``), filling the tuned tables shipped in
src/excise/bench/tuned/. ``--deadline SECONDS`` fits it into a time slot (a GPU lent for ten-minute calls):
studies stop starting trials in time and the next call resumes them from their journals; a table entry is
written only once its study holds the whole budget.

``check`` re-scores every shipped tuned entry and its (1 ± rel) neighbours (``excise tune --recheck``: no
journal needed), records the shift in the table (the leaderboard's tuned section shows it) and writes a summary.

``run`` starts one ``excise bench PROTOCOL --methods ... --seed S`` per protocol and seed (``--jobs`` at a
time), then one ``excise bench PROTOCOL`` over all its seeds, which finds every row in the cache and leaves the
report under ``--runs`` (default excise-out/leaderboard/PROTOCOL/). Rows are cached, so a re-run finishes
what is missing. ``write`` reads those reports and writes the Markdown leaderboard, a JSON copy
of every row and the plot (Avg Gap against seconds, one point per method, one panel per protocol).
``write --reuse OLD.json`` takes the report of a protocol that has none under ``--runs`` from an earlier
``write``'s JSON, after checking that the protocol and (with ``--tuned``) every tuned row's values are still
the shipped ones; the file says which protocols were reused. ``write --reuse OLD.json --patch DIR`` re-runs
part of a reused report, e.g. after a method's revision was raised: DIR/PROTOCOL/report.json (or several,
DIR/PROTOCOL/*/report.json) from ``excise bench PROTOCOL --methods M ... [--tuned] --out ...`` replaces those
methods' rows seed by seed where its original and oracle rows are the reused report's (the same models), and
must re-run every method of a seed whose models differ (trained again, not bit-identical): see ``patch``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .leaderboard import (all_methods, combine_seeds, coverage, patch, patch_reports, stability_md, stale,
                          tunable_methods, tuned_section, winners)

RESULTS = Path("benchmarks") / "results"  # relative to where it runs: the repository's root


def fmnist_protocols():
    from ..protocol import list_protocols, load_protocol

    # every shipped classification protocol (all on Fashion-MNIST today); a generator's protocol has its own table
    return [n for n in list_protocols() if load_protocol(n).get("task", "classification") == "classification"]


def _bench_cmd(args, protocol, out, seeds):
    """``excise bench`` in a fresh interpreter, with deterministic kernels (so a re-run on the same kind of
    machine re-trains bit-identical models and finds its rows in the cache)."""
    boot = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
            "torch.backends.cudnn.benchmark = False; from excise.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", boot, "bench", protocol, "--methods", *all_methods(protocol), "--out", str(out),
           "--device", args.device, "--quiet"] + (["--tuned"] if args.tuned else [])
    return cmd + (["--seed", *map(str, seeds)] if seeds else [])


def _run_all(jobs, n_parallel, env, t0):
    """Run ``(name, cmd, logfile)`` jobs, ``n_parallel`` at a time; ``cmd`` may be a function of the seconds
    since ``t0`` that returns the command, or None to skip the job (a deadline passed)."""
    pending, procs, failed = list(jobs), {}, []
    while pending or procs:
        while pending and len(procs) < n_parallel:
            name, cmd, logfile = pending.pop(0)
            if callable(cmd):
                cmd = cmd(time.perf_counter() - t0)
                if cmd is None:
                    print(f"[{time.perf_counter() - t0:6.0f}s] skip {name} (deadline)", flush=True)
                    continue
            logfile.parent.mkdir(parents=True, exist_ok=True)
            log = open(logfile, "w")
            print(f"[{time.perf_counter() - t0:6.0f}s] start {name}", flush=True)
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        for name, (proc, log) in list(procs.items()):
            if proc.poll() is not None:
                log.close()
                print(f"[{time.perf_counter() - t0:6.0f}s] {name}: exit {proc.returncode}", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
                del procs[name]
        time.sleep(1)
    return failed


def cmd_run(args) -> int:
    """Stage 1: one process per (protocol, seed), ``--jobs`` at a time, fills the row cache. Stage 2: one
    ``excise bench`` per protocol over its seeds, which finds every row in the cache and writes the report."""
    from ..protocol import load_protocol

    protocols = args.protocols or fmnist_protocols()
    runs = Path(args.runs)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    t0 = time.perf_counter()
    seeds = {p: load_protocol(p)["seeds"][: args.seeds] if args.seeds else load_protocol(p)["seeds"] for p in protocols}
    # seed-major order: every protocol's first seed before any second seed
    name = {p: load_protocol(p)["name"] for p in protocols}
    stage1 = [(f"{name[p]} seed {s}", _bench_cmd(args, p, runs / name[p] / f"seed{s}", [s]),
               runs / name[p] / f"seed{s}.log")
              for i in range(max(map(len, seeds.values()))) for p in protocols for s in seeds[p][i:i + 1]]
    failed = _run_all(stage1, args.jobs, env, t0)
    stage2 = [(name[p], _bench_cmd(args, p, runs / name[p], seeds[p]), runs / name[p] / "bench.log")
              for p in protocols]
    failed += _run_all(stage2, args.jobs, env, t0)
    if failed:
        print("failed: " + ", ".join(failed) + f" (logs under {runs})", file=sys.stderr)
    return 1 if failed else 0


def _with_deadline(cmd, deadline, margin):
    """``cmd`` as is without a deadline; else a function of the elapsed seconds that adds ``--timeout`` (the time
    left less ``margin``, the longest trial expected) or returns None once less than ``margin`` is left."""
    if deadline is None:
        return cmd

    def build(elapsed):
        left = deadline - elapsed - margin
        return None if left <= 0 else cmd + ["--timeout", f"{left:.0f}"]

    return build


def cmd_tune(args) -> int:
    """One ``excise tune`` process per (protocol, method), ``--jobs`` at a time; each writes its best values into
    the protocol's shipped tuned table (writers take a lock in turn)."""
    from ..protocol import load_protocol

    protocols = args.protocols or fmnist_protocols()
    journals = Path(args.journals)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    jobs = []
    for p in protocols:
        name = load_protocol(p)["name"]
        for method in tunable_methods(p):
            if args.methods and method not in args.methods:
                continue
            cmd = [sys.executable, "-m", "excise.cli", "tune", method, p, "--budget", str(args.budget),
                   "--storage", str(journals / f"{name}.{method}.journal"), "--out", str(journals), "--write",
                   "--device", args.device, "--quiet"] + (["--seed", *map(str, args.seed)] if args.seed else []) \
                + (["--check", str(args.check)] if args.check else []) + (["--start-tuned"] if args.start_tuned else [])
            jobs.append((f"{method} on {name}", _with_deadline(cmd, args.deadline, args.margin),
                         journals / f"{name}.{method}.log"))
    failed = _run_all(jobs, args.jobs, env, time.perf_counter())
    if failed:
        print("failed: " + ", ".join(failed) + f" (logs under {journals})", file=sys.stderr)
    return 1 if failed else 0


def cmd_check(args) -> int:
    """One ``excise tune METHOD PROTOCOL --recheck --check REL --write`` per tuned entry, ``--jobs`` at a time:
    each re-scores the shipped values and their (1 ± REL) neighbours and records the shift in the table; then
    the Markdown summary of every check under ``--out``."""
    from ..protocol import load_protocol
    from ..tuned import load_tuned

    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    jobs = []
    for p in args.protocols or fmnist_protocols():
        name = load_protocol(p)["name"]
        for method in load_tuned(name):
            if args.methods and method not in args.methods:
                continue
            cmd = [sys.executable, "-m", "excise.cli", "tune", method, p, "--recheck", "--check", str(args.rel),
                   "--write", "--out", str(out), "--device", args.device, "--quiet"]
            jobs.append((f"check {method} on {name}", _with_deadline(cmd, args.deadline, args.margin),
                         out / f"{name}.{method}.check.log"))
    failed = _run_all(jobs, args.jobs, env, time.perf_counter())
    if args.md:
        from ..types import atomic_write_bytes

        md = Path(args.md)
        text = "\n".join(stability_md(out, " ".join(sys.argv[1:]), md.read_text() if md.exists() else "")) + "\n"
        atomic_write_bytes(md, text.encode())
        print(f"wrote {args.md}")
    if failed:
        print("failed: " + ", ".join(failed) + f" (logs under {out})", file=sys.stderr)
    return 1 if failed else 0


def cmd_coverage(args) -> int:
    print("\n".join(coverage(args.protocols or fmnist_protocols(), args.tables, args.journals)))
    return 0


def cmd_write(args) -> int:
    from ..protocol import load_protocol
    from ..types import atomic_write_bytes
    from ..evaluation.report import Report

    runs = Path(args.runs)
    reports, reused, patched = {}, [], []
    old = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    for p in args.protocols or fmnist_protocols():
        proto = load_protocol(p)
        p = proto["name"]
        f = runs / p / "report.json"
        if f.exists():
            reports[p] = Report.load(f)
        elif list((runs / p).glob("seed*/report.json")):
            reports[p] = combine_seeds([Report.load(g) for g in sorted((runs / p).glob("seed*/report.json"))])
            print(f"{p}: no report over all seeds; combined the per-seed ones", file=sys.stderr)
        elif p in old:
            d = old[p]
            rep = Report(d["protocol"], d["rows"], d.get("notes", []), "", d.get("facts", {}))
            if rep.protocol_hash != d["protocol_hash"]:
                raise SystemExit(f"{args.reuse}: {p}'s protocol hash does not match its protocol (edited file?)")
            for f in patch_reports(args.patch, p) if args.patch else []:
                rep, what = patch(rep, Report.load(f))
                patched.append(f"{p}: {'; '.join(what)}")
                print(f"{p}: {'; '.join(what)} from {f}", file=sys.stderr)
            why = stale(rep, proto, args.tuned)
            if why:
                raise SystemExit(f"{args.reuse}: the report of {p} is stale, run it again: " + "; ".join(why))
            reports[p] = rep.finalize()
            reused.append(p)
            print(f"{p}: report reused from {args.reuse}", file=sys.stderr)
        else:
            print(f"no report for {p} under {runs}: left out", file=sys.stderr)
    if not reports:
        raise SystemExit("no reports to write")
    out = Path(args.out or RESULTS / ("leaderboard.md" if args.tuned else "leaderboard-defaults.md"))
    lines = ["# Leaderboard: every method on every shipped Fashion-MNIST protocol", "",
             f"Written by `python benchmarks/leaderboard.py write` from the reports of "
             f"`python benchmarks/leaderboard.py run {args.run_args}` (each protocol: "
             "`excise bench PROTOCOL --methods ...`, rows cached under ~/.cache/excise/bench).", ""]
    if reused:
        lines[-1:] = [f"The reports of {', '.join(reused)} are reused from an earlier write (`--reuse "
                      f"{args.reuse}`), checked to hold the same protocol and, where tuned, the shipped tuned "
                      "values; the rest are from that run.", ""]
    if patched:
        lines[-1:] = ["In the reused reports, these rows were run again (`--patch "
                      f"{args.patch}`: `excise bench PROTOCOL ...`), each seed's checked to evaluate the same "
                      "original and oracle as the rows beside it: " + " | ".join(patched) + ".", ""]
    lines += winners(reports)
    for p, rep in reports.items():
        lines.append(rep.to_markdown(title=p).rstrip())
        lines += ["", f"![Avg Gap against seconds, {p}]({out.stem}/{p}.png)", ""]
    if args.tuned:
        lines += tuned_section(list(reports))
    if args.preamble and Path(args.preamble).exists():  # the reading follows the generated tables
        lines += ["## Reading: how these tables were made", "", Path(args.preamble).read_text().rstrip(), ""]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode())
    dump = {p: rep.to_dict() for p, rep in reports.items()}
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(dump, indent=1, default=str).encode())
    _plots(reports, out.parent / out.stem)  # leaderboard.md -> leaderboard/PROTOCOL.png
    print(f"wrote {out}, {out.with_suffix('.json')} and plots under {out.parent / out.stem}")
    return 0


def _plots(reports, folder: Path) -> None:
    from ..evaluation.plots import gap_vs_seconds

    folder.mkdir(parents=True, exist_ok=True)
    for p, rep in reports.items():
        gap_vs_seconds(rep, folder / f"{p}.png", title=p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="excise leaderboard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--protocols", nargs="+", default=None)
    r.add_argument("--seeds", type=int, default=None, help="the protocols' first N seeds (default: all three)")
    r.add_argument("--device", default="auto")
    r.add_argument("--jobs", type=int, default=1, help="protocols run at once (each its own process)")
    r.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    r.add_argument("--runs", default="excise-out/leaderboard")
    r.add_argument("--tuned", action="store_true", help="run with the shipped tuned tables (excise bench --tuned)")
    t = sub.add_parser("tune")
    t.add_argument("--protocols", nargs="+", default=None)
    t.add_argument("--methods", nargs="+", default=None, help="default: every method with a search space")
    t.add_argument("--budget", type=int, default=20, help="trials per (protocol, method)")
    t.add_argument("--seed", type=int, nargs="+", default=None,
                   help="protocol seeds each trial runs on (objective = their mean; default: the first)")
    t.add_argument("--device", default="auto")
    t.add_argument("--jobs", type=int, default=1)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--journals", default="excise-out/tune")
    t.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="wall-clock seconds for the whole command: each study stops starting trials in time (and "
                        "resumes from its journal on the next call), studies not started by then are skipped")
    t.add_argument("--margin", type=float, default=120.0, metavar="SECONDS",
                   help="with --deadline: time kept back for the longest trial plus start-up (default 120)")
    t.add_argument("--check", type=float, default=None, metavar="REL",
                   help="excise tune --check REL: re-score each finished study's best values at (1 ± REL) (two "
                        "runs more per study, after its budget: keep them inside --margin)")
    t.add_argument("--start-tuned", action="store_true",
                   help="excise tune --start-tuned: each study tries the shipped entry's values once (re-tuning "
                        "a method whose revision was raised)")
    k = sub.add_parser("check", help="re-score every shipped tuned entry at (1 ± REL) (excise tune --recheck)")
    k.add_argument("--protocols", nargs="+", default=None)
    k.add_argument("--methods", nargs="+", default=None)
    k.add_argument("--rel", type=float, default=0.01)
    k.add_argument("--device", default="auto")
    k.add_argument("--jobs", type=int, default=1)
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--out", default="excise-out/check", help="folder for each check's JSON and log")
    k.add_argument("--md", default=None, help="write the summary of every check under --out here")
    k.add_argument("--deadline", type=float, default=None, metavar="SECONDS")
    k.add_argument("--margin", type=float, default=120.0, metavar="SECONDS")
    c = sub.add_parser("coverage", help="which (protocol, method) the tuned tables hold, over which seeds")
    c.add_argument("--protocols", nargs="+", default=None)
    c.add_argument("--tables", default=None, help="a folder of tuned tables (default: the shipped ones)")
    c.add_argument("--journals", default=None,
                   help="tune's --journals folder: also describe the studies under way there")
    w = sub.add_parser("write")
    w.add_argument("--protocols", nargs="+", default=None)
    w.add_argument("--runs", default="excise-out/leaderboard")
    w.add_argument("--out", default=None,
                   help="default: benchmarks/results/leaderboard.md with --tuned (the leaderboard), else "
                        "leaderboard-defaults.md (every method at its defaults)")
    w.add_argument("--run-args", default="", help="the arguments the run used, quoted in the file")
    w.add_argument("--preamble", default=None, help="a Markdown file placed after the tables (the reading)")
    w.add_argument("--tuned", action="store_true", help="add the tuned values of every protocol")
    w.add_argument("--patch", default=None, metavar="DIR",
                   help="with --reuse: DIR/PROTOCOL/report.json, or DIR/PROTOCOL/*/report.json (some methods or "
                        "whole seeds) replaces those rows in the reused report of PROTOCOL (leaderboard.patch)")
    w.add_argument("--reuse", default=None, metavar="JSON",
                   help="an earlier write's JSON: protocols with no report under --runs are taken from it, "
                        "if their protocol and tuned values are unchanged")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "tune": cmd_tune, "write": cmd_write, "coverage": cmd_coverage,
            "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
