"""One plotting style for the whole course, and small helpers that label plots.

Introduced in lab 00. Call `use_style()` once in a notebook's imports cell.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

COLORS = ["#1b6ca8", "#e07b39", "#3a9e5f", "#c0392b", "#7d5ba6", "#8c6d31", "#5f6b73"]


def use_style() -> None:
    """Readable defaults: size, grid, no top/right spines, a colour-blind-safe-ish cycle."""
    mpl.rcParams.update({
        "figure.figsize": (7.0, 4.0), "figure.dpi": 110, "savefig.bbox": "tight",
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "axes.titlesize": 12, "axes.labelsize": 11,
        "legend.frameon": False, "axes.prop_cycle": mpl.cycler(color=COLORS),
    })


def wrapped_table(styler, widths: list[str]):
    """A pandas Styler laid out at fixed column widths (e.g. ["20%", "80%"]) whose cells wrap
    their text, so that a table of prose never hides behind a sideways scroll."""
    styles = [{"selector": "", "props": "table-layout: fixed; width: 100%; "
               "font-size: 0.85em; border-collapse: collapse;"},
              {"selector": "td, th", "props": "white-space: normal; overflow-wrap: break-word; "
               "text-align: left; vertical-align: top; padding: 4px 6px;"}]
    styles += [{"selector": f"th.col_heading.col{i}", "props": f"width: {w};"}
               for i, w in enumerate(widths)]
    return styler.set_table_styles(styles)


def label_bars(ax: plt.Axes, fmt: str = "{:.3g}", rotation: int = 0) -> None:
    """Write each bar's height above it."""
    for container in ax.containers:
        ax.bar_label(container, labels=[fmt.format(v) for v in container.datavalues],
                     padding=2, fontsize=9, rotation=rotation)


def log_axes(ax: plt.Axes, x: bool = True, y: bool = False) -> None:
    """Log scale on the chosen axes, ticked at 1, 2 and 5 per decade with short labels (20k)."""
    for use, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if use:
            set_scale("log")
            axis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(mpl.ticker.EngFormatter(sep=""))
            axis.set_minor_formatter(mpl.ticker.NullFormatter())


def roofline(ax: plt.Axes, peak_flops: float, bandwidths: dict[str, float],
             intensity=(0.2, 3e4), theoretical_flops: float | None = None,
             theoretical_label: str = "theoretical peak") -> float:
    """Draw a log-log roofline in GFLOP/s: min(peak, intensity x bandwidth) for each
    bandwidth (the first solid, the others dashed), and mark the first one's ridge point.

    `bandwidths` maps a label to bytes/s. Returns the ridge point in FLOPs per byte, so the
    caller can place its measured points against it.
    """
    if peak_flops <= 0 or not bandwidths or min(bandwidths.values()) <= 0:
        raise ValueError("roofline needs peak_flops > 0 and at least one bandwidth > 0")
    x = np.geomspace(*intensity, 300)
    for i, (label, bw) in enumerate(bandwidths.items()):
        ax.plot(x, np.minimum(peak_flops, x * bw) / 1e9, color="k", lw=1.5 if i == 0 else 1,
                ls="-" if i == 0 else "--", label=label)
    if theoretical_flops:
        ax.axhline(theoretical_flops / 1e9, color="grey", ls=":", lw=1, label=theoretical_label)
    ridge = peak_flops / next(iter(bandwidths.values()))
    ax.axvline(ridge, color="grey", lw=0.8)
    ax.annotate(f"ridge {ridge:.1f} FLOPs/B", (ridge, peak_flops / 1e9 / 30), rotation=90,
                ha="right", va="bottom", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte)",
           ylabel="GFLOP/s")
    return ridge
