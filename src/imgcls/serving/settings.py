"""What `imgcls serve` is told: where to listen, how to batch, what to refuse, how to watch for drift."""

from __future__ import annotations

from dataclasses import dataclass

from imgcls.errors import UserError

MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise: a model server is not public by accident
    port: int = 8000
    checkpoint: str = "best"
    device: str = "auto"
    batch_size: int | None = None  # images per backend call (the engine's); None: the run's measured one
    max_batch: int = 32  # images scored together at most; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting or being scored; past it 503 at once
    max_bytes: int = 20 * MIB  # request body
    header_timeout_s: float = 10.0  # a request's headers not all arrived by then: 408, connection closed
    body_timeout_s: float = 30.0  # a body that has not fully arrived by then is answered 408
    max_connections: int = 512  # requests in flight at most; past them a JSON 503 at once
    drain_timeout_s: int = 30  # SIGTERM: how long in-flight requests may take to finish
    reject: str | None = None  # the default of the `reject` query parameter, as predict's --reject
    target_accuracy: float | None = None
    coverage: float | None = None
    topk: int = 3
    drift_window: int = 1000  # served images the drift figures are computed over
    drift_min_images: int = 200  # fewer than this in the window: figures shown, no warning
    drift_psi: float = 0.25  # a PSI above this on either score is drift (the usual "significant shift" line)
    log_level: str = "info"

    def __post_init__(self):
        ints = {"--port": (self.port, 0), "--max-batch": (self.max_batch, 1), "--max-queue": (self.max_queue, 1),
                "--max-bytes": (self.max_bytes, 1), "--max-connections": (self.max_connections, 1),
                "--topk": (self.topk, 1), "--drift-window": (self.drift_window, 1),
                "--drift-min-images": (self.drift_min_images, 1), "--drain-timeout": (self.drain_timeout_s, 0)}
        for flag, (value, low) in ints.items():
            if not isinstance(value, int) or value < low:
                raise UserError(f"{flag} {value} must be a whole number of at least {low}")
        if self.port > 65535:
            raise UserError(f"--port {self.port} is not a TCP port; pass one in 1..65535 (0 picks a free one)")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        for flag, value in (("--max-wait-ms", self.max_wait_ms), ("--body-timeout", self.body_timeout_s),
                            ("--header-timeout", self.header_timeout_s), ("--drift-psi", self.drift_psi)):
            if not value >= 0:  # also refuses NaN
                raise UserError(f"{flag} {value} must be a number of at least 0")
        if self.max_batch > self.max_queue:
            raise UserError(f"--max-batch {self.max_batch} is more than --max-queue {self.max_queue} can hold; "
                            "raise --max-queue or lower --max-batch")
