"""GET /logo.svg: the integration's logo in retailCRM's list of integrations.

retailCRM accepts only an SVG URL as a module's logo and loads it from there, so fsbridge serves its own
rather than depend on someone else's host staying up. Drawn here: two nodes joined by a bridge arc over a
handset-green tile.
"""

from __future__ import annotations

from fsbridge.http.app import Request, Response, Router

DEFAULT_PATH = "/logo.svg"

LOGO_SVG = b"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
  <title>fsbridge</title>
  <rect width="64" height="64" rx="14" fill="#1f7a4d"/>
  <path d="M12 42 Q32 10 52 42" fill="none" stroke="#ffffff" stroke-width="5" stroke-linecap="round"/>
  <line x1="8" y1="46" x2="56" y2="46" stroke="#ffffff" stroke-width="4" stroke-linecap="round"/>
  <line x1="22" y1="31" x2="22" y2="46" stroke="#ffffff" stroke-width="3"/>
  <line x1="32" y1="26" x2="32" y2="46" stroke="#ffffff" stroke-width="3"/>
  <line x1="42" y1="31" x2="42" y2="46" stroke="#ffffff" stroke-width="3"/>
  <circle cx="12" cy="46" r="6" fill="#ffd24a"/>
  <circle cx="52" cy="46" r="6" fill="#ffd24a"/>
</svg>
"""


class LogoHandler:
    def __init__(self, svg: bytes = LOGO_SVG) -> None:
        self.svg = svg

    def register(self, router: Router, path: str = DEFAULT_PATH) -> None:
        # parse_query=False: whoever embeds the logo may add cache-busting parameters.
        router.add({"GET"}, path, self, parse_query=False)

    def __call__(self, request: Request) -> Response:
        return Response(200, {
            "Content-Type": "image/svg+xml",
            "Cache-Control": "public, max-age=86400",
            # An SVG can carry script; this one does not, and the header keeps it that way if edited.
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        }, self.svg)
