"""The server's Prometheus figures, in a registry of its own (never the process-wide default: two apps in one
process, as in the tests, keep their counts apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENDPOINTS = ("/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/drift", "/v1/predict", "/v1/explain", "/docs",
             "/openapi.json")


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("imgcls_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("imgcls_request_errors", "requests refused, by status and kind of problem",
                              ["status", "kind"], registry=r)
        self.latency = Histogram("imgcls_request_seconds", "time from the request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("imgcls_batch_images", "images scored together in one engine call",
                               buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("imgcls_queue_images", "images accepted and not yet answered (the batcher sets its "
                           "reader)", registry=r)
        self.images = Counter("imgcls_images", "images answered, by decision", ["decision"], registry=r)
        self.rejected_share = Gauge("imgcls_rejected_share", "share of the images answered so far labelled unknown",
                                    registry=r)
        self.drift_psi = Gauge("imgcls_drift_psi", "PSI of the drift window's scores against validation",
                               ["score"], registry=r)
        self.drift_ks = Gauge("imgcls_drift_ks", "Kolmogorov-Smirnov distance of the drift window's scores against "
                              "validation", ["score"], registry=r)
        self.below = Gauge("imgcls_drift_share_below_threshold", "share of images under the reject threshold",
                           ["where"], registry=r)
        self.drifting = Gauge("imgcls_drift_alarm", "1 while the drift window is past --drift-psi", registry=r)
        self.window = Gauge("imgcls_drift_window_images", "images in the drift window", registry=r)
        self._answered = self._unknown = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # a scanner's paths must not grow the label set
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_error(self, status: int, kind: str) -> None:
        self.errors.labels(str(status), kind).inc()

    def observe_answers(self, rows: list[dict]) -> None:
        """Called on the event loop only, so the two running counts need no lock."""
        unknown = sum(bool(r["rejected"]) for r in rows)
        self.images.labels("unknown").inc(unknown)
        self.images.labels("label").inc(len(rows) - unknown)
        self._answered += len(rows)
        self._unknown += unknown
        self.rejected_share.set(self._unknown / max(self._answered, 1))

    def observe_drift(self, figures: dict) -> None:
        for name, score in figures["scores"].items():
            if score["psi"] is not None:
                self.drift_psi.labels(name).set(score["psi"])
                self.drift_ks.labels(name).set(score["ks"])
        below = figures["below_threshold"]
        if below is not None and below["served"] is not None:
            self.below.labels("served").set(below["served"])
            self.below.labels("validation").set(below["validation"])
        self.drifting.set(1.0 if figures["drifting"] else 0.0)
        self.window.set(figures["window"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
