"""A deliberately small HTTP layer: typed requests and responses, a router, a WSGI adapter.

fsbridge answers a handful of GET callbacks from retailCRM and serves recordings; a web framework would
add dependencies and hide the details that matter here (query parsing, HEAD, streaming, what is logged).

Routes match the raw path (never percent-decoded: `/%6detrics` is not `/metrics`), and each route says
which methods it takes and how large a body: a request it would refuse is refused from its head alone,
before any body is read (server.py).
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_plus

log = logging.getLogger("fsbridge.http")

# A real callback has four or five parameters; a request with hundreds is an attack on parse time.
MAX_QUERY_FIELDS = 50
# The body limit of a route that takes POST and names none of its own (a form is a few hundred bytes).
DEFAULT_MAX_BODY = 16 * 1024


_CGI_HEADERS = {"CONTENT_TYPE", "CONTENT_LENGTH"}


def _environ_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in _CGI_HEADERS else "HTTP_" + key


class Headers(Mapping[str, str]):
    """Read-only request headers with case-insensitive names (lower-case when iterated)."""

    __slots__ = ("_environ", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._environ: Mapping[str, Any] | None = None
        self._items: dict[str, str] | None = {name.lower(): value for name, value in items}

    @classmethod
    def from_lowercase(cls, items: dict[str, str]) -> Headers:
        """Headers whose names are lower-case already (the server's parser makes them so): not copied."""
        headers = cls()
        headers._items = items
        return headers

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Headers:
        """A view of a WSGI environ: a lookup is one dict access, nothing is copied up front."""
        headers = cls()
        headers._environ, headers._items = environ, None
        return headers

    def _all(self) -> dict[str, str]:
        if self._items is None:
            env = self._environ or {}
            self._items = {
                (k[5:] if k.startswith("HTTP_") else k).replace("_", "-").lower(): str(v)
                for k, v in env.items()
                if k.startswith("HTTP_") or (k in _CGI_HEADERS and v)
            }
        return self._items

    def _lookup(self, name: str) -> str | None:
        if self._environ is not None:
            key = _environ_key(name)
            value = self._environ.get(key)
            if value is None or (value == "" and key in _CGI_HEADERS):  # CGI style: empty means absent
                return None
            return str(value)
        return self._all().get(name.lower())

    def __getitem__(self, name: str) -> str:
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        value = self._lookup(name)
        return default if value is None else value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"Headers({self._all()!r})"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    # Never log this: it carries clientId, the only secret of retailCRM's callbacks.
    query: dict[str, str]
    headers: Headers
    remote_addr: str
    body: bytes = b""


class OpenFile(Protocol):
    """What FileBody reads from: a file object, or a lease on a shared descriptor (open_files.py)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class FileBody:
    """`length` bytes of an open binary file from `offset`, read lazily in chunks; owns (closes) the file.

    `head`, when given, stands in for the file's first len(head) bytes (a repaired WAV header: see
    recordings.wav_header_fix); the file itself is never written.

    Any WSGI server can iterate it; fsbridge's own server (server.py) recognises it and sends the same
    bytes with os.sendfile instead, which is the point of returning this rather than a generator.
    """

    __slots__ = ("chunk_size", "file", "head", "length", "offset")

    def __init__(self, file: OpenFile, offset: int, length: int, chunk_size: int = 256 * 1024,
                 head: bytes = b"") -> None:
        self.file = file
        self.offset = offset
        self.length = length
        self.chunk_size = chunk_size
        self.head = head

    def head_part(self) -> bytes:
        """What of `head` falls within the range: it is sent first, the file from its end on."""
        if self.offset >= len(self.head):
            return b""
        return self.head[self.offset:min(len(self.head), self.offset + self.length)]

    def __iter__(self) -> Iterator[bytes]:
        fd = self.file.fileno()
        pos, remaining = self.offset, self.length
        if self.head:
            part = self.head_part()
            pos, remaining = pos + len(part), remaining - len(part)
            if part:
                yield part
        while remaining > 0:
            data = os.pread(fd, min(self.chunk_size, remaining), pos)
            if not data:
                # The file shrank under us: fail loudly so the server drops the connection instead of
                # leaving a client waiting for bytes that were promised in Content-Length.
                raise EOFError("file shorter than announced")
            pos += len(data)
            remaining -= len(data)
            yield data

    def close(self) -> None:
        self.file.close()


Body = bytes | Iterable[bytes]


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Body = b""

    @classmethod
    def text(cls, status: int, message: str = "", headers: Mapping[str, str] | None = None) -> Response:
        """A short plain-text answer; `message` defaults to the status phrase."""
        hdrs = {"Content-Type": "text/plain; charset=utf-8"}
        if headers:
            hdrs.update(headers)
        return cls(status, hdrs, ((message or HTTPStatus(status).phrase) + "\n").encode())

    @classmethod
    def empty(cls, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, dict(headers or {}), b"")


Handler = Callable[[Request], Response]

_STATUS_LINES = {int(s): f"{int(s)} {s.phrase}" for s in HTTPStatus}


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    path: str
    prefix: bool
    handler: Handler
    redact: Callable[[str], str] | None
    parse_query: bool
    max_body: int
    literal_plus: frozenset[str]


class BadRequest(Exception):
    """The request cannot be turned into a `Request`; the message is safe to send to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_client_id(request: Request, expected: str) -> Response | None:
    """403 unless the `clientId` query parameter equals `expected` (same_secret: the secret cannot be
    guessed byte by byte from response times); None when it does."""
    if not same_secret(request.query.get("clientId", ""), expected):
        return Response.text(403, "forbidden")
    return None


def same_secret(given: str, expected: str) -> bool:
    """Whether a secret a client sent (clientId, session, CSRF token) is `expected`; never for an empty one.

    hmac.compare_digest takes the same time wherever the first difference is; compared as bytes, since
    it refuses non-ASCII str (any text a client sends must get a plain no, not an exception)."""
    return bool(expected) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _close(body: object) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame: enough to find the bug, without the exception's message, which
    may quote request data (clientId among it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{os.path.basename(last.filename)}:{last.lineno}"


def loggable(text: str, limit: int = 200) -> str:
    """A client-controlled string made safe for a one-line log: no control characters, bounded length."""
    out = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


def _keep_leading_plus(raw_query: bytes, names: frozenset[str]) -> bytes:
    """`raw_query` with the leading `+` of the parameters `names` made a real plus sign (`%2B`).

    retailCRM's guide shows `phone=+79121234567`: in a form-encoded query a literal `+` is a space, and
    the number would be dialled without its plus. Only a leading one is recovered: a `+` anywhere else
    stays a space (a separator the phone check ignores)."""
    fields = raw_query.split(b"&")
    for i, item in enumerate(fields):
        name, eq, value = item.partition(b"=")
        if eq and value[:1] == b"+" and unquote_plus(name.decode("latin-1"), encoding="latin-1") in names:
            fields[i] = name + b"=%2B" + value[1:]
    return b"&".join(fields)


def parse_form(raw: bytes) -> dict[str, str]:
    """A query string or an urlencoded form body as a dict.

    BadRequest for one that is not UTF-8, a repeated field, or more than MAX_QUERY_FIELDS fields: every
    callback's query and every form fsbridge reads goes through here."""
    if not raw:
        return {}
    try:
        # A query is ASCII on the wire; percent-escapes decode as UTF-8 (parse_qsl on bytes would re-encode
        # them as ASCII and refuse any non-ASCII value).
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS,
                          encoding="utf-8", errors="strict")
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:
                # Two values for one name: proxies and apps disagree on which one wins, the classic
                # way to slip a second clientId or phone past a check.
                raise BadRequest("repeated query parameter")
            form[name] = value
    except (UnicodeError, ValueError):  # not UTF-8, or more than MAX_QUERY_FIELDS fields
        raise BadRequest("malformed path or query") from None
    return form


class Router:
    """Maps (methods, exact path or path prefix) to handlers; answers 404/405/413/500 itself.

    Exact paths win over prefixes, the longest prefix wins among prefixes; paths are matched as sent (not
    percent-decoded). A route that allows GET also answers HEAD (the body is dropped by the server, the
    handler's headers are kept). A route takes a request body only up to its `max_body`: 0 for a route
    without POST, `max_body_bytes` by default for one with it.
    """

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_BODY) -> None:
        self._exact: dict[str, _Route] = {}
        self._prefixes: list[_Route] = []
        self.max_body_bytes = max_body_bytes

    def add(
        self,
        methods: Iterable[str],
        path: str,
        handler: Handler,
        *,
        prefix: bool = False,
        redact: Callable[[str], str] | None = None,
        parse_query: bool = True,
        max_body: int | None = None,
        literal_plus: Iterable[str] = (),
    ) -> None:
        """Register `handler`. `redact(path)` rewrites the path for the access log (e.g. to hide a
        capability token in it). parse_query=False hands the handler an empty query whatever was sent
        (not even a malformed or repeated parameter is refused): for URLs that others may decorate.
        `max_body`: the largest request body the route takes (a larger one is refused with 413 before it
        is read). `literal_plus`: query parameters whose leading `+` is a plus sign, not a space."""
        wanted = {m.upper() for m in methods}
        if "GET" in wanted:
            wanted.add("HEAD")
        if max_body is None:
            max_body = self.max_body_bytes if "POST" in wanted else 0
        route = _Route(frozenset(wanted), path, prefix, handler, redact, parse_query, max(0, max_body),
                       frozenset(literal_plus))
        if prefix:
            self._prefixes.append(route)
            self._prefixes.sort(key=lambda r: len(r.path), reverse=True)
        else:
            self._exact[path] = route

    def match(self, path: str) -> _Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        for candidate in self._prefixes:
            if path.startswith(candidate.path):
                return candidate
        return None

    def loggable_path(self, path: str) -> str:
        route = self.match(path)
        if route is not None and route.redact is not None:
            try:
                path = route.redact(path)
            except Exception:
                path = route.path + "..."
        return loggable(path)

    @staticmethod
    def refusal(route: _Route | None, method: str, body_length: int) -> Response | None:
        """The answer to a request its route does not take (404, 405, 413), decided from its head alone;
        None when the route takes it."""
        if route is None:
            return Response.text(404, "not found")
        if method not in route.methods:
            return Response.text(405, "method not allowed", {"Allow": ", ".join(sorted(route.methods))})
        if body_length > route.max_body:
            return Response.text(413, "request body too large")
        return None

    def call(self, route: _Route, request: Request) -> Response:
        """Run the handler of `route` (already checked with `refusal`): its answer, or 500 if it failed."""
        try:
            return route.handler(request)
        except Exception as exc:
            log.error(
                "%s %s: handler failed: %s at %s",
                request.method,
                self.loggable_path(request.path),
                type(exc).__name__,
                _where(exc),
            )
            return Response.text(500, "internal error")

    @staticmethod
    def decode_path(path: bytes) -> str:
        """The request path as text (still percent-encoded as sent); BadRequest unless it is UTF-8."""
        try:
            return path.decode("utf-8")
        except UnicodeError:
            raise BadRequest("malformed path or query") from None

    @staticmethod
    def parse_query(route: _Route | None, raw_query: bytes) -> dict[str, str]:
        """The query of a request for `route` from its raw bytes.

        BadRequest for a query that is not UTF-8, a repeated parameter, or more than MAX_QUERY_FIELDS
        fields. Shared by the WSGI adapter and fsbridge's own server (server.py)."""
        if not raw_query or (route is not None and not route.parse_query):
            return {}
        if route is not None and route.literal_plus:
            raw_query = _keep_leading_plus(raw_query, route.literal_plus)
        return parse_form(raw_query)

    def _request(self, environ: dict[str, Any]) -> tuple[_Route, Request] | Response:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        # The raw path where the server gives it (RAW_URI: gunicorn; REQUEST_URI: uWSGI); PATH_INFO is
        # percent-decoded already (PEP 3333: latin-1 code points of the decoded bytes).
        raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        try:
            if raw_uri:
                raw_path = str(raw_uri).partition("?")[0].encode("latin-1")
            else:
                raw_path = str(environ.get("PATH_INFO", "")).encode("latin-1")
            raw_query = str(environ.get("QUERY_STRING", "")).encode("latin-1")
        except UnicodeError:
            raise BadRequest("malformed path or query") from None
        path = self.decode_path(raw_path)
        route = self.match(path)
        length = str(environ.get("CONTENT_LENGTH") or "0")
        refused = self.refusal(route, method, int(length) if length.isdigit() else 0)
        if refused is not None:
            return refused
        assert route is not None
        query = self.parse_query(route, raw_query)
        body = b""
        if method not in ("GET", "HEAD", "OPTIONS") and route.max_body:
            stream = environ.get("wsgi.input")
            if stream is not None:
                body = stream.read(route.max_body + 1)
                if len(body) > route.max_body:
                    raise BadRequest("request body too large", 413)
        return route, Request(method, path, query, Headers.from_environ(environ),
                              str(environ.get("REMOTE_ADDR", "")), body)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI application."""
        head = str(environ.get("REQUEST_METHOD", "")).upper() == "HEAD"
        try:
            routed = self._request(environ)
        except BadRequest as exc:
            response = Response.text(exc.status, str(exc))
        else:
            response = routed if isinstance(routed, Response) else self.call(*routed)

        body = response.body
        headers = response.headers
        iterable: Iterable[bytes]
        if isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
            bodyless = response.status in (204, 304) or response.status < 200
            if not bodyless and not any(k.lower() == "content-length" for k in headers):
                headers = {**headers, "Content-Length": str(len(data))}
            iterable = [] if head or bodyless else [data]
        elif head:
            _close(body)
            iterable = []
        else:
            iterable = body

        status = _STATUS_LINES.get(response.status) or f"{response.status} Unknown"
        try:
            start_response(status, list(headers.items()))
        except Exception as exc:
            # e.g. a CR/LF in a header value, refused by the server: never send half a response.
            _close(iterable)
            log.error("%s: bad response headers: %s at %s", environ.get("REQUEST_METHOD"), type(exc).__name__,
                      _where(exc))
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "15")],
                sys.exc_info(),
            )
            return [b"internal error\n"]
        return iterable
