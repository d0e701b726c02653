"""The leaderboard: its logic (excise.bench.leaderboard: combining seeds, staleness, patches, winners, the tuned
tables' coverage and stability) and benchmarks/leaderboard.py's scheduling helpers (the part a GPU session relies
on to fit its time slot)."""

import json

import pytest

from excise.bench import leaderboard as board

@pytest.fixture(scope="module")
def lb():
    from excise.bench import leaderboard_cli

    return leaderboard_cli


def test_deadline_gives_each_study_the_time_left_and_skips_late_ones(lb):
    cmd = ["excise", "tune", "ssd", "p"]
    assert lb._with_deadline(cmd, None, 120) == cmd  # no deadline: the command as is
    build = lb._with_deadline(cmd, 540, 90)
    assert build(0) == cmd + ["--timeout", "450"]
    assert build(400) == cmd + ["--timeout", "50"]
    assert build(450) is None and build(600) is None  # less than the margin left: not started


def test_run_all_skips_jobs_whose_deadline_passed(lb, tmp_path):
    import os
    import sys
    import time

    ran = tmp_path / "ran"
    ok = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('x')"]
    jobs = [("now", lambda elapsed: ok, tmp_path / "a.log"), ("late", lambda elapsed: None, tmp_path / "b.log"),
            ("plain", ok, tmp_path / "c.log")]
    failed = lb._run_all(jobs, 1, dict(os.environ), time.perf_counter())
    assert failed == [] and ran.read_text() == "xx"  # the skipped job never started
    assert not (tmp_path / "b.log").exists()


def test_winners_ranks_by_mean_gap_and_puts_diverged_methods_last():
    from excise.evaluation.report import Report

    rows = []
    for seed in (0, 1):
        rows += [{"method": "original", "seed": seed, "avg_gap": 30.0},
                 {"method": "retrain", "seed": seed, "avg_gap": 0.0, "seconds": 100.0},
                 {"method": "finetune", "seed": seed, "avg_gap": [1.0, 3.0][seed], "seconds": 20.0},  # 2.0 ± 1.41
                 {"method": "ssd", "seed": seed, "avg_gap": [2.5, 3.5][seed], "seconds": 1.0},  # 3.0: tied, fast
                 {"method": "scissorhands", "seed": seed, "avg_gap": 9.0, "seconds": 0.5},  # far: not tied
                 {"method": "scrub", "seed": seed, "avg_gap": 0.1, "seconds": 5.0,  # best gap, but diverged once
                  **({"diverged": "nan at step 3"} if seed else {})}]
    table = "\n".join(board.winners({"p": Report({"name": "p"}, rows)}))
    row = next(line for line in table.splitlines() if line.startswith("| p |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "finetune 2.00 ± 1.41"
    assert cells[2] == "ssd"  # 3.0 lies within finetune's std; scissorhands (9.0) does not
    assert cells[3] == "ssd 3.00 (2 of 4)"
    assert cells[4] == "ssd (1.0 s, 3.00)"  # scissorhands is faster but more than a point behind
    assert cells[5] == "scrub"
    assert cells[6] == "30.00"  # the original, far from the winner
    # a protocol where doing nothing is as close to retraining as the winner: said so
    near = [dict(r, avg_gap=2.5) if r["method"] == "original" else r for r in rows]
    table = "\n".join(board.winners({"q": Report({"name": "q"}, near)}))
    row = next(line for line in table.splitlines() if line.startswith("| q |"))
    assert row.rstrip(" |").endswith("2.50 (tied)")
    # ssd (3.0, the fastest within a point) is no closer than doing nothing (2.5): finetune is named instead
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "finetune (20.0 s, 2.00)"
    # one seed: no std, so the winner says so and nothing is tied with it (ssd's 2.5 would lie within any std)
    one = [r for r in rows if r["seed"] == 0]
    table = "\n".join(board.winners({"r": Report({"name": "r"}, one)}))
    row = next(line for line in table.splitlines() if line.startswith("| r |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "scrub 0.10 (1 seed)" and cells[2] == "— (1 seed: no std)"
    assert cells[3] == "ssd 2.50 (3 of 4)" and cells[6] == "30.00"


def test_coverage_reads_which_methods_a_tuned_table_holds(tmp_path, monkeypatch):
    (tmp_path / "fmnist-smallcnn-class.toml").write_text(
        '[methods.ssd]\nalpha = 3.0\n[tuning.ssd]\nseed = [0, 1, 2]\ntrials = 20\n'
        '[methods.finetune]\nlr = 0.01\n[tuning.finetune]\nseed = 0\ntrials = 12\n'
        '[methods.neggrad]\nlr = 0.01\n[tuning.neggrad]\nseed = 0\ntrials = 12\n')
    (line,) = board.coverage(["fmnist-smallcnn-class"], tmp_path)
    cells = line.split(" | ")
    assert "ssd 0,1,2/20" in cells and "finetune 0/12" in cells and "scissorhands -" in cells
    # tuned before neggrad's revision 1 (max_steps loops over the forget set): no longer counted
    assert "neggrad - (tuned at revision 0, the method is at 1)" in cells
    assert "retrain" not in line  # nothing to tune
    assert line.startswith("fmnist-smallcnn-class: 2/13 tuned")
    # an entry carried from another protocol (tuning.carry_tuned) is not counted as tuned here, and says so
    (tmp_path / "fmnist-smallcnn-class.toml").write_text(
        (tmp_path / "fmnist-smallcnn-class.toml").read_text() + '[methods.salun]\nlr = 0.01\n[tuning.salun]\n'
        'carried_from = "fmnist-resnet18w16-class"\ntrials = 0\nsource_value = 0.19\nsource_trials = 12\n')
    (line,) = board.coverage(["fmnist-smallcnn-class"], tmp_path)
    assert "salun - (carried from fmnist-resnet18w16-class)" in line.split(" | ")
    assert line.startswith("fmnist-smallcnn-class: 2/13 tuned")
    monkeypatch.setattr("excise.tuned.TUNED_DIR", tmp_path)
    text = "\n".join(board.tuned_section(["fmnist-smallcnn-class"]))
    assert ("| salun | lr=0.01 | — | — | 0: carried from fmnist-resnet18w16-class (objective 0.19 there, 12 trials) "
            "| — | - |") in text


def test_stale_refuses_a_reused_report_whose_protocol_or_tuned_values_changed():
    from excise.bench import load_protocol
    from excise.evaluation.report import Report
    from excise.tuned import load_tuned

    proto = load_protocol("fmnist-smallcnn-class")
    ssd = load_tuned(proto["name"])["ssd"]
    body = {k: v for k, v in proto.items() if k not in ("methods", "description", "seeds", "data_root")}
    ident = {**body, "seeds": list(proto["seeds"]), "split_hashes": {}, "data_fingerprint": "x"}
    row = {"method": "ssd", "seed": 0, "tuned": True, "hparams": {**ssd, "scope": None}}
    assert board.stale(Report(ident, [row]), proto, tuned=True) == []
    assert board.stale(Report(ident, [dict(row, tuned=False)]), proto, tuned=False) == []  # a defaults board
    changed = {**ident, "recipe": {**ident["recipe"], "epochs": 9}}
    assert board.stale(Report(changed, [row]), proto, tuned=True) == ["protocol changed: ['recipe']"]
    assert "seeds" in board.stale(Report({**ident, "seeds": [0]}, [row]), proto, tuned=True)[0]
    off = dict(row, hparams={**row["hparams"], "alpha": ssd["alpha"] * 2})
    assert board.stale(Report(ident, [off]), proto, tuned=True) == [
        "ssd seed 0: not run with the shipped tuned values ['alpha']"]
    (why,) = board.stale(Report(ident, [{k: v for k, v in row.items() if k != "tuned"}]), proto, tuned=True)
    assert why.startswith("ssd seed 0: not run with")  # the defaults row of a method that is tuned now
    # a row measured before its method's behaviour changed (neggrad is at revision 1)
    ng = {"method": "neggrad", "seed": 1, "hparams": {}}
    assert board.stale(Report(ident, [ng]), proto, tuned=False) == [
        "neggrad seed 1: run at revision 0 of neggrad, which is at 1 now"]
    assert board.stale(Report(ident, [dict(ng, revision=1)]), proto, tuned=False) == []


def test_stability_summary_and_the_tuned_sections_shift_cell(tmp_path):
    base = {"protocol": "p", "seed": 0, "recorded": 0.5, "value": 0.52, "rel": 0.01, "tolerance": 1.0}
    (tmp_path / "p.ssd.check.json").write_text(json.dumps({
        **base, "method": "ssd", "shift": 0.03, "fragile": False,
        "runs": [{"scale": 0.99, "value": 0.55}, {"scale": 1.01, "value": 0.50}]}))
    (tmp_path / "p.random_labels.check.json").write_text(json.dumps({
        **base, "method": "random_labels", "seed": [0, 1], "shift": 40.1, "fragile": True,
        "runs": [{"scale": 0.99, "value": 40.62}, {"scale": 1.01, "value": 0.6}]}))
    text = "\n".join(board.stability_md(tmp_path, "check --rel 0.01"))
    assert "(the latest call: `check --rel 0.01`)" in text
    assert "**Reading.**" not in text
    # a regenerated page keeps the reading written by hand under the tables of the page it replaces
    kept = "\n".join(board.stability_md(tmp_path, "check", text + "\n**Reading.** SSD holds.\nSecond line.\n"))
    assert kept.endswith("\n**Reading.** SSD holds.\nSecond line.")
    assert kept.count("| ssd | 0 |") == 1
    assert "| random_labels | 0,1 | 0.50 | 0.52 | 40.62 | 0.60 | 40.10 | **fragile** (±1 %, tolerance 1) |" in text
    assert "| ssd | 0 | 0.50 | 0.52 | 0.55 | 0.50 | 0.03 | stable (±1 %, tolerance 1) |" in text
    assert board._shift_cell({}) == "-"
    assert board._shift_cell({"check_shift": 0.03, "check_rel": 0.01}) == "0.03 (±1 %)"
    assert board._shift_cell({"check_shift": 40.1, "check_rel": 0.01}) == "**40.10 (±1 %) fragile**"


def test_patch_replaces_rows_seed_by_seed_only_beside_the_same_models():
    from excise.evaluation.report import Report

    ident = {"name": "q", "seeds": [0, 1], "split_hashes": {"0": "a", "1": "b"}}

    def row(method, seed, fa, **kw):
        return {"method": method, "seed": seed, "forget_acc": fa, "UA": 100.0 - fa, "RA": 99.0, "TA": 90.0,
                "VA": 90.0, "mia_svc_confidence": 50.0, "mia_loss_cv": 50.0, "seconds": 1.0, **kw}

    anchors = [row("original", s, 98.0) for s in (0, 1)] + [row("retrain", s, 0.0, seconds=100.0) for s in (0, 1)]
    old = Report(ident, anchors + [row("ssd", s, 5.0) for s in (0, 1)] + [row("neggrad", s, 40.0) for s in (0, 1)])
    fresh = Report(ident, anchors + [row("neggrad", s, 1.0, revision=1) for s in (0, 1)])
    out, what = board.patch(old, fresh)
    assert what == ["neggrad on seed 0", "neggrad on seed 1"]
    got = {(r["method"], r["seed"]): r for r in out.rows}
    assert [r["method"] for r in out.rows] == [r["method"] for r in old.rows]  # same rows, same order
    assert got[("neggrad", 1)]["forget_acc"] == 1.0 and got[("neggrad", 1)]["revision"] == 1
    assert got[("ssd", 0)]["forget_acc"] == 5.0  # untouched
    assert got[("neggrad", 0)]["avg_gap"] < 1  # gaps recomputed against the same oracle
    # seed 0's original trained again (not bit-identical): one method's row is not comparable, refused ...
    one = {"name": "q", "seeds": [0], "split_hashes": {"0": "a"}}
    other = [row("original", 0, 97.0), row("retrain", 0, 0.0, seconds=90.0)]
    with pytest.raises(SystemExit, match=r"whole seed; it lacks \['ssd'\]"):
        board.patch(old, Report(one, other + [row("neggrad", 0, 1.0)]))
    # ... the whole seed re-run with those models replaces seed 0, and seed 1 stays
    out, what = board.patch(old, Report(one, other + [row("ssd", 0, 2.0), row("neggrad", 0, 1.0)]))
    assert what == ["every row of seed 0 (its models were trained again)"]
    got = {(r["method"], r["seed"]): r for r in out.rows}
    assert got[("original", 0)]["forget_acc"] == 97.0 and got[("ssd", 0)]["forget_acc"] == 2.0
    assert got[("ssd", 1)]["forget_acc"] == 5.0 and got[("retrain", 0)]["seconds"] == 90.0
    # where both reports record the models' hashes, those decide (equal metrics are not enough)
    hashed = Report(ident, [{**r, "model_hash": f"h{r['method']}{r['seed']}"} for r in old.rows])
    with pytest.raises(SystemExit, match="whole seed"):
        board.patch(hashed, Report(one, [{**r, "model_hash": "other"} for r in anchors if r["seed"] == 0]
                                + [row("neggrad", 0, 1.0)]))
    same = [{**r, "model_hash": f"h{r['method']}0"} for r in other]  # other metrics, the same models
    assert board.patch(hashed, Report(one, same + [row("neggrad", 0, 1.0)]))[1] == ["neggrad on seed 0"]
    with pytest.raises(SystemExit, match="original or oracle row"):
        board.patch(old, Report(one, [row("neggrad", 0, 1.0)]))
    with pytest.raises(SystemExit, match="protocol"):
        board.patch(old, Report({**one, "split_hashes": {"0": "x"}}, fresh.rows))


def test_patch_reports_reads_one_report_or_every_subfolder_in_order(tmp_path):
    assert board.patch_reports(tmp_path, "p") == []  # no folder for the protocol: nothing to patch
    for sub in ("b-neggrad", "a-seed0"):
        (tmp_path / "p" / sub).mkdir(parents=True)
        (tmp_path / "p" / sub / "report.json").write_text("{}")
    assert [f.parent.name for f in board.patch_reports(tmp_path, "p")] == ["a-seed0", "b-neggrad"]
    (tmp_path / "p" / "report.json").write_text("{}")  # a report over the whole protocol wins
    assert board.patch_reports(tmp_path, "p") == [tmp_path / "p" / "report.json"]


def test_coverage_describes_the_latest_study_under_way_in_a_journal(tmp_path):
    optuna = pytest.importorskip("optuna")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (tmp_path / "fmnist-smallcnn-class.toml").write_text(
        '[methods.ssd]\nalpha = 3.0\n[tuning.ssd]\nseed = 0\ntrials = 2\n')
    journals = tmp_path / "journals"
    journals.mkdir()
    storage = JournalStorage(JournalFileBackend(str(journals / "fmnist-smallcnn-class.finetune.journal")))
    old = optuna.create_study(study_name="revision 0", storage=storage)
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.01))  # an earlier revision's
    new = optuna.create_study(study_name="revision 1", storage=storage)
    for v in (3.0, 1.5):
        new.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=v))
    new.ask()  # a trial under way (or whose process was killed)
    ssd = JournalStorage(JournalFileBackend(str(journals / "fmnist-smallcnn-class.ssd.journal")))
    optuna.create_study(study_name="ssd", storage=ssd).add_trial(
        optuna.trial.create_trial(params={}, distributions={}, value=0.5))

    state = board.journal_state(journals / "fmnist-smallcnn-class.finetune.journal")
    assert state["complete"] == 2 and state["best"] == 1.5 and state["running_since"] is not None
    assert board.journal_state(journals / "missing.journal") is None
    (line,) = board.coverage(["fmnist-smallcnn-class"], tmp_path, journals)
    cells = line.split(" | ")
    finetune = next(c for c in cells if c.startswith("finetune"))
    assert finetune.startswith("finetune - (journal: 2 trials, best 1.5,") and "marked running since" in finetune
    assert "ssd 0/2" in cells  # the table holds as many trials as the journal: nothing under way to describe
    assert line.startswith("fmnist-smallcnn-class: 1/13 tuned")
    assert board.coverage(["fmnist-smallcnn-class"], tmp_path)[0].split(" | ")[2] == "lfssd -"


def test_combine_seeds_keeps_every_seeds_notes_and_facts_and_renders_them_over_all_rows():
    from excise.evaluation.report import Report

    def row(method, seed, **kw):
        return {"method": method, "seed": seed, "forget_acc": 1.0, "UA": 99.0, "RA": 99.0, "TA": 90.0, "VA": 90.0,
                "mia_svc_confidence": 50.0, "mia_loss_cv": 50.0, "seconds": 2.0, **kw}

    def seed_report(s, total=3):
        rows = [row("original", s), row("retrain", s, seconds=100.0),
                row("ssd", s, one_off={"importance_ref_seconds": 40.0 + s, "first_run_seconds": 45.0})]
        notes = ["shared note", f"only seed {s}", "a note about one of the protocol's splits"]
        return Report({"name": "q", "seeds": [s], "split_hashes": {str(s): f"h{s}"}}, rows, notes,
                      facts={"seeds_total": total})

    one = seed_report(0)
    assert one.rendered_notes()[-4] == "run on 1 of the protocol's 3 seeds ([0])"
    out = board.combine_seeds([seed_report(0), seed_report(1)])
    assert out.protocol["seeds"] == [0, 1] and len(out.rows) == 6 and out.facts == {"seeds_total": 3}
    assert out.notes == ["shared note", "only seed 0", "a note about one of the protocol's splits", "only seed 1"]
    shown = out.rendered_notes()
    assert "ssd (seed 0: 40 s), ssd (seed 1: 41 s)" in shown[0]
    assert shown[1] == "run on 2 of the protocol's 3 seeds ([0, 1])"  # the seeds the combined report holds
    assert shown[2:] == out.notes
    full = board.combine_seeds([seed_report(2), seed_report(0), seed_report(1)])
    assert full.protocol["seeds"] == [0, 1, 2] and not any("seeds (" in n for n in full.rendered_notes())
    with pytest.raises(ValueError, match="different protocols"):
        board.combine_seeds([seed_report(0), Report({"name": "other", "seeds": [1], "split_hashes": {"1": "x"}})])
    with pytest.raises(ValueError, match="different seed counts"):
        board.combine_seeds([seed_report(0), seed_report(1, total=4)])


def test_write_defaults_to_the_tuned_leaderboard_only_with_tuned(lb, tmp_path, monkeypatch):
    """leaderboard.md is the tuned leaderboard: a write without --tuned must not overwrite it (it goes to
    leaderboard-defaults.md), and one with --tuned writes it, with a one-seed protocol's winner marked."""
    from excise.evaluation.report import Report

    rows = [{"method": "original", "seed": 0, "avg_gap": 30.0},
            {"method": "retrain", "seed": 0, "avg_gap": 0.0, "seconds": 100.0},
            {"method": "ssd", "seed": 0, "avg_gap": 0.5, "seconds": 2.0}]
    Report({"name": "fmnist-smallcnn-class"}, rows).save(tmp_path / "runs" / "fmnist-smallcnn-class", plots=False)
    monkeypatch.setattr(lb, "RESULTS", tmp_path / "results")
    args = ["write", "--runs", str(tmp_path / "runs"), "--protocols", "fmnist-smallcnn-class"]
    assert lb.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "results").glob("*.md")) == ["leaderboard-defaults.md"]
    assert lb.main(args + ["--tuned"]) == 0
    text = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "| fmnist-smallcnn-class | ssd 0.50 (1 seed) | — (1 seed: no std) |" in text
    assert (tmp_path / "results" / "leaderboard" / "fmnist-smallcnn-class.png").exists()


def test_excise_leaderboard_is_the_script_s_command(capsys):
    from excise.cli import main

    assert main(["leaderboard", "coverage", "--protocols", "fmnist-smallcnn-class"]) == 0
    assert capsys.readouterr().out.startswith("fmnist-smallcnn-class: ")
    with pytest.raises(SystemExit):
        main(["leaderboard", "--help"])
    assert "excise leaderboard" in capsys.readouterr().out
