"""The bad-input matrix (docs/reliability.md): one case per row. Each asserts what excise promises — an input
is never written, outputs land as a unit, caches are verified, errors come before expensive work, a no-op or a
collapse is reported — on inputs a careless user (or a new machine) produces."""

import copy
import json
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from excise import UnlearningRequest, unlearn
from excise.checks import CollapseWarning, NothingChangedWarning, UtilityDropWarning
from excise.cli import main
from excise.data import ForgetSpec, Splits, load_digits, make_splits
from excise.importance import ImportanceCache
from excise.models import build_model
from excise.tasks import ClassificationTask
from excise.storage import state_hash
from excise.training import CheckpointCache, save_state

from helpers import Attending, tiny_cnn, toy_loader

ALL_METHODS = ["ssd", "lfssd", "assd", "scissorhands", "saps", "finetune", "neggrad", "neggrad_plus",
               "random_labels", "salun", "l1_sparse", "scrub", "bad_teacher", "retrain"]


class Exploding:
    """A loader that fails the test if anything iterates it: proves a check came before the work."""

    def __init__(self, n=40):
        self.dataset = TensorDataset(torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,)))
        self.batch_size = 8

    def __iter__(self):
        raise AssertionError("the data was read before the request was checked")

    def __len__(self):
        return 5


def _digits_setup():
    from excise.protocol import Setup
    from excise.training import TrainRecipe

    return Setup(dataset="digits", arch="mlp", recipe=TrainRecipe(epochs=40, batch_size=32),
                 forget=ForgetSpec.parse("class:3"), seed=0, importance_batch=64)


def _request(**kw):
    base = dict(forget=toy_loader(n=16, seed=1), retain=toy_loader(n=40, seed=2), train=toy_loader(n=56, seed=3))
    base.update(kw)
    return UnlearningRequest(**base)


def _prime(model):
    model.train()
    with torch.no_grad():
        for x, _ in toy_loader():
            model(x)
    return model.eval()


# ------------------------------------------------------------------------------------------ checked up front
@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_forget_set_is_refused_before_any_work(method):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)), batch_size=8)
    req = UnlearningRequest(forget=empty, retain=Exploding(), train=Exploding(), corrected=None)
    with pytest.raises(ValueError, match=f"^{method}: the forget set is empty"):
        unlearn(tiny_cnn(), req, method)


def test_index_requests_are_checked_against_train_and_retain():
    base = TensorDataset(torch.randn(30, 1, 6, 6), torch.randint(0, 3, (30,)))

    def req(forget, retain, train=range(30)):
        return UnlearningRequest(forget=DataLoader(Subset(base, list(forget)), batch_size=8),
                                 retain=DataLoader(Subset(base, list(retain)), batch_size=8),
                                 train=DataLoader(Subset(base, list(train)), batch_size=8))

    with pytest.raises(ValueError, match="twice"):
        unlearn(tiny_cnn(), req([1, 2, 2], range(3, 30)), "finetune")
    with pytest.raises(ValueError, match="also in the retain set"):
        unlearn(tiny_cnn(), req([1, 2, 3], range(3, 30)), "finetune")
    with pytest.raises(ValueError, match="not in the training set"):
        unlearn(tiny_cnn(), req([0, 1, 2], range(3, 20), train=range(1, 20)), "ssd")


@pytest.mark.parametrize("method, hp, match", [
    ("ssd", {"alpha": -1.0}, "alpha must be a number with 0 < value or 'auto'"),
    ("ssd", {"alpha": "often"}, "alpha"),
    ("ssd", {"lam": 0.0}, "lam"),
    ("ssd", {"scope": "nothing-like-a-scope"}, "unknown scope"),
    ("lfssd", {"scope": "pattern:("}, "not a regular expression"),
    ("assd", {"fisher_mode": "sometimes"}, "fisher_mode must be one of"),
    ("scissorhands", {"lam": -0.1}, "lam must be a number with 0 ≤ value"),
    ("scissorhands", {"epochs": 0}, "epochs must be an integer with 1 ≤ value"),
    ("scissorhands", {"projection": "False"}, "projection must be a boolean"),
    ("scrub", {"max_clip": 0.0}, "max_clip must be a number with 0 < value"),
    ("scrub", {"max_clip": -1.0}, "max_clip"),
    ("finetune", {"epochs": -2}, "epochs"),
    ("saps", {"cg_iters": 0}, "cg_iters must be an integer with 1 ≤ value"),
    ("saps", {"largest": "False"}, "largest must be a boolean"),
    ("retrain", {"schedule": "bogus"}, "schedule must be one of 'cosine', 'constant'"),
    ("neggrad_plus", {"beta": 1.5}, "beta"),
    ("salun", {"k": 0.0}, "k must be a number with 0 < value ≤ 1"),
])
def test_bad_hyperparameters_are_refused_before_any_work(method, hp, match):
    req = UnlearningRequest(forget=Exploding(), retain=Exploding(), train=Exploding(), corrected=Exploding())
    with pytest.raises(ValueError, match=match):
        unlearn(tiny_cnn(), req, method, **hp)


@pytest.mark.parametrize("method", ["ssd", "assd", "saps", "finetune"])
def test_non_finite_weights_are_refused_before_any_work(method):
    model = tiny_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    req = UnlearningRequest(forget=Exploding(), retain=Exploding(), train=Exploding())
    with pytest.raises(ValueError, match=f"^{method}: the input model has non-finite values"):
        unlearn(model, req, method)


@pytest.mark.parametrize("method", ["finetune", "neggrad", "scrub", "bad_teacher", "retrain", "ssd"])
def test_an_all_frozen_model_is_refused_before_any_work(method):
    model = tiny_cnn().requires_grad_(False)
    req = UnlearningRequest(forget=Exploding(), retain=Exploding(), train=Exploding())
    with pytest.raises(ValueError, match=f"^{method}: the model has no parameter that requires grad"):
        unlearn(model, req, method)


def test_errors_name_the_method():
    with pytest.raises(ValueError, match="^finetune: .*retain"):
        unlearn(tiny_cnn(), UnlearningRequest(forget=toy_loader()), "finetune")


def test_all_ignored_forget_labels_raise_instead_of_a_silent_no_op():
    x = torch.randn(16, 1, 6, 6)
    forget = DataLoader(TensorDataset(x, torch.full((16,), -100)), batch_size=8)
    model = _prime(tiny_cnn())
    with pytest.raises(FloatingPointError, match="ssd: importance on the forget set: .*classification loss is zero for "
                       "every sample"):
        unlearn(model, _request(forget=forget), "ssd", importance_cache=False)
    with pytest.raises(FloatingPointError, match="ssd: importance on the forget set: .*classification loss is not finite"):
        unlearn(model, _request(forget=forget), "ssd", importance_cache=False, fisher_mode="batch")


# -------------------------------------------------------------------------------------------------- hp parsing
def test_hp_strings_are_parsed_by_the_declared_type():
    from excise.cli import _parse_hparams

    assert _parse_hparams(["projection=False"], "scissorhands") == {"projection": False}
    assert _parse_hparams(["projection=true"], "scissorhands") == {"projection": True}
    assert _parse_hparams(["largest=False"], "saps") == {"largest": False}
    assert _parse_hparams(["alpha=30", "lam=2"], "ssd") == {"alpha": 30.0, "lam": 2.0}
    assert _parse_hparams(["alpha=auto"], "ssd") == {"alpha": "auto"}
    assert _parse_hparams(["max_steps=none", "epochs=3"], "finetune") == {"max_steps": None, "epochs": 3}
    with pytest.raises(ValueError, match="scissorhands: hyperparameter projection must be a boolean"):
        _parse_hparams(["projection=maybe"], "scissorhands")
    with pytest.raises(ValueError, match="finetune: hyperparameter epochs must be an integer"):
        _parse_hparams(["epochs=2.5"], "finetune")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        _parse_hparams(["alpha"], "ssd")
    with pytest.raises(ValueError, match="does not take"):
        _parse_hparams(["alhpa=3"], "ssd")


def test_projection_false_really_turns_the_projection_off(tmp_path, committed):
    prep = committed(_digits_setup())
    # with λ = 0 the repair descends the retain loss alone, which meets the constraint on every seed tried (5
    # projections each over seeds 0-3, at 1 and 2 threads)
    on = unlearn(prep.original, prep.request(), "scissorhands", projection=True, batch_size=32, lam=0.0, checks=False)
    assert on.info["projections"] > 0
    ckpt = tmp_path / "m.safetensors"
    save_state(prep.original, ckpt)
    rc = main(["unlearn", "--data", "digits", "--arch", "mlp", "--epochs", "40", "--forget", "class:3", "--quiet",
               "--model", str(ckpt), "--method", "scissorhands", "--hp", "projection=False", "--hp", "batch_size=32",
               "--hp", "lam=0",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    info = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["result"]["info"]
    assert info["projections"] == 0


# ------------------------------------------------------------------------------------------- importance cache
class SmoothedTask(ClassificationTask):
    """Cross-entropy with label smoothing: another loss, so other importance scores."""

    def __init__(self, smoothing=0.3):
        self.smoothing = smoothing

    def loss_from_output(self, output, targets, reduction="mean"):
        return F.cross_entropy(output, targets, reduction=reduction, label_smoothing=self.smoothing)


def _mlp(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), act, nn.Linear(16, 3))


def test_importance_cache_key_covers_task_network_and_frozen_parameters(tmp_path):
    cache = ImportanceCache(root=tmp_path)
    model, req = _mlp(nn.ReLU()), _request()
    first = unlearn(model, req, "ssd", importance_cache=cache, checks=False)
    assert first.info["ref_importance_cache"] == "miss"
    again = unlearn(model, req, "ssd", importance_cache=cache, checks=False)
    assert again.info["ref_importance_cache"] == "hit"
    # another loss
    smoothed = unlearn(model, _request(task=SmoothedTask()), "ssd", importance_cache=cache, checks=False)
    assert smoothed.info["ref_importance_cache"] == "miss"
    fresh = unlearn(model, _request(task=SmoothedTask()), "ssd", importance_cache=False, checks=False)
    assert smoothed.mask.count() == fresh.mask.count()
    # the same Task class with another setting
    assert unlearn(model, _request(task=SmoothedTask(0.1)), "ssd", importance_cache=cache,
                   checks=False).info["ref_importance_cache"] == "miss"
    # another network with the same weights (Tanh instead of ReLU)
    tanh = _mlp(nn.Tanh())
    assert state_hash(tanh) == state_hash(model)
    assert unlearn(tanh, req, "ssd", importance_cache=cache, checks=False).info["ref_importance_cache"] == "miss"
    # another set of trainable parameters
    part = copy.deepcopy(model)
    part[1].requires_grad_(False)
    assert unlearn(part, req, "ssd", importance_cache=cache, checks=False).info["ref_importance_cache"] == "miss"


def test_a_corrupted_importance_entry_is_discarded_and_recomputed(tmp_path):
    model, req = _mlp(nn.ReLU()), _request()
    first = unlearn(model, req, "ssd", importance_cache=ImportanceCache(root=tmp_path), checks=False)
    (entry,) = (tmp_path / "importance").glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = bytes(len(raw) - header)  # every tensor byte zeroed, header intact
    entry.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum does not match"):
        again = unlearn(model, req, "ssd", importance_cache=ImportanceCache(root=tmp_path), checks=False)
    assert again.info["ref_importance_cache"] == "miss"
    assert state_hash(again.model) == state_hash(first.model)


def test_checkpoint_cache_entries_are_one_verified_file(tmp_path):
    cache = CheckpointCache(tmp_path)

    def build():
        torch.manual_seed(0)
        return build_model("mlp", (1, 8, 8), 10)

    def fit(m):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
        return m

    m1, meta1, hit1 = cache.get_or_train({"k": 1}, build, fit)
    assert not hit1 and "train_seconds" in meta1
    assert list((tmp_path / "models").glob("*.json")) == []  # metadata lives in the model file
    m2, meta2, hit2 = cache.get_or_train({"k": 1}, build, fit)
    assert hit2 and meta2["train_seconds"] == meta1["train_seconds"] and state_hash(m2) == state_hash(m1)
    (entry,) = (tmp_path / "models").glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # a NaN written over the last weight
    entry.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum"):
        m3, _, hit3 = cache.get_or_train({"k": 1}, build, fit)
    assert not hit3 and state_hash(m3) == state_hash(m1)


# ------------------------------------------------------------------------------------------------ frozen / RNG
def test_retrain_keeps_frozen_layers(committed):
    from excise.evaluation import accuracy

    prep = committed(_digits_setup())
    model = copy.deepcopy(prep.original)
    first = model.net[1]
    first.requires_grad_(False)
    res = unlearn(model, prep.request(), "retrain", epochs=20, batch_size=32, lr=0.05)
    assert torch.equal(res.model.net[1].weight, first.weight) and torch.equal(res.model.net[1].bias, first.bias)
    assert not torch.equal(res.model.net[3].weight, model.net[3].weight)  # the rest was re-initialised and trained
    assert accuracy(res.model, prep.loaders["retain"]) > 95


def _attending_request():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 32, generator=g), torch.randint(0, 3, (48,), generator=g))
    return UnlearningRequest(forget=DataLoader(Subset(ds, range(8)), batch_size=8),
                             retain=DataLoader(Subset(ds, range(8, 48)), batch_size=8))


def test_methods_that_re_initialise_cover_modules_without_reset_parameters(monkeypatch):
    """nn.MultiheadAttention initialises with _reset_parameters(), a user module's bare nn.Parameter with nothing:
    retrain re-initialises the first and refuses the second before any work (it would keep trained values);
    the bad teacher zeroes it; Scissorhands zeroes its selected entries and says so."""
    import excise.methods.baselines as baselines
    import excise.training as training

    torch.manual_seed(0)
    model, req = Attending(), _attending_request()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # "trained" values, none of them an initialiser's (out_proj's bias starts at zero)
    trained = copy.deepcopy(model.state_dict())
    runs = []
    monkeypatch.setattr(training, "train", lambda *a, **k: runs.append(1))  # the re-initialisation alone
    with pytest.raises(ValueError, match="retrain cannot re-initialise pos: Attending has no reset_parameters"):
        unlearn(model, req, "retrain", checks=False)
    assert runs == []
    model.pos.requires_grad_(False)  # frozen: a fixed part the retrained model keeps ...
    model.attn.out_proj.requires_grad_(False)  # ... even where its parent's initialiser reaches (out_proj.bias)
    res = unlearn(model, req, "retrain", checks=False)
    assert runs == [1] and torch.equal(res.model.pos, trained["pos"])
    assert torch.equal(res.model.attn.out_proj.bias, trained["attn.out_proj.bias"])
    assert torch.equal(res.model.attn.out_proj.weight, trained["attn.out_proj.weight"])
    model.attn.out_proj.requires_grad_(True)
    for name in ("attn.in_proj_weight", "head.weight"):
        assert not torch.equal(res.model.get_parameter(name), trained[name]), name
    model.pos.requires_grad_(True)

    teachers = []
    real = baselines._frozen_copy
    monkeypatch.setattr(baselines, "_frozen_copy", lambda m: teachers.append(real(m)) or teachers[-1])
    unlearn(model, req, "bad_teacher", batch_size=8, checks=False)
    bad = teachers[1]
    assert torch.equal(bad.pos, torch.zeros(4, 8))
    assert not torch.equal(bad.attn.in_proj_weight, trained["attn.in_proj_weight"])

    res = unlearn(model, req, "scissorhands", k=1.0, batch_size=8, checks=False)
    assert res.info["zeroed"] == ["pos"]


@pytest.mark.parametrize("method", ["bad_teacher", "retrain"])
def test_methods_do_not_reseed_the_global_rng(method):
    """Seeded methods draw from a local generator: after the call the caller's RNG still depends on the caller's
    own seed (a reseeding method would leave the same state whatever the caller had)."""
    draws, model, req = [], _prime(tiny_cnn()), _request()
    for seed in (1, 2):
        torch.manual_seed(seed)
        unlearn(model, req, method, batch_size=8, epochs=1, checks=False)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


# ----------------------------------------------------------------------------------------------------- splits
def _split_body(digits):
    tr, te = digits
    return json.loads(json.dumps(make_splits(ForgetSpec.parse("random:0.2", seed=3), tr, te).__dict__))


@pytest.mark.parametrize("edit, match", [
    (lambda b: b["forget"].append(b["forget"][0]), "twice"),
    (lambda b: b["retain"].__setitem__(0, -5), "negative"),
    (lambda b: b["forget"].append(b["val"][0]), "train"),
    (lambda b: b["val"].append(b["forget"][0]), "both"),
    (lambda b: b.__setitem__("forget", []), "empty"),
    (lambda b: b.__setitem__("forget", b["forget"][1:]), "forget ∪ retain"),
])
@pytest.mark.parametrize("hash_value", [None, ""])
def test_split_files_are_validated_even_without_a_hash(digits, tmp_path, edit, match, hash_value):
    body = _split_body(digits)
    edit(body)
    if hash_value is None:
        body.pop("hash")
    else:
        body["hash"] = hash_value
    (tmp_path / "s.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=match):
        Splits.load(tmp_path / "s.json")


def test_split_indices_out_of_range_are_refused(digits, tmp_path):
    tr, te = digits
    s = make_splits(ForgetSpec.parse("random:0.2", seed=3), tr, te)
    s.check_dataset(tr, te)
    body = json.loads(json.dumps(s.__dict__))
    body["train"].append(len(tr) + 5)
    body["retain"].append(len(tr) + 5)
    body.pop("hash")
    (tmp_path / "s.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match="out of range"):
        Splits.load(tmp_path / "s.json").check_dataset(tr, te)


# -------------------------------------------------------------------------------------------------------- CLI
def _user_checkpoint(folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_state(build_model("mlp", (1, 8, 8), 10), folder / "model.safetensors")
    return folder / "model.safetensors"


UNLEARN = ["unlearn", "--data", "digits", "--arch", "mlp", "--forget", "class:3", "--quiet"]


@pytest.mark.parametrize("out", [".", "sub/.."])
def test_cli_refuses_an_out_that_would_replace_its_input(tmp_path, capsys, out):
    ckpt = _user_checkpoint(tmp_path / "d")
    before = ckpt.read_bytes()
    rc = main(UNLEARN + ["--model", str(ckpt), "--out", str(tmp_path / "d" / out), "--overwrite"])
    assert rc == 2 and "holds the input" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_cli_out_is_written_as_a_unit(tmp_path, capsys, monkeypatch):
    ckpt = _user_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    assert main(UNLEARN + ["--model", str(ckpt), "--out", str(out), "--hp", "alpha=2"]) == 0
    assert (out / "mask.safetensors").exists()
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    # a non-empty --out is refused, before any work
    assert main(UNLEARN + ["--model", str(ckpt), "--out", str(out), "--method", "finetune"]) == 2
    assert "not empty" in capsys.readouterr().err
    # a run that dies after writing the model leaves the previous run's folder as it was
    import excise.cli as cli

    def die(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cli, "write_outputs", die)
    assert main(UNLEARN + ["--model", str(ckpt), "--out", str(out), "--method", "finetune", "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left behind
    monkeypatch.undo()
    # with --overwrite the folder holds the new run only: finetune writes no mask, so none is left
    assert main(UNLEARN + ["--model", str(ckpt), "--out", str(out), "--method", "finetune", "--overwrite",
                           "--hp", "epochs=1"]) == 0
    assert not (out / "mask.safetensors").exists()
    assert json.loads((out / "results.json").read_text())["meta"]["result"]["method"] == "finetune"


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: _write(d / "empty.safetensors", b""), "is empty"),
    (lambda d: _write(d / "trunc.safetensors", (d / "model.safetensors").read_bytes()[:500]), "not a readable safetensors"),
    (lambda d: _write(d / "random.pt", os.urandom(2000)), "refused|not a readable"),
    # seeded random bytes on which the weights-only unpickler fails with IndexError, KeyError and
    # UnicodeDecodeError rather than UnpicklingError (about 1 in 12 random files)
    *[(lambda d, s=s: _write(d / f"random{s}.pt", random.Random(s).randbytes(2000)), "not a readable")
      for s in (2, 20, 195)],
    (lambda d: _write(d / "trunc.pt", b"PK\x03\x04" + os.urandom(100)), "refused|not a readable"),
    (lambda d: d, "is a folder"),
    (lambda d: d / "missing.safetensors", "does not exist"),
])
def test_cli_bad_checkpoints_give_one_line_and_exit_2(tmp_path, capsys, make, match):
    _user_checkpoint(tmp_path / "in")
    bad = make(tmp_path / "in")
    rc = main(UNLEARN + ["--model", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, match", [
    (["--hp", "alpha"], "NAME=VALUE"),
    (["--hp", "alpha=lots"], "alpha must be a number"),
    (["--hp", "nonsense=1"], "does not take"),
    (["--method", "nosuch"], "unknown method"),
])
def test_cli_bad_hp_strings_give_one_line_and_exit_2(tmp_path, capsys, extra, match):
    ckpt = _user_checkpoint(tmp_path / "in")
    rc = main(UNLEARN + ["--model", str(ckpt), "--out", str(tmp_path / "out")] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_cli_out_that_is_a_file_and_debug_traceback(tmp_path, capsys):
    ckpt = _user_checkpoint(tmp_path / "in")
    (tmp_path / "file").write_text("x")
    assert main(UNLEARN + ["--model", str(ckpt), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a file"):
        main(["--debug"] + UNLEARN + ["--model", str(ckpt), "--out", str(tmp_path / "file")])


def test_outputs_respect_the_umask(tmp_path):
    ckpt = _user_checkpoint(tmp_path / "in")
    old = os.umask(0o022)
    try:
        assert main(UNLEARN + ["--model", str(ckpt), "--out", str(tmp_path / "out"), "--hp", "alpha=2"]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "out").iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------------- reports, warnings
def test_saps_phases_add_up_to_at_most_the_total():
    res = unlearn(_prime(tiny_cnn()), _request(corrected=toy_loader(n=16, seed=1)), "saps", curvature_samples=20,
                  update="diagonal", checks=False)
    assert "importance_ref" in res.timings and "select" in res.timings
    assert sum(res.timings.values()) <= res.seconds * 1.001 + 1e-4


def test_nothing_selected_is_reported():
    with pytest.warns(NothingChangedWarning, match="ssd selected no parameter entry"):
        res = unlearn(_prime(tiny_cnn()), _request(), "ssd", alpha=1e9, importance_cache=False)
    assert [w["warning"] for w in res.warnings] == ["NothingChangedWarning"]
    assert res.info["checks"]["entries_changed"] == 0


def test_a_collapse_is_reported(committed):
    prep = committed(_digits_setup())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = unlearn(prep.original, prep.request(), "random_labels", lr=0.5, batch_size=32)
    names = {w["warning"] for w in res.warnings}
    assert {"CollapseWarning", "UtilityDropWarning"} <= names, res.info["checks"]
    assert {type(w.message) for w in caught} >= {CollapseWarning, UtilityDropWarning}
    ok = unlearn(prep.original, prep.request(), "ssd", alpha=10.0)
    assert ok.warnings == [], ok.warnings  # a good result says nothing
    assert ok.info["checks"]["forget"]["acc_after"] < ok.info["checks"]["forget"]["acc_before"] - 50


def test_post_checks_skip_what_a_task_cannot_say():
    """A Task whose predictions are not classes (a regression) gets the changed-entries check only."""
    class Regression(ClassificationTask):
        def loss_from_output(self, output, targets, reduction="mean"):
            return F.mse_loss(output.squeeze(-1), targets, reduction=reduction)

        def predict(self, model, batch):
            return self.output(model, batch).squeeze(-1)

    x, y = torch.randn(32, 1, 6, 6), torch.randn(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 1))
    res = unlearn(model, UnlearningRequest(forget=loader, retain=loader, task=Regression()), "finetune", epochs=1,
                  batch_size=8)
    checks = res.info["checks"]
    assert checks["entries_changed"] > 0 and checks["forget"]["acc_before"] is None
    assert checks["retain"]["top_share_after"] is None and res.warnings == []


def test_one_sample_of_a_small_probe_is_not_a_utility_loss():
    """On a 16-sample probe one sample is 6.25 points: a utility warning needs more than one sample lost."""
    from excise.checks import judge

    def probe(after_hits):
        return {"samples": 16, "acc_before": 100.0, "acc_after": 100.0 * after_hits / 16, "top_share_before": 0.2,
                "top_share_after": 0.2}

    for hits, warned in ((15, False), (14, True)):
        found = judge("m", {"entries_changed": 5, "forget": probe(0), "retain": probe(hits)})
        assert any(cls is UtilityDropWarning for cls, _ in found) == warned, hits
