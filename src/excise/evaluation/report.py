"""Reports: rows of (method, seed, metrics, cost) under one protocol hash; JSON, CSV, Markdown and plots."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..types import atomic_write_bytes
from .evaluate import METRICS, gaps
from .metrics import avg_gap_metrics, get_metric

ORACLE = "retrain"
TABLE_COLUMNS = [(m, get_metric(m).title) for m in avg_gap_metrics()] + [
    ("avg_gap", "Avg Gap"), ("seconds", "seconds"), ("speedup", "speed-up")]  # SalUn's Table 1


def protocol_hash(protocol: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Report:
    """Results of methods on one protocol (data, split, architecture, recipe, seeds), hashed.

    Each row: ``method``, ``seed``, the metrics of :func:`evaluate_metrics`, ``seconds`` (the unlearning step
    alone; for ``retrain`` the oracle's training time), ``timings``, ``counters``, ``hparams``.
    """

    protocol: Dict[str, Any]
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)  # free text, written as given
    protocol_hash: str = ""
    # structured facts the notes are rendered from (never parsed back from prose): ``seeds_total`` (how many
    # seeds the protocol has; a run on fewer says so), ``tuned`` ({"source", "searched", "carried": {label:
    # protocol}, "default": [labels]} for a run with tuned values). The one-off importance note is rendered from
    # the rows' own ``one_off`` fields.
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.protocol_hash:
            self.protocol_hash = protocol_hash(self.protocol)

    # ---- building -------------------------------------------------------------------------------
    def add(self, method: str, seed: int, metrics: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
        row = {"method": method, "seed": seed, **metrics, **extra}
        self.rows.append(row)
        return row

    def finalize(self) -> "Report":
        """Fill gaps to the oracle (same seed), Avg Gap, speed-up and RTE (minutes)."""
        oracles = {r["seed"]: r for r in self.rows if r["method"] == ORACLE}
        for r in self.rows:
            o = oracles.get(r["seed"])
            if o is not None and not r.get("diverged"):
                r.update(gaps(r, o))
                if r.get("seconds") and o.get("seconds"):
                    r["speedup"] = o["seconds"] / r["seconds"]
            if r.get("seconds") is not None:
                r["rte_min"] = r["seconds"] / 60.0
        return self

    def merge(self, other: "Report") -> "Report":
        """Rows of two reports on the same protocol; refuses different protocols."""
        self.check_comparable(other)
        return Report(self.protocol, self.rows + other.rows, self.notes + [n for n in other.notes if n not in self.notes],
                      self.protocol_hash, {**other.facts, **self.facts})

    def check_comparable(self, other: "Report") -> None:
        if other.protocol_hash != self.protocol_hash:
            raise ValueError(f"reports come from different protocols ({self.protocol_hash} vs {other.protocol_hash}): "
                             "their numbers are not comparable")

    # ---- summaries ------------------------------------------------------------------------------
    def methods(self) -> List[str]:
        seen: List[str] = []
        for r in self.rows:
            if r["method"] not in seen:
                seen.append(r["method"])
        return seen

    def summary(self) -> Dict[str, Dict[str, tuple]]:
        """method → column → (mean, std, n) over seeds."""
        out: Dict[str, Dict[str, tuple]] = {}
        for m in self.methods():
            rows = [r for r in self.rows if r["method"] == m]
            cols = {}
            for key in {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}:
                vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
                if vals:
                    mean = sum(vals) / len(vals)
                    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                    cols[key] = (mean, std, len(vals))
            out[m] = cols
        return out

    # ---- output ---------------------------------------------------------------------------------
    def to_markdown(self, title: Optional[str] = None) -> str:
        """SalUn Table 1 layout: one row per method, mean ± std over seeds."""
        summ = self.summary()
        seeds = sorted({r["seed"] for r in self.rows})
        columns = self.columns()
        lines = [f"## {title or self.protocol.get('name', 'report')}", "",
                 f"protocol hash `{self.protocol_hash}`, seeds {seeds}", "",
                 "| method | " + " | ".join(t for _, t in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        for m in self.methods():
            cells = []
            for key, _ in columns:
                v = summ[m].get(key)
                if v is None:
                    cells.append("—")
                elif key == "speedup":
                    cells.append(f"{v[0]:.0f}×" if v[0] >= 10 else f"{v[0]:.2g}×")
                else:
                    cells.append(f"{v[0]:.2f} ± {v[1]:.2f}" if v[2] > 1 else f"{v[0]:.2f}")
            n_div = sum(1 for r in self.rows if r["method"] == m and r.get("diverged"))
            n_all = sum(1 for r in self.rows if r["method"] == m)
            label = m + (" (tuned)" if all(r.get("tuned") for r in self.rows if r["method"] == m) else "")
            label += f" (diverged on {n_div} of {n_all} seeds)" if n_div else ""
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if columns is TABLE_COLUMNS:
            lines += ["", "UA = 100 − forget accuracy; RA / TA = retain / test accuracy (%). MIA (svc) = SalUn's "
                      "MIA-Efficacy: % of the forget set an SVC on the true-class confidence calls non-member (ideal: "
                      "the oracle's). Avg Gap = mean |Δ to the retrain oracle| over UA, RA, TA and MIA (svc), same "
                      "seed. seconds = the unlearning step alone (retrain: its training time); speed-up = retrain "
                      "seconds / seconds."]
        else:
            from .metrics import get_metric

            lines += [""] + [f"{get_metric(k).title}: {get_metric(k).direction}." for k, _ in columns
                             if k not in ("seconds", "speedup")]
            lines += ["seconds = the unlearning step alone (retrain: its training time); speed-up = retrain "
                      "seconds / seconds."]
        lines += [f"- {n}" for n in self.rendered_notes()]
        lines += [f"- {r['method']}, seed {r['seed']}: {r['diverged']}" for r in self.rows if r.get("diverged")]
        return "\n".join(lines) + "\n"

    def columns(self):
        """The table's columns: SalUn's (UA, RA, TA, MIA, Avg Gap) for a classification protocol; for a
        diffusion protocol the registered metrics its rows have, then seconds and speed-up."""
        if self.protocol.get("task") != "diffusion":
            return TABLE_COLUMNS
        from .metrics import get_metric, metric_names

        present = [m for m in metric_names() if any(isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)
                                                    for r in self.rows)]
        return [(m, get_metric(m).title) for m in present] + [("seconds", "seconds"), ("speedup", "speed-up")]

    def to_csv(self) -> str:
        keys: List[str] = []
        for r in self.rows:
            for k, v in r.items():
                if k not in keys and not isinstance(v, (dict, list)):
                    keys.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow(r)
        return buf.getvalue()

    def rendered_notes(self) -> List[str]:
        """The notes a reader sees: those rendered from ``facts`` and the rows (tuned values, one-off importance
        passes, a partial seed list), then the free-text ``notes``."""
        out = []
        tuned = self.facts.get("tuned")
        if tuned:
            out.append(f"tuned hyperparameters from {tuned['source']} for {', '.join(tuned['searched']) or 'no method'}; "
                       + "".join(f"{lb} carried from {src} (not searched on this protocol); "
                                 for lb, src in tuned.get("carried", {}).items())
                       + f"{', '.join(tuned['default']) or 'no method'} on the protocol's values")
        first = [r for r in self.rows if r.get("one_off")]
        if first:
            out.append("the importance on D was computed on first use for " + ", ".join(
                f"{r['method']} (seed {r['seed']}: {r['one_off']['importance_ref_seconds']:.0f} s)" for r in first)
                + "; a one-off per model, cached since: those rows' seconds are a second run that loads it")
        seeds, total = sorted(self.protocol.get("seeds", [])), self.facts.get("seeds_total")
        if total is not None and len(seeds) != total:
            out.append(f"run on {len(seeds)} of the protocol's {total} seeds ({seeds})")
        return out + [n for n in self.notes if n not in out]

    def to_dict(self) -> Dict[str, Any]:
        return {"protocol": self.protocol, "protocol_hash": self.protocol_hash, "facts": self.facts,
                "notes": self.notes, "rendered_notes": self.rendered_notes(), "rows": self.rows,
                "metrics": {k: {"direction": d, "ideal": i} for k, (d, i) in METRICS.items()}}

    def save(self, out: str | os.PathLike, plots: bool = True) -> Dict[str, Path]:
        """Write report.json, report.csv, report.md (and PNG plots when matplotlib is installed)."""
        out = Path(out)
        files = {"json": out / "report.json", "csv": out / "report.csv", "md": out / "report.md"}
        atomic_write_bytes(files["json"], json.dumps(self.to_dict(), indent=1, default=str).encode())
        atomic_write_bytes(files["csv"], self.to_csv().encode())
        atomic_write_bytes(files["md"], self.to_markdown().encode())
        if plots:
            from .plots import save_plots

            files.update(save_plots(self, out))
        return files

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        d = json.loads(Path(path).read_text())
        rep = cls(d["protocol"], d["rows"], d.get("notes", []), "", d.get("facts", {}))
        if rep.protocol_hash != d["protocol_hash"]:
            raise ValueError(f"{path}: protocol hash does not match its protocol (edited file?)")
        return rep
