"""Tune a method's hyperparameters against the retrain oracle, on validation data only.

``tune(method, protocol, budget)`` runs ``budget`` trials of a seeded Optuna TPE search over the method's
registered search space (``excise methods`` lists it). A trial unlearns the protocol's original model with
the suggested hyperparameters and scores it with :func:`validation_metrics` — never on test data:

  forget_acc   accuracy on D_f (the data to forget: the user holds it anyway);
  VA           accuracy on the validation split (held out of training, so neither member nor test);
  mia_val      SalUn's SVC attack with the validation split as non-members: % of D_f called non-member
               (features on a 1e-4 grid, ties merged with weights: about ten times faster than the exact fit,
               with the same predictions on the protocols measured; see ``mia_svc_scores``).

The objective ``avg_gap`` is the mean |model − oracle| over those three, the oracle being the retrained model
of the same split. ``floor`` adds a utility floor: a trial whose VA lies more than ``floor`` points below
the reference model's (``floor_ref``: the oracle by default, since for a class request the original's VA
still counts the class being forgotten) is infeasible and scored 100 + its gap, so any feasible trial beats it.
A diverging trial (FloatingPointError: a non-finite loss, weights or outputs) scores 1,000. The method's defaults are the first trial, so the
result is never worse on validation than the defaults.

Studies live in an Optuna journal file (``storage``): a run stopped halfway resumes where it stopped and draws the same trials as a run straight
through (the sampler is re-seeded from each trial's number), and ``budget`` counts every finished trial. Tuned values go into a per-protocol table
(:func:`write_tuned`) that ``excise bench --tuned`` reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .types import atomic_write_bytes

OBJECTIVES = ("avg_gap",)
TUNE_METRICS = ("forget_acc", "VA", "mia_val")
INFEASIBLE = 100.0
DIVERGED = 1000.0
STABILITY_TOLERANCE = 1.0  # tune(check=...): an objective shift above this many points marks the best values fragile
MIA_RESOLUTION = 1e-4  # grid of the validation attack's features (mia_svc_scores(resolution=...))
TUNED_DIR = Path(__file__).parent / "bench" / "tuned"


@dataclasses.dataclass
class TuneResult:
    method: str
    protocol: str
    seed: Any  # the protocol seed tuned on, or the list of seeds whose objectives were averaged
    objective: str
    best_params: Dict[str, Any]  # the searched hyperparameters only (the rest stay at the method's defaults)
    best_value: float
    best_metrics: Dict[str, float]
    oracle_metrics: Dict[str, float]
    original_metrics: Dict[str, float]
    default_value: Optional[float]
    n_trials: int
    trials: List[Dict[str, Any]]
    budget: Optional[int] = None  # the trials asked for; fewer than that when a timeout stopped the search
    stability: Optional[Dict[str, Any]] = None  # tune(check=rel): the best values re-scored at (1 ± rel)
    # which originals the search scored (a state-hash prefix per seed) and where: CPU models trained at another
    # thread count differ in their bits, and values tuned on one model need not score the same on another
    models: Optional[List[str]] = None
    environment: Optional[Dict[str, Any]] = None

    @property
    def complete(self) -> bool:
        return self.budget is None or self.n_trials >= self.budget

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TuneResult":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def summary(self) -> str:
        gain = "" if self.default_value is None else f" (defaults: {self.default_value:.2f})"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best_params.items())
        of = "" if self.complete else f" of {self.budget} (stopped by the timeout; run again to resume)"
        st = self.stability
        check = "" if not st or not st["runs"] else (
            f"; {'FRAGILE' if st['fragile'] else 'stable'} at ±{100 * st['rel']:g} %: objective "
            + " / ".join(f"{r['value']:.2f}" for r in st["runs"]))
        return (f"{self.method} on {self.protocol} (seed {self.seed}): {self.objective} {self.best_value:.2f}{gain} "
                f"after {self.n_trials} trials{of}; best: {params}{check}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def validation_metrics(model, loaders: Dict[str, Any], seed: int = 0) -> Dict[str, float]:
    """forget_acc, VA and mia_val of ``model`` from the ``forget``, ``val`` and ``members`` loaders (members: a
    seeded subset of the retain set as large as val, the attack's member side)."""
    from .evaluation.evaluate import model_predictions
    from .evaluation.mia import features, mia_svc_scores

    for need in ("forget", "val", "members"):
        if loaders.get(need) is None:
            raise ValueError(f"validation metrics need the {need} split")
    preds = model_predictions(model, {k: loaders[k] for k in ("forget", "val", "members")})
    acc = {k: 100.0 * float((p.argmax(-1) == y).float().mean()) for k, (p, y) in preds.items()}
    feat = {k: features(p, y, "confidence") for k, (p, y) in preds.items()}
    mia = mia_svc_scores(feat["members"], feat["val"], feat["forget"], seed=seed, resolution=MIA_RESOLUTION)["value"]
    return {"forget_acc": acc["forget"], "VA": acc["val"], "mia_val": mia}


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def avg_gap(metrics: Dict[str, float], oracle: Dict[str, float]) -> float:
    return sum(abs(metrics[k] - oracle[k]) for k in TUNE_METRICS) / len(TUNE_METRICS)


def _validation_loaders(prep, seed: int) -> Dict[str, Any]:
    import torch

    from .training import seeded_loader

    L = prep.loaders
    if L.get("val") is None or len(L["val"].dataset) == 0:
        raise ValueError("tuning needs a validation split: give the protocol a val_fraction > 0")
    val = L["val"]
    if prep.setup.forget.kind == "class":  # SalUn's roles: VA and the attack's non-members on the other classes
        forgotten = set(prep.train_ds.targets[prep.splits.forget].unique().tolist())
        keep = [i for i in prep.splits.val if int(prep.train_ds.targets[i]) not in forgotten]
        val = seeded_loader(prep.train_ds, keep, val.batch_size)
    n = len(val.dataset)
    retain = list(prep.splits.retain)
    g = torch.Generator().manual_seed(seed)
    pick = [retain[i] for i in torch.randperm(len(retain), generator=g)[: n].tolist()]
    return {"forget": L["forget"], "val": val,
            "members": seeded_loader(prep.train_ds, sorted(pick), val.batch_size)}


def study_name(method: str, protocol: str, seeds: List[int], objective: str, floor: Optional[float],
               floor_ref: str, preset: Optional[str], fixed: Dict[str, Any],
               search: Optional[Dict[str, Any]] = None, revision: int = 0) -> str:
    """Everything that changes what a trial measures names the study: a journal never mixes two set-ups
    (``search``: the protocol's narrowing of the space, if any; ``revision``: the method's, when raised)."""
    def digest(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    return (f"{method}@{protocol}@seed{'+'.join(map(str, seeds))}@{objective}@floor{floor}:{floor_ref}"
            f"@preset{preset}@fixed{digest(fixed)}" + (f"@search{digest(search)}" if search else "")
            + (f"@rev{revision}" if revision else ""))


def default_storage(protocol: str, method: str) -> Path:
    return Path("excise-out") / "tune" / protocol / f"{method}.journal"


def _check_space(spec) -> None:
    if not spec.space:
        raise ValueError(f"{spec.name} has no search space to tune (it has no hyperparameters worth searching)")


def search_space(proto: Dict[str, Any], method: str, spec=None) -> Dict[str, Any]:
    """What :func:`tune` searches for ``method`` on ``proto``: the method's space, narrowed by the protocol's
    ``[search.METHOD]`` table. There ``NAME = [low, high]`` narrows a number's range (its log scale kept),
    ``NAME = [a, b, ...]`` a choice's options, and ``NAME = value`` holds it at one value. The held or narrowed
    value stays a searched one, so the tuned table records it and ``excise bench --tuned`` replays it: e.g. a
    protocol too costly to search several epochs per trial on (ResNet-18 on a CPU) holds ``epochs = 1``."""
    from .methods import get_method
    from .methods.registry import Choice, Int, Real, available

    spec = spec or get_method(method)
    search = proto.get("search", {})
    if not isinstance(search, dict) or not all(isinstance(v, dict) for v in search.values()):
        raise ValueError(f"protocol {proto.get('name')!r}: 'search' must hold one table per method, "
                         "e.g. [search.finetune] epochs = 1")
    space = dict(spec.space)
    for name, want in search.get(method, {}).items():
        where = f"protocol {proto.get('name')!r}, [search.{method}] {name}"
        if name not in space:
            raise ValueError(f"{where}: {method} does not search {name!r} (it searches: {', '.join(space) or 'nothing'})")
        dim = space[name]
        if isinstance(dim, Choice):
            options = tuple(want) if isinstance(want, list) else (want,)
            bad = [o for o in options if o not in dim.options]
            if bad or not options:
                raise ValueError(f"{where}: {bad or 'no options'} not among {list(dim.options)}")
            space[name] = Choice(options)
            continue
        if not isinstance(want, list):
            want = [want, want]  # held
        low, high = want if len(want) == 2 else (None, None)
        number = (int,) if isinstance(dim, Int) else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)) or not low <= high \
                or (dim.log and low <= 0):
            kind = "an integer" if isinstance(dim, Int) else "a number"
            raise ValueError(f"{where}: want {kind} or [low, high] with low <= high{' > 0' if dim.log else ''}, "
                             f"got {want!r}")
        space[name] = (Int(int(low), int(high), dim.log) if isinstance(dim, Int)
                       else Real(float(low), float(high), dim.log))
    unknown = sorted(set(search) - set(available()))
    if unknown:
        raise ValueError(f"protocol {proto.get('name')!r}: [search] names unknown methods {unknown}")
    return space


def _enqueue_defaults(study, spec, space) -> None:
    """The defaults as the first trial, for the searched values that lie inside the space. Also on resuming a
    study whose defaults trial never finished (its process was killed while it ran: it stays RUNNING in the
    journal for ever), so the defaults are always measured."""
    import optuna

    for t in study.trials:
        if t.user_attrs.get("defaults") and t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.WAITING):
            return

    params = {name: spec.defaults[name] for name, dim in space.items() if _inside(dim, spec.defaults[name])}
    study.enqueue_trial(params, user_attrs={"defaults": True})


def _inside(dim, v) -> bool:
    from .methods.registry import Choice

    if isinstance(dim, Choice):
        return v in dim.options
    return isinstance(v, (int, float)) and not isinstance(v, bool) and dim.low <= v <= dim.high


def _enqueue_starts(study, method: str, space, starts) -> None:
    """Given starting points, each tried once after the defaults: e.g. the values a tuned table held before
    the method's revision was raised, which a new search need not find again by chance. A point names some
    or all of the searched hyperparameters (the rest are sampled); one already tried or waiting is skipped,
    so a resumed study does not run it twice."""
    import optuna

    for point in starts or []:
        unknown = sorted(set(point) - set(space))
        if unknown:
            raise ValueError(f"starting point {point}: {unknown} are not searched for {method} "
                             f"(searched: {sorted(space)})")
        outside = sorted(k for k, v in point.items() if not _inside(space[k], v))
        if outside:
            raise ValueError(f"starting point {point}: {outside} lie outside the search space "
                             f"{ {k: space[k] for k in outside} }")
        params = {k: point[k] for k in space if k in point}
        if any(t.user_attrs.get("start") == params for t in study.trials
               if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)):
            continue
        study.enqueue_trial(params, user_attrs={"start": params})


def _check_rel(check: Optional[float]) -> None:
    if check is not None and not 0 < check < 1:
        raise ValueError(f"check must be a relative change in (0, 1), e.g. 0.01, got {check!r}")


def _fixed_values(proto: Dict[str, Any], method: str, spec, fixed: Optional[Dict[str, Any]]):
    """The protocol's preset for ``method`` and the values held fixed (the protocol's entry, or ``fixed``),
    less the searched ones."""
    entry = dict(proto.get("methods", {}).get(method, {}))
    entry.pop("method", None)
    preset = entry.pop("preset", None)
    fixed = entry if fixed is None else dict(fixed)
    clash = set(fixed) & set(spec.space)
    if clash:  # the protocol pins a searched value: the search wins, and says so
        import warnings

        warnings.warn(f"tuning {method}: {sorted(clash)} are searched, so the protocol's / given values for them "
                      f"are not used (to hold a searched value, give the protocol [search.{method}] NAME = value)",
                      stacklevel=3)
        fixed = {k: v for k, v in fixed.items() if k not in clash}
    return preset, fixed


def _seed_list(proto: Dict[str, Any], seed: Any) -> List[int]:
    seeds = [proto["seeds"][0]] if seed is None else (list(seed) if isinstance(seed, (list, tuple)) else [seed])
    bad_seeds = [s for s in seeds if s not in proto["seeds"]]
    if bad_seeds or not seeds:
        raise ValueError(f"seed {bad_seeds or seeds} is not among the protocol's seeds {proto['seeds']}")
    return seeds


class _Scoring(NamedTuple):
    """What :func:`_scorer` prepares: the objective function and what it was measured against."""

    score: Callable[[Dict[str, Any]], Tuple[float, Dict[str, Any]]]  # params -> (objective, trial attrs)
    oracle: Dict[str, float]  # the oracle's mean validation metrics
    original: Dict[str, float]  # the original's
    models: List[str]  # a state-hash prefix of each seed's original
    environment: Dict[str, Any]  # device and thread count the originals were trained with


def _scorer(proto, method, preset, fixed, seeds, floor, floor_ref, device, progress) -> _Scoring:
    """Prepare every seed's original, request, validation loaders and oracle metrics once."""
    from . import unlearn
    from .bench.runner import _setup
    from .protocol import prepare
    from .types import resolve_device

    device = resolve_device(device)
    runs = []  # per seed: the original, its request, validation loaders, the oracle's validation metrics
    for s in seeds:
        prep = prepare(_setup(proto, s), progress=progress, device=device)
        loaders = _validation_loaders(prep, s)
        runs.append((s, prep.original, prep.request(), loaders, validation_metrics(prep.oracle, loaders, s),
                     validation_metrics(prep.original, loaders, s)))
    oracle_m = _mean([r[4] for r in runs])
    original_m = _mean([r[5] for r in runs])
    from .training import state_hash, training_environment

    models = [state_hash(r[1])[:16] for r in runs]
    environment = {k: v for k, v in training_environment(runs[0][1]).items() if k != "torch"}
    ref_va = (oracle_m if floor_ref == "oracle" else original_m)["VA"]

    def score(params: Dict[str, Any]):
        """The objective of one set of searched values, and what a trial records about it."""
        ms, gaps, secs = [], [], 0.0
        for s, original, request, loaders, o_m, _ in runs:
            try:
                # a trial is scored against the oracle: the post-checks' warnings would only repeat it, per trial
                res = unlearn(original, request, method, preset=preset, checks=False, **{**fixed, **params})
                ms.append(validation_metrics(res.model, loaders, s))  # raises too on non-finite outputs
            except FloatingPointError as err:
                return DIVERGED, {"diverged": f"seed {s}: {err}" if len(runs) > 1 else str(err)}
            gaps.append(avg_gap(ms[-1], o_m))
            secs += res.seconds
        m, gap = _mean(ms), sum(gaps) / len(gaps)
        attrs = {"metrics": m, "gap": gap, "seconds": secs / len(runs)}
        if floor is not None and m["VA"] < ref_va - floor:
            return INFEASIBLE + gap, {**attrs, "infeasible": True}
        return gap, attrs

    return _Scoring(score, oracle_m, original_m, models, environment)


def tune(method: str, protocol: Any, budget: int = 20, objective: str = "avg_gap", seed: Any = None,
         floor: Optional[float] = None, floor_ref: str = "oracle", storage: Optional[str | Path] = None,
         fixed: Optional[Dict[str, Any]] = None, device: Any = None, progress: bool = True,
         sampler_seed: int = 0, timeout: Optional[float] = None, check: Optional[float] = None,
         start: Optional[Sequence[Dict[str, Any]]] = None) -> TuneResult:
    """Search ``method``'s hyperparameters on ``protocol`` (a shipped name, a TOML path or a loaded dict).

    ``budget``: finished trials the study should hold (a resumed study runs only the missing ones).
    ``seed``: the protocol seed whose split, original and oracle are used (default: its first), or a list of
    seeds: each trial then runs on every one and its objective is the mean (costlier, and less prone to fit
    one split's validation set: see benchmarks/results/tuned_vs_defaults.md).
    ``fixed``: hyperparameters held at given values (default: the protocol's own entry for the method).
    ``storage``: the study's journal file (default ``excise-out/tune/<protocol>/<method>.journal``).
    ``timeout``: seconds after which no new trial starts (the one running finishes); the result then holds
    fewer than ``budget`` trials (``result.complete`` is False) and a later call resumes. Use it to split a long
    search into sessions; a process killed mid-trial also resumes, losing only that trial.
    ``check``: once the budget is complete, re-score the best values with every continuous hyperparameter
    scaled by (1 - check) and (1 + check) (two more runs, kept in the journal) into ``result.stability``;
    ``stability["fragile"]`` is True when the objective moves by more than ``STABILITY_TOLERANCE`` points,
    i.e. the best trial sits on a cliff and its values will not transfer (another seed, another device).
    ``start``: points (dicts of searched hyperparameters) tried once each after the defaults, as trials of
    the budget: e.g. the values the tuned table holds, when a method is re-tuned after its revision was raised.
    """
    try:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        raise ImportError("excise.tune needs Optuna: pip install 'excise[tune]' (or pip install optuna)") from None

    from .bench.runner import load_protocol
    from .methods import get_method

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of trials, got {budget!r}")
    if floor_ref not in ("oracle", "original"):
        raise ValueError(f"floor_ref must be 'oracle' or 'original', got {floor_ref!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    _check_rel(check)
    if floor is not None and not floor >= 0:
        raise ValueError(f"floor must be a non-negative number of points, got {floor!r}")
    proto = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    spec = get_method(method)
    _check_space(spec)
    preset, fixed = _fixed_values(proto, method, spec, fixed)
    space = search_space(proto, method, spec)
    seeds = _seed_list(proto, seed)
    scoring = _scorer(proto, method, preset, fixed, seeds, floor, floor_ref, device, progress)
    score = scoring.score

    def run_trial(trial) -> float:
        value, attrs = score({name: dim.suggest(trial, name) for name, dim in space.items()})
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return value

    name = proto.get("name", "protocol")
    path = Path(storage) if storage is not None else default_storage(name, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name(method, name, seeds, objective, floor, floor_ref, preset, fixed,
                              proto.get("search", {}).get(method), spec.revision),
        storage=JournalStorage(JournalFileBackend(str(path))), direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=sampler_seed), load_if_exists=True)
    _enqueue_defaults(study, spec, space)
    _enqueue_starts(study, method, space, start)
    earlier = study.user_attrs.get("models")
    if earlier is None:
        study.set_user_attr("models", scoring.models)
    elif earlier != scoring.models:  # resumed on models trained again (another device or thread count, say)
        warnings.warn(f"tuning {method} on {name}: this study's earlier trials scored other originals "
                      f"({earlier}) than this call prepared ({scoring.models}); their objectives are not "
                      "comparable with the new trials'. Start a new journal, or train the models as before.",
                      UserWarning, stacklevel=2)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = budget - len(done)
    started = time.perf_counter()
    if remaining > 0:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=budget, initial=len(done), desc=f"tune {method}", leave=False)

        def tick(study, trial):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{study.best_value:.2f}")

        # one trial at a time, the sampler re-seeded from the number of finished trials (all TPE looks at): a
        # study stopped and resumed, even one killed mid-trial, draws the same trials as one run straight
        # through. A trial that raises (anything but divergence) is recorded as failed and stops the search.
        for i in range(remaining):
            if timeout is not None and i > 0 and time.perf_counter() - started >= timeout:
                break
            n_done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
            study.sampler = optuna.samplers.TPESampler(seed=sampler_seed * 1_000_003 + max(n_done, 1))
            study.optimize(run_trial, n_trials=1, callbacks=[tick], catch=())
        if bar is not None:
            bar.close()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial
    stable = None
    if check is not None and len(done) >= budget:
        key = f"stability:{check!r}:trial{best.number}"  # kept in the journal: a second call re-uses it
        stable = study.user_attrs.get(key)
        if stable is None:
            stable = _stability(space, best.params, float(best.value), check, score)
            study.set_user_attr(key, stable)
    defaults = [t for t in done if t.user_attrs.get("defaults")]
    trials = [{"number": t.number, "value": t.value, "params": t.params,
               **{k: v for k, v in t.user_attrs.items() if k not in ("defaults", "start")},
               "defaults": bool(t.user_attrs.get("defaults")),
               **({"start": True} if "start" in t.user_attrs else {})} for t in done]
    return TuneResult(method=method, protocol=name, seed=seeds[0] if len(seeds) == 1 else seeds, objective=objective, best_params=dict(best.params),
                      best_value=float(best.value), best_metrics=best.user_attrs.get("metrics", {}),
                      oracle_metrics=scoring.oracle, original_metrics=scoring.original,
                      default_value=float(defaults[0].value) if defaults else None, n_trials=len(done),
                      trials=trials, budget=budget, stability=stable, models=scoring.models,
                      environment=scoring.environment)


def _stability(space, best: Dict[str, Any], best_value: float, rel: float, score) -> Dict[str, Any]:
    """Re-score the best values with every continuous one scaled by (1 - rel) and by (1 + rel) (kept inside its
    range; integers and choices unchanged). A best trial that only holds at its exact digits — the sub-class
    protocol's random-label lr went from forget accuracy 96.6 to 1.2 at a relative change of 1.5e-6 — shows
    up as a shift of the objective far larger than ``STABILITY_TOLERANCE``."""
    from .methods.registry import Real

    real = {k: dim for k, dim in space.items() if isinstance(dim, Real) and k in best}
    out: Dict[str, Any] = {"rel": rel, "tolerance": STABILITY_TOLERANCE, "runs": []}
    if not real:
        out.update(shift=0.0, fragile=False, note="no continuous hyperparameter to perturb")
        return out
    for scale in (1.0 - rel, 1.0 + rel):
        params = dict(best)
        for k, dim in real.items():
            params[k] = min(max(best[k] * scale, dim.low), dim.high)
        value, attrs = score(params)
        out["runs"].append({"scale": scale, "params": params, "value": value,
                            **{k: v for k, v in attrs.items() if k != "seconds"}})
    shift = max(abs(r["value"] - best_value) for r in out["runs"])
    out.update(shift=shift, fragile=shift > STABILITY_TOLERANCE)
    return out


# ---- the per-protocol tables of tuned values ----

def tuned_table_path(protocol: str, directory: Optional[str | Path] = None) -> Path:
    return Path(directory or TUNED_DIR) / f"{protocol}.toml"


def _table_file(protocol: str, path: Optional[str | Path] = None) -> Path:
    """The table file of ``protocol``: ``path`` itself, ``<protocol>.toml`` inside the folder ``path``, or the
    shipped one."""
    p = Path(path) if path is not None else tuned_table_path(protocol)
    return tuned_table_path(protocol, p) if p.is_dir() else p


def load_tuned(protocol: str, path: Optional[str | Path] = None) -> Dict[str, Dict[str, Any]]:
    """``{method label: hyperparameters}`` tuned for ``protocol`` (empty when none were tuned). ``path``: a table
    file, or a folder of ``<protocol>.toml`` tables (default: the tables shipped with excise)."""
    p = _table_file(protocol, path)
    if not p.exists():
        return {}
    with open(p, "rb") as f:
        table = tomllib.load(f)
    values = {k: dict(v) for k, v in table.get("methods", {}).items()}
    for label, v in values.items():
        name = v.get("method", label)
        gap = revision_gap(name, table.get("tuning", {}).get(label, {}).get("revision", 0))
        if gap:
            warnings.warn(f"{p.name}: {label} was tuned at revision {gap[0]} of {name}, which is at revision "
                          f"{gap[1]} now (its behaviour changed): its values may no longer be the best; tune it "
                          f"again", stacklevel=2)
    return values


def carried_entries(protocol: str, path: Optional[str | Path] = None) -> Dict[str, str]:
    """``{method label: source protocol}`` for the entries of ``protocol``'s table that were carried from another
    protocol (:func:`carry_tuned`) rather than searched on this one."""
    p = _table_file(protocol, path)
    return {label: info["carried_from"] for label, info in _read_table(p)["tuning"].items() if "carried_from" in info}


def revision_gap(method: str, recorded: int) -> Optional[Tuple[int, int]]:
    """``(recorded, now)`` when ``recorded`` (the revision a tuned entry or a bench row was measured at; 0 when
    none was recorded) is not ``method``'s registered revision ``now``; None when it is, or for a name that is
    not a registered method."""
    from .methods import available, get_method

    if method not in available() or get_method(method).revision == recorded:
        return None
    return recorded, get_method(method).revision


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot write {v} into a tuned table")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} into a tuned table")


def write_tuned(result: TuneResult, path: Optional[str | Path] = None, label: Optional[str] = None) -> Path:
    """Add (or replace) ``result``'s best values in the protocol's tuned table, atomically, keeping the other
    methods' entries; each entry carries how it was found. Refuses a result whose best trial was infeasible
    or diverged (nothing worth shipping)."""
    if result.best_value >= INFEASIBLE:
        raise ValueError(f"{result.method} on {result.protocol}: no trial met the utility floor without diverging "
                         f"(best objective {result.best_value:.1f}); nothing written")
    p = _writable_table(result.protocol, path)
    with _locked(p.parent / f".{p.name}.lock"):  # tuners running in parallel update one table in turn
        return _update_table(p, result, label)


def _writable_table(protocol: str, path: Optional[str | Path]) -> Path:
    """The table file to write ``protocol``'s entries into: ``path`` when it names a .toml file, else
    ``<protocol>.toml`` in the folder ``path`` (default: the shipped tables); its folder is created."""
    p = Path(path) if path is not None else tuned_table_path(protocol)
    if p.is_dir() or p.suffix != ".toml":
        p = tuned_table_path(protocol, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


class _locked:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (no POSIX locks: parallel writers are on their own)
            return self
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock


def _read_table(p: Path) -> Dict[str, Any]:
    table: Dict[str, Any] = {"methods": {}, "tuning": {}}
    if p.exists():
        with open(p, "rb") as f:
            old = tomllib.load(f)
        table["methods"].update(old.get("methods", {}))
        table["tuning"].update(old.get("tuning", {}))
    return table


def _write_table(p: Path, protocol: str, table: Dict[str, Any]) -> Path:
    lines = [f"# Tuned hyperparameters for the protocol {protocol}, written by `excise tune`",
             "# (validation split and retrain oracle only; see excise.tuning). Read by `excise bench --tuned`.", ""]
    for section in ("methods", "tuning"):
        for name in sorted(table[section]):
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table[section][name].items() if v is not None]
            lines.append("")
    atomic_write_bytes(p, "\n".join(lines).encode())
    return p


def _update_table(p: Path, result: TuneResult, label: Optional[str]) -> Path:
    table = _read_table(p)
    from . import __version__

    label = label or result.method
    # the best trial's values exactly (repr round-trips a float): `bench --tuned` then replays that trial
    # bit for bit. Rounding is not harmless: random-label fine-tuning on the sub-class protocol went from
    # forget accuracy 96.6 to 1.2 when its lr moved by 1.5e-6 relative (0.019890729... -> 0.0198907).
    table["methods"][label] = dict(result.best_params)
    table["tuning"][label] = {
        "objective": result.objective, "value": round(result.best_value, 4),
        "default_value": None if result.default_value is None else round(result.default_value, 4),
        "trials": result.n_trials, "seed": result.seed, "excise": __version__,
        "date": datetime.date.today().isoformat()}
    from .methods import get_method

    revision = get_method(result.method).revision
    if revision:  # the method's behaviour these values were tuned for (leaderboard.py coverage flags older ones)
        table["tuning"][label]["revision"] = revision
    if result.models:  # the originals the values were tuned on (check_tuned says when it scores others)
        table["tuning"][label]["models"] = list(result.models)
    if result.environment:
        table["tuning"][label].update({k: v for k, v in result.environment.items() if v is not None})
    if result.stability and result.stability["runs"]:  # how far the objective moved at (1 ± rel) x the values
        table["tuning"][label].update(check_rel=result.stability["rel"], check_shift=round(result.stability["shift"], 4))
    return _write_table(p, result.protocol, table)


def check_tuned(method: str, protocol: Any, rel: float = 0.01, table: Optional[str | Path] = None,
                floor: Optional[float] = None, floor_ref: str = "oracle", device: Any = None,
                progress: bool = True) -> Dict[str, Any]:
    """No search: is a tuned table's entry on a cliff? Re-score the values the table (shipped, or ``table``)
    holds for ``method`` on the protocol seeds they were tuned on, then with every continuous one scaled by
    (1 - rel) and (1 + rel): three runs, no journal needed (a fresh machine can check what is shipped).

    Returns the entry, its recorded objective (``recorded``), the objective re-scored here (``value``; it
    differs from ``recorded`` when the models were trained again elsewhere: ``same_models`` is False when the
    table recorded other originals, None when it recorded none) and the stability of
    :func:`tune`'s ``check`` measured against ``value``: ``runs``, ``shift``, ``fragile``."""
    from .bench.runner import load_protocol
    from .methods import get_method

    _check_rel(rel)
    proto = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    name = proto.get("name", "protocol")
    spec = get_method(method)
    _check_space(spec)
    p = _table_file(name, table)
    entries = _read_table(p)
    if method not in entries["methods"]:
        raise ValueError(f"{p} holds no tuned entry for {method!r} (it has: {', '.join(sorted(entries['methods'])) or 'none'})")
    values = dict(entries["methods"][method])
    info = entries["tuning"].get(method, {})
    preset, fixed = _fixed_values(proto, method, spec, None)
    space = search_space(proto, method, spec)  # a bad [search] table fails before any model is prepared
    seeds = _seed_list(proto, info.get("seed"))
    scoring = _scorer(proto, method, preset, fixed, seeds, floor, floor_ref, device, progress)
    score = scoring.score
    value, attrs = score(values)
    out = {"method": method, "protocol": name, "table": str(p), "seed": seeds[0] if len(seeds) == 1 else seeds,
           "values": values, "recorded": info.get("value"), "value": value, "metrics": attrs.get("metrics"),
           "same_models": None if "models" not in info else list(info["models"]) == scoring.models}
    out.update(_stability(space, values, value, rel, score))
    return out


def record_check(check: Dict[str, Any], table: Optional[str | Path] = None) -> Path:
    """Write a :func:`check_tuned` result's ``check_rel`` and ``check_shift`` into the entry's tuning section
    (the table it was read from, or ``table``), leaving the tuned values as they are."""
    p = _table_file(check["protocol"], table if table is not None else check["table"])
    with _locked(p.parent / f".{p.name}.lock"):
        entries = _read_table(p)
        if entries["methods"].get(check["method"]) != check["values"]:
            raise ValueError(f"{p}: the entry for {check['method']} changed since it was checked; check it again")
        entries["tuning"].setdefault(check["method"], {}).update(check_rel=check["rel"],
                                                                 check_shift=round(check["shift"], 4))
        return _write_table(p, check["protocol"], entries)


def _held_value(dim) -> Any:
    """The one value a protocol's ``[search]`` table holds a dimension at, or None when it is searched."""
    from .methods.registry import Choice

    if isinstance(dim, Choice):
        return dim.options[0] if len(dim.options) == 1 else None
    return dim.low if dim.low == dim.high else None


def carry_tuned(method: str, source: Any, protocol: Any, table: Optional[str | Path] = None,
                source_table: Optional[str | Path] = None) -> Path:
    """No search: copy the tuned entry ``method`` has on the protocol ``source`` into ``protocol``'s table
    (shipped, or ``table``), marked as carried (``carried_from``; ``trials = 0``), so that ``excise bench
    --tuned`` runs it there. For a protocol too costly to search every method on (ResNet-18 at width 32 on a
    CPU), the entry of the nearest protocol that was searched is a better start than the defaults, and the rows
    then show on test data whether it carries over; it is not a tuned value of ``protocol`` and the leaderboard
    says so. A value that ``protocol``'s ``[search]`` table holds (e.g. ``epochs = 1``) is set to the held value.
    Refuses to overwrite an entry that was searched on ``protocol``."""
    from . import __version__
    from .bench.runner import load_protocol
    from .methods import get_method

    src = load_protocol(source) if not isinstance(source, dict) else source
    dst = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    if src["name"] == dst["name"]:
        raise ValueError(f"carry_tuned: source and target are both {dst['name']!r}")
    spec = get_method(method)
    _check_space(spec)
    sp = _table_file(src["name"], source_table)
    entries = _read_table(sp)
    if method not in entries["methods"]:
        raise ValueError(f"{sp} holds no tuned entry for {method!r} to carry (it has: "
                         f"{', '.join(sorted(entries['methods'])) or 'none'})")
    info = entries["tuning"].get(method, {})
    if "carried_from" in info:
        raise ValueError(f"{sp}: the {method} entry was itself carried from {info['carried_from']}; carry from "
                         "the protocol it was searched on")
    values = dict(entries["methods"][method])
    for name, dim in search_space(dst, method, spec).items():
        held = _held_value(dim)
        if held is not None:
            values[name] = held
    p = _writable_table(dst["name"], table)
    with _locked(p.parent / f".{p.name}.lock"):
        target = _read_table(p)
        old = target["tuning"].get(method)
        if method in target["methods"] and (old is None or "carried_from" not in old):
            raise ValueError(f"{p} holds a {method} entry searched on {dst['name']}; it is not replaced by a "
                             f"carried one")
        target["methods"][method] = values
        target["tuning"][method] = {
            "carried_from": src["name"], "trials": 0, "source_value": info.get("value"),
            "source_trials": info.get("trials"), "source_seed": info.get("seed"),
            "objective": info.get("objective"), "excise": __version__, "date": datetime.date.today().isoformat(),
            "revision": info.get("revision")}
        return _write_table(p, dst["name"], target)
