"""fsbridge's HTTP side: retailCRM's callbacks and the record proxy."""

from fsbridge.http.app import FileBody, Headers, Request, Response, Router, check_client_id
from fsbridge.http.server import HttpServer

__all__ = ["FileBody", "Headers", "HttpServer", "Request", "Response", "Router", "check_client_id"]
