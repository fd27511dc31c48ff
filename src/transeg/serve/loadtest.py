"""Load a running `transeg serve` with concurrent clients (for the tests and benchmarks/serve_load.py).

    results = run_load("http://127.0.0.1:8000", [Upload(png_bytes), Upload(b"junk", ok=False)], clients=16, total=200)
    summary(results)   # {"requests": 200, "answered": ..., "p50_ms": ..., "p99_ms": ..., "images_per_s": ...}
"""
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Upload:
    body: bytes
    query: str = "format=png"
    content_type: str = "application/octet-stream"
    ok: bool = True                     # whether the service should answer 200


@dataclass
class Result:
    index: int
    upload: Upload
    status: int
    seconds: float
    body: bytes


def post(url, upload, timeout=60):
    """(status, body) of POST /v1/segment with `upload` as the raw body."""
    request = urllib.request.Request(f"{url}/v1/segment?{upload.query}", data=upload.body, method="POST",
                                     headers={"Content-Type": upload.content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_load(url, uploads, clients=16, total=200, timeout=60):
    """Send `total` requests, request i carrying uploads[i % len(uploads)], from `clients` concurrent
    clients; returns one Result per request, in order."""
    def one(i):
        upload = uploads[i % len(uploads)]
        start = time.perf_counter()
        status, body = post(url, upload, timeout)
        return Result(i, upload, status, time.perf_counter() - start, body)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, range(total)))


def summary(results, wall_seconds=None):
    """Counts and latency percentiles of the requests the service should answer (`Upload.ok`)."""
    good = sorted(r.seconds for r in results if r.upload.ok)
    wall = wall_seconds or sum(r.seconds for r in results)
    q = statistics.quantiles(good, n=100, method="inclusive") if len(good) > 1 else [good[0]] * 99
    return {"requests": len(results), "good": len(good), "answered": sum(r.status == 200 for r in results if r.upload.ok),
            "rejected": sum(r.status >= 400 for r in results if not r.upload.ok),
            "p50_ms": 1e3 * statistics.median(good), "p99_ms": 1e3 * q[98], "images_per_s": len(good) / wall}
