"""Tuned values into the per-protocol tables (``excise.tuned``): write a tuning result, re-check an entry's
stability, carry an entry to another protocol."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Dict, Optional

from ..tuned import locked, read_table, table_file, tuned_table_path, write_table, writable_table
from .objective import INFEASIBLE
from .search import TuneResult, _check_rel, _scorer, _seed_list, _stability
from .space import _check_space, _fixed_values, _held_value, search_space

def write_tuned(result: TuneResult, path: Optional[str | Path] = None, label: Optional[str] = None) -> Path:
    """Add (or replace) ``result``'s best values in the protocol's tuned table, atomically, keeping the other
    methods' entries; each entry carries how it was found. Refuses a result whose best trial was infeasible
    or diverged (nothing worth shipping)."""
    if result.best_value >= INFEASIBLE:
        raise ValueError(f"{result.method} on {result.protocol}: no trial met the utility floor without diverging "
                         f"(best objective {result.best_value:.1f}); nothing written")
    p = writable_table(result.protocol, path)
    with locked(p):  # tuners running in parallel update one table in turn
        return _update_table(p, result, label)


def _update_table(p: Path, result: TuneResult, label: Optional[str]) -> Path:
    table = read_table(p)
    from .. import __version__

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
    from ..methods import get_method

    revision = get_method(result.method).revision
    if revision:  # the method's behaviour these values were tuned for (leaderboard.py coverage flags older ones)
        table["tuning"][label]["revision"] = revision
    if result.models:  # the originals the values were tuned on (check_tuned says when it scores others)
        table["tuning"][label]["models"] = list(result.models)
    if result.environment:
        table["tuning"][label].update({k: v for k, v in result.environment.items() if v is not None})
    if result.stability and result.stability["runs"]:  # how far the objective moved at (1 ± rel) x the values
        table["tuning"][label].update(check_rel=result.stability["rel"], check_shift=round(result.stability["shift"], 4))
    return write_table(p, result.protocol, table)


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
    from ..protocol import load_protocol
    from ..methods import get_method

    _check_rel(rel)
    proto = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    name = proto.get("name", "protocol")
    spec = get_method(method)
    _check_space(spec)
    p = table_file(name, table)
    entries = read_table(p)
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
    # the table as the caller named it (None: the shipped one), so that a check file holds no machine-local path
    shipped = table is None or p.resolve() == tuned_table_path(name).resolve()
    out = {"method": method, "protocol": name, "table": None if shipped else str(table), "seed": seeds[0] if len(seeds) == 1 else seeds,
           "values": values, "recorded": info.get("value"), "value": value, "metrics": attrs.get("metrics"),
           "same_models": None if "models" not in info else list(info["models"]) == scoring.models}
    out.update(_stability(space, values, value, rel, score))
    return out


def record_check(check: Dict[str, Any], table: Optional[str | Path] = None) -> Path:
    """Write a :func:`check_tuned` result's ``check_rel`` and ``check_shift`` into the entry's tuning section
    (the table it was read from, or ``table``), leaving the tuned values as they are."""
    p = table_file(check["protocol"], table if table is not None else check["table"])
    with locked(p):
        entries = read_table(p)
        if entries["methods"].get(check["method"]) != check["values"]:
            raise ValueError(f"{p}: the entry for {check['method']} changed since it was checked; check it again")
        entries["tuning"].setdefault(check["method"], {}).update(check_rel=check["rel"],
                                                                 check_shift=round(check["shift"], 4))
        return write_table(p, check["protocol"], entries)


def carry_tuned(method: str, source: Any, protocol: Any, table: Optional[str | Path] = None,
                source_table: Optional[str | Path] = None) -> Path:
    """No search: copy the tuned entry ``method`` has on the protocol ``source`` into ``protocol``'s table
    (shipped, or ``table``), marked as carried (``carried_from``; ``trials = 0``), so that ``excise bench
    --tuned`` runs it there. For a protocol too costly to search every method on (ResNet-18 at width 32 on a
    CPU), the entry of the nearest protocol that was searched is a better start than the defaults, and the rows
    then show on test data whether it carries over; it is not a tuned value of ``protocol`` and the leaderboard
    says so. A value that ``protocol``'s ``[search]`` table holds (e.g. ``epochs = 1``) is set to the held value.
    Refuses to overwrite an entry that was searched on ``protocol``."""
    from .. import __version__
    from ..protocol import load_protocol
    from ..methods import get_method

    src = load_protocol(source) if not isinstance(source, dict) else source
    dst = load_protocol(protocol) if not isinstance(protocol, dict) else protocol
    if src["name"] == dst["name"]:
        raise ValueError(f"carry_tuned: source and target are both {dst['name']!r}")
    spec = get_method(method)
    _check_space(spec)
    sp = table_file(src["name"], source_table)
    entries = read_table(sp)
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
    p = writable_table(dst["name"], table)
    with locked(p):
        target = read_table(p)
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
        return write_table(p, dst["name"], target)
