"""What to forget: ForgetSpec → index splits (forget / retain / validation / test), with a split file.

Indices are positions in the training dataset (and, for the test splits, in the test dataset). The
validation split is held out of training: the model is trained on D = train \\ val, and the forget set
is a subset of D.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..types import atomic_write_bytes

KINDS = ("class", "subclass", "random", "indices", "relabel")


@dataclasses.dataclass(frozen=True)
class ForgetSpec:
    """A forgetting request on a dataset.

    kind: ``class`` (every training sample of one or more classes), ``subclass`` (one fine class while
    the model predicts coarse labels), ``random`` (a seeded fraction of D), ``indices`` (explicit positions
    in the training dataset), ``relabel`` (a label-correction request: ``flips`` samples of D get wrong
    labels — random ones, or ``classes=(source, target)`` for a targeted flip — the original model is trained
    on them and the oracle on the corrected data). ``classes`` are names or integer ids. ``val_fraction`` of
    the training data is held out (seeded) as the validation split.
    """

    kind: str
    classes: Tuple[Any, ...] = ()
    fraction: float = 0.0
    indices: Tuple[int, ...] = ()
    seed: int = 0
    val_fraction: float = 0.1
    flips: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown forget kind {self.kind!r}; expected one of {KINDS}")
        if self.kind in ("class", "subclass") and not self.classes:
            raise ValueError(f"a {self.kind} forget spec needs at least one class")
        if self.kind == "random" and not (0.0 < float(self.fraction) < 1.0):
            raise ValueError(f"random forgetting needs 0 < fraction < 1, got {self.fraction}")
        if self.kind == "indices":
            if len(self.indices) == 0:
                raise ValueError("empty forget set: explicit indices list is empty")
            if len(set(self.indices)) != len(self.indices):
                dup = sorted({i for i in self.indices if self.indices.count(i) > 1})[:10]
                raise ValueError(f"duplicate forget indices: {dup}")
        if self.kind == "relabel":
            if self.flips < 1:
                raise ValueError(f"a relabel spec needs flips ≥ 1, got {self.flips}")
            if self.classes and len(self.classes) != 2:
                raise ValueError("a targeted relabel spec needs classes=(source, target)")
        if not (0.0 <= float(self.val_fraction) < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def parse(cls, text: str, seed: int = 0, val_fraction: float = 0.1) -> "ForgetSpec":
        """``class:9``, ``class:Ankle boot``, ``subclass:Shirt``, ``random:0.1``, ``indices:3,17,42``,
        ``relabel:2500`` (random wrong labels), ``relabel:1000:Coat->Shirt`` (targeted)."""
        if ":" not in text:
            raise ValueError(f"forget spec {text!r} should look like KIND:VALUE, e.g. class:9 or random:0.1")
        kind, value = text.split(":", 1)
        kind = kind.strip()
        if kind in ("class", "subclass"):
            classes = tuple(int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in value.split(","))
            return cls(kind, classes=classes, seed=seed, val_fraction=val_fraction)
        if kind == "random":
            try:
                frac = float(value)
            except ValueError:
                raise ValueError(f"random:{value} — the fraction must be a number") from None
            return cls("random", fraction=frac, seed=seed, val_fraction=val_fraction)
        if kind == "indices":
            try:
                idx = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"indices:{value} — expected comma-separated integers") from None
            return cls("indices", indices=idx, seed=seed, val_fraction=val_fraction)
        if kind == "relabel":
            count, _, pair = value.partition(":")
            try:
                flips = int(count)
            except ValueError:
                raise ValueError(f"relabel:{value} — expected relabel:N or relabel:N:SOURCE->TARGET") from None
            classes: tuple = ()
            if pair:
                if "->" not in pair:
                    raise ValueError(f"relabel:{value} — a targeted flip reads SOURCE->TARGET")
                classes = tuple(int(v) if v.strip().isdigit() else v.strip() for v in pair.split("->", 1))
            return cls("relabel", classes=classes, flips=flips, seed=seed, val_fraction=val_fraction)
        raise ValueError(f"unknown forget kind {kind!r}; expected one of {KINDS}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"], d["indices"] = list(self.classes), list(self.indices)
        if self.kind != "relabel":
            d.pop("flips")  # keeps split hashes of the other kinds as they were before relabel existed
        return d

    def label(self) -> str:
        if self.kind in ("class", "subclass"):
            return f"{self.kind}:{','.join(map(str, self.classes))}"
        if self.kind == "random":
            return f"random:{self.fraction:g}"
        if self.kind == "relabel":
            return f"relabel:{self.flips}" + (f":{self.classes[0]}->{self.classes[1]}" if self.classes else "")
        return f"indices:{len(self.indices)}"


def _class_ids(names: Sequence[Any], classes: Sequence[str]) -> List[int]:
    ids = []
    for c in names:
        if isinstance(c, int):
            if not 0 <= c < len(classes):
                raise ValueError(f"unknown class id {c}: the dataset has classes 0..{len(classes) - 1}")
            ids.append(c)
        elif c in classes:
            ids.append(classes.index(c))
        else:
            raise ValueError(f"unknown class {c!r}; known: {list(classes)}")
    return ids


@dataclasses.dataclass
class Splits:
    """Index splits for one forgetting request, with a content hash."""

    spec: Dict[str, Any]
    train_fingerprint: str
    test_fingerprint: Optional[str]
    train: List[int]  # D: what the original model is trained on (forget included)
    forget: List[int]
    retain: List[int]
    val: List[int]
    test: List[int]
    test_forget: Optional[List[int]] = None  # test samples of the forgotten (sub)class, if any
    test_retain: Optional[List[int]] = None
    wrong_labels: Optional[List[int]] = None  # relabel requests: the wrong label of each forget sample
    hash: str = ""

    def __post_init__(self):
        if not self.hash:
            self.hash = self.content_hash()

    def validate(self) -> None:
        """Raise a ValueError for splits that cannot be right: duplicate or negative indices, forget or retain
        outside the training part D, forget ∩ retain, D ∩ validation, forget ∪ retain ≠ D, or one wrong label
        per forget sample missing."""
        def ints(name, xs):
            if xs is None:
                return None
            if not isinstance(xs, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in xs):
                raise ValueError(f"splits: {name} must be a list of integer indices")
            neg = [i for i in xs if i < 0]
            if neg:
                raise ValueError(f"splits: {name} holds negative indices, e.g. {neg[:5]}")
            if len(set(xs)) != len(xs):
                seen: set = set()
                dup = [i for i in xs if i in seen or seen.add(i)]
                raise ValueError(f"splits: {name} names {len(dup)} indices twice, e.g. {sorted(set(dup))[:5]}")
            return set(xs)

        sets = {k: ints(k, getattr(self, k)) for k in ("train", "forget", "retain", "val", "test", "test_forget",
                                                         "test_retain")}
        if not sets["forget"]:
            raise ValueError("splits: the forget set is empty")
        for name, inside, outer in (("forget", sets["forget"], "train"), ("retain", sets["retain"], "train"),
                                    ("test_forget", sets["test_forget"], "test"),
                                    ("test_retain", sets["test_retain"], "test")):
            if inside is not None and sets[outer] and not inside <= sets[outer]:
                extra = sorted(inside - sets[outer])
                raise ValueError(f"splits: {len(extra)} {name} indices are not in {outer}, e.g. {extra[:5]}")
        for a, b in (("forget", "retain"), ("train", "val"), ("forget", "val")):
            both = sets[a] & sets[b]
            if both:
                raise ValueError(f"splits: {len(both)} indices are in both {a} and {b}, e.g. {sorted(both)[:5]}")
        if sets["forget"] | sets["retain"] != sets["train"]:
            raise ValueError("splits: forget ∪ retain must be the training part D")
        if self.wrong_labels is not None and len(self.wrong_labels) != len(self.forget):
            raise ValueError("splits: a relabel request needs one wrong label per forget sample")

    def content_hash(self) -> str:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "hash"}
        if body.get("wrong_labels") is None:
            body.pop("wrong_labels", None)  # keeps the hashes of split files written before the field existed
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Splits":
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"split file {path} does not hold a JSON object")
        stored = d.pop("hash", "")
        try:
            s = cls(**d, hash="")
        except TypeError as e:
            raise ValueError(f"split file {path} has unexpected or missing fields: {e}") from None
        if stored and stored != s.hash:
            raise ValueError(f"split file {path} is corrupt or edited: stored hash {stored[:12]} != content {s.hash[:12]}")
        try:
            s.validate()
        except ValueError as e:
            raise ValueError(f"split file {path}: {e}") from None
        return s

    def check_dataset(self, train, test=None) -> None:
        """Raise if the datasets are not the ones these splits were made for, or an index lies outside them."""
        if train.fingerprint() != self.train_fingerprint:
            raise ValueError("these splits were made for a different training dataset (fingerprint mismatch)")
        if test is not None and self.test_fingerprint is not None and test.fingerprint() != self.test_fingerprint:
            raise ValueError("these splits were made for a different test dataset (fingerprint mismatch)")
        for name in ("train", "forget", "retain", "val"):
            xs = getattr(self, name)
            if xs and max(xs) >= len(train):
                raise ValueError(f"splits: {name} index {max(xs)} is out of range for a training set of {len(train)}")
        if test is not None:
            for name in ("test", "test_forget", "test_retain"):
                xs = getattr(self, name)
                if xs and max(xs) >= len(test):
                    raise ValueError(f"splits: {name} index {max(xs)} is out of range for a test set of {len(test)}")

    def sizes(self) -> Dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "forget", "retain", "val", "test")}


def make_splits(spec: ForgetSpec, train, test=None) -> Splits:
    """Turn a spec into index splits over ``train`` (and ``test``), both ArrayDatasets."""
    n = len(train)
    g = torch.Generator().manual_seed(spec.seed)
    explicit = set()
    if spec.kind == "indices":
        bad = [i for i in spec.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"forget indices out of range [0, {n}): {bad[:10]}")
        explicit = set(spec.indices)
    # validation held out of training, drawn from samples not explicitly named for forgetting
    candidates = torch.tensor([i for i in range(n) if i not in explicit]) if explicit else torch.arange(n)
    n_val = int(round(spec.val_fraction * n))
    perm = candidates[torch.randperm(len(candidates), generator=g)]
    val = perm[:n_val].sort().values
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[val] = True
    d_idx = (~in_val).nonzero().flatten()

    test_forget = test_retain = wrong = None
    if spec.kind == "relabel":
        source = target = None
        if spec.classes:
            source, target = _class_ids(spec.classes, train.classes)
        noisy, flipped = flip_labels(train, spec.flips, seed=spec.seed, source=source, target=target,
                                     candidates=d_idx.tolist())
        forget = torch.tensor(flipped)
        wrong = noisy.targets[forget].tolist()
    elif spec.kind == "class":
        ids = _class_ids(spec.classes, train.classes)
        sel = torch.isin(train.targets[d_idx], torch.tensor(ids))
        forget = d_idx[sel]
        if test is not None:
            tsel = torch.isin(test.targets, torch.tensor(ids))
            test_forget, test_retain = tsel.nonzero().flatten().tolist(), (~tsel).nonzero().flatten().tolist()
    elif spec.kind == "subclass":
        if train.fine_classes == train.classes:
            raise ValueError("sub-class forgetting needs a dataset with coarse labels (e.g. fashion-mnist-coarse)")
        ids = _class_ids(spec.classes, train.fine_classes)
        for i in ids:
            coarse = train.targets[train.fine_targets == i].unique()
            others = train.fine_targets[torch.isin(train.targets, coarse) & (train.fine_targets != i)]
            if len(others) == 0:
                raise ValueError(f"class {train.fine_classes[i]!r} is alone in its coarse class: that is full-class forgetting")
        sel = torch.isin(train.fine_targets[d_idx], torch.tensor(ids))
        forget = d_idx[sel]
        if test is not None:
            tsel = torch.isin(test.fine_targets, torch.tensor(ids))
            test_forget, test_retain = tsel.nonzero().flatten().tolist(), (~tsel).nonzero().flatten().tolist()
    elif spec.kind == "random":
        k = int(round(spec.fraction * len(d_idx)))
        forget = d_idx[torch.randperm(len(d_idx), generator=g)[:k]].sort().values
    else:
        forget = torch.tensor(sorted(spec.indices))
    if len(forget) == 0:
        raise ValueError(f"empty forget set: {spec.label()} selects no training sample")
    if len(forget) >= len(d_idx):
        raise ValueError(f"the forget set ({spec.label()}) covers the whole training set: nothing would remain")
    in_forget = torch.zeros(n, dtype=torch.bool)
    in_forget[forget] = True
    retain = d_idx[~in_forget[d_idx]]
    return Splits(
        spec=spec.to_dict(),
        train_fingerprint=train.fingerprint(),
        test_fingerprint=test.fingerprint() if test is not None else None,
        train=d_idx.tolist(), forget=forget.tolist(), retain=retain.tolist(), val=val.tolist(),
        test=list(range(len(test))) if test is not None else [],
        test_forget=test_forget, test_retain=test_retain, wrong_labels=wrong,
    )


def flip_labels(dataset, n: int, seed: int = 0, source: Optional[int] = None, target: Optional[int] = None,
                candidates: Optional[Sequence[int]] = None):
    """A copy of ``dataset`` with ``n`` wrong labels, for label-correction requests.

    Random flips (default): ``n`` seeded samples each get a different random class. Targeted flips:
    ``source`` → ``target`` relabels ``n`` samples of class ``source``. ``candidates`` restricts which
    positions may be flipped (e.g. the training part D). Returns ``(flipped_dataset, indices)``; the
    corrected versions Z̃ are ``dataset`` at those indices.
    """
    from .arrays import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(dataset)) if candidates is None else torch.tensor(list(candidates))
    if source is not None:
        pool = pool[dataset.targets[pool] == source]
    if not 0 < n <= len(pool):
        raise ValueError(f"cannot flip {n} labels: {len(pool)} candidate samples")
    idx = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    y = dataset.targets.clone()
    k = dataset.num_classes
    if target is not None:
        if not 0 <= target < k or target == source:
            raise ValueError(f"target class must be in [0, {k}) and differ from the source")
        y[idx] = target
    else:
        shift = torch.randint(1, k, (n,), generator=g)
        y[idx] = (y[idx] + shift) % k
    flipped = ArrayDataset(dataset.x, y, dataset.classes, f"{dataset.name}-flip{n}-s{seed}-{source}-{target}",
                           fine_targets=None, fine_classes=None)
    return flipped, idx.tolist()


def with_wrong_labels(train, splits: Splits):
    """The training dataset as the original model of a relabel request saw it (wrong labels on the forget set)."""
    from .arrays import ArrayDataset

    if splits.wrong_labels is None:
        raise ValueError("these splits are not a relabel request")
    y = train.targets.clone()
    y[torch.tensor(splits.forget)] = torch.tensor(splits.wrong_labels)
    return ArrayDataset(train.x, y, train.classes, f"{train.name}-wrong-{splits.hash[:12]}")
