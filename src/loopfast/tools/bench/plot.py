"""``python -m loopfast bench --plot FILE.png``: the report as a figure. One panel per case with
the peers as bars and each bar's ratio to multiprocessing.Pipe() written on it (a log scale
where the bars span more than a decade: the batched 64 B rates are 100 times the plain ones),
then a panel for the memory figures and one for the asyncio round trip when the run has them.
Needs matplotlib (the optional extra: ``pip install loopfast[plot]``, or ``loopfast[bench]``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .report import Report

__all__ = ["MISSING_MESSAGE", "plot_unavailable", "write_plot"]

MISSING_MESSAGE = ("--plot needs matplotlib, which is not installed: "
                   "pip install 'loopfast[plot]' (or pip install matplotlib)")

# Bar colours by family, with the legend's words for them.
_FAMILIES = (("loopfast", "tab:blue", "loopfast"),
             ("mp_", "tab:gray", "multiprocessing"),
             ("", "tab:olive", "socket loop, pyzmq"))


def plot_unavailable() -> Optional[str]:
    """None if the plot can be drawn here, else why not (one line)."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return MISSING_MESSAGE
    return None


def _color(name: str) -> str:
    return next(color for prefix, color, _ in _FAMILIES if name.startswith(prefix))


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str],
          notes: list[str], title: str) -> None:
    """Horizontal bars, a note at the end of each; a log scale if they span over ten times."""
    bars = ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    positive = [v for v in values if v > 0]
    logarithmic = bool(positive) and max(positive) > 10 * min(positive)
    if logarithmic:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 6)
        ax.set_xlabel("log scale", fontsize=7)
    elif positive:
        ax.set_xlim(0, max(positive) * 1.35)
    for bar, note in zip(bars, notes):
        if note:
            ax.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)


def write_plot(report: Report, path: str) -> None:
    """Draw the report (one panel per case, then memory and asyncio) and save the figure to
    `path` (PNG, or any format matplotlib knows by the file name)."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    from matplotlib.patches import Patch  # type: ignore[import-not-found,unused-ignore]

    cases = report["cases"]
    if not cases:
        raise ValueError("the report has no case to plot")
    memory = report.get("memory")
    aio = report.get("aio")
    panels = len(cases) + bool(memory and memory["rows"]) + bool(aio and aio["medians"])
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    flat = iter(axes.flat)
    for case in cases:
        names = list(case["results"])
        notes = []
        for name in names:
            ratio = case["ratios"].get(name, {}).get("mp_pipe")
            notes.append(f"{ratio['of_medians']:.2f}× mp.Pipe" if ratio else "")
        better = "lower" if case["lower_is_better"] else "higher"
        _bars(next(flat), [case["results"][name]["label"] for name in names],
              [case["results"][name]["median"] for name in names],
              [_color(name) for name in names], notes,
              f"{case['title']} ({case['unit']}, {better} is better)")
    if memory and memory["rows"]:
        rows = memory["rows"]
        _bars(next(flat), [f"{row['label']} {row['api']} ({row.get('message', 'bytes')})"
                           for row in rows],
              [row["worst_ratio"] for row in rows], [_color(row["peer"]) for row in rows],
              [f"{row['worst_ratio']:.3f}×" for row in rows],
              f"extra memory for one {memory['size'] // 2**20} MiB message "
              f"(× its size, lower is better)")
    if aio and aio["medians"]:
        from .aio import LABELS
        names = list(aio["medians"])
        _bars(next(flat), [LABELS[name] for name in names],
              [aio["medians"][name] * 1e6 for name in names],
              ["tab:blue" if "loopfast" in LABELS[name] else "tab:olive" for name in names],
              [f"{aio['medians'][name] * 1e6:.1f} µs" for name in names],
              f"asyncio {aio['size']} B round trip (µs, lower is better)")
    env = report["environment"]
    quick = " quick run," if report["settings"].get("quick") else ""
    pin = report["settings"].get("pin", "none")
    fig.suptitle(f"loopfast {env['loopfast_version']} bench ({env['implementation']}),{quick} "
                 f"{report['settings']['rounds']} rounds, medians, pin {pin}; {env['platform']}",
                 fontsize=10)
    fig.legend(handles=[Patch(color=color, label=words) for _, color, words in _FAMILIES],
               loc="lower center", ncol=len(_FAMILIES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
