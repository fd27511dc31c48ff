"""The HTTP service: one model, loaded once, behind a small JSON / PNG API and a page.

    GET  /                the page: drop an image, see the overlay, legend, class under the pointer, ISR
    GET  /healthz         {"status": "ok", "pending": n}
    GET  /v1/model        variant, classes, palette, test protocol, the ISR settings the model takes, limits
    POST /v1/segment      an image (multipart field `image`, or the raw body) -> index PNG, or JSON with
                          per-class shares (and on request the label map, the confidence, GFLOPs, latency)
    GET  /docs, /openapi.json

Requests are decoded in worker threads and batched on the device (`Batcher`). Every refusal is one JSON
line, {"error": "..."}, with the same text the command line prints: 400 a Host not served or a malformed
form, 403 a cross-origin write, 404 / 405 no such path or method, 408 a head or body too slow, 413 too
large, 415 not an image, 422 unreadable or a setting the model does not take, 503 overloaded (with
Retry-After). The bounds and their flags: limits.py.
"""
import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
from starlette.requests import Request

from .. import __version__, isr, tiled
from ..errors import TransegError
from ..flops import image_gmacs, meta_model
from ..registry import get_variant
from .batcher import Batcher, Job, Overloaded
from .limits import LOOPBACK, Budget, Guard, Refused, trim_memory

PAGE = Path(__file__).with_name("page.html")
# The ISR setting the EDAFormer paper recommends, cut to the groups a model has (marked on the page).
PAPER_ISR = {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}
# Freed heap pages go back to the kernel once nothing is in flight and this many pixels have passed
# since the last time: a burst of large images leaves no resident memory behind.
TRIM_AFTER_PIXELS = 2_000_000
BUSY = {"Retry-After": "1", "Connection": "close"}
# GFLOPs counts kept for reuse, one per (ISR setting, forward size): a protocol that does not resize runs every
# new image size a client sends at that size, so the cache is emptied past this many.
GMACS_CACHE_SIZES = 256


class Service:
    """The model, its meta-device twin for counting GFLOPs, and the batcher in front of them."""

    def __init__(self, model, max_batch=8, window_ms=5.0, max_pending=64, max_upload_bytes=20_000_000,
                 max_pixels=40_000_000, max_inflight_pixels=None, max_inflight_upload_bytes=None, tile=tiled.WINDOW):
        self.model, self.tile = model, tile
        self.twin = meta_model(model.meta["variant"], **model.meta["model_args"])
        self.convention = get_variant(model.meta["variant"]).paper.gflops_convention
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.pixels = Budget(max_inflight_pixels or 2 * max_pixels)
        self.uploads = Budget(max_inflight_upload_bytes or 8 * max_upload_bytes)
        self._since_trim = 0
        self.class_index = {name: i for i, name in enumerate(model.classes)}
        self._gmacs_cache = {}
        self.batcher = Batcher(self._run, max_batch=max_batch, window_s=window_ms / 1e3, max_pending=max_pending)

    # ------------------------------------------------------------------------------------ worker thread
    def in_tiles(self, image):
        return tiled.runs_in_tiles(self.model, image.shape[:2], self.tile)

    def _run(self, jobs):
        setting = dict(jobs[0].isr) or None
        start = time.perf_counter()
        if self.in_tiles(jobs[0].image):  # the batcher groups images of one size: all of them, then
            segs = self.model.predict([j.image for j in jobs], isr=setting, tile=self.tile)
        else:
            segs = self.model.predict([j.image for j in jobs], batch_size=len(jobs), isr=setting,
                                      confidence=jobs[0].confidence)
        ms = (time.perf_counter() - start) * 1e3
        isr.set_isr(self.twin, **(setting or {}))
        if len(self._gmacs_cache) > GMACS_CACHE_SIZES:  # one count per (ISR setting, forward size): bounded
            self._gmacs_cache.clear()
        shape, windows = jobs[0].image.shape[:2], 1
        if self.in_tiles(jobs[0].image):  # the cost of every window the image was cut into
            shape, windows = tiled.tile_forwards(shape, self.tile)
        gflops = windows * image_gmacs(self.twin, shape, self.model.protocol, self.convention, self._gmacs_cache)
        return [(seg, ms, len(jobs), gflops) for seg in segs]

    # ------------------------------------------------------------------------------------ request side
    def info(self):
        groups = isr.pool_groups(self.model)
        supported = bool(groups["encoder"] or groups["decoder"])
        settings = isr.sweep_settings(self.model) if supported else []
        paper = {part: PAPER_ISR[part][:len(groups[part])] for part in isr.PARTS}
        return {
            "variant": self.model.meta["variant"], "num_classes": self.model.num_classes,
            "classes": list(self.model.classes), "palette": [list(c) for c in self.model.palette],
            "mean": list(self.model.meta["mean"]), "std": list(self.model.meta["std"]),
            "protocol": {**self.model.protocol.to_meta(), "description": self.model.protocol.describe()},
            "isr": {"supported": supported, "encoder_stages": len(groups["encoder"]),
                    "decoder_branches": len(groups["decoder"]),
                    "settings": [{**{k: list(v) for k, v in s.items()}, "label": isr.describe(s)} for s in settings],
                    "paper": {k: list(v) for k, v in paper.items()} if supported else None},
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                       "max_inflight_pixels": self.pixels.limit, "max_inflight_upload_bytes": self.uploads.limit},
            "device": str(next(self.model.parameters()).device), "dtype": str(self.model.dtype).removeprefix("torch."),
            "version": __version__,
        }

    def measure(self, data, name):
        """(width, height) from the image's header, without decoding a pixel, or Refused with the command
        line's message (not an image, or more pixels than one image may have)."""
        from PIL import Image, UnidentifiedImageError

        from ..images import open_image

        if not data:
            raise Refused(422, f"{name}: empty upload")
        try:
            with open_image(io.BytesIO(data), max_pixels=self.max_pixels) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise Refused(415, f"{name}: not an image transeg can read (PNG, JPEG, BMP, TIFF, WebP ...)") from None
        except Image.DecompressionBombError as e:
            raise Refused(422, f"{name}: cannot read the image ({e})") from None
        if w * h > self.max_pixels:
            raise Refused(413, f"{name}: {w}x{h} pixels is more than the {self.max_pixels:,} this service takes")
        return w, h

    def decode(self, data, name):
        """HxWx3 uint8 from the uploaded bytes (measured and admitted first), or Refused."""
        from ..images import read_image

        try:
            return read_image(io.BytesIO(data), name=name, max_pixels=self.max_pixels)[0]
        except TransegError as e:
            raise Refused(422, str(e)) from None

    def setting(self, encoder, decoder):
        """The hashable ISR setting of a request (() = as trained), or Refused."""
        try:
            parsed = isr.parse_setting(encoder, decoder, names=("isr_encoder", "isr_decoder"))  # the query's names
            checked = isr.check_setting(self.model, **parsed) if parsed else {}
        except TransegError as e:
            raise Refused(422, str(e)) from None
        return () if isr.is_default(checked) else tuple(checked.items())

    async def segment(self, image, setting, confidence):
        if confidence and self.in_tiles(image):
            raise Refused(422, f"confidence is not given for images segmented in tiles ({image.shape[1]}x"
                               f"{image.shape[0]} is larger than the {self.tile}-pixel window): ask without it")
        try:
            future = self.batcher.submit(Job(image, isr=setting, confidence=confidence))
        except Overloaded as e:
            raise Refused(503, f"overloaded ({e}); retry in a second", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wrap_future(future)
        except TransegError as e:
            raise Refused(422, str(e)) from None
        except Exception as e:  # noqa: BLE001 (one line to the client; the worker carries on)
            raise Refused(500, f"inference failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class Ticket:
    """What one request holds of the service's in-flight budgets (body bytes, then pixels); all given back
    when its answer is built. More than a budget has left is 503 with Retry-After, at once."""

    def __init__(self, service):
        self.service, self.bytes, self.pixels = service, 0, 0

    def take_bytes(self, n):
        budget = self.service.uploads
        if not budget.take(n):
            raise Refused(503, f"busy: uploads in flight hold {budget.used:,} of the {budget.limit:,} bytes this "
                          "service holds at once (--max-inflight-upload-mb); retry in a second", BUSY)
        self.bytes += n

    def take_pixels(self, width, height, name):
        budget = self.service.pixels
        if not budget.take(width * height):
            raise Refused(503, f"busy: {name} ({width}x{height}) does not fit beside the {budget.used:,} pixels in "
                          f"flight (at most {budget.limit:,} at once: --max-inflight-megapixels); retry in a second",
                          BUSY)
        self.pixels += width * height

    def give_back_bytes(self):
        self.service.uploads.give(self.bytes)
        self.bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.give_back_bytes()
        service = self.service
        service.pixels.give(self.pixels)
        service._since_trim += self.pixels
        if service.pixels.used == 0 and service._since_trim >= TRIM_AFTER_PIXELS:
            service._since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, trim_memory)


def _b64(array):
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).decode("ascii")


def _png(seg):
    buffer = io.BytesIO()
    seg.mask().save(buffer, format="PNG")
    return buffer.getvalue()


_UPLOAD = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                                       "required": ["image"]}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"error": "one line"}}}}
           for code, text in ((413, "upload or image too large"), (415, "not an image"),
                              (422, "unreadable image or a setting the model does not take"),
                              (503, "overloaded: retry after the Retry-After seconds"))}


def create_app(model, allowed_hosts=LOOPBACK, allowed_origins=(), body_timeout=60.0, **limits):
    """A FastAPI app serving `model` (a ready Segmentor). `allowed_hosts` / `allowed_origins` / `body_timeout`:
    see `limits.Guard` ("*" allows any); `limits`: Service's max_batch, window_ms, max_pending,
    max_upload_bytes, max_pixels, max_inflight_pixels, max_inflight_upload_bytes."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse

    service = Service(model, **limits)
    app = FastAPI(title="transeg", version=__version__,
                  description=f"Semantic segmentation with {model.meta['variant']} ({model.num_classes} classes).")
    app.state.service = service
    _error_handlers(app)
    if allowed_origins:  # a page on an allowed origin may also read the answers
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Latency-Ms", "X-Batch"])
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, body_timeout=body_timeout)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz", summary="liveness: the service answers and how many requests wait")
    async def healthz():
        return {"status": "ok", "pending": service.batcher.pending}

    @app.get("/v1/model", summary="the model: variant, classes, palette, test protocol, ISR settings, limits")
    async def model_info():
        return service.info()

    @app.post("/v1/segment", summary="segment one image", openapi_extra=_UPLOAD, responses={
        200: {"description": "the label map as an index PNG (format=png) or JSON (format=json)",
              "content": {"image/png": {}, "application/json": {}}}, **_ERRORS})
    async def segment(request: Request,
                      format: str = Query("png", pattern="^(png|json)$", description="png: index PNG; json: shares"),
                      labels: bool = Query(False, description="json: the label map, base64 of H*W uint8"),
                      confidence: bool = Query(False, description="json: the argmax probability, mean and map"),
                      isr_encoder: str = Query(None, description="ISR encoder ratios, e.g. 2,2,1,1"),
                      isr_decoder: str = Query(None, description="ISR decoder ratios, e.g. 2,2,2")):
        with Ticket(service) as ticket:
            return await _segment(service, request, ticket, format, labels, confidence, isr_encoder, isr_decoder)

    return app


def _error_handlers(app):
    """Every refusal as {"error": one line}: the service's own, FastAPI's validation, Starlette's 404 / 405 /
    400, and anything unexpected (500)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(Refused)
    async def refused(request, e):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        if e.status_code == 404:
            message = (f"no such path: {request.url.path} (the API: GET /v1/model, POST /v1/segment, GET /healthz; "
                       "docs at /docs)")
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        else:
            message = str(e.detail).splitlines()[0] if e.detail else str(e.status_code)
        return JSONResponse({"error": message}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def failed(request, e):
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)


async def _segment(service, request, ticket, format, labels, confidence, isr_encoder, isr_decoder):
    """The answer to POST /v1/segment: the body read within its byte limits, the image measured from its
    header and admitted by its pixels before it is decoded, then run and encoded."""
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    data, name = await _upload(request, service.max_upload_bytes, ticket)
    setting = service.setting(isr_encoder, isr_decoder)
    width, height = await run_in_threadpool(service.measure, data, name)
    ticket.take_pixels(width, height, name)
    image = await run_in_threadpool(service.decode, data, name)
    del data
    ticket.give_back_bytes()
    seg, ms, batch, gflops = await service.segment(image, setting, confidence)
    headers = {"X-Latency-Ms": f"{ms:.2f}", "X-Batch": str(batch)}
    if format == "png":
        return Response(await run_in_threadpool(_png, seg), media_type="image/png", headers=headers)
    body = {"width": int(image.shape[1]), "height": int(image.shape[0]),
            "shares": [{"index": service.class_index[cls], "name": cls, "share": share}
                       for cls, share in seg.shares().items()],
            "latency_ms": ms, "batch": batch, "gflops": gflops,
            "isr": isr.describe(dict(setting)) if setting else "no ISR"}
    if labels:
        body["labels"] = _b64(seg.labels)
    if confidence:
        conf = seg.confidence
        body["confidence"] = {"mean": float(conf.mean()), "map": _b64(np.rint(conf * 255))}
    return JSONResponse(body, headers=headers)


# Content types any web page can POST without a CORS preflight that are never an image: refused from a
# browser (an Origin header), so that a form on another site cannot drive the service. curl's default
# for --data-binary (application/x-www-form-urlencoded) is still taken from clients that are not pages.
_NOT_UPLOADS = ("text/",)
_NOT_FROM_PAGES = ("application/x-www-form-urlencoded",)


def _check_kind(request):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith(_NOT_UPLOADS) or (kind in _NOT_FROM_PAGES and "origin" in request.headers):
        raise Refused(415, f"{kind} is not an image upload: send the image as multipart/form-data (field `image`), "
                      "image/* or application/octet-stream", {"Connection": "close"})
    return kind


async def _read_body(request, limit, ticket):
    """The body, at most `limit` bytes of it held (and counted in the ticket). More is refused (413) and
    not kept: the rest is read and dropped (up to 4x the limit) so that a client still sending receives it."""
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                ticket.take_bytes(len(chunk))
                chunks.append(chunk)
            elif size > 4 * limit:
                break
    except ClientDisconnect:
        raise Refused(400, "the client went away before its upload was in") from None
    if size > limit:
        declared = request.headers.get("content-length", "")
        what = f"upload of {int(declared):,} bytes" if declared.isdigit() else "upload"
        raise Refused(413, f"{what} is more than the {limit:,} bytes this service takes", {"Connection": "close"})
    return b"".join(chunks)


async def _upload(request, limit, ticket):
    """(bytes, name) of the uploaded image: the multipart field `image` (or the first file), else the
    raw body. The body is read here, bounded (`_read_body`), before any parsing: a multipart form is then
    parsed from what was read (see `_replay`), so a form is never read past the limit either; a form
    cut before its closing boundary, or one without a boundary, is malformed (400)."""
    from python_multipart.multipart import parse_options_header
    from starlette.exceptions import HTTPException

    kind = _check_kind(request)
    body = await _read_body(request, limit, ticket)
    if kind != "multipart/form-data":
        return body, "upload"
    boundary = parse_options_header(request.headers["content-type"])[1].get(b"boundary")
    if not boundary:
        raise Refused(400, "malformed multipart upload: its Content-Type names no boundary")
    if b"--" + boundary + b"--" not in body:
        raise Refused(400, f"malformed multipart upload: cut short, the closing boundary never came "
                      f"({len(body):,} bytes arrived)")
    try:
        async with Request(request.scope, _replay(body)).form() as form:  # closes the parts' spooled files
            upload = form.get("image") or next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None or not hasattr(upload, "read"):
                raise Refused(422, "multipart upload without a file (send the image as the field `image`)")
            return await upload.read(), upload.filename or "upload"
    except HTTPException as e:
        raise Refused(400, f"malformed multipart upload: {e.detail}") from None


def _replay(body):
    """An ASGI `receive` that hands over `body` as the whole request body, then a disconnect: a
    Request built on the original scope with it parses the form from the bytes `_upload` has
    already read (the original request's stream is spent)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    return receive
