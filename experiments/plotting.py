"""One style map (method -> colour and marker) and ``savefig`` to PNG and PDF.

Importing this module changes no global matplotlib state; figures are drawn inside
:func:`style` contexts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

_COLOURS = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
            "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"]
_MARKERS = ["*", "o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "8"]

# Fixed entries so a method has the same look in every figure.
STYLE: dict[str, dict] = {
    name: {"color": _COLOURS[i], "marker": _MARKERS[i]}
    for i, name in enumerate([
        "retrain", "finetune", "neggrad", "neggrad_plus", "random_labels", "scrub", "fisher",
        "l1_sparse", "salun", "newton", "sisa", "influence", "certified",
    ])
}

RC = {"figure.dpi": 100, "savefig.dpi": 120, "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
      "legend.frameon": False}


def method_style(name: str) -> dict:
    """Colour and marker of a method (a stable fallback for unknown names)."""
    if name in STYLE:
        return dict(STYLE[name])
    h = sum(map(ord, name))
    return {"color": _COLOURS[h % len(_COLOURS)], "marker": _MARKERS[h % len(_MARKERS)]}


@contextlib.contextmanager
def style():
    """The project's matplotlib rc settings, scoped to a ``with`` block (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context(RC):
        yield plt


def prediction_panels(plt, actual, panels: list[tuple[str, object]], *, xlabel: str,
                      ylabel: str = "predicted Δ test loss", diagonal: bool = True,
                      height: float = 3.2):
    """One scatter panel per ``(title, predicted)`` pair against the same ``actual`` values (a
    leave-one-out figure); reference lines y = x (``diagonal``) or the two axes. Returns the
    figure."""
    import numpy as np

    actual = np.asarray(actual)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), height), squeeze=False)
    for ax, (title, pred) in zip(axes[0], panels, strict=True):
        pred = np.asarray(pred)
        ax.scatter(actual, pred, s=10, color=method_style("influence")["color"])
        if diagonal:
            lim = [min(actual.min(), pred.min()), max(actual.max(), pred.max())]
            ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
        else:
            ax.axhline(0, color="grey", lw=0.5)
            ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig


def savefig(fig, path: str | Path, *, pdf: bool = True) -> list[Path]:
    """Save ``fig`` as ``path`` (.png) and, with ``pdf``, a .pdf beside it; close it."""
    import matplotlib.pyplot as plt

    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path]
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    if pdf:
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight",
                    metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                              "Creator": None})
        out.append(path.with_suffix(".pdf"))
    plt.close(fig)
    return out
