"""The leaderboard: every registered method (but ``retrain``, which is the oracle row) on every shipped
Fashion-MNIST protocol, through ``excise bench``, then one Markdown file and one plot.

    python benchmarks/leaderboard.py tune  [--protocols P ...] [--methods M ...] [--budget N] [--jobs J]
    python benchmarks/leaderboard.py run   [--protocols P ...] [--seeds N] [--device D] [--jobs J] [--tuned]
    python benchmarks/leaderboard.py write [--runs DIR] [--tuned] [--out FILE]  (default: results/leaderboard.md
                                           with --tuned, results/leaderboard-defaults.md without)
    python benchmarks/leaderboard.py coverage [--protocols P ...] [--journals DIR]   (what the tuned tables hold)
    python benchmarks/leaderboard.py check [--protocols P ...] [--rel 0.01] [--md stability.md]

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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def fmnist_protocols():
    from excise.bench import list_protocols, load_protocol

    return [p for p in list_protocols() if load_protocol(p)["dataset"].startswith("fashion-mnist")]


def all_methods(proto_name: str):
    """The protocol's own method labels first, then every other registered method by name."""
    from excise.bench import load_protocol
    from excise.methods import available

    own = list(load_protocol(proto_name)["methods"])
    return own + [m for m in available() if m not in own and m != "retrain"]


def tunable_methods(proto_name: str):
    """The registered method behind each of the protocol's labels (``all_methods``) that has a search space."""
    from excise.bench import load_protocol
    from excise.methods import get_method

    table = load_protocol(proto_name)["methods"]
    names = [table.get(m, {}).get("method", m) for m in all_methods(proto_name)]
    return [m for m in names if get_method(m).space]


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
    from excise.bench import load_protocol

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
    from excise.bench import load_protocol

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
    from excise.bench import load_protocol
    from excise.tuning import load_tuned

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
        from excise.types import atomic_write_bytes

        md = Path(args.md)
        text = "\n".join(stability_md(out, " ".join(sys.argv[1:]), md.read_text() if md.exists() else "")) + "\n"
        atomic_write_bytes(md, text.encode())
        print(f"wrote {args.md}")
    if failed:
        print("failed: " + ", ".join(failed) + f" (logs under {out})", file=sys.stderr)
    return 1 if failed else 0


READING = "**Reading.**"


def stability_md(folder: Path, command: str = "", previous: str = "") -> list:
    """Markdown: every ``*.check.json`` under ``folder``, one table per protocol. Checks are run a group of
    entries at a time, so the page names the latest call and keeps the hand-written reading of the page it
    replaces (``previous``: from the line that starts with ``**Reading.**`` to the end)."""
    checks = [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*.check.json"))]
    lines = ["# Are the tuned values on a cliff?", "",
             f"Written by `python benchmarks/leaderboard.py check --protocols P --methods M ... --out {folder} "
             f"--md FILE`, one call per group of entries below, each adding its check JSONs to {folder}; the "
             f"summary is written from every check JSON there (the latest call: `{command}`). "
             "For each entry of the shipped tuned tables: "
             "the validation objective (mean |Δ| to the oracle over forget accuracy, validation accuracy and the "
             "validation MIA; the seeds it was tuned on) at the tuned values, re-scored on this machine, and "
             "with every continuous value scaled by (1 − rel) and (1 + rel). An entry whose objective moves by "
             "more than the tolerance is **fragile**: a lucky draw on one split, whose values will not carry "
             "over to another seed or device. 'when tuned' is the objective the study recorded (another "
             "machine's models differ bit-wise, so it may differ from the re-scored one).", ""]
    by_proto = {}
    for c in checks:
        by_proto.setdefault(c["protocol"], []).append(c)
    for p, cs in by_proto.items():
        lines += [f"**{p}**", "", "| method | seeds | when tuned | re-scored | × (1 − rel) | × (1 + rel) | shift | "
                  "verdict |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for c in sorted(cs, key=lambda c: c["method"]):
            runs = {r["scale"]: r["value"] for r in c["runs"]}
            lo, hi = (runs.get(1 - c["rel"]), runs.get(1 + c["rel"]))
            seeds = c["seed"] if isinstance(c["seed"], list) else [c["seed"]]
            verdict = "**fragile**" if c["fragile"] else ("stable" if c["runs"] else "no continuous value")
            lines.append(f"| {c['method']} | {','.join(map(str, seeds))} | "
                         f"{'-' if c['recorded'] is None else format(c['recorded'], '.2f')} | {c['value']:.2f} | "
                         f"{'-' if lo is None else format(lo, '.2f')} | {'-' if hi is None else format(hi, '.2f')} | "
                         f"{c['shift']:.2f} | {verdict} (±{100 * c['rel']:g} %, tolerance {c['tolerance']:g}) |")
        lines.append("")
    at = previous.find(READING)
    if at >= 0 and (at == 0 or previous[at - 1] == "\n"):
        lines += previous[at:].rstrip("\n").split("\n")
    return lines


def journal_state(path: Path):
    """What the latest study in a journal holds so far, or None when there is none: trials complete, the best
    value, the median seconds of a complete trial, and when the trial marked running (if any) started — one
    whose process was killed stays marked running, so its start tells which it is."""
    if not Path(path).exists():
        return None
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    studies = optuna.get_all_study_summaries(storage)  # in creation order; a method's revision starts a new one
    if not studies:
        return None
    trials = optuna.load_study(study_name=studies[-1].study_name, storage=storage).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    secs = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    running = [t.datetime_start for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    return {"complete": len(done), "best": min((t.value for t in done), default=None),
            "trial_seconds": secs[len(secs) // 2] if secs else None, "running_since": max(running, default=None)}


def _journal_cell(state) -> str:
    parts = [f"journal: {state['complete']} trials"]
    if state["best"] is not None:
        parts.append(f"best {state['best']:.3g}")
    if state["trial_seconds"] is not None:
        parts.append(f"~{state['trial_seconds'] / 60:.0f} min a trial")
    if state["running_since"] is not None:
        parts.append(f"one marked running since {state['running_since']:%Y-%m-%d %H:%M}")
    return "(" + ", ".join(parts) + ")"


def coverage(protocols, directory=None, journals=None) -> list:
    """Lines: one per protocol, each tunable method's state in the tuned table — ``seeds/trials`` when tuned,
    ``-`` when not — so a session that splits the tuning over several machines sees what is left. With
    ``journals`` (``tune --journals``), a study under way there is described after its method (trials done,
    best so far, a trial's median cost, whether one is running)."""
    import tomllib

    from excise.bench import load_protocol
    from excise.tuning import revision_gap, tuned_table_path

    out = []
    for p in protocols:
        name = load_protocol(p)["name"]
        f = tuned_table_path(name, directory)
        meta = tomllib.loads(f.read_text()).get("tuning", {}) if f.exists() else {}
        cells = []
        for method in tunable_methods(p):
            t = meta.get(method)
            seeds = t and (t.get("seed") if isinstance(t.get("seed"), list) else [t.get("seed")])
            gap = t and revision_gap(method, t.get("revision", 0))
            old = gap and f"tuned at revision {gap[0]}, the method is at {gap[1]}"
            cell = (f"{method} -" if not t else f"{method} - ({old})" if old
                    else f"{method} - (carried from {t['carried_from']})" if "carried_from" in t
                    else f"{method} {','.join(map(str, seeds))}/{t['trials']}")
            state = journals is not None and journal_state(Path(journals) / f"{name}.{method}.journal")
            if state and (not t or old or state["complete"] > t["trials"]):
                cell += " " + _journal_cell(state)  # a study beyond the table's entry: under way
            cells.append(cell)
        done = sum(not c.startswith(f"{m} -") for m, c in zip(tunable_methods(p), cells))
        out.append(f"{name}: {done}/{len(cells)} tuned | " + " | ".join(cells))
    return out


def cmd_coverage(args) -> int:
    print("\n".join(coverage(args.protocols or fmnist_protocols(), args.tables, args.journals)))
    return 0


def _shift_cell(meta) -> str:
    """How far the objective moved at (1 ± rel) x the tuned values (``leaderboard.py check``), or '-'."""
    from excise.tuning import STABILITY_TOLERANCE

    if "check_shift" not in meta:
        return "-"
    cell = f"{meta['check_shift']:.2f} (±{100 * meta['check_rel']:g} %)"
    return f"**{cell} fragile**" if meta["check_shift"] > STABILITY_TOLERANCE else cell


def tuned_section(names) -> list:
    """Markdown: the tuned values each protocol's table holds, with the validation objective they reached."""
    from excise.tuning import TUNED_DIR

    import tomllib

    lines = ["## Tuned hyperparameters", "",
             "From the tables shipped in src/excise/bench/tuned/ (`excise tune`: validation splits and retrain "
             "oracles of the seeds listed; objective = mean |Δ| to the oracle over forget accuracy, validation "
             "accuracy and the validation-split MIA, averaged over those seeds; every trial of each study is in "
             "benchmarks/results/tune/).", ""]
    for p in names:
        f = TUNED_DIR / f"{p}.toml"
        if not f.exists():
            lines += [f"- {p}: none tuned", ""]
            continue
        t = tomllib.loads(f.read_text())
        lines += [f"**{p}**", "", "| method | tuned values | objective (tuned) | objective (defaults) | trials | seeds "
                  "| shift at ±rel |", "|---|---|---|---|---|---|---|"]
        for m, vals in sorted(t.get("methods", {}).items()):
            meta = t.get("tuning", {}).get(m, {})
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items())
            if "carried_from" in meta:  # tuning.carry_tuned: another protocol's entry, not searched here
                lines.append(f"| {m} | {shown} | — | — | 0: carried from {meta['carried_from']} (objective "
                             f"{meta.get('source_value', float('nan')):.2f} there, {meta.get('source_trials', '?')} "
                             f"trials) | — | - |")
                continue
            seeds = meta.get("seed", "")
            seeds = ", ".join(map(str, seeds)) if isinstance(seeds, list) else seeds
            lines.append(f"| {m} | {shown} | {meta.get('value', float('nan')):.2f} | "
                         f"{meta.get('default_value', float('nan')):.2f} | {meta.get('trials', '')} | {seeds} | "
                         f"{_shift_cell(meta)} |")
        lines.append("")
    return lines


def winners(reports, seed_methods=None) -> list:
    """Markdown: who wins where, computed from the rows (not written by hand). Per protocol: the method with the
    lowest mean Avg Gap, the others whose mean lies within that winner's std (not separable on these seeds),
    the best seed method and its rank, the fastest method within one point of the winner that is also closer
    to the oracle than the untouched original, the methods that diverged on some seed (they rank last), and
    the untouched original's own Avg Gap — "tied" when it too lies within the winner's std, i.e. no method is
    separable from doing nothing on these seeds. A protocol run on one seed has no std: its winner says "(1 seed)"
    and nothing is called tied with it.
    ``seed_methods``: default ``excise.methods.SELECTIVE``."""
    from excise.methods import SELECTIVE

    seed_methods = SELECTIVE if seed_methods is None else seed_methods
    lines = ["## Who wins where", "",
             "Computed by `leaderboard.py write` from the tables below: rank = by mean Avg Gap over the seeds "
             "(lower is closer to retraining); a method that diverged on any seed ranks last. *Tied* = mean within "
             "the winner's std over seeds. *Fastest within 1 point* counts only methods closer to the oracle than "
             "the original (a method that leaves the model as it was is not fast unlearning). The last column is "
             "the original model's own Avg Gap (no unlearning), *tied* when it too lies within the winner's std.",
             "",
             "| protocol | winner (Avg Gap) | tied with it | best seed method (rank of n) | fastest within 1 point "
             "of the winner | diverged | original |", "|---|---|---|---|---|---|---|"]
    for p, rep in reports.items():
        summ = rep.summary()
        labels = [m for m in rep.methods() if m not in ("original", "retrain")]
        div = {m for m in labels if any(r.get("diverged") for r in rep.rows if r["method"] == m)}
        ok = sorted((m for m in labels if m not in div and "avg_gap" in summ[m]), key=lambda m: summ[m]["avg_gap"][0])
        if not ok:
            lines.append(f"| {p} | — | — | — | — | {', '.join(sorted(div)) or '—'} | — |")
            continue
        gap = {m: summ[m]["avg_gap"] for m in ok}
        best = ok[0]
        one = gap[best][2] < 2  # a single seed has no std: no method (nor the original) is called tied with it
        tie_limit = gap[best][0] + (0.0 if one else gap[best][1])  # within the winner's std: not separable
        tied = [] if one else [m for m in ok[1:] if gap[m][0] <= tie_limit]
        seeds = [m for m in ok if m.split("-")[0] in seed_methods]
        seed_cell = (f"{seeds[0]} {gap[seeds[0]][0]:.2f} ({ok.index(seeds[0]) + 1} of {len(labels)})"
                     if seeds else "—")
        orig = summ.get("original", {}).get("avg_gap")
        # a method no closer to the oracle than the untouched original (e.g. one that selected nothing) is not
        # "fast within a point": doing nothing would be faster still
        near = [m for m in ok if gap[m][0] <= gap[best][0] + 1.0 and "seconds" in summ[m]
                and (orig is None or gap[m][0] < orig[0])]
        fast = min(near, key=lambda m: summ[m]["seconds"][0]) if near else None
        fast_cell = f"{fast} ({summ[fast]['seconds'][0]:.1f} s, {gap[fast][0]:.2f})" if fast else "—"
        orig_cell = "—" if orig is None else (
            f"{orig[0]:.2f}" + (" (tied)" if orig[0] <= tie_limit else ""))
        win_cell = f"{best} {gap[best][0]:.2f} (1 seed)" if one else f"{best} {gap[best][0]:.2f} ± {gap[best][1]:.2f}"
        tied_cell = "— (1 seed: no std)" if one else (", ".join(tied) or "—")
        lines.append(f"| {p} | {win_cell} | {tied_cell} | "
                     f"{seed_cell} | {fast_cell} | {', '.join(sorted(div)) or '—'} | {orig_cell} |")
    return lines + [""]


def _fmt(v, spec=".2f"):
    mean, std, n = v
    return f"{mean:{spec}} ± {std:{spec}}" if n > 1 else f"{mean:{spec}}"


def combine_seeds(reports):
    """One Report from single-seed reports of one protocol: the identity a run over all those seeds has (the
    same body, the union of seeds and split hashes), the rows of each."""
    from excise.bench.runner import ONE_OFF_NOTE, one_off_note, parse_seeds_note, seeds_note
    from excise.evaluation.report import Report

    body = {k: v for k, v in reports[0].protocol.items() if k not in ("seeds", "split_hashes")}
    for r in reports[1:]:
        if {k: v for k, v in r.protocol.items() if k not in ("seeds", "split_hashes")} != body:
            raise ValueError("per-seed reports of different protocols cannot be combined")
    seeds = sorted(s for r in reports for s in r.protocol["seeds"])
    hashes = {k: v for r in reports for k, v in r.protocol["split_hashes"].items()}
    out = Report({**body, "seeds": seeds, "split_hashes": {str(s): hashes[str(s)] for s in seeds}})
    out.rows = [row for r in reports for row in r.rows]
    # every report's notes, once each, but for the per-run ones, written again over all the rows: which of the
    # protocol's seeds were run and the one-off importance note
    totals = {parse_seeds_note(n) for r in reports for n in r.notes} - {None}
    if len(totals) > 1:
        raise ValueError(f"per-seed reports name different seed counts for their protocol: {sorted(totals)}")
    out.notes = list(dict.fromkeys(n for r in reports for n in r.notes
                                   if parse_seeds_note(n) is None and not n.startswith(ONE_OFF_NOTE)))
    for note in (one_off_note(out.rows), seeds_note(seeds, totals.pop()) if totals else None):
        if note:
            out.notes.append(note)
    return out.finalize()


# what identifies a model's evaluation in a row that records no model_hash: equal in two reports only when the
# same models were evaluated
_MODEL_KEYS = ("forget_acc", "RA", "TA", "VA", "mia_svc_confidence", "mia_loss_cv")


def _same_model(a, b) -> bool:
    """Whether two original (or oracle) rows evaluated the same model: by its state hash where both rows
    record one (reports from 0.4.0 on), else by equal metrics."""
    if a.get("model_hash") and b.get("model_hash"):
        return a["model_hash"] == b["model_hash"]
    return all(a.get(k) == b.get(k) for k in _MODEL_KEYS)


def patch_reports(folder, protocol) -> list:
    """The reports ``write --patch FOLDER`` applies to ``protocol``: FOLDER/PROTOCOL/report.json, else every
    FOLDER/PROTOCOL/*/report.json in name order (none when the protocol has no folder there)."""
    where = Path(folder) / protocol
    return [where / "report.json"] if (where / "report.json").exists() else sorted(where.glob("*/report.json"))


def patch(report, fresh):
    """``report`` (an earlier write's, reused) with rows of ``fresh`` (a report on the same protocol, e.g.
    ``excise bench P --methods neggrad --tuned``) in their place. Rows compared within a seed must share that
    seed's original and oracle, so per seed: where ``fresh``'s original and oracle rows equal the reused ones
    (the same models), its rows replace those of the same methods; where they differ (the models were trained
    again elsewhere, not bit-identical), ``fresh`` must hold every method of that seed, and the whole seed is
    replaced. Returns the patched report and a description of what was replaced."""
    from excise.evaluation.report import ORACLE, Report

    anchor = ("original", ORACLE)
    def body(ident):
        return {k: v for k, v in ident.items() if k not in ("seeds", "split_hashes")}

    mine, theirs = report.protocol.get("split_hashes", {}), fresh.protocol.get("split_hashes", {})
    if body(fresh.protocol) != body(report.protocol) or any(mine.get(s) != h for s, h in theirs.items()):
        raise SystemExit("a patch report's protocol (body, seeds, splits or data) differs from the reused one's")
    old = {(r["method"], r["seed"]): r for r in report.rows}
    new = {(r["method"], r["seed"]): r for r in fresh.rows}
    rows, what = list(report.rows), []
    for seed in sorted({r["seed"] for r in fresh.rows}):
        methods = sorted(m for m, s in new if s == seed and m not in anchor)
        if any((m, seed) not in new for m in anchor):
            raise SystemExit(f"a patch report lacks the original or oracle row of seed {seed}")
        same = all(old.get((m, seed)) is not None and _same_model(old[(m, seed)], new[(m, seed)]) for m in anchor)
        if same:
            rows = [new[(r["method"], seed)] if r["seed"] == seed and r["method"] in methods else r for r in rows]
            rows += [new[(m, seed)] for m in methods if (m, seed) not in old]
            what.append(f"{', '.join(methods)} on seed {seed}")
            continue
        lacking = sorted(m for m, s in old if s == seed and (m, s) not in new)
        if lacking:
            raise SystemExit(f"a patch report's original or oracle of seed {seed} is not the reused one's (its models "
                             f"differ: trained again, not bit-identical), so it must re-run the whole seed; it "
                             f"lacks {lacking}")
        rows = [new[(r["method"], seed)] if r["seed"] == seed else r for r in rows]
        rows += [r for (m, s), r in new.items() if s == seed and (m, s) not in old]
        what.append(f"every row of seed {seed} (its models were trained again)")
    if not what:
        raise SystemExit("a patch report holds no rows")
    out = Report(report.protocol, [dict(r) for r in rows], list(report.notes), "")
    return out.finalize(), what


def stale(report, proto, tuned: bool) -> list:
    """Why an earlier report no longer stands for ``proto`` (a loaded protocol): a changed protocol body, or a
    tuned row whose values differ from the shipped tuned table. Empty when it still does."""
    from excise.tuning import load_tuned

    skip = ("methods", "description", "seeds", "data_root", "search", "split_hashes", "data_fingerprint")
    now = {k: v for k, v in proto.items() if k not in skip}
    then = {k: v for k, v in report.protocol.items() if k not in skip}
    why = [] if now == then else [f"protocol changed: {sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))}"]
    if list(report.protocol.get("seeds", [])) != list(proto["seeds"]):
        why.append(f"seeds {report.protocol.get('seeds')} are not the protocol's {proto['seeds']}")
    values = load_tuned(proto["name"]) if tuned else {}
    from excise.tuning import revision_gap

    for row in report.rows:
        name = (proto["methods"].get(row["method"]) or {}).get("method", row["method"])
        gap = revision_gap(name, row.get("revision", 0))
        if gap:
            why.append(f"{row['method']} seed {row['seed']}: run at revision {gap[0]} of {name}, which is at "
                       f"{gap[1]} now")
        if tuned and row["method"] in values:
            want = {k: v for k, v in values[row["method"]].items() if k not in ("method", "preset")}
            have = row.get("hparams") or {}
            off = sorted(k for k, v in want.items() if k in have and have[k] != v)
            if not row.get("tuned") or off:
                why.append(f"{row['method']} seed {row['seed']}: not run with the shipped tuned values {off}")
    return why


def cmd_write(args) -> int:
    from excise.bench import load_protocol
    from excise.types import atomic_write_bytes
    from excise.evaluation.report import Report

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
            rep = Report(d["protocol"], d["rows"], d.get("notes", []), "")
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
    from excise.evaluation.plots import gap_vs_seconds

    folder.mkdir(parents=True, exist_ok=True)
    for p, rep in reports.items():
        gap_vs_seconds(rep, folder / f"{p}.png", title=p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
