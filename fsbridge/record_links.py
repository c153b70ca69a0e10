"""Self-authenticating recording links for retailCRM's `recordUrl`.

retailCRM stores the URL forever and fetches it (or lets the user's browser fetch it) with no credentials
of ours, possibly appending query parameters of its own. So the proof travels in the path:

    {public_url}/records/{signature}/{uuid}.{ext}

signature = base64url(HMAC-SHA256(secret, "fsbridge-record-v1" NUL uuid NUL ext))[:22], i.e. 132 bits:
far beyond guessing over HTTP, short enough for logs and the CRM's column.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

# FreeSWITCH's uuids are lowercase; anything else is not one of ours.
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SIGNATURE_RE = re.compile(r"[A-Za-z0-9_-]{22}")
CONTENT_TYPES: dict[str, str] = {
    # Stated explicitly: mimetypes says audio/x-wav, which some players refuse.
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
}
EXTENSIONS = frozenset(CONTENT_TYPES)
PATH_PREFIX = "/records/"

_DOMAIN = b"fsbridge-record-v1"
_SIG_LEN = 22


def valid_record_id(record_id: str) -> bool:
    return isinstance(record_id, str) and UUID_RE.fullmatch(record_id) is not None


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A parsed record path: id and format allow-listed, signature not yet verified."""

    signature: str
    record_id: str
    ext: str


def parse_path(path: str) -> RecordRef | None:
    """`/records/<sig>/<uuid>.<ext>` -> parts, or None unless every part matches its allow-list.

    This runs before anything else touches the request: nothing that fails here can reach the filesystem.
    """
    if not path.startswith(PATH_PREFIX):
        return None
    parts = path[len(PATH_PREFIX):].split("/")
    if len(parts) != 2:
        return None
    signature, filename = parts
    record_id, dot, ext = filename.partition(".")
    if not dot or not valid_record_id(record_id) or ext not in EXTENSIONS:
        return None
    # The signature's shape is left to verify(): a malformed one is a bad signature (403), not a 404.
    return RecordRef(signature, record_id, ext)


def redact_path(path: str) -> str:
    """The access log's view of a record path: the signature is a credential for that recording."""
    if not path.startswith(PATH_PREFIX):
        return path
    _, _, rest = path[len(PATH_PREFIX):].partition("/")
    return f"{PATH_PREFIX}*/{rest}"


class RecordLinks:
    """Builds and checks record links.

    `previous_secrets` keep links signed before a secret rotation playable: the CRM never re-fetches
    the URLs it stored.
    """

    def __init__(self, public_url: str, secret: str, previous_secrets: Sequence[str] = ()) -> None:
        if len(secret) < 16:
            raise ValueError("record link secret must be at least 16 characters")
        if not public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must be an http(s) URL, got {public_url!r}")
        self.public_url = public_url.rstrip("/")
        self._keys = [k.encode() for k in (secret, *previous_secrets) if k]
        # A player seeking through one recording re-sends the same link many times. Bounded, and an
        # attacker filling it with junk only costs the HMACs he would have cost anyway.
        self._verify_cached = lru_cache(maxsize=4096)(self._verify)

    @staticmethod
    def _mac(key: bytes, record_id: str, ext: str) -> str:
        msg = b"\0".join((_DOMAIN, record_id.encode(), ext.encode()))
        digest = hmac.new(key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii")[:_SIG_LEN]

    def _signature(self, record_id: str, ext: str) -> str:
        return self._mac(self._keys[0], record_id, ext)

    def path(self, record_id: str, ext: str = "wav") -> str:
        if not valid_record_id(record_id):
            raise ValueError(f"not a recording id: {record_id!r}")
        if ext not in EXTENSIONS:
            raise ValueError(f"unsupported recording format: {ext!r}")
        return f"{PATH_PREFIX}{self._signature(record_id, ext)}/{record_id}.{ext}"

    def url(self, record_id: str, ext: str = "wav") -> str:
        """The link to put in calls/upload's `recordUrl`."""
        return self.public_url + self.path(record_id, ext)

    def verify(self, signature: str, record_id: str, ext: str) -> bool:
        """True if `signature` was made by one of our secrets for exactly this id and format."""
        if not (isinstance(signature, str) and isinstance(record_id, str) and isinstance(ext, str)):
            return False
        return self._verify_cached(signature, record_id, ext)

    def _verify(self, signature: str, record_id: str, ext: str) -> bool:
        if not valid_record_id(record_id) or ext not in EXTENSIONS:
            return False
        if SIGNATURE_RE.fullmatch(signature) is None:
            return False
        ok = False
        for key in self._keys:
            # No early exit: the time taken does not reveal which key matched.
            ok |= hmac.compare_digest(self._mac(key, record_id, ext), signature)
        return ok
