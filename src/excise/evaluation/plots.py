"""Plots of a Report (matplotlib, the ``plots`` extra): per-class test accuracy and where the selective
methods edited."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict


def save_figure(fig, path, **savefig_kw) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (and by rank 0 only under torch.distributed)."""
    import io

    from ..types import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _place_labels(ax, points, fontsize=7):
    """Annotate each (label, x, y) next to its point: try offsets close around it first, then a wider ring (a
    label not next to its point is joined to it by a thin leader line), and keep the first place whose box
    (the label's measured extent) is inside the axes, overlaps no label placed before it (nor touches it), no
    point's marker and not the legend; failing that, the first place clear of the other labels, else the first."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits, so data -> display positions are final
    renderer = fig.canvas.get_renderer()
    scale = 72.0 / fig.dpi  # display pixels -> points

    def in_points(bbox):  # a display Bbox as (x0, y0, x1, y1) in points
        return [v * scale for v in bbox.extents]

    ax_box = in_points(ax.get_window_extent())

    def hits(box, boxes):
        return any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes)

    def inside(box):
        return ax_box[0] <= box[0] and box[2] <= ax_box[2] and ax_box[1] <= box[1] and box[3] <= ax_box[3]

    # what a label must not cover: every point's marker, the legend and any text already on the axes
    m = 4.0
    obstacles = [(px - m, py - m, px + m, py + m) for px, py in
                 ((v * scale for v in ax.transData.transform((x, y))) for _, x, y in points)]
    if ax.get_legend() is not None:
        obstacles.append(in_points(ax.get_legend().get_window_extent(renderer)))
    obstacles += [in_points(t.get_window_extent(renderer)) for t in ax.texts]
    placed = []  # label boxes (x0, y0, x1, y1) in points
    for label, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        probe = ax.text(0, 0, label, fontsize=fontsize)
        w, h = (v * scale for v in probe.get_window_extent(renderer).size)
        probe.remove()
        near = [(4, 3), (4, -h - 2), (-w - 4, 3), (-w - 4, -h - 2), (4, h + 5), (4, -2 * h - 4),
                (-w / 2, 6), (-w / 2, -h - 6)]
        far = [(dx, dy) for r in (2.5, 4.0) for dx, dy in (
            (12 * r / 2.5, h * r), (12 * r / 2.5, -h * (r + 1)), (-w - 12 * r / 2.5, h * r),
            (-w - 12 * r / 2.5, -h * (r + 1)), (-w / 2, h * (r + 0.5)), (-w / 2, -h * (r + 1.5)),
            (18 * r / 2.5, -h / 2), (-w - 18 * r / 2.5, -h / 2))]
        tries = []
        for dx, dy in near + far:
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            gap = math.hypot(max(box[0] - px, 0, px - box[2]), max(box[1] - py, 0, py - box[3]))
            tries.append((dx, dy, box, gap > h))  # not next to its point: join them with a leader line
        clear = [t for t in tries if not hits(t[2], placed)]
        dx, dy, box, lead = next((t for t in clear if inside(t[2]) and not hits(t[2], obstacles)),
                                 next((t for t in clear if inside(t[2])), clear[0] if clear else tries[0]))
        placed.append((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1))  # a little space between two labels
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, va="bottom",
                    **({"arrowprops": dict(arrowstyle="-", color="grey", lw=0.5, shrinkA=0, shrinkB=3)}
                       if lead else {}))


def gap_vs_seconds(report, path: Path, title: str = "", selective=None) -> Path:
    """One point per method: mean Avg Gap to the oracle (symlog: linear below 1) against mean seconds (log
    scale), error bars the std over seeds; the original model (no unlearning) as a dashed line. Diverged runs
    are left out. Methods in ``selective`` (default: ``excise.methods.SELECTIVE``, matched on the label's
    first word) are filled circles, the baselines open squares, the retrain oracle a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if selective is None:
        from ..methods.registry import SELECTIVE as selective

    summ = report.summary()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points, kinds = [], set()
    for m, cols in summ.items():
        if "avg_gap" not in cols:
            continue
        if "seconds" not in cols:
            if m == "original":
                ax.axhline(cols["avg_gap"][0], ls="--", color="grey", lw=1)
                ax.annotate("original (no unlearning)", (0.99, cols["avg_gap"][0]), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom", ha="right")
            continue
        x, y = cols["seconds"], cols["avg_gap"]
        kind = ("retrain (oracle)" if m == "retrain" else
                "excise's selective methods" if m.split("-")[0] in selective else "baselines")
        style = {"retrain (oracle)": dict(fmt="*", ms=9, color="black"),
                 "excise's selective methods": dict(fmt="o", ms=5, color="tab:blue"),
                 "baselines": dict(fmt="s", ms=5, color="tab:orange", mfc="none")}[kind]
        ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], capsize=2, label=None if kind in kinds else kind, **style)
        kinds.add(kind)
        points.append((m, x[0], y[0]))
    ax.set_xscale("log")
    # linear below 1 point, logarithmic above: the methods that come close to the oracle (a few tenths apart)
    # stay apart when another one is tens of points off
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
    ax.set_ylim(bottom=-0.05)
    ax.set_xlabel("seconds (unlearning step; retrain: training), log scale")
    ax.set_ylabel("Avg Gap to the retrain oracle (points;\nlinear below 1, log above)")
    ax.set_title(title or str(report.protocol.get("name", "")), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if kinds:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _place_labels(ax, points)
    save_figure(fig, path, dpi=110)
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
        save_figure(fig, files["per_class"], dpi=110)
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
        save_figure(fig, files["selected"], dpi=110)
        plt.close(fig)
    if any(r.get("avg_gap") is not None and r.get("seconds") for r in report.rows):
        files["gap_vs_seconds"] = gap_vs_seconds(report, out / "gap_vs_seconds.png")
    return files
