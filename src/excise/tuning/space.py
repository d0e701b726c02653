"""The space a method is tuned over: its registered space, narrowed by a protocol's ``[search]`` table; the
starting trials (the defaults, given starts) and values held fixed."""

from __future__ import annotations

from typing import Any, Dict, Optional


def _check_space(spec) -> None:
    if not spec.space:
        raise ValueError(f"{spec.name} has no search space to tune (it has no hyperparameters worth searching)")


def search_space(proto: Dict[str, Any], method: str, spec=None) -> Dict[str, Any]:
    """What :func:`tune` searches for ``method`` on ``proto``: the method's space, narrowed by the protocol's
    ``[search.METHOD]`` table. There ``NAME = [low, high]`` narrows a number's range (its log scale kept),
    ``NAME = [a, b, ...]`` a choice's options, and ``NAME = value`` holds it at one value. The held or narrowed
    value stays a searched one, so the tuned table records it and ``excise bench --tuned`` replays it: e.g. a
    protocol too costly to search several epochs per trial on (ResNet-18 on a CPU) holds ``epochs = 1``."""
    from ..methods import get_method
    from ..methods.registry import Choice, Int, Real, available

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
    from ..methods.registry import Choice

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


def _held_value(dim) -> Any:
    """The one value a protocol's ``[search]`` table holds a dimension at, or None when it is searched."""
    from ..methods.registry import Choice

    if isinstance(dim, Choice):
        return dim.options[0] if len(dim.options) == 1 else None
    return dim.low if dim.low == dim.high else None


