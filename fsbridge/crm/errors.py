"""Exceptions raised by the retailCRM client.

The split is by what the caller should do next: CRMUnavailable means "try again later"
(the request never reached the API, or the API was overloaded), CRMRejected means "this
request will never succeed as sent" (fix the data or the configuration).
"""

from __future__ import annotations

from typing import Any


class CRMError(Exception):
    """Any failure talking to retailCRM.

    `status` is the HTTP status (None when no reply arrived), `message` one readable line
    safe to log (never an HTML page, never the API key), `errors` the CRM's per-field
    errors (a dict or a list) when it sent any.
    """

    def __init__(
        self, status: int | None, message: str, errors: dict[str, Any] | list[Any] | None = None
    ) -> None:
        super().__init__(status, message, errors)
        self.status = status
        self.message = message
        self.errors = errors

    def __str__(self) -> str:
        return self.message


class CRMUnavailable(CRMError):
    """retailCRM could not be reached or did not answer as the API: retrying may help."""


class CRMNoReply(CRMUnavailable):
    """The request went out but no reply came (the connection closed, the reply timed out): retailCRM may
    have acted on it, so only a request it de-duplicates may be sent again."""


class CRMRejected(CRMError):
    """retailCRM refused the request (a 4xx): retrying the same request will not help."""


class CRMAuthError(CRMRejected):
    """The API key is missing, wrong, or lacks the rights for this method."""
