import subprocess
import sys

import pytest
import torch

from excise.models import build_model, model_names
from excise.storage import state_hash
from excise.training import CheckpointCache, TrainRecipe, load_state, save_state, seeded_loader, train


def _fit(ds, seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", ds.input_shape, ds.num_classes)
    loader = seeded_loader(ds, None, 64, shuffle=True, seed=seed)
    return train(model, loader, TrainRecipe(epochs=2, lr=0.05), seed=seed, progress=False)


def test_training_is_seeded_and_learns(digits):
    tr, te = digits
    a, b = _fit(tr), _fit(tr)
    assert state_hash(a) == state_hash(b)
    from excise.evaluation import accuracy

    assert accuracy(a, seeded_loader(te, None, 256)) > 80


def test_checkpoint_cache_hits_on_second_call(digits, tmp_path):
    tr, _ = digits
    cache = CheckpointCache(tmp_path)
    calls = []

    def build():
        torch.manual_seed(0)
        return build_model("mlp", tr.input_shape, 10)

    def fit(m):
        calls.append(1)
        return train(m, seeded_loader(tr, None, 64, shuffle=True), TrainRecipe(epochs=1), progress=False)

    m1, meta1, hit1 = cache.get_or_train({"k": 1}, build, fit)
    m2, meta2, hit2 = cache.get_or_train({"k": 1}, build, fit)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert state_hash(m1) == state_hash(m2) and meta2["train_seconds"] == meta1["train_seconds"]
    # what decides a CPU-trained model's bits beside its recipe is recorded with it
    assert meta2["threads"] == torch.get_num_threads() and meta2["device"] == "cpu"
    assert meta2["torch"] == torch.__version__
    _, _, hit3 = cache.get_or_train({"k": 2}, build, fit)
    assert not hit3 and len(calls) == 2


def test_state_round_trips_safetensors_and_plain_state_dict(tmp_path):
    m = build_model("smallcnn", (1, 28, 28), 10)
    save_state(m, tmp_path / "m.safetensors")
    torch.save(m.state_dict(), tmp_path / "m.pt")
    for f in ("m.safetensors", "m.pt"):
        other = build_model("smallcnn", (1, 28, 28), 10)
        load_state(other, tmp_path / f)
        assert state_hash(other) == state_hash(m)


class Payload:
    """An arbitrary object that a checkpoint must not be allowed to unpickle."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_state(build_model("mlp", (1, 8, 8), 10), tmp_path / "evil.pt")


@pytest.mark.parametrize("name, kw", [("mlp", {}), ("smallcnn", {}), ("resnet18", {"width": 8})])
def test_registry_builds_models_that_run(name, kw):
    m = build_model(name, (3, 32, 32), 7, **kw)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert set(model_names()) >= {"mlp", "smallcnn", "resnet18"}
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", (3, 32, 32), 7)


def test_resnet18_default_width_is_64():
    m = build_model("resnet18", (3, 32, 32), 10)
    assert m.head.in_features == 512


def test_import_excise_is_light():
    code = "import sys, excise; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
