"""Sweep plots: a metric against ε (log scale), one line per private method, ceilings as lines.

Matplotlib's object-oriented API (``Figure``, no pyplot): no GUI backend, no global state, so
it is safe inside a Hydra multirun.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
from collections import Counter
from typing import TYPE_CHECKING, Any

from dpgen.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("dpgen")

Rows = list[dict[str, Any]]

_NUMBER = re.compile(r"(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")


def setting_order(setting: str) -> tuple:
    """Sort key of a ``setting`` label that orders its numbers by value (``steps=500`` before
    ``steps=2000``). Text and numbers alternate in the split, so keys always compare."""
    parts = _NUMBER.split(setting)
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _spread(values: list[float]) -> float:
    """The sample standard deviation of repeats (n - 1: the runs are a sample of the seeds a user
    could have drawn; the population sd understates the spread by sqrt(n / (n - 1))); 0 for one run."""
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def _private_lines(ax: Any, rows: Rows, key: str, scale: float) -> int:
    """One line per DP-trained method and setting; repeats at the same ε target are averaged
    (± their sample sd). Runs whose guarantee was voided (CPSample) get their own dashed line at the ε of
    their training."""
    points = [r for r in rows if r["epsilon"] and r.get(key) is not None]
    lines = sorted({(r["method"], r["private"], r.get("setting", "")) for r in points},
                   key=lambda line: (not line[1], line[0], setting_order(line[2])))
    for method, private, setting in lines:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in points:
            if (r["method"], r["private"], r.get("setting", "")) == (method, private, setting):
                groups.setdefault(r["epsilon_target"], []).append(r)
        series = sorted((statistics.fmean(r["epsilon"] for r in g),
                         statistics.fmean(scale * r[key] for r in g),
                         _spread([scale * r[key] for r in g])) for g in groups.values())
        xs, ys, errs = zip(*series)
        repeated = any(len(g) > 1 for g in groups.values())
        label = (method if private else f"{method}, no formal DP (sampling used the data)") + _setting(setting)
        ax.errorbar(xs, ys, yerr=errs if repeated else None, marker="o", capsize=3, linestyle="-" if private else "--",
                    label=f"{label} (mean ± sd of repeats)" if repeated else label)
    return len(points)


def _setting(setting: str) -> str:
    return f" [{setting}]" if setting else ""


def _ceiling(ax: Any, value: float | None, label: str, style: str, color: str, unit: str = "") -> None:
    if value is not None:
        ax.axhline(value, linestyle=style, color=color, linewidth=1.5, label=f"{label}: {value:.3g}{unit}")


def _nonprivate_ceilings(ax: Any, rows: Rows, key: str, scale: float, unit: str = "") -> None:
    """The non-private generator's mean, one line per setting (repeats averaged)."""
    settings: dict[str, list[float]] = {}
    for r in rows:
        if r["epsilon"] is None and r.get(key) is not None:
            settings.setdefault(r.get("setting", ""), []).append(scale * r[key])
    for setting, values in sorted(settings.items(), key=lambda item: setting_order(item[0])):
        _ceiling(ax, _mean(values), "non-private generator (no DP)" + _setting(setting), "--", "black", unit)


def _new_figure() -> tuple[Figure, Any]:
    """A figure and the ``ticker`` module. Imported here, not at the top: Hydra builds the sweep
    report callback (which reads this module) at every start, refusals included (about 0.4 s)."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4.6), layout="constrained"), ticker


def _axes(title: str, ylabel: str, rows: Rows) -> tuple[Figure, Any]:
    fig, ticker = _new_figure()
    ax = fig.add_subplot()
    deltas = sorted({r["delta"] for r in rows if r["delta"] is not None})
    delta = f", δ = {deltas[0]:g}" if len(deltas) == 1 else ""
    ax.set_title(title)
    ax.set_xlabel(f"ε, privacy budget spent (log scale{delta})")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _finish(ax: Any, n_private: int) -> None:
    if not n_private:
        ax.set_xlim(0.1, 100)  # only ceilings: give the log axis a sensible span
    handles, labels = ax.get_legend_handles_labels()
    # Methods first, then the reference lines (matplotlib lists plain lines before error bars).
    order = sorted(range(len(labels)), key=lambda i: not hasattr(handles[i], "lines"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="best", fontsize="small")


def accuracy_figure(rows: Rows) -> Figure:
    classifiers = sorted({k[9:] for r in rows for k in r if k.startswith("accuracy_")} - {"mean", "real_mean"})
    fig, ax = _axes(f"Utility vs privacy (mean of {', '.join(classifiers) or 'no'} classifiers)",
                    "accuracy on held-out real data (%)", rows)
    n = _private_lines(ax, rows, "accuracy_mean", 100.0)
    _nonprivate_ceilings(ax, rows, "accuracy_mean", 100.0, "%")
    real = [100 * r["accuracy_real_mean"] for r in rows if r["accuracy_real_mean"] is not None]
    _ceiling(ax, _mean(real), "classifiers trained on real data", ":", "grey", "%")
    _finish(ax, n)
    return fig


def fid_figure(rows: Rows) -> Figure:
    extractors = Counter(r["feature_extractor"] for r in rows if r["feature_extractor"])
    extractor = extractors.most_common(1)[0][0] if extractors else None
    if len(extractors) > 1:
        log.warning("report: runs use several feature extractors %s; FID plot shows %s only",
                    sorted(extractors), extractor)
    rows = [r for r in rows if r["feature_extractor"] == extractor]
    # FID depends on the number of images: where the runs scored their samples at the size of the
    # real-data reference, plot that, so the reference line is what an ideal generator would get.
    matched = any(r.get("fid_at_reference_size") is not None for r in rows)
    key = "fid_at_reference_size" if matched else "fid"
    if matched:
        _warn_unmatched(rows)
    fig, ax = _axes(f"Fidelity vs privacy ({extractor or 'no'} features)",
                    "FID to the real training split" + (", at the reference's size" if matched else "")
                    + " (lower is better)", rows)
    n = _private_lines(ax, rows, key, 1.0)
    _nonprivate_ceilings(ax, rows, key, 1.0)
    reference = [r["fid_reference"] for r in rows if r["fid_reference"] is not None]
    label = "real held-out vs real train" + ("" if matched else " (other sample size)")
    _ceiling(ax, _mean(reference), label, ":", "grey")
    _finish(ax, n)
    return fig


def _warn_unmatched(rows: Rows) -> None:
    """Runs with a FID but none at the reference's size have no point on a plot of the latter."""
    left_out = [r["run"] for r in rows if r.get("fid") is not None and r.get("fid_at_reference_size") is None]
    if left_out:
        log.warning("report: the FID plot shows FID at the reference's sample size and leaves out %d run(s) "
                    "scored without it (eval.reference=false, or by an older dpgen): %s; re-score them with "
                    "python -m dpgen.evaluate <run> eval.reference=true to plot them", len(left_out), ", ".join(left_out))


def utility_figure(series: dict[str, list[tuple[float, float]]], n_train: int) -> Figure:
    """Held-out accuracy against the synthetic set's size, one line per classifier family and
    the ensemble (``dpgen/eval/utility.py``)."""
    fig, ticker = _new_figure()
    ax = fig.add_subplot()
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=name,
                linestyle="--" if name == "ensemble" else "-", color="black" if name == "ensemble" else None)
    ax.set_title("Utility vs synthetic set size")
    ax.set_xlabel(f"synthetic samples, multiples of the sensitive training split (N = {n_train}; log scale)")
    ax.set_ylabel("accuracy on held-out real data (%)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(sorted({x for pts in series.values() for x, _ in pts})))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
