"""A forgetting setup end to end: data → splits → loaders → original model and retrain oracle (cached).

Used by ``excise demo``, ``excise unlearn`` and the benchmarks; everything is keyed by content so that
runs are repeatable and a second run loads instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import ForgetSpec, Splits, load_dataset, make_splits, with_wrong_labels
from .models import build_model
from .training import CheckpointCache, TrainRecipe, seeded_loader, train
from .types import UnlearningRequest, resolve_device

EVAL_BATCH = 256


@dataclasses.dataclass
class Setup:
    """Dataset, architecture, training recipe, forgetting spec and seed."""

    dataset: str = "fashion-mnist"
    arch: str = "smallcnn"
    arch_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: TrainRecipe = dataclasses.field(default_factory=TrainRecipe)
    forget: ForgetSpec = dataclasses.field(default_factory=lambda: ForgetSpec("class", classes=(9,)))
    seed: int = 0
    data_root: Optional[str] = None
    importance_batch: int = 256  # batch size of the importance passes (batch-mode Fisher depends on it)


@dataclasses.dataclass
class Prepared:
    setup: Setup
    train_ds: Any
    test_ds: Any
    splits: Splits
    loaders: Dict[str, DataLoader]
    original: Optional[nn.Module]
    oracle: Optional[nn.Module]
    original_meta: Optional[Dict[str, Any]]
    oracle_meta: Optional[Dict[str, Any]]
    cache_hits: Dict[str, bool]
    original_ds: Any = None  # what the original was trained on: train_ds, or with wrong labels (relabel)

    def __post_init__(self):
        if self.original_ds is None:
            self.original_ds = self.train_ds

    @property
    def is_correction(self) -> bool:
        return self.splits.wrong_labels is not None

    def request(self) -> UnlearningRequest:
        """The unlearning request, batched for importance passes: forget (as the original saw it), retain, the
        full training set D, and for a relabel request the corrected forget samples Z̃."""
        b = self.setup.importance_batch
        return UnlearningRequest(
            forget=seeded_loader(self.original_ds, self.splits.forget, b),
            retain=seeded_loader(self.train_ds, self.splits.retain, b),
            train=seeded_loader(self.original_ds, self.splits.train, b),
            corrected=seeded_loader(self.train_ds, self.splits.forget, b) if self.is_correction else None,
        )

    def build(self) -> nn.Module:
        return build_model(self.setup.arch, self.train_ds.input_shape, self.train_ds.num_classes,
                           **self.setup.arch_kwargs)


# ---- protocols: TOML files naming a dataset, a model, a recipe, a forget request and seeds ----

PROTOCOL_DIR = Path(__file__).parent / "bench" / "protocols"
_KEYS = {"name", "dataset", "arch", "arch_kwargs", "recipe", "forget", "val_fraction", "seeds", "importance_batch",
         "methods", "data_root", "description", "search", "task", "diffusion"}
TASKS = ("classification", "diffusion")  # a protocol's ``task``: what the models are, and how rows are scored


def list_protocols() -> List[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def load_protocol(name_or_path: str | Path) -> Dict[str, Any]:
    """A shipped protocol by name, or a TOML file by path."""
    p = Path(name_or_path)
    if not p.suffix == ".toml" or not p.exists():
        shipped = PROTOCOL_DIR / f"{name_or_path}.toml"
        if not shipped.exists():
            raise ValueError(f"unknown protocol {name_or_path!r}: not a .toml file; shipped: {list_protocols()} "
                             "(to score a model on your own data: excise.evaluate(model, {'forget': loader, "
                             "'retain': loader, 'test': loader}, oracle=..., original=...))")
        p = shipped
    with open(p, "rb") as f:
        proto = tomllib.load(f)
    unknown = set(proto) - _KEYS
    if unknown:
        raise ValueError(f"{p}: unknown protocol keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    for need in ("dataset", "arch", "forget"):
        if need not in proto:
            raise ValueError(f"{p}: protocol needs '{need}'")
    if proto.get("task", "classification") not in TASKS:
        raise ValueError(f"{p}: unknown task {proto['task']!r}; expected one of {TASKS}")
    if "diffusion" in proto and proto.get("task") != "diffusion":
        raise ValueError(f"{p}: a [diffusion] table needs task = \"diffusion\"")
    proto.setdefault("name", p.stem)
    proto.setdefault("seeds", [0])
    proto.setdefault("methods", {})
    ForgetSpec.parse(proto["forget"])  # fail early on a bad spec
    return proto


def require_classification(proto: Dict[str, Any], what: str) -> None:
    """Refuse a diffusion protocol where only classification protocols make sense (tuning, evaluate)."""
    if proto.get("task", "classification") != "classification":
        raise ValueError(f"{what} works on classification protocols; {proto.get('name')} is a "
                         f"{proto['task']} protocol: run it with excise bench")


def setup_for(proto: Dict[str, Any], seed: int) -> "Setup":
    """The :class:`Setup` of a loaded protocol (:func:`load_protocol`) at one of its seeds."""
    return Setup(dataset=proto["dataset"], arch=proto["arch"], arch_kwargs=dict(proto.get("arch_kwargs", {})),
                 recipe=TrainRecipe(**proto.get("recipe", {})),
                 forget=ForgetSpec.parse(proto["forget"], seed=seed, val_fraction=proto.get("val_fraction", 0.1)),
                 seed=seed, data_root=proto.get("data_root"), importance_batch=proto.get("importance_batch", 256))


def _digest(indices) -> str:
    return hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()[:16]


def prepare(setup: Setup, cache: Optional[CheckpointCache] = None, with_oracle: bool = True,
            progress: bool = True, device: Optional[torch.device] = None, datasets: Optional[tuple] = None,
            with_original: bool = True) -> Prepared:
    """Load the data, make the splits, and train (or load from the cache) the original and the oracle.

    ``datasets``: an explicit ``(train, test)`` pair of ArrayDatasets instead of ``setup.dataset``.
    ``with_original`` / ``with_oracle``: skip a model that is not needed (e.g. for a user's own checkpoint).
    """
    cache = cache or CheckpointCache()
    device = resolve_device(device)
    if datasets is not None:
        train_ds, test_ds = datasets
    else:
        train_ds = load_dataset(setup.dataset, "train", setup.data_root)
        test_ds = load_dataset(setup.dataset, "test", setup.data_root)
    splits = make_splits(setup.forget, train_ds, test_ds)
    correction = splits.wrong_labels is not None
    original_ds = with_wrong_labels(train_ds, splits) if correction else train_ds
    loaders = {
        "forget": seeded_loader(original_ds, splits.forget, EVAL_BATCH),
        "retain": seeded_loader(train_ds, splits.retain, EVAL_BATCH),
        "val": seeded_loader(train_ds, splits.val, EVAL_BATCH),
        "test": seeded_loader(test_ds, splits.test, EVAL_BATCH),
    }
    if splits.test_forget:
        loaders["test_forget"] = seeded_loader(test_ds, splits.test_forget, EVAL_BATCH)
    if setup.forget.kind == "class" and splits.test_retain:
        # class-wise forgetting, SalUn's roles: test accuracy and the attack's non-members on the other classes
        loaders["test_retain"] = seeded_loader(test_ds, splits.test_retain, EVAL_BATCH)
    if correction:  # the forget samples with their true labels
        loaders["corrected"] = seeded_loader(train_ds, splits.forget, EVAL_BATCH)

    def build():
        torch.manual_seed(setup.seed)
        return build_model(setup.arch, train_ds.input_shape, train_ds.num_classes, **setup.arch_kwargs).to(device)

    def key(role: str, ds, indices) -> Dict[str, Any]:
        # models trained on an accelerator differ bit-wise from CPU ones: cache them apart (CPU keys unchanged)
        where = {} if device.type == "cpu" else {"device": device.type}
        return {"role": role, "data": ds.fingerprint(), "indices": _digest(indices), "arch": setup.arch,
                "arch_kwargs": setup.arch_kwargs, "recipe": setup.recipe.to_dict(), "seed": setup.seed, **where}

    def fitter(ds, indices, desc):
        def fit(model):
            loader = seeded_loader(ds, indices, setup.recipe.batch_size, shuffle=True, seed=setup.seed)
            return train(model, loader, setup.recipe, seed=setup.seed, progress=progress, desc=desc)
        return fit

    original = ometa = oracle = rmeta = None
    ohit = rhit = False
    if with_original:
        original, ometa, ohit = cache.get_or_train(key("original", original_ds, splits.train), build,
                                                   fitter(original_ds, splits.train, "original"))
    if with_oracle:
        # removal: retrain on the retain set; correction: retrain on D with the true labels (retain ∪ Z̃)
        oracle_idx = splits.train if correction else splits.retain
        oracle, rmeta, rhit = cache.get_or_train(key("retrain", train_ds, oracle_idx), build,
                                                 fitter(train_ds, oracle_idx, "retrain oracle"))
    return Prepared(setup, train_ds, test_ds, splits, loaders, original, oracle, ometa, rmeta,
                    {"original": ohit, "oracle": rhit}, original_ds)


@dataclasses.dataclass
class CanarySetup:
    """Secret removal: a character-level LSTM trained on Python's pydoc text with
    ``prefix + secret`` inserted ``copies`` times. The request replaces every window that holds a copy (Z) by
    the same window of the text without it (Z̃); the oracle is trained on the retained windows and Z̃.
    Exposure is measured over every secret of the same length drawn from ``alphabet``."""

    text: str = "pydoc"
    text_chars: Optional[int] = None  # use only the first N characters of the text (tests, quick runs)
    prefix: str = "my pin is "
    secret: str = "47163"
    alphabet: str = "0123456789"
    copies: int = 20
    length: int = 64
    stride: int = 32
    arch_kwargs: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"embed": 32, "hidden": 128})
    recipe: TrainRecipe = dataclasses.field(default_factory=lambda: TrainRecipe(
        epochs=8, lr=3e-3, optimizer="adam", weight_decay=0.0, batch_size=64, clip_grad_norm=1.0))
    seed: int = 0
    importance_batch: int = 64


@dataclasses.dataclass
class PreparedCanary:
    setup: CanarySetup
    corpus: Any
    loaders: Dict[str, DataLoader]
    original: Optional[nn.Module]
    oracle: Optional[nn.Module]
    original_meta: Optional[Dict[str, Any]]
    oracle_meta: Optional[Dict[str, Any]]

    def request(self) -> UnlearningRequest:

        from .tasks import LanguageModelTask

        c, b = self.corpus, self.setup.importance_batch
        return UnlearningRequest(forget=seeded_loader(c.train, c.forget, b), retain=seeded_loader(c.train, c.retain, b),
                                 train=seeded_loader(c.train, None, b), corrected=seeded_loader(c.corrected, None, b),
                                 task=LanguageModelTask())

    def metrics(self, model: nn.Module) -> Dict[str, float]:
        """Exposure of the secret (exact enumeration up to 10⁵ candidates), the canary's log-perplexity,
        held-out perplexity (utility) and perplexity on the corrected windows Z̃."""
        from .evaluation.exposure import canary_exposure, perplexity

        s = self.setup
        e = canary_exposure(model, self.corpus.vocab, s.prefix, s.secret, s.alphabet, seed=s.seed)
        return {"exposure": e["exposure"], "canary_log_perplexity": e["log_perplexity"],
                "heldout_ppl": perplexity(model, self.loaders["heldout"]),
                "corrected_ppl": perplexity(model, self.loaders["corrected"])}


def prepare_canary(setup: CanarySetup, cache: Optional[CheckpointCache] = None, progress: bool = True,
                   device: Optional[torch.device] = None, with_oracle: bool = True) -> PreparedCanary:
    """Build the canary corpus and train (or load from the cache) the original and the oracle."""
    from torch.utils.data import ConcatDataset, Subset

    from .data.text import load_text, make_canary_corpus
    from .tasks import LanguageModelTask

    if any(ch not in setup.alphabet for ch in setup.secret):
        raise ValueError("the secret must be drawn from the alphabet")
    cache = cache or CheckpointCache()
    device = resolve_device(device)
    text = load_text(setup.text)
    if setup.text_chars is not None:
        text = text[:setup.text_chars]
    corpus = make_canary_corpus(text, canary=setup.prefix + setup.secret, copies=setup.copies,
                                length=setup.length, stride=setup.stride, seed=setup.seed)
    task = LanguageModelTask()
    loaders = {"forget": seeded_loader(corpus.train, corpus.forget, EVAL_BATCH),
               "retain": seeded_loader(corpus.train, corpus.retain, EVAL_BATCH),
               "corrected": seeded_loader(corpus.corrected, None, EVAL_BATCH),
               "heldout": seeded_loader(corpus.heldout, None, EVAL_BATCH)}

    def build():
        torch.manual_seed(setup.seed)
        return build_model("char_lstm", (setup.length,), len(corpus.vocab), **setup.arch_kwargs).to(device)

    def fitter(ds, desc):
        def fit(model):
            loader = seeded_loader(ds, None, setup.recipe.batch_size, shuffle=True, seed=setup.seed)
            return train(model, loader, setup.recipe, task=task, seed=setup.seed, progress=progress, desc=desc)
        return fit

    def key(role, fp):
        return {"role": role, "data": fp, "arch": "char_lstm", "arch_kwargs": setup.arch_kwargs,
                "recipe": setup.recipe.to_dict(), "seed": setup.seed, "vocab": "".join(corpus.vocab.chars)}

    original, ometa, _ = cache.get_or_train(key("original", corpus.train.fingerprint()), build,
                                            fitter(corpus.train, "original (with canary)"))
    oracle = rmeta = None
    if with_oracle:
        fixed = ConcatDataset([Subset(corpus.train, corpus.retain), corpus.corrected])
        fp = hashlib.sha256(f"{corpus.train.fingerprint()}|{_digest(corpus.retain)}|"
                            f"{corpus.corrected.fingerprint()}".encode()).hexdigest()
        oracle, rmeta, _ = cache.get_or_train(key("retrain", fp), build, fitter(fixed, "retrain oracle (no canary)"))
    return PreparedCanary(setup, corpus, loaders, original, oracle, ometa, rmeta)
