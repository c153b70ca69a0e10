"""retailCRM API v5 client (telephony methods)."""

from fsbridge.crm.client import MAX_CALLS_PER_UPLOAD, RetailCRM, encode_form, encode_params, form_body
from fsbridge.crm.errors import CRMAuthError, CRMError, CRMNoReply, CRMRejected, CRMUnavailable
from fsbridge.crm.ratelimit import RateLimiter

__all__ = [
    "MAX_CALLS_PER_UPLOAD",
    "CRMAuthError",
    "CRMError",
    "CRMNoReply",
    "CRMRejected",
    "CRMUnavailable",
    "RateLimiter",
    "RetailCRM",
    "encode_form",
    "encode_params",
    "form_body",
]
