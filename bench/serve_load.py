"""`imgcls serve` under load: throughput and latency percentiles at several concurrencies, with micro-batching
on (--max-batch 32) and off (--max-batch 1), beside `imgcls predict`'s offline images/s on the same files,
and the server's resident memory over a long run. Bounded: each level stops after --requests requests or
--seconds seconds, whichever comes first; the soak after --soak requests.

    python bench/serve_load.py SOURCE [--images FOLDER] [--concurrency 1 8 32 128] [--requests 2000]
                               [--seconds 20] [--max-wait-ms 5] [--soak 10000]

SOURCE is anything `imgcls serve` takes; the bench starts `imgcls serve SOURCE` itself on a free port of
127.0.0.1 for each mode and stops it with SIGTERM. The images sent are the files of --images (default: the
first 256 test images of cifar10-mini, PNG-encoded), one image per request, cycled. A refused request
(503: the queue was full) counts as an error, not as an answer; its latency is left out. The offline figure
is what `imgcls predict SOURCE FOLDER --out CSV` prints for a folder of the same files repeated to 2048.
The soak (batching on, 32 clients) reads the server's VmRSS from /proc every 1000 answers (Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MODES = {"batching on": 32, "batching off": 1}


def sample_images(folder: str | None, count: int = 256) -> list[bytes]:
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
        return [p.read_bytes() for p in paths[:count]]
    from imgcls.data import load_dataset

    test = load_dataset("cifar10-mini").test
    images = []
    for i in range(min(count, len(test.images))):
        out = io.BytesIO()
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(out, format="PNG")
        images.append(out.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: str, max_batch: int, max_wait_ms: float, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "imgcls", "serve", source, "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"imgcls serve exited with {server.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"imgcls serve did not get ready in 180 s: {' '.join(cmd)}")


async def load(url: str, images: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` clients sending one image each, back to back, until `requests` or `seconds` is spent."""
    latencies, errors, sent = [], 0, itertools.count()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        while time.perf_counter() < deadline and (n := next(sent)) < requests:
            start = time.perf_counter()
            reply = await http.post(f"{url}/v1/predict", content=images[n % len(images)],
                                    headers={"content-type": "image/png"})
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"answered": len(latencies), "errors": errors, "per_s": len(latencies) / wall,
            "p50": ms[0], "p95": ms[1], "p99": ms[2]}


def batch_totals(url: str) -> np.ndarray:
    """(images scored, engine calls) so far, from the server's batch histogram."""
    text = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("imgcls_batch_images_sum", "imgcls_batch_images_count"))}
    return np.array([values["imgcls_batch_images_sum"], values["imgcls_batch_images_count"]])


def offline_images_per_s(source: str, images: list[bytes], total: int = 2048) -> float:
    """`imgcls predict`'s own images/s over a folder of `images` repeated to `total` files."""
    with tempfile.TemporaryDirectory() as folder:
        for i in range(total):
            Path(folder, f"{i:05d}.png").write_bytes(images[i % len(images)])
        done = subprocess.run([sys.executable, "-m", "imgcls", "predict", source, folder, "--out",
                               str(Path(folder) / "rows.csv"), "--quiet"], capture_output=True, text=True, check=True)
    return float(re.search(r"(\d+) images/s", done.stdout).group(1))


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def soak(source: str, images: list[bytes], requests: int, max_wait_ms: float) -> None:
    """`requests` requests from 32 clients, batching on; the server's RSS after each 1000 answers."""
    server, url = start_server(source, 32, max_wait_ms, 256)
    try:
        samples, answered = [resident_mib(server.pid)], 0
        while answered < requests:
            r = asyncio.run(load(url, images, 32, min(1000, requests - answered), 600))
            answered += r["answered"] + r["errors"]
            samples.append(resident_mib(server.pid))
        print(f"soak: {answered} requests; server VmRSS MiB when ready {samples[0]:.0f}, after each 1000: "
              f"{' '.join(f'{m:.0f}' for m in samples[1:])}; peak {max(samples):.0f}, growth after the first "
              f"1000: {samples[-1] - samples[1]:+.0f} MiB")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--images", help="folder of image files to send (default: cifar10-mini test images)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level at most (2000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per level at most (20)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--soak", type=int, default=0, help="requests of the memory soak (0: none)")
    args = parser.parse_args()
    images = sample_images(args.images)
    print(f"imgcls predict offline: {offline_images_per_s(args.source, images):.0f} images/s")
    print(f"{len(images)} images, one per request; at most {args.requests} requests or {args.seconds:g} s a level")
    print(f"{'mode':<14} {'clients':>7} {'answered':>8} {'503s':>5} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'batch':>6}")
    for mode, max_batch in MODES.items():
        server, url = start_server(args.source, max_batch, args.max_wait_ms, max(256, max(args.concurrency)))
        try:
            for concurrency in args.concurrency:
                before = batch_totals(url)
                r = asyncio.run(load(url, images, concurrency, args.requests, args.seconds))
                scored, calls = batch_totals(url) - before
                print(f"{mode:<14} {concurrency:>7} {r['answered']:>8} {r['errors']:>5} {r['per_s']:>8.1f} "
                      f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {scored / max(calls, 1):>6.1f}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print("batch: mean images per engine call during the level")
    if args.soak:
        soak(args.source, images, args.soak, args.max_wait_ms)


if __name__ == "__main__":
    main()
