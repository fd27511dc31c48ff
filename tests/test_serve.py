"""`transeg serve` as a real process on loopback: the API, its refusals, batching under load, overload."""
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import transeg  # noqa: E402
from transeg.serve.app import create_app  # noqa: E402
from transeg.serve.loadtest import Upload, post, run_load, summary  # noqa: E402

CLASSES = ["sky", "ground", "disc", "box", "triangle", "ring"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, ckpt, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "transeg.cli", "serve", str(ckpt), "--port", str(self.port),
                                      "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the service did not start in 90 s")

    def get(self, path):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = transeg.create_model("edaformer-t", num_classes=6, classes=CLASSES, embed_dims=(8, 16, 24, 32),
                                 depths=(1, 1, 1, 1), decoder_dim=16)
    model.protocol = transeg.Protocol(size_divisor=None)
    path = tmp_path_factory.mktemp("serve") / "m.safetensors"
    transeg.save(model, path)
    return path


@pytest.fixture(scope="module")
def server(model_file):
    s = Server(model_file, "--max-upload-mb", "1", "--max-megapixels", "0.5", "--max-batch", "8",
               "--max-inflight-megapixels", "4")  # 16 clients of 256x256 fit: test_load... expects no 503
    yield s
    s.stop()


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.integration
def test_model_metadata_and_openapi(server):
    info = server.get("/v1/model")
    assert info["variant"] == "edaformer-t" and info["classes"] == CLASSES and len(info["palette"]) == 6
    assert info["isr"]["supported"] and (info["isr"]["encoder_stages"], info["isr"]["decoder_branches"]) == (4, 3)
    assert info["isr"]["paper"] == {"encoder": [2, 2, 1, 1], "decoder": [2, 2, 2]}
    assert info["isr"]["settings"][0]["label"] == "no ISR" and len(info["isr"]["settings"]) == 10  # isr.SWEEP
    assert info["limits"] == {"max_upload_bytes": 1_000_000, "max_pixels": 500_000, "max_inflight_pixels": 4_000_000,
                              "max_inflight_upload_bytes": 8_000_000}
    schema = server.get("/openapi.json")
    assert {"/healthz", "/v1/model", "/v1/segment"} <= set(schema["paths"])
    segment = schema["paths"]["/v1/segment"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(segment["requestBody"]["content"])
    assert {"413", "415", "422", "503"} <= set(segment["responses"])


@pytest.mark.integration
def test_png_and_json_answers_equal_the_library(server, model_file):
    """The service gives what `model.predict` gives in this process: the same label map (as an index PNG
    with the class colours, or base64 in JSON), the same shares, the argmax probability as confidence."""
    model = transeg.load(model_file)
    rgb = _image(70, 90, 1)
    expected = model.predict(rgb, probabilities=True)
    status, body = post(server.url, Upload(_png(rgb)))
    assert status == 200
    mask = Image.open(io.BytesIO(body))
    assert mask.mode == "P" and (np.asarray(mask) == expected.labels).all()
    assert mask.getpalette()[:18] == [v for c in model.palette for v in c]
    status, body = post(server.url, Upload(_png(rgb), "format=json&labels=true&confidence=true"))
    got = json.loads(body)
    labels = np.frombuffer(base64.b64decode(got["labels"]), np.uint8).reshape(got["height"], got["width"])
    assert (labels == expected.labels).all()
    assert [(s["name"], s["share"]) for s in got["shares"]] == list(expected.shares().items())
    assert [s["index"] for s in got["shares"]] == [CLASSES.index(s["name"]) for s in got["shares"]]
    assert abs(got["confidence"]["mean"] - expected.confidence.mean()) < 1e-6
    conf = np.frombuffer(base64.b64decode(got["confidence"]["map"]), np.uint8).reshape(70, 90)
    assert np.abs(conf.astype(float) - 255 * expected.confidence).max() <= 0.5 + 1e-4  # rounded to 8 bits
    assert got["latency_ms"] > 0 and got["batch"] == 1 and got["isr"] == "no ISR"


@pytest.mark.integration
def test_isr_per_request_changes_cost_not_the_model(server):
    rgb = _png(_image(64, 64, 2))
    plain = json.loads(post(server.url, Upload(rgb, "format=json"))[1])
    reduced = json.loads(post(server.url, Upload(rgb, "format=json&isr_encoder=2,2,1,1&isr_decoder=2,2,2"))[1])
    assert reduced["isr"] == "ISR encoder 2,2,1,1 / decoder 2,2,2"
    assert reduced["gflops"] < plain["gflops"]  # K/V pooled harder: fewer multiply-adds in attention
    again = json.loads(post(server.url, Upload(rgb, "format=json"))[1])
    assert again["gflops"] == plain["gflops"] and again["isr"] == "no ISR"  # the next request runs as trained


@pytest.mark.parametrize("upload,status,message", [
    (Upload(b"GIF? no: plain text"), 415, "upload: not an image transeg can read"),
    (Upload(_png(_image(64, 64, 3))[:300]), 422, "upload: cannot read the image"),
    (Upload(b"\0" * 1_200_000), 413, "upload of 1,200,000 bytes is more than the 1,000,000 bytes"),
    (Upload(_png(np.zeros((800, 800, 3), np.uint8))), 413, "800x800 pixels is more than the 500,000"),
    (Upload(_png(_image(32, 32, 4)), "isr_encoder=2,2"), 422, "ISR encoder needs 4 ratios"),
    (Upload(_png(_image(32, 32, 4)), "format=xml"), 422, "format: String should match pattern"),
    (Upload(b""), 422, "upload: empty upload"),
])
@pytest.mark.integration
def test_bad_requests_get_one_line(server, upload, status, message):
    got_status, body = post(server.url, upload)
    assert got_status == status
    error = json.loads(body)["error"]
    assert message in error and "\n" not in error


@pytest.mark.integration
def test_pixel_bombs_are_refused_from_the_header(server):
    """A 24 kB PNG that decodes to 14000x14000 pixels (196 M; Pillow refuses above 179 M) and one that
    decodes to 16 M (over this service's 0.5 M): both refused before any pixel is decoded."""
    for side, status, message in ((14000, 422, "upload: cannot read the image (Image size (196000000 pixels)"),
                                  (4000, 413, "upload: 4000x4000 pixels is more than the 500,000")):
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG")
        got, body = post(server.url, Upload(buffer.getvalue()))
        assert (got, json.loads(body)["error"][:len(message)]) == (status, message)
    assert server.get("/healthz")["status"] == "ok"


@pytest.mark.integration
def test_multipart_upload(server):
    rgb = _png(_image(40, 40, 5))
    boundary = "transegboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + rgb + f"\r\n--{boundary}--\r\n".encode()
    status, answer = post(server.url, Upload(body, "format=json", f"multipart/form-data; boundary={boundary}"))
    assert status == 200 and json.loads(answer)["width"] == 40
    junk = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"notes.txt\"\r\n\r\n"
            f"hello\r\n--{boundary}--\r\n").encode()
    status, answer = post(server.url, Upload(junk, "format=json", f"multipart/form-data; boundary={boundary}"))
    assert status == 415 and json.loads(answer)["error"].startswith("notes.txt: not an image")


def _form(*parts, boundary="transegboundary"):
    """A multipart/form-data body of (field, filename or None, bytes) parts, and its content type."""
    body = b""
    for field, filename, data in parts:
        name = f'; filename="{filename}"' if filename else ""
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{name}\r\n\r\n'.encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.integration
def test_multipart_field_choice_and_limits(server):
    """The field `image` is taken over an earlier file, else the first file; a form without a file is one
    line; a form over the upload limit is refused with 413 like a raw body, its size named."""
    small, large = _png(_image(24, 24, 7)), _png(_image(48, 40, 8))
    body, kind = _form(("note", None, b"hello"), ("other", "a.png", small), ("image", "b.png", large))
    status, answer = post(server.url, Upload(body, "format=json", kind))
    assert status == 200 and (json.loads(answer)["width"], json.loads(answer)["height"]) == (40, 48)
    body, kind = _form(("note", None, b"hello"), ("first", "a.png", small))
    status, answer = post(server.url, Upload(body, "format=json", kind))
    assert status == 200 and json.loads(answer)["width"] == 24
    body, kind = _form(("note", None, b"hello"))
    status, answer = post(server.url, Upload(body, "format=json", kind))
    assert (status, json.loads(answer)) == (422, {"error": "multipart upload without a file (send the image as "
                                                           "the field `image`)"})
    body, kind = _form(("image", "big.png", b"\0" * 1_000_000))
    status, answer = post(server.url, Upload(body, "format=json", kind))
    assert (status, json.loads(answer)) == (413, {"error": f"upload of {len(body):,} bytes is more than the "
                                                           "1,000,000 bytes this service takes"})
    assert server.get("/healthz")["status"] == "ok"


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_an_oversized_upload_is_refused_before_it_is_all_read(model_file, multipart):
    """The app called in-process as the ASGI server would call it, with a 1,000-byte limit, for a
    client that declares 50 MB and sends it in 1,000-byte messages: the 413 and its one JSON line come
    back after at most 4x the limit was read (what the service drains so that a client still sending
    receives the answer), the rest never asked for."""
    app = create_app(transeg.load(model_file), max_upload_bytes=1000)
    declared, chunk = 50_000_000, b"\0" * 1000
    kind = b"multipart/form-data; boundary=transegboundary" if multipart else b"application/octet-stream"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/segment", "raw_path": b"/v1/segment", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", kind), (b"content-length", str(declared).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    received, sent = [], []

    async def receive():
        received.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": sum(received) < declared}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:])) == {
        "error": f"upload of {declared:,} bytes is more than the 1,000 bytes this service takes"}
    assert sum(received) <= 4 * 1000 + len(chunk)


@pytest.mark.integration
def test_load_with_bad_uploads_mixed_in(server, model_file):
    """200 requests from 16 concurrent clients, one in four a bad upload: every good one is answered with
    the library's label map (batched by the service: `batch` > 1 shows it happened), every bad one
    refused, the process alive, and its memory flat (a leak of one 256x256 request's arrays and
    probabilities, ~2 MB, over 200 requests would add ~400 MB; 100 MB allows allocator noise)."""
    model = transeg.load(model_file)
    images = [_image(256, 256, 10 + i) for i in range(3)]
    expected = [model.predict(im).labels for im in images]
    uploads = [Upload(_png(images[0])), Upload(b"not an image", ok=False),
               Upload(_png(images[1]), "format=json&labels=true&confidence=true"), Upload(_png(images[2]))]
    image_of = [0, None, 1, 2]
    run_load(server.url, uploads, clients=16, total=40)  # warm-up: the allocator reaches its working size
    before = _rss_mb(server.proc.pid)
    results = run_load(server.url, uploads, clients=16, total=200)
    after = _rss_mb(server.proc.pid)
    s = summary(results)
    assert (s["good"], s["answered"], s["rejected"]) == (150, 150, 50)
    batches = []
    for r in results:
        if not r.upload.ok:
            assert r.status == 415
            continue
        k = image_of[r.index % len(uploads)]
        if "json" in r.upload.query:
            got = json.loads(r.body)
            labels = np.frombuffer(base64.b64decode(got["labels"]), np.uint8).reshape(256, 256)
            batches.append(got["batch"])
        else:
            labels = np.asarray(Image.open(io.BytesIO(r.body)))
        # batching runs the same convolutions on a stacked batch: allow a near-tie to flip (random weights)
        assert (labels == expected[k]).mean() >= 0.999
    assert server.proc.poll() is None
    assert max(batches) > 1
    assert after - before < 100, (before, after)


@pytest.mark.integration
def test_overload_answers_503_with_retry_after(model_file):
    """One request admitted at a time and a 1 s collection window: while the first waits in its window,
    a second is refused at once with 503 and Retry-After instead of queueing."""
    s = Server(model_file, "--max-pending", "1", "--window-ms", "1000", "--max-batch", "2")
    try:
        from concurrent.futures import ThreadPoolExecutor

        rgb = _png(_image(32, 32, 6))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, s.url, Upload(rgb))
            time.sleep(0.3)
            request = urllib.request.Request(f"{s.url}/v1/segment", data=rgb, method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert first.result()[0] == 200
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "overloaded" in json.loads(refused.value.read())["error"]
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- bounds (issue 30)
def _call(app, method, path, headers=(), body=b""):
    """(status, headers, body) of one request to the ASGI app in this process, the body in one message."""
    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture(scope="module")
def app(model_file):
    return create_app(transeg.load(model_file), max_upload_bytes=1_000_000, max_pixels=500_000)


_LOCAL = [("Host", "127.0.0.1:8000")]
_PNG = _png(_image(20, 30, 9))
_OCTET = [("Content-Type", "application/octet-stream")]


@pytest.mark.parametrize("method,path,headers,body,status,message", [
    # item 11: Starlette's own refusals in the service's format
    ("GET", "/nope", _LOCAL, b"", 404, "no such path: /nope"),
    ("GET", "/v1/segment", _LOCAL, b"", 405, "GET is not allowed on /v1/segment (allowed: POST)"),
    ("DELETE", "/healthz", _LOCAL, b"", 405, "DELETE is not allowed on /healthz"),
    ("POST", "/v1/model", _LOCAL + _OCTET, _PNG, 405, "POST is not allowed on /v1/model"),
    # item 6: a Host that is not this machine's name (DNS rebinding) and cross-origin writes
    ("GET", "/v1/model", [("Host", "evil.example.com")], b"", 400, "Host 'evil.example.com' is not a name"),
    ("GET", "/healthz", [("Host", "evil.example.com:8000")], b"", 400, "is not a name this service answers to"),
    ("GET", "/", [("Host", "127.0.0.1.nip.io")], b"", 400, "--allowed-hosts adds names"),
    ("POST", "/v1/segment", [("Host", "localhost.evil.example")] + _OCTET, _PNG, 400, "is not a name"),
    ("POST", "/v1/segment", _LOCAL + _OCTET + [("Origin", "http://evil.example.com")], _PNG, 403,
     "from the page at 'http://evil.example.com' is refused"),
    ("POST", "/v1/segment", _LOCAL + _OCTET + [("Origin", "null")], _PNG, 403, "cross-origin writes need"),
    ("POST", "/v1/segment", _LOCAL + _OCTET + [("Origin", "http://127.0.0.1:9999")], _PNG, 403, "is refused"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "text/plain")], _PNG, 415, "text/plain is not an image upload"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "text/html; charset=utf-8")], _PNG, 415, "text/html is not"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "application/x-www-form-urlencoded"),
                                      ("Origin", "http://127.0.0.1:8000")], _PNG, 415, "not an image upload"),
    # item 11: malformed multipart
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "multipart/form-data")], _PNG, 400, "names no boundary"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", _form(("image", "a.png", _PNG))[1])],
     _form(("image", "a.png", _PNG))[0][:-40], 400, "cut short, the closing boundary never came"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", _form(("image", "a.png", _PNG))[1])],
     b"--transegboundary--\r\n", 422, "multipart upload without a file"),
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", _form(("image", "a.png", _PNG))[1])],
     b"--transegboundary\r\nno header here\r\n\r\nx\r\n--transegboundary--\r\n", 400, "malformed multipart upload"),
    ("POST", "/v1/segment?format=xml", _LOCAL + _OCTET, _PNG, 422, "format: String should match pattern"),
])
def test_refusals_are_one_json_error_line(app, method, path, headers, body, status, message):
    """Every refusal, the framework's included, is {"error": one line} naming the input and the fix."""
    got, _, answer = _call(app, method, path, headers, body)
    assert got == status, answer
    parsed = json.loads(answer)
    assert list(parsed) == ["error"] and message in parsed["error"] and "\n" not in parsed["error"]


@pytest.mark.parametrize("method,path,headers,body", [
    ("HEAD", "/healthz", _LOCAL, b""),
    ("HEAD", "/v1/model", [("Host", "localhost")], b""),
    ("GET", "/healthz", [("Host", "[::1]:8000")], b""),
    ("GET", "/healthz", [], b""),                                                   # HTTP/1.0: no Host
    ("POST", "/v1/segment", _LOCAL + _OCTET + [("Origin", "http://127.0.0.1:8000")], _PNG),  # the page itself
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "application/x-www-form-urlencoded")], _PNG),  # curl -d
    ("POST", "/v1/segment", _LOCAL + [("Content-Type", "image/png")], _PNG),
])
def test_what_is_still_answered(app, method, path, headers, body):
    assert _call(app, method, path, headers, body)[0] == 200


def test_allowed_hosts_and_origins_are_settable(model_file):
    app = create_app(transeg.load(model_file), allowed_hosts=("seg.example.com",),
                     allowed_origins=("https://app.example.com",))
    cross = [("Host", "seg.example.com"), ("Origin", "https://app.example.com")] + _OCTET
    status, headers, _ = _call(app, "POST", "/v1/segment", cross, _PNG)
    assert status == 200 and headers[b"access-control-allow-origin"] == b"https://app.example.com"
    assert _call(app, "GET", "/healthz", _LOCAL)[0] == 400  # the loopback names are replaced, not added to
    anyone = create_app(transeg.load(model_file), allowed_hosts=("*",))
    assert _call(anyone, "GET", "/healthz", [("Host", "whatever.example")])[0] == 200


def test_admission_counts_pixels_and_bytes_in_flight(app):
    """A request holds its body bytes and decoded pixels until its answer is built; what does not fit
    beside the others is 503 with Retry-After at once, and everything is given back afterwards."""
    from transeg.serve.app import Refused, Ticket

    service = app.state.service  # 0.5 MP per image, 1 MP in flight; 1 MB per body, 8 MB in flight
    first, second, third = Ticket(service), Ticket(service), Ticket(service)
    first.take_pixels(700, 700, "a.png")
    second.take_pixels(700, 700, "b.png")
    with pytest.raises(Refused) as busy:
        third.take_pixels(700, 700, "c.png")
    assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "1"
    assert "c.png (700x700) does not fit beside the 980,000 pixels in flight" in busy.value.message
    third.take_pixels(100, 200, "d.png")
    for _ in range(8):
        first.take_bytes(1_000_000)
    with pytest.raises(Refused, match="--max-inflight-upload-mb"):
        second.take_bytes(1)
    asyncio.run(_leave(first, second, third))
    assert (service.pixels.used, service.uploads.used) == (0, 0)


async def _leave(*tickets):
    for ticket in tickets:
        ticket.__exit__(None, None, None)


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port 70000: a port is 1 to 65535"),
    (["--port", "0"], "--port 0: must be a whole number at least 1"),
    (["--max-megapixels", "nan"], "--max-megapixels nan: must be a number above 0"),
    (["--max-megapixels", "0"], "--max-megapixels 0.0: must be a number above 0"),
    (["--max-upload-mb", "-1"], "--max-upload-mb -1.0: must be a number above 0"),
    (["--max-upload-mb", "inf"], "--max-upload-mb inf: must be"),
    (["--header-timeout", "0"], "--header-timeout 0.0: must be a number above 0"),
    (["--body-timeout", "nan"], "--body-timeout nan: must be"),
    (["--max-connections", "0"], "--max-connections 0: must be a whole number above 0"),
    (["--max-connections", "100000000"], "--max-connections 100000000: this process may open"),
    (["--max-inflight-megapixels", "10"], "--max-inflight-megapixels 10 is below --max-megapixels 40"),
    (["--max-inflight-upload-mb", "1"], "--max-inflight-upload-mb 1 is below --max-upload-mb 20"),
    (["--window-ms", "-5"], "--window-ms -5.0: must be a number at least 0"),
    (["--max-pending", "0"], "--max-pending 0: must be a whole number above 0"),
    (["--host", "203.0.113.7"], "cannot listen on 203.0.113.7:"),
    (["--port", "IN_USE"], "in use (another server?); choose another --port"),
])
def test_bad_serve_settings_are_one_line_before_serving(model_file, capsys, monkeypatch, args, message):
    """Item 9: each bad setting, a port in use or an address not on this machine: one line, exit 2,
    nothing printed as serving (checked before the model loads and the port is announced)."""
    from transeg.cli import main

    monkeypatch.setenv("TRANSEG_MALLOC", "system")  # main() would otherwise change this process's malloc
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        args = [str(taken.getsockname()[1]) if a == "IN_USE" else a for a in args]
        if "--port" not in args:
            args += ["--port", str(_free_port())]
        assert main(["serve", str(model_file), "--device", "cpu", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def _slow(port, parts, gap, limit=8.0):
    """Send `parts` one every `gap` seconds (stopping when the server closes), then read; returns
    (seconds until the connection ended, what came back)."""
    start, answer = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        try:
            for part in parts:
                s.sendall(part)
                time.sleep(gap)
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:  # reset or timed out: the server closed while we were still sending
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    return time.monotonic() - start, answer


def _status(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.integration
def test_slow_clients_are_cut_off_and_healthz_answers(model_file):
    """Item 4 on loopback, with a 1 s head deadline, a 2 s body deadline and 40 connections: a head sent
    one line every 0.4 s, a body one byte every 0.4 s, a chunked body with no end and an idle connection
    are each ended within their deadline (+1 s), with a 408 where a request had begun; 150 half-sent
    requests (more than the connection limit) leave the descriptors bounded and /healthz answering."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server(model_file, "--header-timeout", "1", "--body-timeout", "2", "--max-connections", "40")
    try:
        head = [b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"] + [b"X-Slow: 1\r\n"] * 30
        body = [b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"]
        chunked = [b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n"]
        cases = [("head", head, 0.4, 408, 1.0), ("body", body + [b"x"] * 30, 0.4, 408, 2.0),
                 ("chunked", chunked, 0.1, 408, 2.0), ("idle", [], 0, None, 1.0),
                 ("healthz body", [b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"]
                  + [b"x"] * 30, 0.4, 405, 3.0)]
        with ThreadPoolExecutor(len(cases)) as pool:
            runs = list(pool.map(lambda c: _slow(s.port, c[1], c[2]), cases))
        for (name, _, _, status, deadline), (seconds, answer) in zip(cases, runs):
            print(f"{name}: ended after {seconds:.2f} s with {answer[:12]!r}")
            assert seconds < deadline + 1.5 and _status(answer) == status, (name, seconds, answer[:200])
            if status == 408:
                assert b'"error":' in answer and b'the request ' in answer
        flood = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(150)]
        try:
            for sock in flood:
                sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            time.sleep(1.2)  # the flood has now waited longer than a newcomer that may push it out
            assert _fds(s.proc.pid) < 40 + 30  # the connections and the process's own files
            for _ in range(5):
                assert s.get("/healthz")["status"] == "ok"
        finally:
            for sock in flood:
                sock.close()
        request = urllib.request.Request(f"{s.url}/healthz", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and r.read() == b""
        evil = urllib.request.Request(f"{s.url}/v1/model", headers={"Host": "evil.example.com"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(evil, timeout=10)
        assert refused.value.code == 400 and "evil.example.com" in json.loads(refused.value.read())["error"]
    finally:
        s.stop()


@pytest.mark.integration
def test_soak_mixed_clients(model_file):
    """Good, huge (1 MP, 2 MP in flight at most), oversized, junk and slow clients together for ~10 s:
    every request is answered or refused with a status, /healthz answers throughout, and the resident
    memory after the burst is back within 150 MB of before (the freed heap is trimmed once idle)."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server(model_file, "--max-megapixels", "1", "--max-inflight-megapixels", "2", "--header-timeout", "1",
               "--body-timeout", "2", "--max-connections", "64")
    try:
        good, huge = _png(_image(128, 128, 20)), _png(_image(1000, 1000, 21))
        big = io.BytesIO()
        Image.new("1", (3000, 3000)).save(big, format="PNG")
        uploads = [Upload(good), Upload(huge), Upload(big.getvalue(), ok=False), Upload(b"junk" * 50, ok=False),
                   Upload(good, content_type="text/plain", ok=False), Upload(huge), Upload(good, "format=json")]
        ok = {200, 503}  # 503 + Retry-After while the 2 MP in flight are taken
        allowed = {0: ok, 1: ok, 2: {413}, 3: {415}, 4: {415}, 5: ok, 6: ok}
        for upload in (uploads[0], uploads[1]):  # warm-up: the allocator reaches its working size
            assert post(s.url, upload)[0] == 200
        time.sleep(1)
        before = _rss_mb(s.proc.pid)
        end, health = time.monotonic() + 10, []

        def poll():
            while time.monotonic() < end:
                health.append(s.get("/healthz")["status"])
                time.sleep(0.2)

        def slow(_):
            while time.monotonic() < end:
                _slow(s.port, [b"POST /v1/segment HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n"] + [b"X: 1\r\n"] * 9, 0.3)

        with ThreadPoolExecutor(12) as pool:
            pollers = [pool.submit(poll)] + [pool.submit(slow, i) for i in range(3)]
            rounds, answered = 0, 0
            while time.monotonic() < end - 2:
                results = run_load(s.url, uploads, clients=8, total=len(uploads) * 2, timeout=30)
                for r in results:
                    assert r.status in allowed[r.index % len(uploads)], (r.index, r.status, r.body[:200])
                    assert list(json.loads(r.body)) == ["error"] if r.status >= 400 else True
                answered += sum(r.status == 200 for r in results)
                rounds += 1
            for f in pollers:
                f.result()
        peak = _rss_mb(s.proc.pid)
        time.sleep(1.5)
        after = _rss_mb(s.proc.pid)
        print(f"soak: {rounds} rounds of {2 * len(uploads)}, {answered} answered 200, {len(health)} health checks; RSS before {before:.0f} MB, "
              f"at the end {peak:.0f} MB, after {after:.0f} MB")
        assert rounds >= 2 and answered >= rounds * 4 and set(health) == {"ok"} and len(health) >= 25
        assert after - before < 150, (before, peak, after)
        assert s.proc.poll() is None
    finally:
        s.stop()
