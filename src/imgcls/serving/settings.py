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
        # (value, lowest, highest): the highest are far past any real use, and keep a typo (or an infinity)
        # from becoming a server that waits forever or holds everything
        ints = {"--port": (self.port, 0, 65535), "--max-batch": (self.max_batch, 1, 65536),
                "--max-queue": (self.max_queue, 1, 10**6), "--max-bytes": (self.max_bytes, 1, 1 << 31),
                "--max-connections": (self.max_connections, 1, 10**5), "--topk": (self.topk, 1, 1000),
                "--drift-window": (self.drift_window, 1, 10**7),
                "--drift-min-images": (self.drift_min_images, 1, 10**7),
                "--drain-timeout": (self.drain_timeout_s, 0, 3600)}
        if self.batch_size is not None:
            ints["--batch-size"] = (self.batch_size, 1, 65536)
        for flag, (value, low, high) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"{flag} {str(value)[:20]} is out of range; pass a whole number from {low} to {high}")
        floats = {"--max-wait-ms": (self.max_wait_ms, 0.0, 10_000.0),
                  "--body-timeout": (self.body_timeout_s, 0.0, 3600.0),
                  "--header-timeout": (self.header_timeout_s, 0.0, 3600.0), "--drift-psi": (self.drift_psi, 0.0, 100.0)}
        for flag, (value, low, high) in floats.items():
            if not low <= value <= high or 0 < value < 1e-6:  # also NaN, infinities and a time that is 0 in effect
                raise UserError(f"{flag} {value} is out of range; pass 0 or a number from 1e-06 to {high:g}")
        if self.max_batch > self.max_queue:
            raise UserError(f"--max-batch {self.max_batch} is more than --max-queue {self.max_queue} can hold; "
                            "raise --max-queue or lower --max-batch")
