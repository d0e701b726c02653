"""Datasets by registry (excise.data.register_dataset) and a user's own dataset as ``package.module:function``,
defined here, used by load_dataset, ``excise unlearn`` and ``excise bench``."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from excise.cli import main
from excise.data import ArrayDataset, dataset_names, has_coarse, load_dataset, register_dataset
from excise.data import registry as R
from excise.models import build_model


def blobs(split, root=None):
    """Three Gaussian blobs in 6 dimensions: a user's own dataset, 240 training and 90 test points."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 80 if split == "train" else 30
    centres = torch.tensor([[3.0] * 6, [-3.0] * 6, [3.0, -3.0] * 3])
    y = torch.arange(3).repeat_interleave(n)
    x = centres[y] + torch.randn(len(y), 6, generator=g)
    return ArrayDataset(x, y, ["a", "b", "c"], f"blobs-{split}")


def blob_tensors(split, root=None):
    ds = blobs(split)
    return ds.x, ds.targets


def blob_pairs(split, root=None):
    ds = blobs(split)
    return TensorDataset(ds.x, ds.targets)


@pytest.fixture()
def registry(monkeypatch):
    monkeypatch.setattr(R, "_DATASETS", dict(R._DATASETS))
    return R


def test_builtin_datasets_are_registered_with_their_metadata():
    names = dataset_names()
    assert {"fashion-mnist", "fashion-mnist-coarse", "digits", "cifar10", "cifar100"} <= set(names)
    assert has_coarse("fashion-mnist") and not has_coarse("digits")
    with pytest.raises(ValueError, match="never downloads"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*package.module:function"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="no coarse labels"):
        load_dataset("digits-coarse")


@pytest.mark.parametrize("fn", ["blobs", "blob_tensors", "blob_pairs"])
def test_a_user_dataset_by_module_and_function(fn):
    ds = load_dataset(f"test_data_registry:{fn}", "train")
    assert isinstance(ds, ArrayDataset) and len(ds) == 240 and ds.num_classes == 3 and ds.input_shape == (6,)
    assert torch.equal(ds.x, blobs("train").x)
    with pytest.raises(ValueError, match="cannot import"):
        load_dataset("test_data_registry:missing")


def test_registering_a_dataset_with_coarse_labels(registry):
    register_dataset("blobs", blobs, coarse={"ab": ["a", "b"], "c": ["c"]}, summary="three blobs")
    assert "blobs" in dataset_names() and "blobs-coarse" in dataset_names()
    coarse = load_dataset("blobs-coarse", "test")
    assert coarse.classes == ["ab", "c"] and coarse.targets.tolist() == [0] * 60 + [1] * 30
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("blobs", blob_tensors)
    with pytest.raises(ValueError, match="may not contain"):
        register_dataset("x:y", blobs)


def test_excise_unlearn_and_bench_on_a_dataset_defined_in_a_test_file(tmp_path, capsys):
    model = build_model("mlp", (6,), 3)
    torch.save(model.state_dict(), tmp_path / "user.pt")
    rc = main(["unlearn", "--model", str(tmp_path / "user.pt"), "--arch", "mlp", "--data",
               "test_data_registry:blobs", "--forget", "class:1", "--method", "ssd", "--quiet",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["rows"] and (tmp_path / "o" / "model.safetensors").exists()
    proto = tmp_path / "blobs.toml"
    proto.write_text('dataset = "test_data_registry:blobs"\narch = "mlp"\nforget = "class:1"\nseeds = [0]\n'
                     'importance_batch = 64\n[recipe]\nepochs = 3\nbatch_size = 32\n[methods.ssd]\n')
    assert main(["bench", str(proto), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [r["method"] for r in rep["rows"]] == ["original", "retrain", "ssd"]
    assert rep["rows"][1]["UA"] == 100.0  # the oracle never saw class 1 of three separated blobs
