"""`/ui`: the status page, three static files shipped in the package (no CDN, no build step).

The page holds no data: it signs in with the admin token (kept in the tab's sessionStorage)
and reads the same admin API as the CLI. It is served with a strict Content-Security-Policy
(its own scripts and styles only, no inline code, fetches to berthd only, never framed), so
text from the API (endpoint names, event messages, logs) can never run as code in it.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
UI_FILES = web.AppKey("ui_files", dict[str, bytes])


def load_files() -> dict[str, bytes]:
    folder = resources.files("berth.daemon") / "ui"
    return {name: (folder / name).read_bytes() for name in FILES}


async def serve_file(request: web.Request) -> web.Response:
    name = request.match_info.get("file", "index.html")
    body = request.app[UI_FILES].get(name)
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(body=body, content_type=FILES[name], charset="utf-8", headers=HEADERS)


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def add_ui(app: web.Application) -> None:
    app[UI_FILES] = load_files()
    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", serve_file)
    app.router.add_get("/ui/{file}", serve_file)
