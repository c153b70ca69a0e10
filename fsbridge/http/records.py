"""GET|HEAD /records/<signature>/<uuid>.<ext>: the record proxy behind calls/upload's `recordUrl`.

Browsers seek audio with Range requests and need 206 answers, which gevent.pywsgi leaves to the app;
conditional requests (ETag / Last-Modified) let players revalidate instead of downloading again.

Behind nginx, `accel_redirect_prefix` makes fsbridge only authorise the request and hand the transfer to
nginx (zero-copy, Range and conditionals done by nginx), except a WAV whose header needs repair (a recording
cut short by a FreeSWITCH crash), which fsbridge serves itself. The matching nginx config, added to the server
block of conf/nginx/fsbridge.conf (whose `location /records/` forwards to fsbridge's public listener):

    location /_records/ {
        internal;
        alias /var/lib/freeswitch/recordings/;   # the recordings_dir, trailing slash included
        types { audio/wav wav; audio/mpeg mp3; audio/ogg ogg; }
        add_header Cache-Control private;
    }
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from functools import lru_cache
from typing import Literal

from fsbridge.http.app import FileBody, Request, Response, Router
from fsbridge.record_links import PATH_PREFIX, RecordLinks, parse_path, redact_path
from fsbridge.recordings import OpenRecording, Recordings, wav_header_fix

_NUM_RE = re.compile(r"[0-9]+")
# int() refuses strings over 4300 digits, and any offset this large is past the end of any file anyway.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS


def _num(text: str) -> int:
    return int(text) if len(text) <= _MAX_DIGITS else _HUGE


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One `bytes=` range -> (first, last) inclusive and clipped to the file; "unsatisfiable";
    or None when the header is to be ignored (invalid syntax, other unit, several ranges)."""
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        # Several ranges would need multipart/byteranges. RFC 9110 §14.2 lets a server ignore Range and
        # answer 200 with the whole file; audio players only ever ask for one range.
        return None
    first_s, dash, last_s = (part.strip() for part in spec.partition("-"))
    if not dash:
        return None
    if not first_s:
        if not _NUM_RE.fullmatch(last_s):
            return None
        suffix = _num(last_s)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    if not _NUM_RE.fullmatch(first_s) or (last_s and not _NUM_RE.fullmatch(last_s)):
        return None
    first = _num(first_s)
    if last_s and _num(last_s) < first:
        return None
    if first >= size:
        return "unsatisfiable"
    last = min(_num(last_s), size - 1) if last_s else size - 1
    return first, last


def _etag_list(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _weak_match(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes are ignored."""
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in _etag_list(header))


@lru_cache(maxsize=1024)
def _format_date(mtime: int) -> str:
    # Cached: a recording's date never changes, and formatting it is a measurable part of a request.
    return formatdate(mtime, usegmt=True)


def _http_date(header: str) -> float | None:
    if not header:
        return None
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp()


class RecordsHandler:
    """Serves signed record links from `recordings`.

    chunk_size applies when the server streams by reading (any WSGI server, or zero_copy off).
    """

    def __init__(
        self,
        links: RecordLinks,
        recordings: Recordings,
        *,
        accel_redirect_prefix: str | None = None,
        chunk_size: int = 256 * 1024,
        locate: Callable[[str], str | None] | None = None,
    ) -> None:
        if accel_redirect_prefix is not None and not (
            accel_redirect_prefix.startswith("/") and accel_redirect_prefix.endswith("/")
        ):
            raise ValueError("accel_redirect_prefix must start and end with '/'")
        self.links = links
        self.recordings = recordings
        self.accel_redirect_prefix = accel_redirect_prefix
        self.chunk_size = chunk_size
        # record id -> its directory under the recordings directory ("" flat), None: not to be served.
        # Found from the call (its RECORD_STOP path), never from the URL.
        self.locate = locate

    def register(self, router: Router) -> None:
        # The query is not ours: retailCRM or a player may append anything, even twice.
        router.add({"GET", "HEAD"}, PATH_PREFIX, self, prefix=True, redact=redact_path, parse_query=False)

    def __call__(self, request: Request) -> Response:
        # Allow-lists first (parse_path), then the signature, and only then the filesystem.
        ref = parse_path(request.path)
        if ref is None:
            # /records/<uuid>.<ext> with no signature segment: a link that was never ours.
            missing_sig = parse_path(PATH_PREFIX + "-/" + request.path.removeprefix(PATH_PREFIX)) is not None
            return Response.text(403, "forbidden") if missing_sig else Response.text(404, "not found")
        if not self.links.verify(ref.signature, ref.record_id, ref.ext):
            return Response.text(403, "forbidden")

        subdir = self.locate(ref.record_id) if self.locate is not None else ""
        if subdir is None:
            return Response.text(404, "not found")
        rec = self.recordings.open(ref.record_id, ref.ext, subdir)
        if rec is None:
            return Response.text(404, "not found")
        try:
            if self.accel_redirect_prefix is not None and not self._repaired_head(rec):
                rec.file.close()
                return self._accel_redirect(ref.record_id, rec, subdir)
            # Served here (also behind nginx when the WAV's header needs repair: nginx would send it as it is,
            # and a recording cut short by a FreeSWITCH crash would play as silence).
            response = self._respond(request, ref.record_id, rec)
        except BaseException:
            rec.file.close()
            raise
        if not isinstance(response.body, FileBody):
            rec.file.close()
        return response

    def _accel_redirect(self, record_id: str, rec: OpenRecording, subdir: str) -> Response:
        name = f"{record_id}.{rec.ext}"
        where = f"{subdir}/{name}" if subdir else name
        return Response.empty(200, {
            "X-Accel-Redirect": f"{self.accel_redirect_prefix}{where}",
            "Content-Type": rec.content_type,
            "Content-Disposition": f'inline; filename="{name}"',
            "Cache-Control": "private",
        })

    @staticmethod
    def _repaired_head(rec: OpenRecording) -> bytes:
        """The repaired header of a WAV cut short (see wav_header_fix), b"" for any other file; once per open file."""
        memo = rec.file.memo
        head: bytes | None = memo.get("head")
        if head is None:
            head = memo["head"] = wav_header_fix(rec.file.fileno(), rec.size) if rec.ext == "wav" else b""
        return head

    def _respond(self, request: Request, record_id: str, rec: OpenRecording) -> Response:
        # The headers depend on the file alone: worked out once per open file (see open_files.py).
        memo = rec.file.memo
        headers: dict[str, str] | None = memo.get("headers")
        if headers is None:
            headers = memo["headers"] = {
                "Content-Type": rec.content_type,
                "Accept-Ranges": "bytes",
                "ETag": f'"{rec.mtime_ns:x}-{rec.size:x}"',
                "Last-Modified": _format_date(int(rec.mtime)),
                "Cache-Control": "private",
                "Content-Disposition": f'inline; filename="{record_id}.{rec.ext}"',
                "X-Content-Type-Options": "nosniff",
            }
            memo["whole"] = {**headers, "Content-Length": str(rec.size)}
        # A recording cut short by a FreeSWITCH crash claims no data in its header: served repaired.
        head = self._repaired_head(rec)
        etag = headers["ETag"]
        hdrs = request.headers

        # RFC 9110 §13.2.2: If-None-Match, when present, decides alone; If-Modified-Since otherwise.
        inm = hdrs.get("if-none-match")
        if inm is not None:
            not_modified = _weak_match(inm, etag)
        else:
            ims = _http_date(hdrs.get("if-modified-since", ""))
            not_modified = ims is not None and int(rec.mtime) <= ims
        if not_modified:
            return Response.empty(304, {k: headers[k] for k in ("ETag", "Last-Modified", "Cache-Control")})

        size = rec.size
        if request.method == "HEAD":
            # Range is defined for GET only (RFC 9110 §14.2): HEAD describes the whole file.
            return Response.empty(200, memo["whole"])

        wanted = parse_range(hdrs["range"], size) if "range" in hdrs else None
        if_range = hdrs.get("if-range")
        if wanted is not None and if_range is not None and not self._if_range_holds(if_range, etag, rec):
            wanted = None  # the client's copy is stale: send the whole new file
        if wanted == "unsatisfiable":
            return Response.text(416, "range not satisfiable", {
                "Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes", "Cache-Control": "private",
            })
        if wanted is None:
            return Response(200, dict(memo["whole"]), FileBody(rec.file, 0, size, self.chunk_size, head))
        first, last = wanted
        length = last - first + 1
        return Response(206, {**headers, "Content-Length": str(length),
                              "Content-Range": f"bytes {first}-{last}/{size}"},
                        FileBody(rec.file, first, length, self.chunk_size, head))

    @staticmethod
    def _if_range_holds(value: str, etag: str, rec: OpenRecording) -> bool:
        value = value.strip()
        if value.startswith(('"', "W/")):
            return value == etag  # strong comparison: a weak tag never validates a range
        when = _http_date(value)
        return when is not None and int(when) == int(rec.mtime)
