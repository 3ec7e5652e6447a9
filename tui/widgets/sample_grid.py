"""Images as terminal text: two pixel rows per character cell with the upper half block (foreground: the
upper pixel, background: the lower one), so a 16x16 digit takes 16 columns and 8 lines."""

from __future__ import annotations

import numpy as np
from rich.text import Text

UPPER_HALF = "\u2580"


def _grey(v: int) -> str:
    return f"#{v:02x}{v:02x}{v:02x}"


def halfblock_grid(images: np.ndarray, cols: int = 4, captions: list[str] | None = None) -> Text:
    """Images ``[n, c, h, w]`` in ``[-1, 1]`` (the first channel shown, in grey) as a grid of ``cols``
    per row, one blank column between images, an optional caption line above each row of images."""
    u8 = ((np.asarray(images)[:, 0] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    n, h, w = u8.shape
    if h % 2:
        u8 = np.concatenate([u8, np.zeros((n, 1, w), np.uint8)], axis=1)
        h += 1
    text = Text(no_wrap=True, overflow="crop")
    for start in range(0, n, cols):
        group = range(start, min(n, start + cols))
        if captions:
            text.append(" ".join(captions[i][:w].ljust(w) for i in group) + "\n", style="dim")
        for y in range(0, h, 2):
            for k, i in enumerate(group):
                if k:
                    text.append(" ")
                for x in range(w):
                    top, bottom = int(u8[i, y, x]), int(u8[i, y + 1, x])
                    text.append(UPPER_HALF, style=f"{_grey(top)} on {_grey(bottom)}")
            text.append("\n")
    text.rstrip()
    return text
