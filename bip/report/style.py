"""The one look every figure of the project shares: a colour and a marker per method name,
readable log-axis ticks, axis labels with units.

The palette is Okabe & Ito's (https://jfly.uni-koeln.de/color/), which stays distinguishable
under the common colour-vision deficiencies and in greyscale print. A method keeps its colour
in every figure and every report, so a reader learns it once; settings of one method (a swept
bip.gamma) share the colour and differ by line style.
"""
from __future__ import annotations

import math
import zlib

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7",
}
# The methods the project ships; any other name gets a colour from its name's CRC, so it is
# the same in every run of the report.
METHOD_COLORS = {
    "dense": OKABE_ITO["black"], "bip": OKABE_ITO["vermillion"], "hydra": OKABE_ITO["blue"],
    "omp": OKABE_ITO["bluish_green"], "imp": OKABE_ITO["orange"], "random": OKABE_ITO["reddish_purple"],
}
METHOD_MARKERS = {"dense": "s", "bip": "o", "hydra": "s", "omp": "^", "imp": "D", "random": "v"}
_SPARE_COLORS = (OKABE_ITO["sky_blue"], OKABE_ITO["yellow"], OKABE_ITO["reddish_purple"], OKABE_ITO["orange"])
_SPARE_MARKERS = ("P", "X", "h", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
COLLAPSED_COLOR = OKABE_ITO["black"]

# Axis labels, with units, used by every figure.
ACC_LABEL = "test accuracy (%)"
SPARSITY_LABEL = "sparsity 1 - k (%), log scale in k"
PASSES_LABEL = "training passes of one example, whole lineage (example passes, log scale)"
HOURS_LABEL = "wall time, whole lineage (hours, log scale)"


def color(method: str) -> str:
    """The colour of a method name (a label like ``bip (as pruned)`` uses its first word)."""
    name = str(method).split(" ")[0]
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    return _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]


def marker(method: str) -> str:
    name = str(method).split(" ")[0]
    if name in METHOD_MARKERS:
        return METHOD_MARKERS[name]
    return _SPARE_MARKERS[zlib.crc32(name.encode()) % len(_SPARE_MARKERS)]


def compact(value: float) -> str:
    """A tick label short enough not to collide: 0.02, 50, 1.5k, 2M (3 significant digits)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def log_axis(ax, axis: str = "x") -> None:
    """A log axis whose labels never overlap and never run out: at 1, 2, 5 x 10^n when the data
    spans a few decades, at decades only when it spans many, and at 4 evenly chosen values
    when it spans less than one (a decade axis would then have one label or none). Call it
    after plotting: it reads the data limits. Minor ticks carry no labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    target = ax.xaxis if axis == "x" else ax.yaxis
    getattr(ax, f"set_{axis}scale")("log")
    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    decades = 0.0 if lo <= 0 or hi <= 0 else abs(math.log10(hi / lo))
    if decades < 1:
        target.set_major_locator(MaxNLocator(4))
    else:
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    target.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
    target.set_minor_formatter(NullFormatter())
