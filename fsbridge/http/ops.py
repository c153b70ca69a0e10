"""/metrics and /healthz on the internal listener: for Prometheus, systemd, Docker and load balancers."""

from __future__ import annotations

import json

from fsbridge.health import Health, Report
from fsbridge.http.app import Request, Response, Router
from fsbridge.metrics import CONTENT_TYPE, Metrics


class OpsHandlers:
    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health

    def register(self, router: Router) -> None:
        router.add({"GET"}, "/metrics", self.serve_metrics)
        router.add({"GET"}, "/healthz", self.ready)
        router.add({"GET"}, "/healthz/live", self.live)

    def serve_metrics(self, request: Request) -> Response:
        return Response(200, {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}, self.metrics.render())

    def ready(self, request: Request) -> Response:
        return self._report(self.health.ready())

    def live(self, request: Request) -> Response:
        return self._report(self.health.live())

    @staticmethod
    def _report(report: Report) -> Response:
        body = json.dumps(report.as_dict(), sort_keys=True).encode() + b"\n"
        return Response(200 if report.ok else 503,
                        {"Content-Type": "application/json", "Cache-Control": "no-store"}, body)
