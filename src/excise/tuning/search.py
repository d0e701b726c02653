"""The search: a seeded, resumable Optuna TPE study over a method's space, each trial scored on validation data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .objective import DIVERGED, INFEASIBLE, _mean, _validation_loaders, avg_gap, validation_metrics
from .space import _check_space, _enqueue_defaults, _enqueue_starts, _fixed_values, search_space

OBJECTIVES = ("avg_gap",)
STABILITY_TOLERANCE = 1.0  # tune(check=...): an objective shift above this many points marks the best values fragile


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


def _check_rel(check: Optional[float]) -> None:
    if check is not None and not 0 < check < 1:
        raise ValueError(f"check must be a relative change in (0, 1), e.g. 0.01, got {check!r}")


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
    from .. import unlearn
    from ..protocol import setup_for
    from ..protocol import prepare
    from ..types import resolve_device

    device = resolve_device(device)
    runs = []  # per seed: the original, its request, validation loaders, the oracle's validation metrics
    for s in seeds:
        prep = prepare(setup_for(proto, s), progress=progress, device=device)
        loaders = _validation_loaders(prep, s)
        runs.append((s, prep.original, prep.request(), loaders, validation_metrics(prep.oracle, loaders, s),
                     validation_metrics(prep.original, loaders, s)))
    oracle_m = _mean([r[4] for r in runs])
    original_m = _mean([r[5] for r in runs])
    from ..storage import state_hash
    from ..training import training_environment

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

    from ..protocol import load_protocol, require_classification
    from ..methods import get_method

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
    require_classification(proto, "excise tune")
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
    from ..methods.registry import Real

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


