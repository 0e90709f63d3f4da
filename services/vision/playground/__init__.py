"""The playground: one static page (plain HTML, JS and CSS in this folder, no build step)
that the OpenAI-compatible API serves at the HTTP port's root. The page itself needs no
token; every API call it makes sends the token typed into it (kept in the page's memory
only)."""

from __future__ import annotations

from importlib.resources import files

PAGE = "/"
ASSETS_PREFIX = "/playground/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    # only this server's own scripts, styles and API; images the page makes itself
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}


def assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, content type) of the page and its files, read once."""
    folder = files(__package__)
    out = {}
    for name in ("index.html", "playground.js", "playground.css"):
        suffix = name[name.rindex("."):]
        path = PAGE if name == "index.html" else ASSETS_PREFIX + name
        out[path] = (folder.joinpath(name).read_bytes(), CONTENT_TYPES[suffix])
    return out
