"""Cross-origin access (CORS): which web pages, served from elsewhere, may call the API.

By default none may: any page a user opens could otherwise drive the model on their machine and
read its answers. The chat page at / is served by the server itself, so it needs no CORS. With
--cors_origins, the listed origins ("*": any) get CORS headers on every response, and their
browsers' preflight OPTIONS requests are answered before any route or API-key check (a preflight
never carries the key)."""

from typing import Optional, Sequence

from aiohttp import web

ALLOWED_METHODS = "GET, POST, OPTIONS"
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer


def parse_origins(value) -> Sequence[str]:
    """--cors_origins as a list: None or "" for none, "*" for any, else a comma-separated list."""
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    origins = [str(item).strip().rstrip("/") for item in items if str(item).strip()]
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"--cors_origins: {origin!r} is not an origin; give e.g. "
                             f"'https://example.com,http://localhost:3000', or '*' for any")
    return origins


class Cors:
    def __init__(self, origins: Sequence[str]):
        self.origins = set(origins)

    def allowed(self, origin: Optional[str]) -> Optional[str]:
        """The Access-Control-Allow-Origin value for this request's Origin, or None."""
        if not origin or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def install(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._add_headers)

    def preflight(self, request: web.Request) -> Optional[web.Response]:
        """The answer to a browser's preflight, or None when this is not one."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        if self.allowed(request.headers.get("Origin")) is None:
            return web.Response(status=403, text="this origin may not call the API (see --cors_origins)")
        asked = request.headers.get("Access-Control-Request-Headers", "authorization, content-type")
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": ALLOWED_METHODS,
                                                 "Access-Control-Allow-Headers": asked,
                                                 "Access-Control-Max-Age": MAX_AGE})

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self.allowed(request.headers.get("Origin"))
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            if origin != "*":
                response.headers["Vary"] = "Origin"
