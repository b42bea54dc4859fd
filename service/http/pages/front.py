"""The service's front page text (`/`, BentoML's API reference page): what this project is, and where to go.

BentoML fills the page's introduction from the OpenAPI document's `info.description`, which it takes from
the bento's description, or from its own template ("a Machine Learning Service created with BentoML", badge
images from the internet, a BentoML contact) when the service runs from source. `auth.document_security`
puts this text there in both cases; bentofile.yaml names the same file as the bento's description.
BentoML's page itself loads an analytics script from the internet and a GitHub corner; `front_html` is
the same page without them (a hospital network's service calls no third party), which `auth.BearerAuth`
serves at `/`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FRONT_PAGE_FILE = Path(__file__).with_name("front.md")
FRONT_HTML_FILE = Path(__file__).with_name("templates") / "front.html"


@lru_cache(maxsize=1)
def front_page() -> str:
    """The front page's Markdown (read once; it ships with the code)."""
    return FRONT_PAGE_FILE.read_text(encoding="utf-8").strip()


@lru_cache(maxsize=1)
def front_html() -> bytes:
    """The API reference page (Swagger UI from BentoML's static files, reading ./docs.json)."""
    return FRONT_HTML_FILE.read_bytes()
