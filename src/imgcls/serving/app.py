"""The HTTP surface: FastAPI routes over one Service and one MicroBatcher.

Every refusal is a 4xx whose JSON body is {"error": "<one line naming the problem and the fix>"}, counted
in /metrics by status and kind; only a fault of the server itself is a 500. The body is read by hand, not
by the framework, so that its size limit and its arrival deadline hold before any of it is parsed.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from imgcls import __version__
from imgcls.data.decode import FORMAT_NAMES, MAX_PIXELS, DecodeError
from imgcls.errors import UserError
from imgcls.evaluation.evaluate import parse_tta_flag
from imgcls.inference.reject import energy
from imgcls.serving.batching import MicroBatcher, QueueFull
from imgcls.serving.metrics import ServerMetrics
from imgcls.serving.page import PAGE
from imgcls.serving.service import LOG, Job, Service, decode_upload

MAX_FORM_FIELDS = 100  # non-file parts of a multipart body
DECODE_SLOTS = 4  # requests decoding their images at once
EXPLAIN_SLOTS = 1  # Grad-CAMs at once: each a float32 forward and backward pass beside the inference thread
PREDICT_BODY = {"requestBody": {"required": True, "description": "image files as multipart/form-data parts (any "
                                "field name), or one image as the raw body (Content-Type image/* or "
                                "application/octet-stream)",
                                "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
                                    "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                                    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


class RequestError(Exception):
    """A refused request: its status, a short kind for /metrics, the one-line message, extra headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class InFlightLimit:
    """ASGI middleware: past `limit` requests in flight, a JSON 503 with Retry-After at once, before the
    body is read: the memory a burst of clients can hold is bounded by the limit times --max-bytes."""

    def __init__(self, app, limit: int, metrics: ServerMetrics):
        self.app, self.limit, self.metrics, self.in_flight = app, limit, metrics, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:  # the event loop runs one coroutine at a time: no lock needed
            self.metrics.observe_error(503, "too_many_requests")
            refusal = JSONResponse({"error": f"the server is busy: {self.in_flight} requests in flight, its "
                                    f"--max-connections {self.limit}; retry after a second"}, 503,
                                   headers={"Retry-After": "1"})
            return await refusal(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class MeasuredRequests:
    """ASGI middleware: every HTTP request counted by endpoint and status, and timed."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(scope["path"], status[0], time.perf_counter() - start)


def create_app(service: Service) -> FastAPI:
    """The app; its inference thread starts with the app's lifespan and drains when it ends."""
    settings = service.settings
    metrics = ServerMetrics()
    batcher = MicroBatcher(_scorer(service, metrics), settings.max_batch, settings.max_wait_ms / 1000,
                           settings.max_queue)
    metrics.queue.set_function(lambda: batcher.pending)
    # A 20 MiB file may decode to 89 megapixels (268 MB of RGB): a few decodes at a time, not one per thread
    decoding = asyncio.Semaphore(DECODE_SLOTS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        service.ready = True
        LOG.info("serving %s", service.engine.describe())
        yield
        service.ready = False  # uvicorn has let the in-flight requests finish; what is queued is theirs
        await asyncio.to_thread(batcher.close, settings.drain_timeout_s)

    app = FastAPI(title="imgcls", version=__version__, lifespan=lifespan,
                  description="Image classification with an imgcls run or export: the answers of imgcls predict.")
    app.add_middleware(InFlightLimit, limit=settings.max_connections, metrics=metrics)
    app.add_middleware(MeasuredRequests, metrics=metrics)  # added last, so outermost: it counts the 503s above
    _add_error_handlers(app, metrics)
    _add_info_routes(app, service, batcher, metrics)
    _add_predict_route(app, service, batcher, metrics, decoding)
    _add_explain_route(app, service, decoding)
    return app


WHOLE_NUMBERS = {"topk"}  # query parameters that are whole numbers


def _query(*names: str):
    """A route's query string checked whole (400 in JSON otherwise): each parameter once (?topk=1&topk=5 took the
    last, silently) and only those the route takes (?topK=5 was the default, silently)."""
    async def check(request: Request) -> None:
        keys = [k for k, _ in request.query_params.multi_items()]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise RequestError(400, "invalid_parameter", f"the query gives {repeated!r} {keys.count(repeated)} "
                               "times; give each one once")
        unknown = next((k for k in keys if k not in names), None)
        if unknown is not None:
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            raise RequestError(400, "invalid_parameter", f"{request.url.path} has no query parameter {unknown!r}; "
                               f"{takes}")
        for name in WHOLE_NUMBERS & set(keys):  # as the flags read them: pydantic takes 1_0, 3.0, +3 and ' 3'
            value = request.query_params[name]
            if not re.fullmatch(r"[0-9]+", value):
                raise RequestError(422, "invalid_parameter", f"{name}={value[:20]!r} is not a whole number written "
                                   f"in ASCII digits; e.g. {name}=3")

    return Depends(check)


def _add_predict_route(app: FastAPI, service: Service, batcher: MicroBatcher, metrics: ServerMetrics,
                       decoding: asyncio.Semaphore) -> None:
    settings = service.settings

    @app.post("/v1/predict", openapi_extra=PREDICT_BODY, dependencies=[_query("topk", "reject", "tta")])
    async def predict(request: Request,
                      topk: int | None = Query(None, ge=1, le=1000, description=f"classes per image ({settings.topk})"),
                      reject: str | None = Query(None, description="auto, a probability, or off (the server's "
                                                 f"--reject: {settings.reject or 'off'})"),
                      tta: str = Query("none", description="none, flip, flip-crop or N random views")):
        """Classify one or many images: per image the top-k classes with calibrated probabilities, the decision
        (a class or `unknown`), the max-softmax and energy scores and the model's identity."""
        mode, threshold = _resolve(service, tta, reject)
        if batcher.pending >= settings.max_queue:  # refused before its body is read or decoded
            raise _busy(QueueFull(f"{batcher.pending} images are waiting, the queue's {settings.max_queue}"))
        uploads = await _read_images(request, settings)
        async with decoding:
            pixels = await run_in_threadpool(_decode_all, uploads, service)
        try:
            futures = batcher.submit([Job(p, mode) for p in pixels])
        except QueueFull as e:
            raise _busy(e) from None
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        rows = service.answer([name for name, _ in uploads], results, topk or settings.topk, threshold)
        metrics.observe_answers(rows)
        return {"model": service.engine.identity, "predictions": rows}


def _add_explain_route(app: FastAPI, service: Service, decoding: asyncio.Semaphore) -> None:
    settings, explaining = service.settings, asyncio.Semaphore(EXPLAIN_SLOTS)

    @app.post("/v1/explain", openapi_extra=PREDICT_BODY, dependencies=[_query("class")])
    async def explain(request: Request,
                      class_name: str | None = Query(None, alias="class", description="the class explained (by "
                                                     "default the predicted one)")):
        """Grad-CAM of one image, as `imgcls cam` draws it: a PNG data URL of the heat-map over the image, the
        class explained and its softmax. A run or a safetensors export only: an ONNX graph has no gradients."""
        if not service.explains:
            raise RequestError(404, "no_gradients", f"Grad-CAM needs the model's gradients and {service.engine.source}"
                               " is an ONNX graph; serve the run folder or its safetensors export for /v1/explain")
        if class_name is not None and class_name not in service.engine.classes:
            raise RequestError(422, "invalid_parameter", f"class {class_name!r} is not one of the model's classes: "
                               f"{', '.join(service.engine.classes)}")
        uploads = await _read_images(request, settings)
        if len(uploads) > 1:
            raise RequestError(422, "invalid_parameter", f"/v1/explain takes one image and the request holds "
                               f"{len(uploads)}; send one per request")
        async with decoding:
            pixels = await run_in_threadpool(_decode_all, uploads, service)
        async with explaining:
            return await run_in_threadpool(service.explain, pixels[0], class_name)


def _scorer(service: Service, metrics: ServerMetrics):
    """What the inference thread runs on a batch: the scores, then the batch size and the drift window."""
    def process(jobs: list[Job]) -> list:
        results = service.score(jobs)
        metrics.batch.observe(len(jobs))
        plain = [result for job, result in zip(jobs, results, strict=True) if job.tta == "none"]
        if plain:  # the drift reference is the plain view's, so TTA answers stay out of the window
            confidences = [float(probs.max()) for probs, _ in plain]
            metrics.observe_drift(service.drift.observe(confidences, energy(torch.stack([lg for _, lg in plain]))))
        return results

    return process


def _add_info_routes(app: FastAPI, service: Service, batcher: MicroBatcher, metrics: ServerMetrics) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    @app.get("/healthz")
    async def healthz():
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """The model is loaded, warmed up, and its inference thread runs."""
        if service.ready and batcher.running:
            return {"status": "ready", "model": service.engine.identity}
        return JSONResponse({"status": "not ready", "error": "the model is not serving (starting or stopping)"},
                            503)

    @app.get("/v1/model", dependencies=[_query()])
    async def model():
        """Classes, input, preprocessing, calibration, reject rule, parity figures and model card."""
        return service.describe()

    @app.get("/v1/drift", dependencies=[_query()])
    async def drift():
        """The served scores of the drift window against validation: PSI, KS, share under the threshold."""
        return service.drift.figures()

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def refuse(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.observe_error(status, kind)
        return JSONResponse({"error": message}, status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return refuse(e.status, e.kind, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request, e: RequestValidationError):
        problems = "; ".join(f"{' '.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return refuse(422, "invalid_parameter", f"{problems}; see /docs for the parameters")

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return refuse(e.status_code, kind, f"{e.detail}: {request.method} {request.url.path}; see /docs",
                      getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_fault(request, e: Exception):
        LOG.exception("internal error on %s %s", request.method, request.url.path)
        return refuse(500, "internal", f"internal error ({type(e).__name__}: {e}); the server keeps serving")


def _busy(e: QueueFull) -> RequestError:
    return RequestError(503, "queue_full", f"the server is busy: {e}; retry after a second", {"Retry-After": "1"})


def _resolve(service: Service, tta: str, reject: str | None) -> tuple[str | int, float | None]:
    """The query's TTA mode and threshold, or a 422 with predict's message for the flag."""
    try:
        return parse_tta_flag(tta), service.threshold(reject)
    except UserError as e:
        raise RequestError(422, "invalid_parameter", str(e).replace("--", "")) from None


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused past `limit` bytes (from Content-Length at once, else while it arrives) or when it has
    not arrived within `timeout` seconds: a slow client holds a connection no longer than that."""
    declared = request.headers.get("content-length")
    too_large = "the body is {:,} bytes or more, over the limit of {:,}; send fewer or smaller images (--max-bytes)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", too_large.format(int(declared), limit))
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, "too_large", too_large.format(size, limit))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, "body_timeout", f"the body did not arrive within {timeout:g} s; send it at once "
                                                "(--body-timeout)") from None
    except ClientDisconnect:
        raise RequestError(400, "disconnected", "the client went away before its body arrived") from None
    return b"".join(chunks)


async def _read_images(request: Request, settings) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request: each file part of a multipart body, or the raw body."""
    body = await _read_body(request, settings.max_bytes, settings.body_timeout_s)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        uploads = await _multipart_files(request, body, settings.max_queue)
    elif media in ("", "application/octet-stream") or media.startswith("image/"):
        uploads = [("body", body)] if body else []
    else:
        raise RequestError(415, "unsupported_media", f"Content-Type {media} is not an image; send image files as "
                           "multipart/form-data or one image as the body (Content-Type image/*)")
    if not uploads:
        raise RequestError(400, "no_image", "the request holds no image; send files as multipart/form-data parts "
                           "or one image as the body")
    if len(uploads) > settings.max_queue:
        raise RequestError(413, "too_many_images", f"{len(uploads)} images in one request, over the queue's "
                           f"{settings.max_queue}; split the request (--max-queue)")
    return uploads


async def _multipart_files(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    async def replay():  # the body already read (within its limits), handed to the framework's parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except HTTPException as e:
        if "Too many files" in str(e.detail):  # the parser's own count, past the queue's size
            raise RequestError(413, "too_many_images", f"more than {max_files} images in one request; split the "
                               "request (--max-queue)") from None
        raise RequestError(400, "malformed_multipart", f"the multipart body cannot be read ({e.detail}); send "
                           "image files as multipart/form-data parts") from None
    except Exception as e:  # noqa: BLE001 - the parser's own errors on a body it cannot read are the client's
        raise RequestError(400, "malformed_multipart", f"the multipart body cannot be read ({type(e).__name__}: "
                           f"{e}); send image files as multipart/form-data parts") from None
    try:
        return [(value.filename or key, await value.read()) for key, value in form.multi_items()
                if isinstance(value, UploadFile)]
    finally:
        await form.close()


def _decode_all(uploads: list[tuple[str, bytes]], service: Service) -> list:
    """Each image as the model's input; the first that cannot be read refuses the request, by name."""
    pixels = []
    for name, data in uploads:
        try:
            pixels.append(decode_upload(data, service.engine.preprocessing))
        except DecodeError as e:
            if f"{MAX_PIXELS:,}" in str(e):  # the decoder's two pixel-limit messages, and only they, name it
                raise RequestError(413, "too_many_pixels", f"image {name}: {e}") from None
            raise RequestError(415, "not_an_image", f"image {name} cannot be read: {e}; send a {FORMAT_NAMES} "
                               "file") from None
    return pixels
