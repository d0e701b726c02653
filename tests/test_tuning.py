"""The tuner on a small MLP trained on scikit-learn's digits, forgetting one class."""

import json
import tomllib

import pytest

pytest.importorskip("optuna")

from excise import protocol as protocol_mod  # noqa: E402
from excise.bench import run_bench  # noqa: E402
from excise.cli import main  # noqa: E402
from excise.tuned import load_tuned  # noqa: E402
from excise.tuning import INFEASIBLE, TuneResult, tune, write_tuned  # noqa: E402
from excise.methods.ssd import SSD_DEFAULTS

TINY = """
name = "digits-mlp-class"
dataset = "digits"
arch = "mlp"
forget = "class:3"
val_fraction = 0.15
seeds = [0, 1]
importance_batch = 64

[recipe]
epochs = 8
batch_size = 64

[methods.ssd]
[methods.assd]
"""


@pytest.fixture()
def tiny(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


class _Forbidden:
    """A loader that fails when read: the tuner must not look at test data."""

    batch_size = 64

    def __iter__(self):
        raise AssertionError("the tuner read test data")

    def __len__(self):
        return 1


@pytest.fixture()
def no_test_data(monkeypatch):
    real = protocol_mod.prepare

    def prepare(*a, **kw):
        prep = real(*a, **kw)
        for k in ("test", "test_forget"):
            if k in prep.loaders:
                prep.loaders[k] = _Forbidden()
        return prep

    monkeypatch.setattr(protocol_mod, "prepare", prepare)


def test_tune_ssd_forgets_toward_the_oracle_on_validation_only(tiny, tmp_path, no_test_data):
    res = tune("ssd", str(tiny), budget=8, storage=tmp_path / "s.journal", progress=False)
    assert res.n_trials == 8 and len(res.trials) == 8
    first = res.trials[0]
    assert first["defaults"] and first["params"] == {"alpha": SSD_DEFAULTS["alpha"], "lam": 1.0}  # defaults first
    assert res.best_value <= res.default_value
    assert set(res.best_metrics) == {"forget_acc", "VA", "mia_val"}
    o, orig, best = res.oracle_metrics, res.original_metrics, res.best_metrics
    assert orig["forget_acc"] > 90 and o["forget_acc"] < 5
    # the tuned model forgets: most of the way from the original's forget accuracy to the oracle's
    assert best["forget_acc"] < orig["forget_acc"] - 0.6 * (orig["forget_acc"] - o["forget_acc"]), res.summary()
    assert best["VA"] > o["VA"] - 15
    assert 1.0 <= res.best_params["alpha"] <= 3000.0


def test_tune_resumes_and_is_seeded(tiny, tmp_path):
    a = tune("ssd", str(tiny), budget=3, storage=tmp_path / "a.journal", progress=False)
    a5 = tune("ssd", str(tiny), budget=5, storage=tmp_path / "a.journal", progress=False)
    assert a5.n_trials == 5
    assert [t["params"] for t in a5.trials[:3]] == [t["params"] for t in a.trials]  # resumed, not restarted
    again = tune("ssd", str(tiny), budget=5, storage=tmp_path / "a.journal", progress=False)
    assert again.n_trials == 5  # nothing left to do
    b = tune("ssd", str(tiny), budget=5, storage=tmp_path / "b.journal", progress=False)
    assert [t["params"] for t in b.trials] == [t["params"] for t in a5.trials]
    assert [t["value"] for t in b.trials] == pytest.approx([t["value"] for t in a5.trials])


def test_a_study_resumed_on_other_originals_warns(tiny, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    j = tmp_path / "m.journal"
    first = tune("ssd", str(tiny), budget=1, storage=j, progress=False)
    study = optuna.load_study(study_name=optuna.get_all_study_names(JournalStorage(JournalFileBackend(str(j))))[0],
                              storage=JournalStorage(JournalFileBackend(str(j))))
    assert study.user_attrs["models"] == first.models
    study.set_user_attr("models", ["f" * 16])  # as if its earlier trials ran on models trained elsewhere
    with pytest.warns(UserWarning, match="earlier trials scored other originals"):
        tune("ssd", str(tiny), budget=1, storage=j, progress=False)


def test_starting_points_are_tried_once_after_the_defaults(tiny, tmp_path):
    point = {"alpha": 3.25, "lam": 0.75}
    j = tmp_path / "s.journal"
    r = tune("ssd", str(tiny), budget=3, storage=j, progress=False, start=[point])
    assert r.trials[0]["defaults"] and r.trials[1]["params"] == point and r.trials[1]["start"]
    assert not any(t.get("start") for t in (r.trials[0], r.trials[2]))
    again = tune("ssd", str(tiny), budget=4, storage=j, progress=False, start=[point])  # resumed: not run twice
    assert sum(t["params"] == point for t in again.trials) == 1 and again.n_trials == 4
    part = tune("ssd", str(tiny), budget=2, storage=tmp_path / "p.journal", progress=False, start=[{"lam": 0.6}])
    assert part.trials[1]["params"]["lam"] == 0.6  # alpha sampled
    with pytest.raises(ValueError, match="not searched"):
        tune("ssd", str(tiny), budget=1, storage=tmp_path / "x.journal", start=[{"lr": 0.1}])
    with pytest.raises(ValueError, match="outside the search space"):
        tune("ssd", str(tiny), budget=1, storage=tmp_path / "x.journal", start=[{"alpha": -1.0}])


def test_timeout_stops_between_trials_and_a_killed_trial_is_redone(tiny, tmp_path, capsys):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from excise.methods import get_method
    from excise.tuning import _enqueue_defaults, study_name

    straight = tune("ssd", str(tiny), budget=3, storage=tmp_path / "s.journal", progress=False)
    # a timeout shorter than one trial: the first trial runs, no second one starts
    part = tune("ssd", str(tiny), budget=3, storage=tmp_path / "t.journal", progress=False, timeout=1e-6)
    assert part.n_trials == 1 and not part.complete and "stopped by the timeout" in part.summary()
    # the CLI does not write an unfinished study into the tuned table
    table = tmp_path / "table.toml"
    assert main(["tune", "ssd", str(tiny), "--budget", "3", "--storage", str(tmp_path / "t.journal"),
                 "--timeout", "1e-6", "--out", str(tmp_path / "out"), "--write", str(table), "--quiet"]) == 0
    assert "not written" in capsys.readouterr().out and not table.exists()
    rest = tune("ssd", str(tiny), budget=3, storage=tmp_path / "t.journal", progress=False)
    assert rest.complete and [t["params"] for t in rest.trials] == [t["params"] for t in straight.trials]

    # a process killed while the defaults trial ran leaves it RUNNING in the journal for ever: the resumed
    # study measures the defaults again and then draws what a straight run draws
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "k.journal")))
    name = study_name("ssd", "digits-mlp-class", [0], "avg_gap", None, "oracle", None, {})
    # a method's raised revision names a new study (its older trials measured something else); revision 0
    # leaves the name as it was, so existing journals resume
    assert study_name("ssd", "digits-mlp-class", [0], "avg_gap", None, "oracle", None, {}, revision=1) != name
    assert study_name("ssd", "digits-mlp-class", [0], "avg_gap", None, "oracle", None, {}, revision=0) == name
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    _enqueue_defaults(study, get_method("ssd"), get_method("ssd").space)
    killed = study.ask()
    assert killed.user_attrs.get("defaults")
    resumed = tune("ssd", str(tiny), budget=3, storage=tmp_path / "k.journal", progress=False)
    assert resumed.default_value == pytest.approx(straight.default_value)
    assert [t["params"] for t in resumed.trials] == [t["params"] for t in straight.trials]
    assert [t["value"] for t in resumed.trials] == pytest.approx([t["value"] for t in straight.trials])
    with pytest.raises(ValueError, match="timeout"):
        tune("ssd", str(tiny), budget=3, storage=tmp_path / "x.journal", timeout=0)


def test_utility_floor_marks_trials_infeasible(tiny, tmp_path):
    # VA is measured on the other classes (SalUn's roles), where forgetting the class need not cost anything
    # (SSD's trials keep it); neggrad's ascent at its default step costs it: the floor bites
    res = tune("neggrad", str(tiny), budget=6, floor=0.0, floor_ref="original", storage=tmp_path / "f.journal",
               progress=False)
    ref = res.original_metrics["VA"]
    assert any(t.get("infeasible") for t in res.trials)
    # a study whose best trial is infeasible has nothing worth shipping
    bad = TuneResult.from_dict({**res.to_dict(), "best_value": INFEASIBLE + 3.0})
    with pytest.raises(ValueError, match="utility floor"):
        write_tuned(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    for t in res.trials:
        if t.get("diverged"):
            continue
        if t.get("infeasible"):
            assert t["value"] >= INFEASIBLE and t["metrics"]["VA"] < ref
        else:
            assert t["value"] < INFEASIBLE and t["metrics"]["VA"] >= ref


def test_tuned_table_is_used_by_bench(tiny, tmp_path):
    res = tune("ssd", str(tiny), budget=3, storage=tmp_path / "t.journal", progress=False)
    table = write_tuned(res, tmp_path / "tuned")
    assert table == tmp_path / "tuned" / "digits-mlp-class.toml"
    # a second method keeps the first one's entry
    res2 = tune("assd", str(tiny), budget=2, storage=tmp_path / "t2.journal", progress=False)
    write_tuned(res2, tmp_path / "tuned")
    values = load_tuned("digits-mlp-class", tmp_path / "tuned")
    assert values["ssd"] == res.best_params and values["assd"] == res2.best_params  # exactly, not rounded
    rep = run_bench(str(tiny), methods=["ssd", "lfssd"], seeds=1, progress=False, tuned=tmp_path / "tuned")
    row = [r for r in rep.rows if r["method"] == "ssd"][0]
    assert row["hparams"]["alpha"] == values["ssd"]["alpha"] and row["tuned"]
    assert not [r for r in rep.rows if r["method"] == "lfssd"][0].get("tuned")  # not in the table: defaults
    assert any("tuned hyperparameters" in n and "ssd" in n for n in rep.rendered_notes())
    md = rep.to_markdown()
    assert "| ssd (tuned) |" in md and "| lfssd |" in md
    plain = run_bench(str(tiny), methods=["ssd"], seeds=1, progress=False)
    assert [r for r in plain.rows if r["method"] == "ssd"][0]["hparams"]["alpha"] == SSD_DEFAULTS["alpha"]


def test_cli_tune_writes_trials_and_table(tiny, tmp_path, capsys):
    out, table = tmp_path / "out", tmp_path / "table.toml"
    assert main(["tune", "ssd", str(tiny), "--budget", "2", "--storage", str(tmp_path / "c.journal"),
                 "--out", str(out), "--write", str(table), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ssd on digits-mlp-class (seed 0)" in printed and "oracle" in printed
    trials = json.loads((out / "digits-mlp-class.ssd.json").read_text())
    assert len(trials["trials"]) == 2
    assert "alpha" in load_tuned("digits-mlp-class", table)["ssd"]
    # --check on the finished study: two runs near the best values, printed and kept in the JSON
    assert main(["tune", "ssd", str(tiny), "--budget", "2", "--storage", str(tmp_path / "c.journal"),
                 "--out", str(out), "--check", "--quiet"]) == 0
    assert " at ±1 %: objective " in capsys.readouterr().out
    st = json.loads((out / "digits-mlp-class.ssd.json").read_text())["stability"]
    assert st["rel"] == 0.01 and len(st["runs"]) == 2
    # a new study that starts from the table's entry (re-tuning after a revision, say) tries it second
    held = {k: v for k, v in load_tuned("digits-mlp-class", table)["ssd"].items() if k in ("alpha", "lam")}
    assert main(["tune", "ssd", str(tiny), "--budget", "2", "--storage", str(tmp_path / "d.journal"),
                 "--out", str(out), "--start-tuned", "--write", str(table), "--quiet"]) == 0
    second = json.loads((out / "digits-mlp-class.ssd.json").read_text())["trials"][1]
    assert second["params"] == held and second["start"]
    assert main(["tune", "ssd", str(tiny), "--budget", "2", "--storage", str(tmp_path / "e.journal"),
                 "--out", str(out), "--start", "alpha=2.5,lam=0.9", "--quiet"]) == 0
    second = json.loads((out / "digits-mlp-class.ssd.json").read_text())["trials"][1]
    assert second["params"] == {"alpha": 2.5, "lam": 0.9}


def test_tune_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        tune("ssd", str(tiny), objective="accuracy")
    with pytest.raises(ValueError, match="budget"):
        tune("ssd", str(tiny), budget=0)
    with pytest.raises(ValueError, match="no search space"):
        tune("retrain", str(tiny), budget=1)
    with pytest.raises(ValueError, match="floor"):
        tune("ssd", str(tiny), floor=-1)
    with pytest.raises(ValueError, match="not among the protocol's seeds"):
        tune("ssd", str(tiny), seed=7)
    no_val = tmp_path / "noval.toml"
    no_val.write_text(TINY.replace("val_fraction = 0.15", "val_fraction = 0.0"))
    with pytest.raises(ValueError, match="validation split"):
        tune("ssd", str(no_val), budget=1, storage=tmp_path / "n.journal", progress=False)


def test_a_silently_diverging_trial_scores_as_diverged_and_the_search_goes_on(tiny, tmp_path):
    """A method that leaves NaN weights without raising: unlearn() refuses the model (FloatingPointError naming
    the tensor), the tuner scores that trial as diverged and carries on with the next."""
    import torch

    from excise import unlearn
    from excise.methods.registry import _METHODS, Real, register
    from excise.tuning import DIVERGED

    @register("nan_above_half_for_test", defaults={"x": 0.5}, space={"x": Real(0.0, 1.0)})
    def nan_above_half(model, request, ctx, x):
        from excise.types import UnlearningResult

        if x > 0.5:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return UnlearningResult(model=model, method="", hparams={})

    try:
        import copy

        from excise.models import build_model

        m = build_model("mlp", (1, 8, 8), 10)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8),
                                                                            torch.zeros(4, dtype=torch.long)))
        with pytest.raises(FloatingPointError, match="non-finite values in"):
            unlearn(m, {"forget": loader}, "nan_above_half_for_test", x=0.9)
        before = copy.deepcopy(m.state_dict())
        unlearn(m, {"forget": loader}, "nan_above_half_for_test", x=0.1)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        res = tune("nan_above_half_for_test", str(tiny), budget=6, storage=tmp_path / "d.journal", progress=False)
    finally:
        _METHODS.pop("nan_above_half_for_test")
    assert res.n_trials == 6
    for t in res.trials:
        if t["params"]["x"] > 0.5:
            assert t["value"] == DIVERGED and "non-finite" in t["diverged"]
        else:
            assert t["value"] < DIVERGED and "metrics" in t
    assert any(t["params"]["x"] > 0.5 for t in res.trials)


def test_a_trial_whose_model_overflows_scores_as_diverged(tiny, tmp_path):
    """Finite weights, non-finite outputs (what gradient ascent with a large step can leave): the validation
    metrics refuse the model and the tuner scores the trial as diverged instead of stopping the study."""
    import torch

    from excise.methods.registry import _METHODS, Real, register
    from excise.tuning import DIVERGED

    @register("overflow_above_half_for_test", defaults={"x": 0.5}, space={"x": Real(0.0, 1.0)})
    def overflow_above_half(model, request, ctx, x):
        from excise.types import UnlearningResult

        if x > 0.5:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.sign(p) * 3e38)  # finite, but the first layer's sums overflow
        return UnlearningResult(model=model, method="", hparams={})

    try:
        res = tune("overflow_above_half_for_test", str(tiny), budget=5, storage=tmp_path / "o.journal",
                   progress=False)
    finally:
        _METHODS.pop("overflow_above_half_for_test")
    assert res.n_trials == 5
    assert any(t["params"]["x"] > 0.5 for t in res.trials)
    for t in res.trials:
        if t["params"]["x"] > 0.5:
            assert t["value"] == DIVERGED and "not finite" in t["diverged"]
        else:
            assert t["value"] < DIVERGED


def test_tune_over_several_seeds_averages_their_objectives(tiny, tmp_path):
    one = {s: tune("ssd", str(tiny), budget=2, seed=s, storage=tmp_path / f"s{s}.journal", progress=False)
           for s in (0, 1)}
    both = tune("ssd", str(tiny), budget=2, seed=[0, 1], storage=tmp_path / "both.journal", progress=False)
    assert both.seed == [0, 1]
    # trial 0 is the defaults on every run: its objective over both seeds is the mean of the single-seed ones
    assert both.trials[0]["defaults"]
    assert both.trials[0]["value"] == pytest.approx((one[0].trials[0]["value"] + one[1].trials[0]["value"]) / 2)
    assert both.oracle_metrics["VA"] == pytest.approx((one[0].oracle_metrics["VA"] + one[1].oracle_metrics["VA"]) / 2)
    table = write_tuned(both, tmp_path / "t")
    assert tomllib.loads(table.read_text())["tuning"]["ssd"]["seed"] == [0, 1]


def test_tuned_table_keeps_values_exactly(tmp_path):
    """A tuned value is written so that it reads back bit-identical: `bench --tuned` must replay the best
    trial itself (a chaotic method flips under a 1e-6 relative change of its lr)."""
    lr, k = 0.019890729214442012, 1.0 / 3.0
    res = TuneResult(method="salun", protocol="p", seed=0, objective="avg_gap",
                     best_params={"lr": lr, "k": k, "epochs": 3}, best_value=7.2, best_metrics={},
                     oracle_metrics={}, original_metrics={}, default_value=60.0, n_trials=12, trials=[])
    write_tuned(res, tmp_path)
    back = load_tuned("p", tmp_path)["salun"]
    assert back["lr"] == lr and back["k"] == k and back["epochs"] == 3 and isinstance(back["epochs"], int)
    assert f"{lr:.6g}" != repr(lr)  # the case rounding to six digits used to get wrong


def test_a_tuned_entry_records_the_methods_revision_and_an_older_one_warns(tmp_path):
    import warnings

    res = TuneResult(method="neggrad", protocol="p", seed=0, objective="avg_gap",
                     best_params={"lr": 5e-4, "max_steps": 60}, best_value=1.0, best_metrics={},
                     oracle_metrics={}, original_metrics={}, default_value=2.0, n_trials=12, trials=[])
    f = write_tuned(res, tmp_path)
    assert "revision = 1" in f.read_text()  # neggrad's revision when it was tuned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tuned("p", tmp_path)["neggrad"]["max_steps"] == 60
    f.write_text(f.read_text().replace("revision = 1\n", ""))  # as tuned before neggrad's max_steps looped
    with pytest.warns(UserWarning, match="neggrad was tuned at revision 0 of neggrad, which is at revision 1"):
        load_tuned("p", tmp_path)


def test_check_rescores_the_best_values_nearby_and_flags_a_cliff(tiny, tmp_path, monkeypatch, capsys):
    from excise import tuning
    from excise.tuning import search as tuning_search

    res = tune("ssd", str(tiny), budget=3, storage=tmp_path / "s.journal", progress=False, check=0.05)
    st = res.stability
    assert st["rel"] == 0.05 and [r["scale"] for r in st["runs"]] == [0.95, 1.05]
    for r in st["runs"]:  # every continuous value scaled (inside its range), the objective re-measured
        for k, v in r["params"].items():
            assert v == pytest.approx(min(max(res.best_params[k] * r["scale"], 1.0 if k == "alpha" else 0.1),
                                          300.0 if k == "alpha" else 10.0))
        assert set(r["metrics"]) == {"forget_acc", "VA", "mia_val"}
    assert st["shift"] == pytest.approx(max(abs(r["value"] - res.best_value) for r in st["runs"]))
    assert st["fragile"] == (st["shift"] > tuning.STABILITY_TOLERANCE)
    # kept in the journal: asking again re-uses it (no new runs), and the table records the shift
    real = tuning_search._stability
    monkeypatch.setattr(tuning_search, "_stability", lambda *a: pytest.fail("re-scored a check already made"))
    again = tune("ssd", str(tiny), budget=3, storage=tmp_path / "s.journal", progress=False, check=0.05)
    assert again.stability == st
    assert ("FRAGILE" if st["fragile"] else "stable") + " at ±5 %: objective" in again.summary()
    table = write_tuned(again, tmp_path / "t")
    assert f"check_shift = {round(st['shift'], 4)!r}" in table.read_text()

    # a cliff: the objective jumps off the exact best values, so the check calls them fragile; a plateau not
    from excise.methods import get_method

    best = dict(res.best_params)
    jump = real(get_method("ssd").space, best, 0.5, 0.01, lambda p: (0.5 if p == best else 40.0, {"metrics": {}}))
    assert jump["fragile"] and jump["shift"] == 39.5
    flat = real(get_method("ssd").space, best, 0.5, 0.01, lambda p: (0.6, {"metrics": {}}))
    assert not flat["fragile"] and flat["shift"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="check must be"):
        tune("ssd", str(tiny), budget=3, storage=tmp_path / "s.journal", progress=False, check=2.0)


def test_recheck_rescores_a_tables_entry_without_its_journal(tiny, tmp_path, capsys):
    from excise.tuning import check_tuned, record_check

    res = tune("ssd", str(tiny), budget=3, storage=tmp_path / "s.journal", progress=False)
    table = write_tuned(res, tmp_path / "t")
    (tmp_path / "s.journal").unlink()  # a fresh machine: the table only
    chk = check_tuned("ssd", str(tiny), rel=0.05, table=table, progress=False)
    assert chk["values"] == res.best_params and chk["recorded"] == round(res.best_value, 4)
    assert chk["value"] == pytest.approx(res.best_value, abs=1e-6)  # same models, same values: same objective
    assert chk["same_models"] is True and len(res.models) == 1 and res.environment["device"] == "cpu"
    assert chk["table"] == str(table)  # as named by the caller (the shipped table is recorded as None)
    entry = tomllib.loads(table.read_text())["tuning"]["ssd"]
    assert entry["models"] == [res.models[0]] and entry["threads"] == res.environment["threads"]
    assert [r["scale"] for r in chk["runs"]] == [0.95, 1.05]
    assert chk["shift"] == pytest.approx(max(abs(r["value"] - chk["value"]) for r in chk["runs"]))
    before = load_tuned("digits-mlp-class", table)
    record_check(chk)
    assert load_tuned("digits-mlp-class", table) == before  # the values stay; the check is recorded beside them
    assert f"check_shift = {round(chk['shift'], 4)!r}" in table.read_text() and "check_rel = 0.05" in table.read_text()
    with pytest.raises(ValueError, match="no tuned entry for 'lfssd'.*it has: ssd"):
        check_tuned("lfssd", str(tiny), table=table, progress=False)
    # an entry tuned on other originals (trained again elsewhere) is re-scored, and says so
    table.write_text(table.read_text().replace(res.models[0], "0" * 16))
    other = check_tuned("ssd", str(tiny), rel=0.05, table=table, progress=False)
    assert other["same_models"] is False
    assert main(["tune", "ssd", str(tiny), "--recheck", "--write", str(table), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert "not the ones the entry was tuned on" in capsys.readouterr().out
    table.write_text(table.read_text().replace("[methods.ssd]\n", "[methods.ssd]\nlam = 2.0\n", 1)
                     if "lam =" not in table.read_text() else
                     table.read_text().replace("lam = ", "lam = 1", 1))
    with pytest.raises(ValueError, match="changed since it was checked"):
        record_check(chk)
    # the CLI: no search, the verdict printed, the JSON written, the check recorded with --write
    out = tmp_path / "out"
    assert main(["tune", "ssd", str(tiny), "--recheck", "--check", "0.02", "--write", str(table), "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert " at ±2 %: the objective moves by " in printed and "recorded the check in" in printed
    assert json.loads((out / "digits-mlp-class.ssd.check.json").read_text())["rel"] == 0.02
    assert "check_rel = 0.02" in table.read_text()
    with pytest.raises(SystemExit, match="--recheck re-scores"):
        main(["tune", "ssd", str(tiny), "--recheck", "--seed", "1", "--write", str(table)])


def test_a_protocols_search_table_narrows_or_holds_what_is_searched(tiny, tmp_path):
    """[search.METHOD] in the protocol: a range narrowed, a value held; both stay searched values, so the tuned
    table records them and bench --tuned replays them. Bad entries fail before any model is trained."""
    from excise.methods import get_method
    from excise.methods.registry import Int, Real
    from excise.tuning import search_space

    narrowed = tmp_path / "narrow.toml"
    narrowed.write_text(TINY + "\n[search.ssd]\nalpha = [20.0, 30.0]\nlam = 0.5\n")
    res = tune("ssd", str(narrowed), budget=3, storage=tmp_path / "n.journal", progress=False)
    assert res.n_trials == 3
    for t in res.trials:
        assert 20.0 <= t["params"]["alpha"] <= 30.0 and t["params"]["lam"] == 0.5
    assert not 20.0 <= get_method("ssd").defaults["alpha"] <= 30.0  # outside the narrowed range: no defaults trial
    table = write_tuned(res, tmp_path / "t")
    assert load_tuned("digits-mlp-class", table)["ssd"]["lam"] == 0.5
    rep = run_bench(str(narrowed), methods=["ssd"], seeds=1, progress=False, tuned=table)
    row = [r for r in rep.rows if r["method"] == "ssd"][0]
    assert row["tuned"] and row["hparams"]["lam"] == 0.5 and 20.0 <= row["hparams"]["alpha"] <= 30.0
    # the unnarrowed protocol's study is another study (its journal name differs), and its space the method's
    plain = tune("ssd", str(tiny), budget=1, storage=tmp_path / "n.journal", progress=False)
    assert plain.n_trials == 1 and plain.trials[0]["params"]["alpha"] == SSD_DEFAULTS["alpha"]

    proto = {"name": "p", "search": {"scrub": {"epochs": 1, "max_lr": [0.01, 0.02]}}}
    space = search_space(proto, "scrub")
    assert space["epochs"] == Int(1, 1) and space["max_lr"] == Real(0.01, 0.02, log=True)
    assert space["lr"] == get_method("scrub").space["lr"]  # the rest untouched
    assert search_space(proto, "ssd") == get_method("ssd").space
    assert search_space({"search": {"saps": {"update": "steps"}}}, "saps")["update"].options == ("steps",)
    bad = {
        "does not search 'momentum'": {"finetune": {"momentum": 0.5}},
        "an integer or \\[low, high\\]": {"finetune": {"epochs": 1.5}},
        "low <= high": {"finetune": {"lr": [0.1, 0.01]}},
        "> 0": {"finetune": {"lr": [0.0, 0.01]}},
        "not among": {"saps": {"update": ["newton"]}},
        "unknown methods \\['nope'\\]": {"nope": {}},
        "one table per method": {"finetune": 1},
    }
    for msg, search in bad.items():
        with pytest.raises(ValueError, match=msg):
            search_space({"name": "p", "search": search}, "finetune" if "saps" not in search else "saps")
    broken = tmp_path / "broken.toml"
    broken.write_text(TINY + "\n[search.ssd]\nalpha = [300.0, 1.0]\n")
    with pytest.raises(ValueError, match="low <= high"):
        tune("ssd", str(broken), budget=1, storage=tmp_path / "b.journal", progress=False)


def test_carry_copies_another_protocols_entry_marked_and_bench_runs_it(tiny, tmp_path, capsys, monkeypatch):
    """A protocol too costly to search (ResNet-18 width 32) takes the nearest searched protocol's entry:
    copied, marked as carried, values the target's [search] table holds set to those; never over a searched
    entry; `bench --tuned` runs it and its note says it was not searched there."""
    import excise.tuned as tuned_mod
    from excise.tuned import carried_entries
    from excise.tuning import carry_tuned

    big = tmp_path / "big.toml"
    big.write_text(TINY.replace('"digits-mlp-class"', '"digits-mlp-class-big"') + "\n[search.ssd]\nlam = 1.5\n")
    tables = tmp_path / "t"
    tables.mkdir()
    (tables / "digits-mlp-class.toml").write_text(
        "[methods.ssd]\nalpha = 4.0\nlam = 0.5\n[methods.lfssd]\nalpha = 2.0\n"
        "[tuning.ssd]\nvalue = 1.25\ntrials = 12\nseed = 0\nobjective = \"avg_gap\"\n")
    path = carry_tuned("ssd", str(tiny), str(big), table=tables, source_table=tables)
    assert path == tables / "digits-mlp-class-big.toml"
    assert load_tuned("digits-mlp-class-big", tables) == {"ssd": {"alpha": 4.0, "lam": 1.5}}  # lam held there
    assert carried_entries("digits-mlp-class-big", tables) == {"ssd": "digits-mlp-class"}
    text = path.read_text()
    assert 'carried_from = "digits-mlp-class"' in text and "trials = 0" in text and "source_value = 1.25" in text
    assert carried_entries("digits-mlp-class", tables) == {}
    carry_tuned("ssd", str(tiny), str(big), table=tables, source_table=tables)  # a carried entry is replaced
    with pytest.raises(ValueError, match="holds no tuned entry for 'assd' to carry"):
        carry_tuned("assd", str(tiny), str(big), table=tables, source_table=tables)
    with pytest.raises(ValueError, match="was itself carried from digits-mlp-class"):
        carry_tuned("ssd", str(big), str(tiny), table=tmp_path / "x.toml", source_table=tables)
    searched = tmp_path / "searched.toml"
    searched.write_text("[methods.ssd]\nalpha = 9.0\n[tuning.ssd]\nvalue = 0.5\ntrials = 20\nseed = 0\n")
    with pytest.raises(ValueError, match="searched on digits-mlp-class-big; it is not replaced"):
        carry_tuned("ssd", str(tiny), str(big), table=searched, source_table=tables)
    assert load_tuned("digits-mlp-class-big", searched) == {"ssd": {"alpha": 9.0}}
    # `bench --tuned` runs the carried values and says where they came from
    rep = run_bench(str(big), methods=["ssd"], seeds=[0], progress=False, tuned=tables)
    (row,) = [r for r in rep.rows if r["method"] == "ssd"]
    assert row["hparams"]["alpha"] == 4.0 and row["hparams"]["lam"] == 1.5
    assert any("ssd carried from digits-mlp-class (not searched on this protocol)" in n for n in rep.rendered_notes())
    assert rep.facts["tuned"]["carried"] == {"ssd": "digits-mlp-class"}
    # the CLI: no search; the source read from the shipped tables (here: the folder above)
    monkeypatch.setattr(tuned_mod, "TUNED_DIR", tables)
    out = tmp_path / "cli.toml"
    assert main(["tune", "ssd", str(big), "--carry-from", str(tiny), "--write", str(out)]) == 0
    assert "carried the ssd entry of" in capsys.readouterr().out
    assert load_tuned("digits-mlp-class-big", out) == {"ssd": {"alpha": 4.0, "lam": 1.5}}
    with pytest.raises(SystemExit, match="--carry-from copies"):
        main(["tune", "ssd", str(big), "--carry-from", str(tiny), "--seed", "1"])
