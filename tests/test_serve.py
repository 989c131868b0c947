"""imgcls serve: a real server on 127.0.0.1 (uvicorn in a thread, and once as a subprocess), a real HTTP client.

One small run on cifar10-mini and its ONNX export serve every test: the answers are `imgcls predict`'s rows,
concurrent requests share batches, a full queue refuses at once, bad input is a 4xx with its message, SIGTERM
drains, drift shows when noise replaces test images, and the page works in a real browser.
"""

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imgcls import rundir  # noqa: E402
from imgcls.cli import main  # noqa: E402
from imgcls.errors import UserError  # noqa: E402
from imgcls.evaluation.cam import explain_files  # noqa: E402
from imgcls.inference.exported import open_engine  # noqa: E402
from imgcls.plotting import cam_overlay  # noqa: E402
from imgcls.serving.app import create_app  # noqa: E402
from imgcls.serving.drift import DriftMonitor, Reference, ks_distance, psi  # noqa: E402
from imgcls.serving.server import uvicorn_config  # noqa: E402
from imgcls.serving.service import LOG, build_service  # noqa: E402
from imgcls.serving.settings import ServeSettings  # noqa: E402
from imgcls.training.train import fit  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

FILES = 12  # test images written as files, PNG and JPEG alternately


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """fastnet_cifar_small, one epoch on cifar10-mini (500 validation images: the drift reference)."""
    return fit(tiny_config("cifar10-mini", tmp_path_factory.mktemp("serve") / "run", epochs=1, batch_size=256))


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-export") / "export"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), "--out", str(out), "--format", "onnx"]) == 0
    return out / "model.onnx"


@pytest.fixture(scope="module")
def files(mini, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i in range(FILES):
        path = folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(mini.test.images[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def predict_rows(source, paths, *flags) -> list[dict]:
    """What `imgcls predict SOURCE FILES --json` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", str(source), *map(str, paths), "--json", *flags]) == 0
    return json.loads(out.getvalue())


@contextlib.contextmanager
def serving(service):
    """The app on a free port of 127.0.0.1, in a thread; stopped as SIGTERM stops it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(create_app(service), service.settings, log_config=None,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def run_service(run):
    return build_service(run, ServeSettings(max_wait_ms=100, max_bytes=1 << 20, body_timeout_s=1.0,
                                            header_timeout_s=1.0))


@pytest.fixture(scope="module")
def run_url(run_service):
    with serving(run_service) as url:
        yield url


def multipart(paths) -> list:
    return [("file", (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in paths]


def same_row(served: dict, printed: dict, path, exact: bool = True) -> None:
    """A served prediction is predict's row: the same decision, scores and top-k, to the last bit when both
    scored it in a batch of the same images. In a batch of another size a CPU kernel may sum in another
    order (differences of about 1e-8 seen): then the same to 1e-6."""
    assert served["image"] == path.name and printed["path"] == str(path)
    for key in ("label", "rejected", "error"):
        assert served[key] == printed[key], key
    for key in ("confidence", "energy"):
        assert served[key] == (printed[key] if exact else pytest.approx(printed[key], abs=1e-6)), key
    assert [t["class"] for t in served["top"]] == [t["class"] for t in printed["top"]]
    probabilities = [t["probability"] for t in printed["top"]]
    assert [t["probability"] for t in served["top"]] == (probabilities if exact else
                                                        pytest.approx(probabilities, abs=1e-6))


def metric(url: str, name: str) -> dict:
    """{labels as a sorted tuple: value} of one Prometheus sample name in /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("source", ["run", "onnx"])
def test_answers_are_predicts_rows_for_the_run_and_for_its_onnx_file(source, run, onnx_file, run_url, files):
    path = run if source == "run" else onnx_file
    printed = predict_rows(path, files)
    with contextlib.ExitStack() as stack:
        url = run_url if source == "run" else stack.enter_context(serving(build_service(path, ServeSettings())))
        answer = httpx.post(f"{url}/v1/predict", files=multipart(files), timeout=60).json()
        for served, row, p in zip(answer["predictions"], printed, files, strict=True):
            same_row(served, row, p)
        assert answer["model"]["model"] == "fastnet_cifar_small" and len(answer["model"]["weights"]) == 16
        one = httpx.post(f"{url}/v1/predict", content=files[1].read_bytes(), headers={"content-type": "image/png"})
        assert one.status_code == 200
        alone = predict_rows(path, files[1:2])[0]  # one image, as the raw body is: the same batch
        same_row({**one.json()["predictions"][0], "image": files[1].name}, alone, files[1])
        # the query parameters are predict's flags
        flagged = predict_rows(path, files[:4], "--topk", "2", "--reject", "0.5", "--tta", "flip")
        answer = httpx.post(f"{url}/v1/predict", params={"topk": 2, "reject": "0.5", "tta": "flip"},
                            files=multipart(files[:4])).json()
        for served, row, p in zip(answer["predictions"], flagged, files[:4], strict=True):
            same_row(served, row, p)


def test_model_description_health_and_openapi(run_url, onnx_file):
    model = httpx.get(f"{run_url}/v1/model").json()
    assert model["classes"][:3] == ["airplane", "automobile", "bird"] and model["preprocessing"]["img_size"] == 32
    assert model["reject"] == {"default": "off", "threshold": None, "auto_rule": None}
    assert "validation split (500 images" in model["drift_reference"]
    assert httpx.get(f"{run_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{run_url}/readyz").status_code == 200
    paths = httpx.get(f"{run_url}/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/model", "/v1/drift", "/healthz", "/readyz"} <= set(paths)
    assert httpx.get(f"{run_url}/docs").status_code == 200
    with serving(build_service(onnx_file, ServeSettings())) as url:
        model = httpx.get(f"{url}/v1/model").json()
        assert model["parity"]["results"]["onnx"]["max_abs_prob_diff"] < 1e-4 and "model_card" in model


def test_a_server_publishes_only_the_parity_and_card_export_wrote_for_its_model(run, onnx_file, tmp_path):
    """parity.json edited to a failed proof (top-1 agreement 0.2) was published by /v1/model as the export's;
    max_abs_prob_diff NaN made every GET /v1/model a 500."""
    for edit in ("agreement", "nan", "card", "other weights"):
        folder = tmp_path / edit.replace(" ", "-")
        shutil.copytree(onnx_file.parent, folder)
        parity = json.loads((folder / "parity.json").read_text())
        if edit == "agreement":
            parity["results"]["onnx"].update(top1_agreement=0.2, passed=False)
        elif edit == "nan":
            parity["results"]["onnx"]["max_abs_prob_diff"] = float("nan")
        elif edit == "card":
            (folder / "MODEL_CARD.md").write_text("# a better model\n")
        if edit != "card":
            (folder / "parity.json").write_text(json.dumps(parity))
        if edit == "other weights":  # sealed as export would, for another checkpoint
            rundir.write_sealed_json(folder / "parity.json", {**parity, "weights": "f" * 64})
        with pytest.raises(UserError) as refused:
            build_service(folder / "model.onnx", ServeSettings())
        message = str(refused.value)
        assert "\n" not in message and "export the run again" in message, (edit, message)
        words = {"card": "is not the card export wrote", "other weights": "the parity of other weights"}
        assert words.get(edit, "was edited after imgcls wrote it") in message, (edit, message)


def test_explain_draws_imgcls_cams_overlay_for_runs_and_refuses_for_onnx(run, run_url, onnx_file, files):
    images, cams, classes, probs = explain_files(open_engine(run), [str(files[3])])
    reply = httpx.post(f"{run_url}/v1/explain", files=multipart(files[3:4]), timeout=60)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    engine_classes = httpx.get(f"{run_url}/v1/model").json()["classes"]
    assert answer["class"] == engine_classes[int(classes[0])] == predict_rows(run, files[3:4])[0]["label"]
    assert answer["uncalibrated_probability"] == pytest.approx(float(probs[0, classes[0]]), abs=1e-6)
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay"].split(",", 1)[1]))))
    expected = cam_overlay(images[0], cams[0])
    assert drawn.shape == expected.shape == (160, 160, 3)
    assert np.abs(drawn.astype(int) - expected).max() <= 1  # the same overlay as `imgcls cam`, to rounding
    other = next(c for c in engine_classes if c != answer["class"])
    assert httpx.post(f"{run_url}/v1/explain", params={"class": other}, files=multipart(files[3:4]),
                      timeout=60).json()["class"] == other
    for params, parts, status, words in [({"class": "unicorn"}, files[3:4], 422, "'unicorn' is not one of"),
                                         ({}, files[3:5], 422, "takes one image and the request holds 2")]:
        reply = httpx.post(f"{run_url}/v1/explain", params=params, files=multipart(parts), timeout=60)
        assert reply.status_code == status and words in reply.json()["error"]
    with serving(build_service(onnx_file, ServeSettings())) as url:
        assert httpx.get(f"{url}/v1/model").json()["explain"] is False
        reply = httpx.post(f"{url}/v1/explain", files=multipart(files[3:4]), timeout=60)
        assert reply.status_code == 404 and "is an ONNX graph; serve the run folder" in reply.json()["error"]


# ---------------------------------------------------------------- batching and backpressure


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(run, run_url, files):
    printed = predict_rows(run, files)
    before = metric(run_url, "imgcls_batch_images_count")[()]

    def send(i):
        return httpx.post(f"{run_url}/v1/predict", files=multipart([files[i]]), timeout=60).json()["predictions"][0]

    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(send, range(len(files))))
    for served, row, path in zip(answers, printed, files, strict=True):
        assert served["image"] == path.name and served["label"] == row["label"]
        # another batch composition: the same numbers up to the float order of a batch of another size
        assert served["confidence"] == pytest.approx(row["confidence"], abs=1e-6)
    batches = metric(run_url, "imgcls_batch_images_count")[()] - before
    assert batches < len(files)  # fewer engine calls than requests: some batch held more than one image


class Gated:
    """A backend that holds every call until the test opens the gate."""

    def __init__(self, backend, gate: threading.Event):
        self.backend, self.gate = backend, gate

    def __call__(self, images):
        assert self.gate.wait(60)
        return self.backend(images)


def gated(service, **settings):
    """`service` with these settings, one image per engine call, a backend held until the gate opens, and no
    drift window: (the service, its gate)."""
    gate = threading.Event()
    held = dataclasses.replace(service.engine, backend=Gated(service.engine.backend, gate))
    settings = dataclasses.replace(service.settings, max_batch=1, max_wait_ms=0, **settings)
    return dataclasses.replace(service, settings=settings, engine=held,
                               drift=DriftMonitor({}, None, 10, 10, 1.0, "none", LOG)), gate


def test_a_full_queue_answers_503_at_once_and_accepted_requests_lose_nothing(run_service, run, files):
    service, gate = gated(run_service, max_queue=4)
    printed = predict_rows(run, files[:4])
    with serving(service) as url, ThreadPoolExecutor(4) as pool:
        accepted = [pool.submit(httpx.post, f"{url}/v1/predict", files=multipart([p]), timeout=60) for p in files[:4]]
        deadline = time.monotonic() + 30
        while metric(url, "imgcls_queue_images")[()] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.monotonic()
        refused = httpx.post(f"{url}/v1/predict", files=multipart(files[4:5]), timeout=60)
        assert time.monotonic() - start < 2 and refused.status_code == 503
        assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]
        gate.set()
        for reply, row, path in zip((f.result() for f in accepted), printed, files[:4], strict=True):
            assert reply.status_code == 200
            same_row(reply.json()["predictions"][0], row, path, exact=False)  # scored alone, not as predict's 4
        assert metric(url, "imgcls_request_errors_total")[(("kind", "queue_full"), ("status", "503"))] == 1


def test_past_max_connections_requests_in_flight_the_answer_is_a_json_503(run_service, files):
    service, gate = gated(run_service, max_connections=2)
    with serving(service) as url, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, f"{url}/v1/predict", files=multipart([p]), timeout=60) for p in files[:2]]
        deadline, refused = time.monotonic() + 30, None
        while time.monotonic() < deadline:  # the two held requests fill the limit: then even /healthz waits
            refused = httpx.get(f"{url}/healthz", timeout=10)
            if refused.status_code == 503:
                break
            time.sleep(0.02)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == ("the server is busy: 2 requests in flight, its --max-connections 2; "
                                           "retry after a second")
        gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert metric(url, "imgcls_request_errors_total")[(("kind", "too_many_requests"), ("status", "503"))] >= 1


# ---------------------------------------------------------------- bad input


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is a few bytes): no decoder must expand it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def slow_body(url: str, seconds: float) -> tuple[bytes, float]:
    """Headers promising 1000 bytes, then 10 of them, then silence: (the answer, how long it took)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=seconds) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                  + b"\x89PNG\r\n\x1a\n\0\0")
        answer = b""
        while not answer.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - start


def test_every_bad_input_gets_its_status_and_message_and_the_next_request_succeeds(run_url, files):
    good = files[0].read_bytes()
    png = files[1].read_bytes()
    cases = [  # (what is sent, status, words of the message)
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "text/plain is not an image"),
        ({"content": b"not an image at all", "headers": {"content-type": "image/png"}}, 415, "not a JPEG"),
        ({"content": png[: len(png) // 2], "headers": {"content-type": "image/png"}}, 415, "cannot be read"),
        ({"files": [("file", ("a.jpg", good)), ("file", ("junk.png", b"junk"))]}, 415, "image junk.png"),
        ({"content": b"\0" * (3 << 19), "headers": {"content-type": "image/png"}}, 413, "over the limit of 1,048,576"),
        ({"content": png_claiming(10_000, 10_000), "headers": {"content-type": "image/png"}}, 413, "89,478,485"),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
        ({"content": b"--xyz\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "multipart"),
        ({"content": b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n',
          "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "no image"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "no image"),
        ({"params": {"topk": 0}, "content": good}, 422, "topk"),
        ({"params": {"topk": "three"}, "content": good}, 422, "topk"),
        ({"params": {"topk": "1_0"}, "content": good}, 422, "topk='1_0' is not a whole number written in ASCII"),
        ({"params": {"topk": "3.0"}, "content": good}, 422, "topk='3.0' is not a whole number"),
        ({"params": {"topk": "+3"}, "content": good}, 422, "topk='+3' is not a whole number"),
        ({"params": {"topk": " 3"}, "content": good}, 422, "topk=' 3' is not a whole number"),
        ({"params": {"reject": "2"}, "content": good}, 422, "reject 2 is neither auto"),
        ({"params": {"reject": "auto"}, "content": good}, 422, "run imgcls calibrate"),
        ({"params": {"tta": "sideways"}, "content": good}, 422, "sideways"),
        ({"params": {"tta": "\uff15"}, "content": good}, 422, "tta must be"),  # a full-width 5, as topk refuses it
        ({"params": {"reject": "\u0660.5"}, "content": good}, 422, "is neither auto"),  # an Arabic-Indic zero
        ({"params": [("topk", 1), ("topk", 5)], "content": good}, 400, "gives 'topk' 2 times; give each one once"),
        ({"params": {"topK": 5}, "content": good}, 400, "no query parameter 'topK'; it takes topk, reject, tta"),
    ]
    for request, status, words in cases:
        reply = httpx.post(f"{run_url}/v1/predict", timeout=30, **request)
        assert reply.status_code == status, (request.get("params"), reply.text)
        assert words in reply.json()["error"], reply.json()["error"]
        assert httpx.post(f"{run_url}/v1/predict", content=good).status_code == 200
    for path, query, words in (("/v1/model", "?verbose=1", "it takes none"), ("/v1/drift", "?a=1", "it takes none")):
        reply = httpx.get(f"{run_url}{path}{query}")
        assert reply.status_code == 400 and words in reply.json()["error"], reply.text
    reply = httpx.post(f"{run_url}/v1/explain?class=bird&class=cat", content=good)
    assert reply.status_code == 400 and "gives 'class' 2 times" in reply.json()["error"]
    missing = httpx.get(f"{run_url}/v1/nothing")
    assert missing.status_code == 404 and "GET /v1/nothing" in missing.json()["error"]
    answer, seconds = slow_body(run_url, 10)  # the server's body timeout is 1 s
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer and seconds < 5
    assert httpx.post(f"{run_url}/v1/predict", content=good).status_code == 200
    errors = [dict(labels) for labels in metric(run_url, "imgcls_request_errors_total")]
    assert {e["kind"] for e in errors} >= {"unsupported_media", "not_an_image", "too_large", "too_many_pixels",
                                                 "malformed_multipart", "no_image", "invalid_parameter",
                                                 "body_timeout", "not_found"}
    assert "500" not in {e["status"] for e in errors}


def answer_to(url: str, trickle: list[bytes], gap: float) -> tuple[bytes, float]:
    """Send `trickle` a piece every `gap` seconds on one connection: (all the server answered, seconds taken)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start, answer = time.monotonic(), b""
        s.setblocking(False)
        for piece in trickle:
            with contextlib.suppress(OSError):  # the server may have closed the connection already
                s.sendall(piece)
            time.sleep(gap)
            with contextlib.suppress(BlockingIOError):
                chunk = s.recv(4096)
                answer += chunk
                if not chunk:
                    break
        return answer, time.monotonic() - start


def test_headers_that_trickle_in_or_never_come_are_answered_408_and_the_connection_freed(run_url, files):
    late = b'HTTP/1.1 408 Request Timeout'
    # a byte every 0.2 s would take 14 s to finish its headers; the server's header timeout is 1 s
    trickled, seconds = answer_to(run_url, [bytes([c]) for c in b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX: y"], 0.2)
    assert trickled.startswith(late) and b"did not arrive within 1 s" in trickled and seconds < 4
    silent, seconds = answer_to(run_url, [b""] * 20, 0.2)  # a connection that sends nothing at all
    assert silent.startswith(late) and seconds < 4
    # after an answer the same connection again has 1 s for the next request's headers
    first = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    kept, seconds = answer_to(run_url, [first, *[b"G"] * 19], 0.2)
    assert kept.startswith(b"HTTP/1.1 200") and late in kept and seconds < 4
    assert httpx.post(f"{run_url}/v1/predict", content=files[0].read_bytes()).status_code == 200


# ---------------------------------------------------------------- SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_request_in_flight_then_exits_0(run, files, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        body = files[1].read_bytes()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:20])
            time.sleep(0.3)  # the request is in flight: its body half sent
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no new connections once stopping
                httpx.get(f"{url}/healthz", timeout=2)
            s.sendall(body[20:])
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"][0]["label"] is not None
        # on a loaded machine the /healthz probe can be accepted before the listener closes: the server then
        # drains it too (up to --drain-timeout, 30 s) before it exits
        assert server.wait(90) == 0
    finally:
        if server.poll() is None:
            server.kill()
        _, err = server.communicate(timeout=30)
    assert "Shutting down" in err


# ---------------------------------------------------------------- drift


def test_drift_reference_figures():
    rng = np.random.default_rng(0)
    sample = rng.normal(size=2000)
    reference = Reference.of_sample(sample)
    assert psi(reference, sample) == pytest.approx(0, abs=1e-9)
    assert ks_distance(reference, sample) == pytest.approx(0, abs=1e-9)
    assert psi(reference, rng.normal(size=500)) < 0.1 and psi(reference, rng.normal(1.5, size=500)) > 1
    assert ks_distance(reference, rng.normal(1.5, size=500)) > 0.4
    curve = {"threshold": [0.9, 0.7, 0.5, 0.2], "coverage": [0.25, 0.5, 0.75, 1.0]}  # a quarter at each
    from_curve = Reference.of_curve(curve)
    assert from_curve.share_below(0.6) == pytest.approx(0.5) and from_curve.share_below(0.95) == pytest.approx(1)


def encode_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_drift_shows_when_noise_replaces_test_images(run, mini, caplog):
    settings = ServeSettings(drift_window=200, drift_min_images=200, drift_psi=0.25, reject="0.5")
    test_images = [encode_png(mini.test.images[i].permute(1, 2, 0).numpy()) for i in range(200)]
    rng = np.random.default_rng(0)
    noise = [encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(200)]

    def send(url, images):
        for start in range(0, len(images), 20):
            parts = [("file", (f"{start + i}.png", b, "image/png")) for i, b in enumerate(images[start:start + 20])]
            assert httpx.post(f"{url}/v1/predict", files=parts, timeout=60).status_code == 200
        return httpx.get(f"{url}/v1/drift").json()

    with caplog.at_level(logging.INFO, logger="imgcls.serve"), serving(build_service(run, settings)) as url:
        calm = send(url, test_images)
        assert calm["window"] == 200 and not calm["drifting"]
        assert max(calm["scores"]["confidence"]["psi"], calm["scores"]["energy"]["psi"]) < 0.25
        assert not [r for r in caplog.records if r.name == "imgcls.serve" and r.levelno == logging.WARNING]
        below = calm["below_threshold"]
        assert below["threshold"] == 0.5 and abs(below["served"] - below["validation"]) < 0.15
        drifted = send(url, noise)
        assert drifted["drifting"] and drifted["scores"]["energy"]["psi"] > 1
        assert drifted["scores"]["energy"]["ks"] > calm["scores"]["energy"]["ks"] + 0.3
        warnings = [r.getMessage() for r in caplog.records if r.name == "imgcls.serve" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith("drift: the last 200 served images against the run's")
        assert metric(url, "imgcls_drift_alarm")[()] == 1
        assert metric(url, "imgcls_drift_psi")[(("score", "energy"),)] == pytest.approx(
            drifted["scores"]["energy"]["psi"])
    print(json.dumps({"calm": calm["scores"], "drifted": drifted["scores"]}, indent=1))


# ---------------------------------------------------------------- the page


def test_the_page_answers_a_drawn_image_in_a_real_browser(run_url):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=15000"]
    done = subprocess.run([chromium, *flags, "--dump-dom", f"{run_url}/#selftest"], capture_output=True, text=True,
                          timeout=120)
    dom = done.stdout
    assert '<form id="upload"' in dom and 'type="file"' in dom
    assert 'data-answered="1"' in dom, dom[-2000:]
    assert 'class="bar"' in dom and "max-softmax" in dom
    assert 'data-explained="1"' in dom and 'id="cam" alt="Grad-CAM overlay" src="data:image/png;base64,' in dom
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []


def test_without_the_serve_extra_the_command_names_it(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None  # as if not installed\n"
            "from imgcls.cli import main; raise SystemExit(main(['serve', 'runs/any']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "imgcls: error: imgcls serve needs fastapi, uvicorn; pip install 'imgcls[serve]'"
