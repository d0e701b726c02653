"""``excise bench`` on a diffusion protocol: a protocol TOML with ``task = "diffusion"`` and a ``[diffusion]`` table.

The protocol names a labelled image dataset, a class request (``forget = "class:9"``), ``arch = "ddpm-unet"`` and a
training recipe, as a classification protocol does; ``[diffusion]`` says how its images become the generator's
and how generated images are judged:

- ``pixels = [mean, std]``: the dataset's normalisation, undone to [0, 1] pixels and mapped to [−1, 1];
  ``pad``: pixels of background (−1) added on every side (28 → 32 for a three-level UNet);
- ``cond_drop``: share of training labels replaced by the null class (classifier-free guidance);
- ``judge``: the classification protocol whose original (its first seed) classifies the samples;
- ``samples`` per class, DDIM ``steps``, ``guidance``: the scoring samples (seeded by the run's seed).

The original trains on the split's training part, the retrain oracle on its retain part (the same recipe), both
cached by content; each method runs on the original through ``excise.unlearn`` with the split's forget and retain
sets and a :class:`DiffusionTask`; every row is scored by the registered generation metrics (the forgotten
classes' and the other classes' recognised share, FID and KID in the judge's features) and, with ``out``, a
sample grid (one row a class) is written to ``out/samples/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

SETTINGS = {"pixels": None, "pad": 0, "cond_drop": 0.1, "judge": None, "samples": 50, "steps": 25, "guidance": 2.0}


@dataclasses.dataclass(frozen=True)
class Pixels:
    """The dataset's inputs ↔ the generator's [−1, 1] images (``pad`` background pixels on every side)."""

    mean: float
    std: float
    pad: int = 0

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        unit = (x * self.std + self.mean) * 2 - 1
        return torch.nn.functional.pad(unit, (self.pad,) * 4, value=-1.0) if self.pad else unit

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Generated [−1, 1] images → the dataset's (and the judge's) input form."""
        if self.pad:
            images = images[..., self.pad:images.shape[-2] - self.pad, self.pad:images.shape[-1] - self.pad]
        return (((images + 1) / 2) - self.mean) / self.std


def settings(proto: Dict[str, Any]) -> Dict[str, Any]:
    """The protocol's ``[diffusion]`` table over the defaults; unknown keys and a missing judge or pixel mapping
    are errors."""
    given = dict(proto.get("diffusion") or {})
    unknown = set(given) - set(SETTINGS)
    if unknown:
        raise ValueError(f"protocol {proto.get('name')}: unknown [diffusion] keys {sorted(unknown)}; "
                         f"allowed: {sorted(SETTINGS)}")
    out = {**SETTINGS, **given}
    if out["judge"] is None or out["pixels"] is None:
        raise ValueError(f"protocol {proto.get('name')}: [diffusion] needs 'judge' (a classification protocol) "
                         "and 'pixels' ([mean, std] of the dataset's normalisation)")
    return out


def _digest(indices) -> str:
    return hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()[:16]


def diffusion_rows(proto: Dict[str, Any], seed: int, labels: Sequence[str], table: Dict[str, Dict[str, Any]],
                   tuned: Sequence[str], progress: bool, device: torch.device, out: Optional[Path]):
    """``(rows, split hash, data fingerprint)`` of one seed of a diffusion protocol (see the module docstring)."""
    from .. import __version__, unlearn
    from ..evaluation.report import ORACLE
    from ..data import ForgetSpec, load_dataset, make_splits
    from ..methods import get_method
    from ..models import build_model
    from ..protocol import load_protocol, prepare, setup_for
    from ..storage import cache_key, cached_row, state_hash
    from ..training import CheckpointCache, TrainRecipe, seeded_loader, train
    from ..types import UnlearningRequest
    from .evaluate import generation_predictions, sample_grid
    from .task import DiffusionTask
    from ..evaluation.metrics import applicable, compute

    cfg = settings(proto)
    spec = ForgetSpec.parse(proto["forget"], seed=seed, val_fraction=proto.get("val_fraction", 0.1))
    if spec.kind != "class":
        raise ValueError(f"protocol {proto.get('name')}: a diffusion protocol erases classes (forget = "
                         f"'class:…'), got {proto['forget']!r}")
    train_ds = load_dataset(proto["dataset"], "train", proto.get("data_root"))
    test_ds = load_dataset(proto["dataset"], "test", proto.get("data_root"))
    splits = make_splits(spec, train_ds, test_ds)
    pixels = Pixels(float(cfg["pixels"][0]), float(cfg["pixels"][1]), int(cfg["pad"]))
    images = TensorDataset(pixels.to_unit(train_ds.x), train_ds.targets)
    classes = train_ds.num_classes
    forgotten = sorted(int(c) for c in spec.classes)
    recipe = TrainRecipe(**proto.get("recipe", {}))
    arch_kwargs = dict(proto.get("arch_kwargs", {}))
    shape = tuple(images.tensors[0].shape[1:])
    train_task = DiffusionTask(seed=seed, null_class=classes, cond_drop=float(cfg["cond_drop"]))

    def build():
        torch.manual_seed(seed)
        return build_model(proto["arch"], shape, classes, **arch_kwargs).to(device)

    def key(role: str, indices) -> Dict[str, Any]:
        where = {} if device.type == "cpu" else {"device": device.type}
        return {"role": role, "task": "diffusion", "data": train_ds.fingerprint(), "indices": _digest(indices),
                "arch": proto["arch"], "arch_kwargs": arch_kwargs, "recipe": recipe.to_dict(), "seed": seed,
                "pixels": [pixels.mean, pixels.std, pixels.pad], "cond_drop": float(cfg["cond_drop"]), **where}

    def fitter(indices, desc):
        def fit(model):
            loader = seeded_loader(images, indices, recipe.batch_size, shuffle=True, seed=seed)
            return train(model, loader, recipe, task=train_task, seed=seed, progress=progress, desc=desc)
        return fit

    cache = CheckpointCache()
    original, o_meta, _ = cache.get_or_train(key("original", splits.train), build, fitter(splits.train, "original"))
    oracle, r_meta, _ = cache.get_or_train(key("retrain", splits.retain), build,
                                           fitter(splits.retain, "retrain oracle"))
    judge_proto = load_protocol(cfg["judge"])
    judge = prepare(setup_for(judge_proto, judge_proto["seeds"][0]), with_oracle=False, progress=progress,
                    device=device).original.eval()
    keep = ~torch.isin(test_ds.targets, torch.tensor(forgotten))
    real_retain = test_ds.x[keep][:cfg["samples"] * (classes - len(forgotten))].to(device)
    b = int(proto.get("importance_batch", recipe.batch_size))
    task = DiffusionTask(seed=seed, null_class=classes)
    request = UnlearningRequest(forget=seeded_loader(images, splits.forget, b, shuffle=True, seed=seed + 1),
                                retain=seeded_loader(images, splits.retain, b, shuffle=True, seed=seed + 1), task=task)
    scoring = {k: cfg[k] for k in ("samples", "steps", "guidance", "judge")}
    o_hash, r_hash, j_hash = state_hash(original), state_hash(oracle), state_hash(judge)

    def score(label: str, model) -> Dict[str, Any]:
        p, imgs, _ = generation_predictions(model, judge, forgotten, list(range(classes)), real_retain,
                                            n_per_class=int(cfg["samples"]), steps=int(cfg["steps"]),
                                            guidance=float(cfg["guidance"]), seed=seed, to_classifier=pixels.to_input)
        if out is not None:
            per = imgs.view(classes, int(cfg["samples"]), *imgs.shape[1:])[:, :8].reshape(-1, *imgs.shape[1:])
            slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in label).strip("-")
            sample_grid(per.cpu(), classes, Path(out) / "samples" / f"{slug}-seed{seed}.png", title=label)
        return compute(p, applicable(p.splits()))

    def eval_key(model_hash):
        return cache_key(kind="eval-diffusion", model=model_hash, judge=j_hash, scoring=scoring, seed=seed,
                         v=__version__)

    rows: List[Dict[str, Any]] = [
        {"method": "original", "seed": seed, "model_hash": o_hash,
         **cached_row(eval_key(o_hash), lambda: {**score("original", original), "seconds": None})},
        {"method": ORACLE, "seed": seed, "model_hash": r_hash,
         **cached_row(eval_key(r_hash), lambda: {**score(ORACLE, oracle), "seconds": r_meta["train_seconds"]})},
    ]
    for label in labels:
        entry = dict(table.get(label, {}))
        name = entry.pop("method", label)
        preset = entry.pop("preset", None)

        def compute_row(label=label, name=name, preset=preset, entry=entry):
            try:
                res = unlearn(original, request, name, preset=preset, progress=progress, checks=False, **entry)
                row = {**score(label, res.model), "seconds": res.seconds, "hparams": res.hparams,
                       "info": {k: v for k, v in res.info.items() if not isinstance(v, dict)}}
            except FloatingPointError as err:
                return {"diverged": str(err), "seconds": None}
            if res.mask is not None:
                row["selected_fraction"] = res.mask.fraction(original)
            return row

        rev = get_method(name).revision
        k = cache_key(kind="method-diffusion", model=o_hash, split=splits.hash, method=name, preset=preset,
                      hparams=entry, scoring=scoring, judge=j_hash, seed=seed, v=__version__,
                      **({"rev": rev} if rev else {}))
        rows.append({"method": label, "seed": seed, **cached_row(k, compute_row),
                     **({"tuned": True} if label in tuned else {})})
    if o_meta is not None:
        rows[0]["train_seconds"] = o_meta.get("train_seconds")
    return rows, splits.hash, train_ds.fingerprint()
