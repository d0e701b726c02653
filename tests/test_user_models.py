"""Models and loaders as users write them: logits wrapped in a tuple, dict or output object; inputs that are a
dict of tensors. Every route gives what the plain model and tensor batches give."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from excise import UnlearningRequest, importance, unlearn
from excise.checks import take

from helpers import per_sample_squares


class _Output:
    """What a transformers model returns: an object with ``.logits``."""

    def __init__(self, logits):
        self.logits, self.hidden = logits, None


class Wrapped(nn.Module):
    def __init__(self, core: nn.Module, how: str):
        super().__init__()
        self.core, self.how = core, how

    def forward(self, x):
        z = self.core(x)
        return {"tuple": lambda: (z, z.detach().mean()), "list": lambda: [z], "dict": lambda: {"logits": z, "aux": 1},
                "object": lambda: _Output(z), "string": lambda: "logits", "dict-without": lambda: {"scores": z}}[
            self.how]()


def _core(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _scores(model, loader):
    mean, second = importance.gradient_moments(model, loader)
    return {"mean": mean, "second": second, "batch": importance.fisher(model, loader, mode="batch"),
            "ggn": importance.hessian_diag(model, loader, method="ggn_mc", mc_samples=2)}


def _same(a, b, prefix=""):
    for kind in a:
        for n, v in a[kind].items():
            torch.testing.assert_close(b[kind][prefix + n], v, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("how", ["tuple", "list", "dict", "object"])
def test_wrapped_logits_give_the_plain_models_importance_and_result(how):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    plain, wrapped = _core(), Wrapped(_core(), how)
    _same(_scores(plain, loader), _scores(wrapped, loader), prefix="core.")
    req = UnlearningRequest(forget=DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8), retain=loader)
    a, b = unlearn(plain, req, "ssd", alpha=2.0, checks=False), unlearn(wrapped, req, "ssd", alpha=2.0, checks=False)
    assert a.mask.count() > 0 and a.mask.count() == b.mask.count()
    for n, m in a.mask.items():
        assert torch.equal(b.mask["core." + n], m)


@pytest.mark.parametrize("how", ["string", "dict-without"])
def test_an_output_without_logits_is_a_clear_error(how):
    x, y = _data()
    req = UnlearningRequest(forget=DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8),
                            retain=DataLoader(TensorDataset(x, y), batch_size=16))
    with pytest.raises(TypeError, match="not logits.*wrap the model"):
        unlearn(Wrapped(_core(), how), req, "ssd")


class _DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"a": self.x[i], "b": 2 * self.x[i]}, self.y[i]


class DictIn(nn.Module):
    """Reads a dict of inputs; ``shared``: one layer applied to both (the per-sample pass falls back to vmap)."""

    def __init__(self, core, shared=False):
        super().__init__()
        self.core, self.shared = core, shared

    def forward(self, d):
        if self.shared:
            return self.core(d["a"]) + self.core(d["b"] / 2)
        return self.core(d["a"])


def _as_user_dict(samples):
    """Collate into a dict-like that is not a dict (as a tokenizer's BatchEncoding is)."""
    from collections import UserDict

    from torch.utils.data import default_collate

    inputs, labels = default_collate(samples)
    return UserDict(inputs), labels


@pytest.mark.parametrize("shared", [False, True])
def test_dict_inputs_give_the_per_sample_sums_and_run_every_route(shared):
    x, y = _data(n=70)
    loader = DataLoader(_DictData(x, y), batch_size=64)  # > CPU_PART: the hooked pass cuts batches into parts
    model = DictIn(_core(), shared)
    _, second = importance.gradient_moments(model, loader)
    ref = per_sample_squares(model, x, y, wrap=lambda t: {"a": t, "b": 2 * t})
    for n in ref:
        torch.testing.assert_close(second[n], ref[n], rtol=1e-5, atol=1e-8)
    big = DataLoader(_DictData(x, y), batch_size=70, collate_fn=_as_user_dict)  # cut in parts through the UserDict
    _, again = importance.gradient_moments(model, big)
    for n in ref:
        torch.testing.assert_close(again[n], ref[n], rtol=1e-5, atol=1e-8)
    if not shared:  # the tensor-input model on the same data: the same importance
        _same(_scores(_core(), DataLoader(TensorDataset(x, y), batch_size=64)), _scores(model, loader),
              prefix="core.")
    taken = take(loader, 67)  # counted by the inputs' leading size (not the dict's number of keys)
    assert [b[1].shape[0] for b in taken] == [64, 3] and [b[0]["a"].shape[0] for b in taken] == [64, 3]
    ds = _DictData(x, y)
    sub = lambda lo, hi: DataLoader(torch.utils.data.Subset(ds, range(lo, hi)), batch_size=16)
    req = UnlearningRequest(forget=sub(0, 10), retain=sub(10, 50), holdout=sub(50, 70))
    for method, kw in (("ssd", {"calibrate": {"trials": 2}}), ("scissorhands", {}), ("saps", {})):
        res = unlearn(model, req, method, **kw)
        assert res.info["checks"]["forget"]["samples"] == 10, method


@pytest.mark.parametrize("smooth", [0.0, 0.1])
def test_one_hot_and_soft_labels_count_as_their_class(smooth):
    """Targets given as a row of class weights per sample (one-hot, or label-smoothed): accuracy, the post-checks
    and calibration count each sample as its heaviest class (they raised or said nothing before); with one-hot
    rows every number is the integer labels' own."""
    import excise

    x, y = _data(n=120, seed=1)
    model = _core(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    rows = nn.functional.one_hot(y, 3).float() * (1 - smooth) + smooth / 3

    def request(targets):
        ds = TensorDataset(x, targets)
        sub = lambda idx: DataLoader(torch.utils.data.Subset(ds, list(idx)), batch_size=16)
        keep = [i for i in range(100) if y[i] != 2]
        return UnlearningRequest(forget=sub([i for i in range(100) if y[i] == 2]), retain=sub(keep),
                                 holdout=sub(range(100, 120)))

    ints, weighted = request(y), request(rows)
    loaders = lambda r: {"forget": r.forget, "retain": r.retain, "test": r.holdout}
    a, b = excise.evaluate(model, loaders(ints))["model"], excise.evaluate(model, loaders(weighted))["model"]
    assert a["forget_acc"] > 50 and all(a[k] == b[k] for k in ("forget_acc", "RA", "TA", "per_class_test_acc"))
    res_i, res_w = (unlearn(model, r, "ssd", calibrate={"trials": 3}) for r in (ints, weighted))
    cal_i, cal_w = res_i.info["calibration"], res_w.info["calibration"]
    assert cal_w["intent"] == "class" and cal_w["classes"] == [2]
    assert res_w.info["checks"]["forget"]["acc_before"] == res_i.info["checks"]["forget"]["acc_before"] > 50
    if smooth == 0.0:  # the same loss, so the same importance, trials and result
        assert [t["alpha"] for t in cal_w["trials"]] == [t["alpha"] for t in cal_i["trials"]]
        assert res_w.mask.count() == res_i.mask.count()
    unlearn(model, weighted, "random_labels", epochs=1, batch_size=16)  # draws wrong classes for weighted rows


def test_int32_labels_are_taken_as_class_indices():
    """Labels of NumPy's or pandas' int32 (cross-entropy itself refuses them): the same importance and mask."""
    x, y = _data(n=48, seed=2)
    model = _core(2)

    def request(labels):
        ds = TensorDataset(x, labels)
        return UnlearningRequest(forget=DataLoader(torch.utils.data.Subset(ds, range(8)), batch_size=8),
                                 retain=DataLoader(torch.utils.data.Subset(ds, range(8, 48)), batch_size=16))

    with pytest.raises(RuntimeError, match="Long"):
        nn.functional.cross_entropy(model(x), y.int())
    a = unlearn(model, request(y), "ssd", alpha=2.0)
    b = unlearn(model, request(y.int()), "ssd", alpha=2.0)
    assert a.mask.count() > 0 and all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
    assert b.info["checks"]["forget"]["acc_before"] == a.info["checks"]["forget"]["acc_before"] is not None
