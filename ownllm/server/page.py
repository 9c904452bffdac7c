"""The chat page at GET /: one self-contained HTML file (static/chat.html, its script and styles inline, nothing
loaded from elsewhere) that talks to /v1/chat/completions. It is open like /health (it holds no secrets; the API
calls it makes carry the key), and served with a Content-Security-Policy that allows exactly its own inline
script and style and requests to this server, so nothing a model writes into the page can run or call out."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import HTMLResponse, Response


def router() -> APIRouter:
    api = APIRouter()

    @api.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def chat_page() -> Response:
        html, headers = _page()
        return HTMLResponse(html, headers=headers)

    return api


@cache
def _page() -> tuple[str, dict[str, str]]:
    """-> (the page, its security headers)."""
    html = (files("ownllm.server") / "static" / "chat.html").read_text(encoding="utf-8")
    policy = (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer"}


def _hashes(html: str, tag: str) -> str:
    """The CSP source expressions that allow each inline <tag> element of `html` by its content's SHA-256."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                    for body in bodies)
