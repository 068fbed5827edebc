"""``python -m loopfast bench --plot FILE.png``: the report as a figure, one panel per case with
the peers as bars and each bar's ratio to multiprocessing.Pipe() written on it. Needs matplotlib
(the optional extra: ``pip install loopfast[plot]``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .runner import Report

__all__ = ["MISSING_MESSAGE", "plot_unavailable", "write_plot"]

MISSING_MESSAGE = ("--plot needs matplotlib, which is not installed: "
                   "pip install 'loopfast[plot]' (or pip install matplotlib)")


def plot_unavailable() -> Optional[str]:
    """None if the plot can be drawn here, else why not (one line)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return MISSING_MESSAGE
    return None


def write_plot(report: Report, path: str) -> None:
    """Draw the report's cases (one panel each: peers as bars, ratio to mp.Pipe on each bar) and
    save the figure to `path` (PNG, or any format matplotlib knows by the file name)."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    cases = report["cases"]
    if not cases:
        raise ValueError("the report has no case to plot")
    ncols = min(3, len(cases))
    nrows = math.ceil(len(cases) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes.flat, cases):
        names = list(case["results"])
        labels = [case["results"][name]["label"] for name in names]
        medians = [case["results"][name]["median"] for name in names]
        colors = ["tab:blue" if name.startswith("loopfast") else
                  "tab:gray" if name.startswith("mp_") else "tab:olive" for name in names]
        bars = ax.barh(range(len(names)), medians, color=colors)
        ax.set_yticks(range(len(names)), labels, fontsize=7)
        ax.invert_yaxis()
        better = "lower" if case["lower_is_better"] else "higher"
        ax.set_title(f"{case['title']} ({case['unit']}, {better} is better)", fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        for bar, name in zip(bars, names):
            ratio = case["ratios"].get(name, {}).get("mp_pipe")
            if ratio is not None:
                ax.annotate(f"{ratio['of_medians']:.2f}× mp.Pipe",
                            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_xlim(0, max(medians) * 1.35)
    env = report["environment"]
    fig.suptitle(f"loopfast {env['loopfast_version']} bench ({env['implementation']}), "
                 f"{report['settings']['rounds']} rounds, medians; {env['platform']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
