"""``GET /``: the playground page, one prompt streamed through many models (base + adapters) side by side.

The page is one self-contained HTML file (``static/playground.html``: inline CSS and JS, no external
assets) that talks to the server only through the public API: ``GET /v1/models`` and one concurrent
streaming ``POST /v1/chat/completions`` or ``/v1/completions`` per selected model. A Content-Security-Policy
header holds the browser to that: scripts only the page's own (by hash), network only the same origin.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = "static/playground.html"

router = APIRouter()


@functools.cache
def page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (read once, from the installed package)."""
    html = files("blora.server").joinpath(PAGE).read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts
    )
    csp = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    html, csp = page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})
