import json

import pytest

from excise.data import ForgetSpec, Splits, load_fashion_mnist, make_splits, FASHION_MNIST_COARSE


def _check_partition(s, n_train):
    d, f, r, v = set(s.train), set(s.forget), set(s.retain), set(s.val)
    assert f <= d and r <= d and not (f & r) and f | r == d
    assert not (d & v) and d | v == set(range(n_train))


def test_class_split(digits):
    tr, te = digits
    s = make_splits(ForgetSpec.parse("class:3"), tr, te)
    _check_partition(s, len(tr))
    assert all(int(tr.targets[i]) == 3 for i in s.forget)
    assert all(int(tr.targets[i]) != 3 for i in s.retain)
    assert all(int(te.targets[i]) == 3 for i in s.test_forget) and len(s.test_forget) + len(s.test_retain) == len(te)


def test_random_split_is_seeded(digits):
    tr, te = digits
    a = make_splits(ForgetSpec.parse("random:0.1", seed=1), tr, te)
    b = make_splits(ForgetSpec.parse("random:0.1", seed=1), tr, te)
    c = make_splits(ForgetSpec.parse("random:0.1", seed=2), tr, te)
    _check_partition(a, len(tr))
    assert a.forget == b.forget and a.hash == b.hash and a.forget != c.forget
    assert len(a.forget) == round(0.1 * len(a.train))


def test_subclass_split_on_coarse_fashion_mnist():
    tr = load_fashion_mnist("train").with_coarse_labels(FASHION_MNIST_COARSE)
    s = make_splits(ForgetSpec.parse("subclass:Shirt"), tr)
    shirt = tr.fine_classes.index("Shirt")
    assert all(int(tr.fine_targets[i]) == shirt for i in s.forget[:500])
    assert {int(tr.targets[i]) for i in s.forget} == {tr.classes.index("top")}
    with pytest.raises(ValueError, match="alone in its coarse class"):
        make_splits(ForgetSpec.parse("subclass:Bag"), tr)
    with pytest.raises(ValueError, match="coarse labels"):
        make_splits(ForgetSpec.parse("subclass:Shirt"), load_fashion_mnist("train"))


def test_explicit_indices_stay_out_of_validation(digits):
    tr, _ = digits
    s = make_splits(ForgetSpec("indices", indices=(0, 5, 7), val_fraction=0.5), tr)
    assert s.forget == [0, 5, 7] and not set(s.val) & {0, 5, 7}


@pytest.mark.parametrize("make, match", [
    (lambda: ForgetSpec("indices", indices=()), "empty"),
    (lambda: ForgetSpec("indices", indices=(1, 2, 2)), "duplicate"),
    (lambda: ForgetSpec("random", fraction=1.0), "fraction"),
    (lambda: ForgetSpec("nonsense"), "unknown forget kind"),
    (lambda: ForgetSpec.parse("class"), "KIND:VALUE"),
    (lambda: ForgetSpec.parse("random:lots"), "number"),
])
def test_bad_specs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_specs_against_data(digits):
    tr, te = digits
    with pytest.raises(ValueError, match="unknown class"):
        make_splits(ForgetSpec.parse("class:cat"), tr, te)
    with pytest.raises(ValueError, match="unknown class id"):
        make_splits(ForgetSpec.parse("class:12"), tr, te)
    with pytest.raises(ValueError, match="out of range"):
        make_splits(ForgetSpec("indices", indices=(1, 10_000)), tr, te)
    with pytest.raises(ValueError, match="covers the whole"):
        make_splits(ForgetSpec.parse("class:" + ",".join(map(str, range(10)))), tr, te)
    with pytest.raises(ValueError, match="empty forget set"):
        make_splits(ForgetSpec.parse("random:0.0001"), tr, te)


def test_split_file_round_trip_and_tamper(digits, tmp_path):
    tr, te = digits
    spec = ForgetSpec.parse("random:0.2", seed=3)
    s = make_splits(spec, tr, te)
    s.save(tmp_path / "split.json")
    back = Splits.load(tmp_path / "split.json")
    assert back == s
    back.check_dataset(tr, te)
    again = make_splits(ForgetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in back.spec.items()}), tr, te)
    assert again.forget == s.forget and again.hash == s.hash
    body = json.loads((tmp_path / "split.json").read_text())
    body["forget"] = body["forget"][1:]
    (tmp_path / "split.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match="corrupt or edited"):
        Splits.load(tmp_path / "split.json")
    with pytest.raises(ValueError, match="different training dataset"):
        s.check_dataset(te)


def test_relabel_specs_and_splits(digits):
    tr, te = digits
    spec = ForgetSpec.parse("relabel:100", seed=2)
    assert spec.flips == 100 and spec.label() == "relabel:100"
    s = make_splits(spec, tr, te)
    _check_partition(s, len(tr))
    assert len(s.forget) == 100 and len(s.wrong_labels) == 100
    assert all(w != int(tr.targets[i]) for i, w in zip(s.forget, s.wrong_labels))
    from excise.data import with_wrong_labels

    noisy = with_wrong_labels(tr, s)
    assert int((noisy.targets != tr.targets).sum()) == 100
    t = make_splits(ForgetSpec.parse("relabel:20:3->8"), tr, te)
    assert set(t.wrong_labels) == {8} and {int(tr.targets[i]) for i in t.forget} == {3}
    with pytest.raises(ValueError, match="flips"):
        ForgetSpec.parse("relabel:0")
    with pytest.raises(ValueError, match="relabel:N"):
        ForgetSpec.parse("relabel:many")
    with pytest.raises(ValueError, match="SOURCE->TARGET"):
        ForgetSpec.parse("relabel:5:3to8")
    with pytest.raises(ValueError, match="not a relabel"):
        with_wrong_labels(tr, make_splits(ForgetSpec.parse("class:3"), tr, te))
