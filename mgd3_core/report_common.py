"""What the parts of the evaluation report share (``report``, ``report_grid``): the order of the
base methods, the accuracy format, and figures rendered to PNG bytes."""

from __future__ import annotations

import io
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Baselines first, then the diffusion methods, the method last (the order of the README's results table).
METHOD_ORDER = ("full_data", "random_real", "closest_real", "decoded_centroids", "unguided", "mgd3_no_stop", "mgd3")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def fmt(mean: float, std: float) -> str:
    return "n/a" if not np.isfinite(mean) else f"{mean:.2f} ± {std:.2f}"
