"""HTTP/1.x on the wire: parsing a request head, framing its body, writing a response head.

Pure functions over bytes (no sockets), so every refusal can be tested without a server; server.py does
the I/O. Deliberately strict, because fsbridge may face the internet directly and sits behind proxies that
may parse differently (request smuggling lives in those differences):

- request line `METHOD SP target SP HTTP/1.x`, exactly; only GET, HEAD and POST (others: 501);
- header fields `name: value` with a token name, no whitespace before the colon, no obs-fold, no control
  characters in the value; one Content-Length, one Host (required by HTTP/1.1);
- bodies only by Content-Length: any Transfer-Encoding is refused (411 for chunked, 501 for others, 400
  when the framing is ambiguous), and GET/HEAD must not carry one;
- limits on the request line (414), each header line, the number of fields and the whole head (431).

Lines may end in CRLF or a bare LF (RFC 9112 §2.2); a bare CR anywhere is refused.

The path is kept as sent, never percent-decoded: routes match the raw bytes, so `/%6detrics` is not
`/metrics` (a proxy that allows or denies by raw prefix sees what fsbridge routes on).
"""

from __future__ import annotations

import re
from http import HTTPStatus

MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
MAX_HEAD_BYTES = 32 * 1024  # request line and header fields together

METHODS = frozenset({"GET", "HEAD", "POST"})

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_METHOD_RE = re.compile(_TOKEN)
# Control characters other than HTAB, CR and LF: never valid anywhere in a head (a request-target is
# visible ASCII, a field value visible characters, SP and HTAB: RFC 9112 §3.2, RFC 9110 §5.5). Bytes
# >= 0x80 are let through, in the target as pywsgi and nginx do, in values as obs-text.
_BAD_HEAD_CHARS_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Raw header names already checked -> their lower-case form: a browser sends the same dozen every time.
_NAMES: dict[bytes, str] = {}
_VERSION_RE = re.compile(rb"HTTP/[0-9]\.[0-9]")
# The request line of every sane request, in one match; anything else is sorted out step by step.
_REQUEST_LINE_RE = re.compile(rb"(GET|HEAD|POST) ([^ \t]+) HTTP/1\.([01])")
_DIGITS_RE = re.compile(rb"[0-9]+")
_ABSOLUTE_RE = re.compile(rb"https?://[^/?]*", re.IGNORECASE)
# int() of an 18-digit number is cheap and any such length is far over every body limit.
_MAX_LENGTH_DIGITS = 18


class WireError(Exception):
    """The request cannot be served; answer `status` with `reason` (safe to send) and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead:
    """A parsed request line and header section."""

    __slots__ = ("content_length", "expect_continue", "headers", "http11", "keep_alive", "method", "path",
                 "query")

    def __init__(self, method: str, path: bytes, query: bytes, http11: bool, headers: dict[str, str],
                 content_length: int, keep_alive: bool, expect_continue: bool) -> None:
        self.method = method
        self.path = path  # as sent: not percent-decoded
        self.query = query  # raw bytes after the first "?": never log it (clientId)
        self.http11 = http11
        self.headers = headers  # lower-case names; repeated fields joined with ", "
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue


def find_head_end(buf: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(end of the last header line, start of what follows the blank line), or None while incomplete.

    `start` lets a caller that appends to `buf` rescan only the new bytes (minus 3 for a split match)."""
    # The blank line is an LF, an optional CR, an LF; the earliest one ends the head.
    start = max(0, start - 2)
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start, len(buf) if crlf < 0 else crlf)
    if lf >= 0:
        at, after = lf, lf + 2
    elif crlf >= 0:
        at, after = crlf, crlf + 3
    else:
        return None
    return (at - 1 if at and buf[at - 1] == 13 else at), after


def check_partial(buf: bytes | bytearray) -> None:
    """Limits on a head still incomplete in `buf` (leading blank lines already dropped): 414 or 431."""
    nl = buf.find(b"\n", 0, MAX_REQUEST_LINE + 2)
    if nl < 0 and len(buf) > MAX_REQUEST_LINE + 1:
        raise WireError(414, "request line too long")
    if len(buf) > MAX_HEAD_BYTES:
        raise WireError(431, "request header section too large")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request-target, both raw bytes as sent.

    Nothing is decoded or normalised: `%6d` stays `%6d`, `..` and `//` reach the router as sent, so a
    percent-encoded form of a route's name matches no route. The query is what follows the first `?`."""
    if target[:1] != b"/":
        m = _ABSOLUTE_RE.match(target)
        if m is None:
            raise WireError(400, "bad request target")
        target = target[m.end():]
        if target[:1] != b"/":
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query


def request_line_of(partial: bytes | bytearray) -> tuple[str, bytes] | None:
    """(method, raw path) of an incomplete head whose request line is complete and well formed, else None:
    what the access log can say about a request cut off before its head ended."""
    nl = partial.find(b"\n", 0, MAX_REQUEST_LINE + 2)
    if nl < 0:
        return None
    m = _REQUEST_LINE_RE.fullmatch(bytes(partial[:nl]).rstrip(b"\r"))
    if m is None:
        return None
    try:
        path, _ = split_target(m.group(2))
    except WireError:
        return None
    return m.group(1).decode("ascii"), path


def _request_line(line: bytes) -> tuple[str, bytes, bool]:
    """(method, target, is HTTP/1.1) of a request line that is not a plain GET/HEAD/POST: find out why."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise WireError(400, "bad request line")
    raw_method, _, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if _VERSION_RE.fullmatch(version):
            raise WireError(505, "HTTP version not supported")
        raise WireError(400, "bad request line")
    if not _METHOD_RE.fullmatch(raw_method):
        raise WireError(400, "bad request line")
    if raw_method.decode("ascii") not in METHODS:
        raise WireError(501, "method not implemented")
    raise WireError(400, "bad request target")  # empty, or a TAB in it


def parse_head(head: bytes) -> RequestHead:
    """Parse a head: `head` runs from the request line to the end of the last header line (the blank line
    excluded), leading blank lines already dropped. Raises WireError."""
    if _BAD_HEAD_CHARS_RE.search(head):
        raise WireError(400, "control character in request head")
    if b"\r" in head:
        head = head.replace(b"\r\n", b"\n")
        if b"\r" in head:
            raise WireError(400, "bare CR in request head")
    if len(head) > MAX_HEAD_BYTES:
        raise WireError(431, "request header section too large")
    lines = head.split(b"\n")
    line = lines[0]
    if len(line) > MAX_REQUEST_LINE:
        raise WireError(414, "request line too long")
    m = _REQUEST_LINE_RE.fullmatch(line)
    if m is not None:
        method = m.group(1).decode("ascii")
        target = m.group(2)
        http11 = m.group(3) == b"1"
    else:
        method, target, http11 = _request_line(line)

    if len(lines) > MAX_HEADERS + 1:
        raise WireError(431, "too many header fields")
    headers: dict[str, str] = {}
    names = _NAMES
    for line in lines[1:]:
        if len(line) > MAX_HEADER_LINE:
            raise WireError(431, "header field too large")
        raw_name, colon, raw_value = line.partition(b":")
        name = names.get(raw_name)
        if name is None or not colon:
            # Not a token: no colon, whitespace before it (RFC 9112 §5.1), obs-fold (§5.2), empty.
            if not colon or not raw_name or raw_name.translate(None, _TOKEN_CHARS):
                raise WireError(400, "bad header field")
            name = raw_name.decode("ascii").lower()
            if len(names) < 512:
                names[raw_name] = name
        value = raw_value.strip(b" \t").decode("latin-1")
        if name in headers:
            if name in ("content-length", "host"):
                raise WireError(400, f"repeated {name}")
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value

    length = 0
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        codings = [c.strip().lower() for c in te.split(",")]
        if cl is not None or codings[-1] != "chunked":
            raise WireError(400, "ambiguous message framing")  # RFC 9112 §6.1, §6.3
        if any(c != "chunked" for c in codings):
            raise WireError(501, "transfer coding not implemented")
        raise WireError(411, "chunked request bodies are not accepted: send Content-Length")
    if cl is not None:
        raw = cl.encode("latin-1")
        if not _DIGITS_RE.fullmatch(raw):
            raise WireError(400, "bad content-length")
        length = int(raw) if len(raw) <= _MAX_LENGTH_DIGITS else 10**_MAX_LENGTH_DIGITS
        if length and method != "POST":
            # Content in a GET has no meaning; refusing it closes a request-smuggling door (a front proxy
            # that ignores it would take the body for the next request).
            raise WireError(400, "unexpected request body")

    if http11 and "host" not in headers:
        raise WireError(400, "missing host")

    connection = headers.get("connection")
    if connection is None:
        keep_alive = http11
    else:
        tokens = {t.strip() for t in connection.lower().split(",")}
        keep_alive = "close" not in tokens and (http11 or "keep-alive" in tokens)

    expect_continue = False
    expect = headers.get("expect")
    if expect is not None and http11:  # HTTP/1.0 clients cannot mean it (RFC 9110 §10.1.1)
        if expect.strip().lower() != "100-continue":
            raise WireError(417, "expectation failed")
        expect_continue = length > 0

    path, query = split_target(target)
    return RequestHead(method, path, query, http11, headers, length, keep_alive, expect_continue)


# --- responses -------------------------------------------------------------------------------------------

_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n" for s in HTTPStatus}
# What response_head does with a handler's header, by name: send it, or drop it because framing is the
# server's job (whatever a handler says about these is replaced), or note that Date / Server are set.
_SEND, _DROP, _DATE, _SERVER = 0, 1, 2, 3
_KINDS = {"content-length": _DROP, "connection": _DROP, "transfer-encoding": _DROP, "keep-alive": _DROP,
          "date": _DATE, "server": _SERVER}
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_RE = re.compile(_TOKEN.decode())
_name_kinds: dict[str, int] = {}


def _kind(name: str) -> int:
    if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
        raise ValueError("bad response header name")
    kind = _KINDS.get(name.lower(), _SEND)
    if len(_name_kinds) < 1024:  # handlers use a few constant names; do not grow on anything else
        _name_kinds[name] = kind
    return kind


def response_head(status: int, headers: dict[str, str], content_length: int | None, connection: str | None,
                  date: str, server: str = "fsbridge") -> bytes:
    """Status line and header section of a response, the blank line included.

    `content_length` None leaves Content-Length out; `connection` is the Connection value to send (None
    for none). Date and Server are added unless the handler set them. ValueError (or UnicodeError for a
    value outside latin-1, TypeError for a value that is not a str) when a handler's header is unsafe to
    send: a name that is not a token, a value with a control character (CR/LF: header injection)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError("bad status")
        line = f"HTTP/1.1 {status} Unknown\r\n"
    out = [line]
    has_date = has_server = False
    if headers:
        kinds = _name_kinds
        for name, value in headers.items():
            kind = kinds.get(name)
            if kind is None:
                kind = _kind(name)
            if kind:
                if kind == _DROP:
                    continue
                if kind == _DATE:
                    has_date = True
                else:
                    has_server = True
            out.append(f"{name}: {value}\r\n")
        if _BAD_VALUE_RE.search("\t".join(headers.values())):
            raise ValueError("control character in a response header value")
    if not has_date:
        out.append(f"Date: {date}\r\n")
    if not has_server and server:
        out.append(f"Server: {server}\r\n")
    if content_length is not None:
        out.append(f"Content-Length: {content_length}\r\n")
    if connection is not None:
        out.append(f"Connection: {connection}\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1")
