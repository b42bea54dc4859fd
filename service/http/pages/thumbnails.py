"""Worklist thumbnails: the overlay PNG the PACS side keeps (up to 1024 px a side), made small once.

Why not send the overlay itself with a small `width`: a page of 25 studies would fetch 25 images of several
hundred kB to show them at 96 px. A thumbnail is made on first request and cached in memory by the file's
path, size and modification time (a rewritten overlay gets a new thumbnail); the cache is bounded.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from PIL import Image

SIDE = 128  # px, the longer side; shown at 64 CSS px, sharp on a 2x screen
CACHED = 512  # thumbnails (about 10 kB each)


def thumbnail(path: Path) -> bytes:
    """A PNG of at most SIDE px a side of the image at `path` (OSError when it cannot be read)."""
    stat = path.stat()
    return _thumbnail(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=CACHED)
def _thumbnail(path: str, size: int, mtime_ns: int) -> bytes:
    with Image.open(path) as image:
        image.thumbnail((SIDE, SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
