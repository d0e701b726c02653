"""The leaderboard's logic: combine per-seed reports, tell stale ones, patch rows in, rank who wins where, and
describe the tuned tables (coverage, stability). ``benchmarks/leaderboard.py`` runs the benchmarks and writes
the Markdown with these."""

from __future__ import annotations

import json
from pathlib import Path


def all_methods(proto_name: str):
    """The protocol's own method labels first, then every other registered method that applies to
    classification, by name."""
    from excise.bench import load_protocol
    from excise.methods import available, get_method

    own = list(load_protocol(proto_name)["methods"])
    return own + [m for m in available() if m not in own and m != "retrain"
                  and (get_method(m).tasks is None or "classification" in get_method(m).tasks)]


def tunable_methods(proto_name: str):
    """The registered method behind each of the protocol's labels (``all_methods``) that has a search space."""
    from excise.bench import load_protocol
    from excise.methods import get_method

    table = load_protocol(proto_name)["methods"]
    names = [table.get(m, {}).get("method", m) for m in all_methods(proto_name)]
    return [m for m in names if get_method(m).space]


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
    from excise.tuned import revision_gap, tuned_table_path

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


def _shift_cell(meta) -> str:
    """How far the objective moved at (1 ± rel) x the tuned values (``leaderboard.py check``), or '-'."""
    from excise.tuning import STABILITY_TOLERANCE

    if "check_shift" not in meta:
        return "-"
    cell = f"{meta['check_shift']:.2f} (±{100 * meta['check_rel']:g} %)"
    return f"**{cell} fragile**" if meta["check_shift"] > STABILITY_TOLERANCE else cell


def tuned_section(names) -> list:
    """Markdown: the tuned values each protocol's table holds, with the validation objective they reached."""
    from excise.tuned import TUNED_DIR

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
    same body, the union of seeds and split hashes), the rows of each, every report's free-text notes once each
    and their facts (which must agree; the notes rendered from them then describe the combined rows)."""
    from excise.evaluation.report import Report

    body = {k: v for k, v in reports[0].protocol.items() if k not in ("seeds", "split_hashes")}
    for r in reports[1:]:
        if {k: v for k, v in r.protocol.items() if k not in ("seeds", "split_hashes")} != body:
            raise ValueError("per-seed reports of different protocols cannot be combined")
    totals = {r.facts.get("seeds_total") for r in reports} - {None}
    if len(totals) > 1:
        raise ValueError(f"per-seed reports name different seed counts for their protocol: {sorted(totals)}")
    seeds = sorted(s for r in reports for s in r.protocol["seeds"])
    hashes = {k: v for r in reports for k, v in r.protocol["split_hashes"].items()}
    out = Report({**body, "seeds": seeds, "split_hashes": {str(s): hashes[str(s)] for s in seeds}})
    out.rows = [row for r in reports for row in r.rows]
    out.notes = list(dict.fromkeys(n for r in reports for n in r.notes))
    for r in reports:
        out.facts.update({k: v for k, v in r.facts.items() if k not in out.facts})
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
    out = Report(report.protocol, [dict(r) for r in rows], list(report.notes), "", dict(report.facts))
    return out.finalize(), what


def stale(report, proto, tuned: bool) -> list:
    """Why an earlier report no longer stands for ``proto`` (a loaded protocol): a changed protocol body, or a
    tuned row whose values differ from the shipped tuned table. Empty when it still does."""
    from excise.tuned import load_tuned

    skip = ("methods", "description", "seeds", "data_root", "search", "split_hashes", "data_fingerprint")
    now = {k: v for k, v in proto.items() if k not in skip}
    then = {k: v for k, v in report.protocol.items() if k not in skip}
    why = [] if now == then else [f"protocol changed: {sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))}"]
    if list(report.protocol.get("seeds", [])) != list(proto["seeds"]):
        why.append(f"seeds {report.protocol.get('seeds')} are not the protocol's {proto['seeds']}")
    values = load_tuned(proto["name"]) if tuned else {}
    from excise.tuned import revision_gap

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
