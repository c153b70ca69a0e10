"""Logging: one line per notable thing, human-readable or JSON, and never a secret.

Modules already avoid logging secrets; the filter here is the second line of defence: any
configured secret (API key, clientId, link secrets, the ESL password) that still finds
its way into a message, an argument or a traceback is masked before it is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

MASK = "***"


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self._clean(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # urllib3 logs full URLs (the manager lookup's phone numbers) at DEBUG.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def add_secrets(values: Iterable[str]) -> None:
    """Mask these too from now on (a tenant file added by a reload brings its own API key and clientId)."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactSecrets):
                f.secrets = sorted(set(f.secrets) | {s for s in values if s and len(s) >= 6}, key=len, reverse=True)
