"""Plots of a Report (matplotlib, the ``plots`` extra): per-class test accuracy and where the selective
methods edited."""

from __future__ import annotations

from pathlib import Path
from typing import Dict


def gap_vs_seconds(report, path: Path, title: str = "") -> Path:
    """One point per method: mean Avg Gap to the oracle against mean seconds (log scale), error bars the std
    over seeds; the original model (no unlearning) as a dashed line. Diverged runs are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = report.summary()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, cols in summ.items():
        if "avg_gap" not in cols:
            continue
        if "seconds" not in cols:
            if m == "original":
                ax.axhline(cols["avg_gap"][0], ls="--", color="grey", lw=1)
                ax.annotate("original (no unlearning)", (0.01, cols["avg_gap"][0]), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
            continue
        x, y = cols["seconds"], cols["avg_gap"]
        ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt="o", ms=5, capsize=2)
        ax.annotate(m, (x[0], y[0]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (unlearning step; retrain: training), log scale")
    ax.set_ylabel("Avg Gap to the retrain oracle (points)")
    ax.set_title(title or str(report.protocol.get("name", "")), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(report, out: Path) -> Dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: Dict[str, Path] = {}
    seed = min(r["seed"] for r in report.rows)
    rows = [r for r in report.rows if r["seed"] == seed and r.get("per_class_test_acc")]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, len(rows[0]["per_class_test_acc"]) * 0.8), 3.5))
        n = len(rows)
        width = 0.8 / n
        for i, r in enumerate(rows):
            vals = [v if v is not None else 0 for v in r["per_class_test_acc"]]
            ax.bar([c - 0.4 + (i + 0.5) * width for c in range(len(vals))], vals, width, label=r["method"])
        ax.set_xticks(range(len(rows[0]["per_class_test_acc"])))
        ax.set_xlabel("class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"per-class test accuracy (seed {seed})")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        files["per_class"] = out / "per_class_accuracy.png"
        fig.savefig(files["per_class"], dpi=110)
        plt.close(fig)
    sel = [r for r in report.rows if r["seed"] == seed and r.get("selected_per_layer")]
    if sel:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for r in sel:
            layers = list(r["selected_per_layer"])
            ax.plot(range(len(layers)), [100.0 * r["selected_per_layer"][k] for k in layers], marker="o", label=r["method"])
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("% of the tensor selected")
        ax.set_title(f"selected parameters per tensor (seed {seed})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["selected"] = out / "selected_per_layer.png"
        fig.savefig(files["selected"], dpi=110)
        plt.close(fig)
    if any(r.get("avg_gap") is not None and r.get("seconds") for r in report.rows):
        files["gap_vs_seconds"] = gap_vs_seconds(report, out / "gap_vs_seconds.png")
    return files
