"""The per-protocol tables of tuned hyperparameters (``excise/bench/tuned/<protocol>.toml``): read, written.

A table holds ``[methods.<label>]`` (the values ``excise bench --tuned`` runs) and ``[tuning.<label>]`` (how they
were found: objective, trials, seed, the method's revision, the machine). ``excise.tuning`` searches and writes
them; ``excise.bench`` reads them. Writes are atomic and, between processes, serialised by a file lock.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .types import atomic_write_bytes

TUNED_DIR = Path(__file__).parent / "bench" / "tuned"


def tuned_table_path(protocol: str, directory: Optional[str | Path] = None) -> Path:
    return Path(directory or TUNED_DIR) / f"{protocol}.toml"


def table_file(protocol: str, path: Optional[str | Path] = None) -> Path:
    """The table file of ``protocol``: ``path`` itself, ``<protocol>.toml`` inside the folder ``path``, or the
    shipped one."""
    p = Path(path) if path is not None else tuned_table_path(protocol)
    return tuned_table_path(protocol, p) if p.is_dir() else p


def writable_table(protocol: str, path: Optional[str | Path]) -> Path:
    """The table file to write ``protocol``'s entries into: ``path`` when it names a .toml file, else
    ``<protocol>.toml`` in the folder ``path`` (default: the shipped tables); its folder is created."""
    p = Path(path) if path is not None else tuned_table_path(protocol)
    if p.is_dir() or p.suffix != ".toml":
        p = tuned_table_path(protocol, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def load_tuned(protocol: str, path: Optional[str | Path] = None) -> Dict[str, Dict[str, Any]]:
    """``{method label: hyperparameters}`` tuned for ``protocol`` (empty when none were tuned). ``path``: a table
    file, or a folder of ``<protocol>.toml`` tables (default: the tables shipped with excise)."""
    p = table_file(protocol, path)
    if not p.exists():
        return {}
    table = read_table(p)
    values = {k: dict(v) for k, v in table["methods"].items()}
    for label, v in values.items():
        name = v.get("method", label)
        gap = revision_gap(name, table["tuning"].get(label, {}).get("revision", 0))
        if gap:
            warnings.warn(f"{p.name}: {label} was tuned at revision {gap[0]} of {name}, which is at revision "
                          f"{gap[1]} now (its behaviour changed): its values may no longer be the best; tune it "
                          f"again", stacklevel=2)
    return values


def carried_entries(protocol: str, path: Optional[str | Path] = None) -> Dict[str, str]:
    """``{method label: source protocol}`` for the entries of ``protocol``'s table that were carried from another
    protocol (``excise.tuning.carry_tuned``) rather than searched on this one."""
    p = table_file(protocol, path)
    return {label: info["carried_from"] for label, info in read_table(p)["tuning"].items() if "carried_from" in info}


def revision_gap(method: str, recorded: int) -> Optional[Tuple[int, int]]:
    """``(recorded, now)`` when ``recorded`` (the revision a tuned entry or a bench row was measured at; 0 when
    none was recorded) is not ``method``'s registered revision ``now``; None when it is, or for a name that is
    not a registered method."""
    from .methods import available, get_method

    if method not in available() or get_method(method).revision == recorded:
        return None
    return recorded, get_method(method).revision


def read_table(p: Path) -> Dict[str, Any]:
    """``{"methods": {...}, "tuning": {...}}`` of the table file ``p`` (both empty when it does not exist)."""
    table: Dict[str, Any] = {"methods": {}, "tuning": {}}
    if p.exists():
        with open(p, "rb") as f:
            old = tomllib.load(f)
        table["methods"].update(old.get("methods", {}))
        table["tuning"].update(old.get("tuning", {}))
    return table


def _checked(v: Any, where: str) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"cannot write {v} into a tuned table ({where})")
    if isinstance(v, (list, tuple)):
        return [_checked(x, where) for x in v]
    if not isinstance(v, (bool, int, float, str, list, tuple)):
        raise ValueError(f"cannot write {type(v).__name__} {v!r} into a tuned table ({where})")
    return v


def write_table(p: Path, protocol: str, table: Dict[str, Any]) -> Path:
    """Write ``table`` to ``p`` atomically (sections and entries sorted by name; None values left out). Floats
    are written so that they read back bit for bit: ``bench --tuned`` then replays the tuned trial exactly."""
    import tomli_w

    body = {section: {name: {k: _checked(v, f"{section}.{name}.{k}") for k, v in table[section][name].items()
                             if v is not None}
                      for name in sorted(table[section])}
            for section in ("methods", "tuning")}
    header = (f"# Tuned hyperparameters for the protocol {protocol}, written by `excise tune`\n"
              "# (validation split and retrain oracle only; see excise.tuning). Read by `excise bench --tuned`.\n\n")
    atomic_write_bytes(p, (header + tomli_w.dumps(body)).encode())
    return p


def locked(p: Path):
    """An exclusive lock on the table ``p`` between processes (tuners running in parallel update one table in
    turn): ``with locked(p): read, change, write``."""
    from filelock import FileLock

    return FileLock(str(p.parent / f".{p.name}.lock"))
