"""The page of `transeg serve` (src/transeg/serve/page.html) in a real headless Chromium, against the
service started as a real process on loopback with a tiny EDAFormer (so the ISR control is shown).

Checked against the service's own JSON, fetched separately with urllib: the overlay is the photo blended
with the class colours of `labels` at the slider's opacity (and exactly the photo at 0 %), the legend
is `shares`, the class under the pointer is `labels` at that image pixel (the canvas is scaled to fit),
the paper's ISR setting lowers the GFLOPs shown, the downloaded mask is the index PNG of the labels,
a refused upload shows the service's one-line error, every request stays on 127.0.0.1 and the console
stays clean. With the model description routed to a model without ISR: no ISR control; 503 and 422
lines shown, an upload over the limit refused in the page, a dropped file segmented.

Needs Chromium at /usr/bin/chromium and the playwright package (CI installs both), else it is skipped.
TRANSEG_SCREENSHOT=1 also writes docs/serve_page.png (otherwise the screenshot goes to a temporary
folder, so a normal run never changes the tree); for a picture that reads, the tiny model is then first
trained on the built-in synthetic set (2-4 minutes on one core) instead of keeping random weights.
"""
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transeg

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = os.environ.get("TRANSEG_SCREENSHOT") == "1"
# the built-in synthetic set's classes and colours
CLASSES = ["sky", "ground", "disc", "box", "triangle", "ring"]
PALETTE = [(110, 170, 230), (130, 95, 60), (220, 60, 60), (60, 180, 90), (240, 200, 50), (170, 80, 210)]
# EDAFormer-T's code paths with tiny widths (divisible by the decoder's 2/4/8 heads)
TINY_EDAFORMER = dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), mlp_ratio=2, decoder_dim=16, decoder_mlp_ratio=1)
# for the screenshot: a little wider, trained for 1000 iterations so its predictions resemble the scenes
SCREENSHOT_EDAFORMER = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], mlp_ratio=2, decoder_dim=32,
                            decoder_mlp_ratio=1)
W, H = 96, 128
FLOAT = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"

pytest.importorskip("fastapi", reason="transeg serve needs fastapi (pip install 'transeg[serve]')")
pytest.importorskip("uvicorn", reason="transeg serve needs uvicorn (pip install 'transeg[serve]')")
pytest.importorskip("multipart", reason="transeg serve needs python-multipart (pip install 'transeg[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"the page test needs Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base URL, model info) of `transeg serve` running as its own process; stopped at the end."""
    tmp = tmp_path_factory.mktemp("serve_page")
    torch.manual_seed(0)
    if SCREENSHOT:
        _train_for_screenshot(tmp / "run").replace(tmp / "m.safetensors")
    else:
        model = transeg.create_model("edaformer-t", num_classes=len(CLASSES), classes=CLASSES, palette=PALETTE,
                                     **TINY_EDAFORMER)
        transeg.save(model, tmp / "m.safetensors")
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transeg.cli", "serve", str(tmp / "m.safetensors"), "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transeg serve exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transeg serve did not answer /healthz in 60 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/model", timeout=10) as r:
            info = json.load(r)
        yield base, info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _train_for_screenshot(out):
    """A small EDAFormer trained from scratch on the synthetic set (the quick start's settings, fewer
    iterations): its predictions look like the scenes, where random weights give noise."""
    from transeg.engine import load_config, train
    from transeg.engine.config import QUICKSTART

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [], **{**QUICKSTART, "model": "edaformer-t", "model_args": SCREENSHOT_EDAFORMER,
                                       "iters": 1000, "amp": "no", "out": str(out), "eval_interval": 1000,
                                       "ckpt_interval": 1000})
        train(cfg, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out / "model.safetensors"


def _post(base, query, data, filename="photo.png"):
    """(status, body bytes) of POST /v1/segment?query with `data` as the multipart field `image`."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/v1/segment?{query}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _segment_json(base, data, isr=None):
    query = "format=json&labels=true&confidence=true"
    if isr:
        query += "".join(f"&isr_{part}={','.join(map(str, r))}" for part, r in isr.items() if r)
    status, body = _post(base, query, data)
    assert status == 200, body
    out = json.loads(body)
    out["labels_array"] = np.frombuffer(base64.b64decode(out["labels"]), np.uint8).reshape(out["height"], out["width"])
    out["confidence_array"] = np.frombuffer(base64.b64decode(out["confidence"]["map"]), np.uint8).reshape(
        out["height"], out["width"])
    return out


def _png(rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo():
    """A 96x128 (WxH) RGB test picture: gradients, two shapes and some noise (no colour profile, so
    the browser decodes it to exactly these values)."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 255 // (W - 1), yy * 255 // (H - 1), 255 - (xx + yy) * 255 // (W + H - 2)], -1)
    rgb[20:60, 10:50] = (220, 40, 40)
    rgb[((yy - 90) ** 2 + (xx - 60) ** 2) < 18 ** 2] = (40, 200, 60)
    rgb = rgb + np.random.RandomState(0).randint(-12, 13, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _screenshot_photo():
    """A scene of the built-in synthetic set, upscaled 3x with nearest, so the screenshot reads at a glance."""
    from transeg.data import build_dataset

    image = build_dataset(None, "val")[0]["image"]
    image = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    rgb = np.ascontiguousarray(image.transpose(1, 2, 0)).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 3, rgb.shape[0] * 3), Image.NEAREST))


def _canvas(page):
    """The overlay canvas's pixels, [h, w, 4] uint8."""
    size = page.evaluate("() => [document.getElementById('overlay').width, document.getElementById('overlay').height]")
    data = page.evaluate("""() => {
        const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
        return btoa(s);
    }""")
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(size[1], size[0], 4)


def _wait_result(page, n):
    """Wait until the page has drawn its n-th answer (body[data-results]); fail on a shown error."""
    page.wait_for_function(
        "n => Number(document.body.dataset.results) >= n || document.body.dataset.state === 'error'", arg=n,
        timeout=20_000)
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")


def _number(page, selector):
    text = page.text_content(selector)
    match = re.search(FLOAT, text)
    assert match, f"{selector} shows no number: {text!r}"
    return float(match.group())


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A 1280x800 page; page.requests: every URL it asked for, page.errors: console errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1, accept_downloads=True)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(f"page error: {e}"))
    yield page
    context.close()


def _local_only(urls):
    return urls and all(urllib.parse.urlsplit(u).scheme in ("data", "blob") or urllib.parse.urlsplit(u).hostname == "127.0.0.1"
                        for u in urls)


def _refusals_only(errors, *statuses):
    """Chromium itself logs each answered-with-an-error fetch ("Failed to load resource: ... 415"); nothing else."""
    return not [m for m in errors if not any(f"status of {s}" in m for s in statuses)]


@pytest.mark.integration
def test_page_in_headless_chromium(service, page, tmp_path):
    base, info = service
    photo = _photo()
    photo_png = _png(photo)
    (tmp_path / "photo.png").write_bytes(photo_png)
    plain = _segment_json(base, photo_png)
    paper = _segment_json(base, photo_png, info["isr"]["paper"])
    palette = np.array(info["palette"], np.float64)

    page.goto(base + "/")
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=10_000)

    # header: the model and its test protocol
    assert info["variant"] in page.text_content("#model")
    assert info["protocol"]["description"] in page.text_content("#protocol")

    # ISR control: every setting by label, "no ISR" selected, the paper's setting marked
    options = page.eval_on_selector_all("#isr option", "os => os.map(o => [o.textContent, o.selected])")
    labels = [s["label"] for s in info["isr"]["settings"]]
    paper_label = next(s["label"] for s in info["isr"]["settings"]
                       if s["encoder"] == info["isr"]["paper"]["encoder"]
                       and s["decoder"] == info["isr"]["paper"]["decoder"])
    assert [t for t, _ in options] == [t + " (paper)" if t == paper_label else t for t in labels]
    assert [t for t, selected in options if selected] == ["no ISR"]
    assert page.is_visible("#isr")

    # upload: the overlay has the image's size and aspect ratio, and is the photo blended with the
    # class colours of the service's labels at the slider's opacity (50 %)
    page.set_input_files("#file", str(tmp_path / "photo.png"))
    _wait_result(page, 1)
    pixels = _canvas(page)
    assert pixels.shape == (H, W, 4)
    box = page.locator("#overlay").bounding_box()
    assert box["width"] > W and abs(box["width"] / box["height"] - W / H) < 0.02, box
    assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 800
    expected = 0.5 * photo + 0.5 * palette[plain["labels_array"]]
    assert (pixels[..., 3] == 255).all()
    assert np.abs(pixels[..., :3] - expected).max() <= 2, "the overlay is not photo + class colours at 50 %"
    assert np.abs(pixels[..., :3].astype(int) - photo).max() > 20, "no class colours on the overlay"

    # legend: exactly the classes of `shares`, in order, with their shares in %
    legend = page.eval_on_selector_all(
        "#legend li", "lis => lis.map(li => [li.querySelector('.name').textContent, "
                      "li.querySelector('.share').textContent, getComputedStyle(li.querySelector('.swatch')).backgroundColor])")
    assert [(name, share) for name, share, _ in legend] == \
        [(s["name"], "< 0.1 %" if s["share"] < 0.0005 else f"{100 * s['share']:.1f} %") for s in plain["shares"]]
    assert [c for _, _, c in legend] == \
        ["rgb({}, {}, {})".format(*info["palette"][s["index"]]) for s in plain["shares"]]

    # the class under the pointer: the centre, then pixels near the corners (the canvas is scaled)
    def pointer_at(x, y):
        page.mouse.move(box["x"] + (x + 0.5) * box["width"] / W, box["y"] + (y + 0.5) * box["height"] / H)
        label = int(plain["labels_array"][y, x])
        conf = round(100 * int(plain["confidence_array"][y, x]) / 255)
        assert page.text_content("#hover-class", timeout=2000) == info["classes"][label], (x, y)
        assert f"{conf} %" in page.text_content("#hover") and f"({x}, {y})" in page.text_content("#hover")

    for x, y in [(W // 2, H // 2), (3, 5), (W - 4, H - 3), (W - 2, 7), (11, H - 9)]:
        pointer_at(x, y)

    # opacity 0: the canvas is the plain photo; back to 50 % without a new request
    segment_requests = sum("/v1/segment" in u for u in page.requests)
    page.fill("#opacity", "0")
    assert np.abs(_canvas(page)[..., :3].astype(int) - photo).max() <= 1, "opacity 0 is not the plain photo"
    page.fill("#opacity", "50")
    assert np.abs(_canvas(page)[..., :3] - expected).max() <= 2
    assert sum("/v1/segment" in u for u in page.requests) == segment_requests, "the slider sent a request"

    # ISR: the paper's setting re-runs the image, with fewer GFLOPs than no ISR
    gflops_plain = _number(page, "#gflops")
    assert gflops_plain == pytest.approx(plain["gflops"], rel=0.01)
    assert _number(page, "#latency") > 0
    page.select_option("#isr", label=paper_label + " (paper)")
    _wait_result(page, 2)
    gflops_paper = _number(page, "#gflops")
    assert gflops_paper < gflops_plain, (gflops_paper, gflops_plain)
    assert gflops_paper == pytest.approx(paper["gflops"], rel=0.01)
    expected = 0.5 * photo + 0.5 * palette[paper["labels_array"]]
    assert np.abs(_canvas(page)[..., :3] - expected).max() <= 2, "the overlay is not the ISR labels"

    # download: the index PNG of the labels on screen, named after the upload
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "photo_mask.png"
    mask = Image.open(download.value.path())
    assert mask.mode == "P" and mask.size == (W, H)
    assert (np.asarray(mask) == paper["labels_array"]).all()

    # a refused upload: the service's one-line error in the page, the page still there
    (tmp_path / "notes.png").write_bytes(b"this is not an image\n")
    status, body = _post(base, "format=json", b"this is not an image\n", "notes.png")
    assert status == 415
    page.set_input_files("#file", str(tmp_path / "notes.png"))
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)
    error = page.text_content("#error")
    assert page.is_visible("#error") and error.startswith("415") and json.loads(body)["error"] in error
    assert page.is_visible("#file") and page.is_visible("#model")

    # screenshot: a synthetic scene with the paper's ISR setting, the pointer on the image
    (tmp_path / "scene.png").write_bytes(_png(_screenshot_photo()))
    page.set_input_files("#file", str(tmp_path / "scene.png"))
    _wait_result(page, 3)
    assert not page.is_visible("#error")
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.62, box["y"] + box["height"] * 0.4)
    shot = ROOT / "docs" / "serve_page.png" if SCREENSHOT else tmp_path / "serve_page.png"
    page.screenshot(path=str(shot))

    requests = page.requests
    assert _local_only(requests), requests
    assert sum("/v1/segment?format=json" in u for u in requests) == 4 and sum("format=png" in u for u in requests) == 1, \
        requests
    assert sum("status of 415" in m for m in page.errors) <= 1 and _refusals_only(page.errors, 415), page.errors


@pytest.mark.integration
def test_page_without_isr_and_its_refusals(service, page, tmp_path):
    """A model without pooled attention (the model description routed to say so): no ISR control. The
    service's 503 (with Retry-After) and 422 lines are shown as they come; a file over the upload limit
    is refused in the page without being sent; a file dropped on the page is segmented."""
    base, info = service
    limit = 20_000
    no_isr = {**info, "variant": "segformer-b0", "limits": {**info["limits"], "max_upload_bytes": limit},
              "isr": {"supported": False, "encoder_stages": 4, "decoder_branches": 0, "settings": [], "paper": None}}
    page.route("**/v1/model", lambda route: route.fulfill(json=no_isr))
    refusals = [(503, "overloaded (64 requests pending)", {"Retry-After": "1"}),
                (422, "upload: cannot read the image (truncated PNG)", {})]
    answers = iter([None, *refusals, None])

    def segment(route):
        answer = next(answers)
        if answer is None:
            route.continue_()
        else:
            route.fulfill(status=answer[0], json={"error": answer[1]}, headers=answer[2])

    page.route("**/v1/segment?*", segment)
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(_png(_photo()[::2, ::2].copy()))
    big.write_bytes(_png(np.random.RandomState(1).randint(0, 256, (128, 128, 3), dtype=np.uint8)))
    assert small.stat().st_size < limit < big.stat().st_size

    page.goto(base + "/")
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=10_000)
    assert "segformer-b0" in page.text_content("#model")
    assert not page.is_visible("#isr") and page.eval_on_selector_all("#isr option", "os => os.length") == 0

    page.set_input_files("#file", str(small))
    _wait_result(page, 1)
    assert page.eval_on_selector_all("#legend li", "lis => lis.length") > 0 and not page.is_visible("#error")

    for status, message, headers in refusals:
        page.set_input_files("#file", str(small))
        page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)
        error = page.text_content("#error")
        assert page.is_visible("#error") and error.startswith(f"{status}: {message}"), error
        if "Retry-After" in headers:
            assert "try again in 1 s" in error, error
        page.evaluate("document.body.dataset.state = 'checked'")

    sent = len(page.requests)
    page.set_input_files("#file", str(big))
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)
    assert page.text_content("#error").startswith("413: big.png") and len(page.requests) == sent

    # dropped on the page rather than chosen: the drop zone takes it
    page.evaluate("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const drop = new DataTransfer();
        drop.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("stage").dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(small.read_bytes()).decode(), "dropped.png"])
    _wait_result(page, 2)
    assert not page.is_visible("#error") and page.is_visible("#overlay")
    assert page.text_content("#filename") == "dropped.png" and page.evaluate("document.getElementById('overlay').width") == W // 2
    assert _local_only(page.requests), page.requests
    assert _refusals_only(page.errors, 503, 422), page.errors


@pytest.mark.integration
def test_page_is_self_contained(service):
    """No URL outside the service: no CDN, fonts, images or style sheets, inline CSS and JavaScript only."""
    base, _ = service
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        assert r.headers.get_content_type() == "text/html"
        html = r.read().decode()
    assert not re.search(r"https?:|//[\w.-]+\.\w|url\(|@import|<script[^>]+src=|<link(?![^>]+href=\"data:)[^>]*href=", html)
    for element in ("file", "overlay", "opacity", "legend", "hover", "isr", "gflops", "latency", "download", "error", "status"):
        assert f'id="{element}"' in html, element
