"""Asset metadata the UI shows: the inline preview stays under the UI's inline limit."""

import base64

import numpy as np
import pytest

from mgd3_assets.metadata import INLINE_MARKDOWN_CHARS, preview_markdown, thumbnails_markdown


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (20, 1, 32, 32), (20, 3, 256, 256)])
def test_the_preview_fits_inline_where_the_full_grid_does_not(shape):
    # Noise is the least compressible content a PNG thumbnail can have: the worst case.
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    preview = preview_markdown(images, "caption").value
    assert len(preview) < INLINE_MARKDOWN_CHARS
    png = base64.b64decode(preview.split("base64,", 1)[1].rstrip(")"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(thumbnails_markdown(images, "caption").value) > INLINE_MARKDOWN_CHARS  # collapsed in the UI
