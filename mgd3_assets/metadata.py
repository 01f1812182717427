"""Asset metadata the UI shows: thumbnail grids, lineage tables, progress lines.

Thumbnails are embedded in markdown as base64 PNG so they travel with the
materialization event (no file server needed) and stay a few KB: at most
``MAX_THUMBNAILS`` images, each scaled to ``THUMB_PX`` pixels on its longer side.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Callable

import dagster as dg
import numpy as np

from mgd3_core.images import image_grid, png_bytes

MAX_THUMBNAILS = 20
THUMB_PX = 48
GRID_COLUMNS = 10
# The Dagster UI (1.13) renders a markdown value inline only when it is shorter than 1,000
# characters; a longer one collapses to "[Show Markdown]". The preview is made to fit.
INLINE_MARKDOWN_CHARS = 1000


def image_grid_png(images: np.ndarray, columns: int = GRID_COLUMNS, cell: int = THUMB_PX) -> bytes:
    """uint8 images (k, C, H, W), C in {1, 3} -> one PNG grid of ``cell``-px thumbnails,
    ``columns`` wide, 2 px grey gaps."""
    return png_bytes(image_grid(images, nrow=columns, padding=2, pad_value=128, cell=cell), optimize=True)


def thumbnails_markdown(images: np.ndarray, caption: str, columns: int = GRID_COLUMNS) -> dg.MetadataValue:
    """A markdown thumbnail grid of the first ``MAX_THUMBNAILS`` images."""
    shown = np.asarray(images)[:MAX_THUMBNAILS]
    data = base64.b64encode(image_grid_png(shown, columns=columns)).decode()
    more = f" (first {len(shown)} of {len(images)})" if len(images) > len(shown) else ""
    return dg.MetadataValue.md(f"**{caption}**{more}\n\n![{caption}](data:image/png;base64,{data})")


def preview_markdown(images: np.ndarray, caption: str) -> dg.MetadataValue:
    """A few thumbnails small enough to show inline in the UI's metadata table (under
    ``INLINE_MARKDOWN_CHARS``): fewer and smaller thumbnails until the markdown fits;
    the full grid is ``thumbnails_markdown``."""
    images = np.asarray(images)
    md = ""
    for count, cell in ((4, 32), (4, 24), (3, 20), (2, 16), (1, 16), (1, 8)):
        shown = images[:count]
        data = base64.b64encode(image_grid_png(shown, columns=count, cell=cell)).decode()
        md = f"![preview](data:image/png;base64,{data})"
        if len(md) < INLINE_MARKDOWN_CHARS:
            break
    return dg.MetadataValue.md(md)


def _cell(value, digits: int):
    """A table cell: plain Python scalars, floats rounded to ``digits`` decimals for reading;
    NaN and empty strings become empty cells."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if not isinstance(value, (int, float, bool, str, type(None))):
        value = str(value)
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if value == "":
        return None
    return value


def table(rows: list[dict], columns: list[tuple[str, str, str]], digits: int = 3) -> dg.MetadataValue:
    """A metadata table; ``columns`` are (key, type, description), type as in ``TableColumn``;
    float cells rounded to ``digits`` decimals (the files keep full precision)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(k, t, description=d) for k, t, d in columns])
    records = [dg.TableRecord({k: _cell(r.get(k), digits) for k, _, _ in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def frame_table(df, digits: int = 2) -> dg.MetadataValue:
    """A pandas DataFrame as a metadata table, column types from the dtypes, floats rounded."""
    kinds = {"i": "int", "u": "int", "f": "float", "b": "bool"}
    columns = [(str(c), kinds.get(df[c].dtype.kind, "string"), "") for c in df.columns]
    return table(df.to_dict("records"), columns, digits=digits)


def progress_logger(log, label: str, every_s: float = 10.0) -> Callable[[str, float], None]:
    """A core ``progress(msg, fraction)`` callback that logs at most every ``every_s`` seconds."""
    last = [float("-inf")]

    def progress(msg: str, fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - last[0] >= every_s:
            last[0] = now
            log.info(f"{label}: {msg} ({fraction:.0%})")

    return progress


def training_progress_logger(log, label: str, every_s: float = 10.0):
    """A backbone-training ``progress(stage, step, total, metrics)`` callback, throttled the same way."""
    last = [float("-inf")]

    def progress(stage: str, step: int, total: int, metrics: dict) -> None:
        now = time.monotonic()
        if step >= total or now - last[0] >= every_s:
            last[0] = now
            shown = {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)}
            log.info(f"{label}: {stage} step {step}/{total} {shown}")

    return progress
