"""The chat page at GET /: a small page shipped in the package (llama/serve/static, no build step,
nothing loaded from elsewhere) that chats with the served model through /v1/chat/completions,
streamed.

Its three files are read once, when the app is made. Each is answered with a Content-Security-Policy
that lets the page run only this server's own script file and reach only this server: no inline
script, nothing from another host. The page puts what the model and the user write into the page as
text (chat.js sets textContent, never innerHTML), so a model's `<script>` shows as text; the policy
is a second wall, should markup ever reach the page."""

from importlib import resources

from aiohttp import web

# URL path -> (file in static/, content type). Paths the page names relatively (static/chat.js,
# v1/chat/completions), so it also works behind a proxy that serves the server under a prefix.
FILES = {
    "/": ("index.html", "text/html"),
    "/static/chat.js": ("chat.js", "text/javascript"),
    "/static/chat.css": ("chat.css", "text/css"),
}

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",  # whatever is not named below: nothing
    "script-src 'self'",  # chat.js from this server; inline script and eval never run
    "style-src 'self'",
    "connect-src 'self'",  # fetch only to this server's API
    "img-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",  # no other site may frame the page
])

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",  # the browser takes each file as its content type says
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a newer server's page is seen at once
}


def add_page(app: web.Application) -> None:
    """Registers GET / and the page's static files."""
    static = resources.files(__package__) / "static"
    for path, (name, content_type) in FILES.items():
        app.router.add_get(path, _file_handler((static / name).read_bytes(), content_type))


def _file_handler(body: bytes, content_type: str):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)

    return handler
