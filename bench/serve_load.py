"""A bounded load test of `mlflow models serve` on 127.0.0.1: throughput and latency percentiles.

    python bench/serve_load.py --model models:/brecahad-faster-rcnn@champion --image IMAGE.tif \\
        [--concurrency 4] [--requests 12] [--workers 2] [--timeout 600]

Starts the server in its own process group (workers and request timeout as docs/serving.md advises),
sends `--requests` requests of one image with at most `--concurrency` in flight (<= 20), stops
after 2 minutes whatever happens, stops the server, and prints one JSON line: requests/s, p50 and
p95 latency, and the count of each HTTP status. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

BUDGET_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, port: int, workers: int, timeout: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detection",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--timeout",
            str(timeout),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
            return server
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGTERM)
    raise SystemExit("the server did not answer /ping within 180 s")


def request(url: str, body: bytes, timeout: float) -> tuple[int, float]:
    t = time.perf_counter()
    try:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0  # no answer within the client's timeout
    return status, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS to serve")
    p.add_argument("--image", required=True, type=Path, help="a TIFF or PNG to send")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight, at most 20 (default: %(default)s)")
    p.add_argument("--requests", type=int, default=12, help="requests to send (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="server workers (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=600, help="server request timeout, s (default: %(default)s)")
    args = p.parse_args()
    concurrency = max(1, min(args.concurrency, 20))
    body = json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(args.image.read_bytes()).decode()]]}}
    ).encode()
    port = free_port()
    server = start(args.model, port, args.workers, args.timeout)
    url = f"http://127.0.0.1:{port}/invocations"
    results: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(request, url, body, BUDGET_S) for _ in range(args.requests)]
            for f in concurrent.futures.as_completed(futures, timeout=BUDGET_S + 5):
                results.append(f.result())
    except concurrent.futures.TimeoutError:
        pass  # the 2-minute budget ran out; what answered is reported
    finally:
        wall = time.perf_counter() - t0
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    ok = [s for code, s in results if code == 200]
    print(
        json.dumps(
            {
                "image": args.image.name,
                "concurrency": concurrency,
                "workers": args.workers,
                "requests": args.requests,
                "answered": len(results),
                "wall_s": round(wall, 1),
                "requests_per_s": round(len(ok) / wall, 3),
                "p50_s": round(float(np.percentile(ok, 50)), 2) if ok else None,
                "p95_s": round(float(np.percentile(ok, 95)), 2) if ok else None,
                "status": dict(Counter(code for code, _ in results)),
            }
        )
    )


if __name__ == "__main__":
    main()
