"""The HTTP service: one model, loaded once, behind a small JSON / PNG API and a page.

    GET  /                the page: drop an image, see the overlay, legend, class under the pointer, ISR
    GET  /healthz         {"status": "ok", "pending": n}
    GET  /v1/model        variant, classes, palette, test protocol, the ISR settings the model takes, limits
    POST /v1/segment      an image (multipart field `image`, or the raw body) -> index PNG, or JSON with
                          per-class shares (and on request the label map, the confidence, GFLOPs, latency)
    GET  /docs, /openapi.json

Requests are decoded in worker threads and batched on the device (`Batcher`). Refusals are one JSON
line, {"error": "..."}, with the same text the command line prints: 413 too large, 415 not an image,
422 unreadable or a setting the model does not take, 503 overloaded (with Retry-After).
"""
import asyncio
import base64
import io
import time
from pathlib import Path

import numpy as np
from starlette.requests import Request

from .. import __version__, isr
from ..errors import TransegError
from ..flops import image_gmacs, meta_model
from ..registry import get_variant
from .batcher import Batcher, Job, Overloaded

PAGE = Path(__file__).with_name("page.html")
# The ISR setting the EDAFormer paper recommends, cut to the groups a model has (marked on the page).
PAPER_ISR = {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}


class Refused(Exception):
    """A request the service answers with `status` and a one-line `message`."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Service:
    """The model, its meta-device twin for counting GFLOPs, and the batcher in front of them."""

    def __init__(self, model, max_batch=8, window_ms=5.0, max_pending=64, max_upload_bytes=20_000_000,
                 max_pixels=40_000_000):
        self.model = model
        self.twin = meta_model(model.meta["variant"], **model.meta["model_args"])
        self.convention = get_variant(model.meta["variant"]).paper.gflops_convention
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.class_index = {name: i for i, name in enumerate(model.classes)}
        self._gmacs_cache = {}
        self.batcher = Batcher(self._run, max_batch=max_batch, window_s=window_ms / 1e3, max_pending=max_pending)

    # ------------------------------------------------------------------------------------ worker thread
    def _run(self, jobs):
        setting = dict(jobs[0].isr) or None
        start = time.perf_counter()
        segs = self.model.predict([j.image for j in jobs], batch_size=len(jobs), isr=setting,
                                  probabilities=jobs[0].probabilities)
        ms = (time.perf_counter() - start) * 1e3
        isr.set_isr(self.twin, **(setting or {}))
        gflops = image_gmacs(self.twin, jobs[0].image.shape[:2], self.model.protocol, self.convention,
                             self._gmacs_cache)
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
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels},
            "device": str(next(self.model.parameters()).device), "dtype": str(self.model.dtype).removeprefix("torch."),
            "version": __version__,
        }

    def decode(self, data, name):
        """HxWx3 uint8 from the uploaded bytes, or Refused with the command line's message."""
        from PIL import Image, UnidentifiedImageError

        from ..images import read_image

        if not data:
            raise Refused(422, f"{name}: empty upload")
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise Refused(415, f"{name}: not an image transeg can read (PNG, JPEG, BMP, TIFF, WebP ...)") from None
        except Image.DecompressionBombError as e:
            raise Refused(422, f"{name}: cannot read the image ({e})") from None
        if w * h > self.max_pixels:
            raise Refused(413, f"{name}: {w}x{h} pixels is more than the {self.max_pixels:,} this service takes")
        try:
            return read_image(io.BytesIO(data), name=name)[0]
        except TransegError as e:
            raise Refused(422, str(e)) from None

    def setting(self, encoder, decoder):
        """The hashable ISR setting of a request (() = as trained), or Refused."""
        try:
            parsed = isr.parse_setting(encoder, decoder)
            checked = isr.check_setting(self.model, **parsed) if parsed else {}
        except TransegError as e:
            raise Refused(422, str(e)) from None
        return () if isr.is_default(checked) else tuple(checked.items())

    async def segment(self, image, setting, probabilities):
        try:
            future = self.batcher.submit(Job(image, isr=setting, probabilities=probabilities))
        except Overloaded as e:
            raise Refused(503, f"overloaded ({e}); retry in a second", {"Retry-After": "1"}) from None
        try:
            return await asyncio.wrap_future(future)
        except TransegError as e:
            raise Refused(422, str(e)) from None
        except Exception as e:  # noqa: BLE001 (one line to the client; the worker carries on)
            raise Refused(500, f"inference failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


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


def create_app(model, **limits):
    """A FastAPI app serving `model` (a ready Segmentor). `limits`: Service's max_batch, window_ms,
    max_pending, max_upload_bytes, max_pixels."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    service = Service(model, **limits)
    app = FastAPI(title="transeg", version=__version__,
                  description=f"Semantic segmentation with {model.meta['variant']} ({model.num_classes} classes).")
    app.state.service = service

    @app.exception_handler(Refused)
    async def refused(request, e):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

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
        data, name = await _upload(request, service.max_upload_bytes)
        setting = service.setting(isr_encoder, isr_decoder)
        image = await run_in_threadpool(service.decode, data, name)
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

    return app


async def _upload(request, limit):
    """(bytes, name) of the uploaded image: the multipart field `image` (or the first file), else the
    raw body. More than `limit` bytes is refused, and not kept: the rest of an oversized body is read
    and dropped (up to 4x the limit) so that the client, still sending, receives the 413. The body is
    read here, bounded, before any parsing: a multipart form is then parsed from what was read (see
    `_replay`), so a form is never read past the limit either."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 4 * limit:
            break
    if size > limit:
        declared = request.headers.get("content-length", "")
        what = f"upload of {int(declared):,} bytes" if declared.isdigit() else "upload"
        raise Refused(413, f"{what} is more than the {limit:,} bytes this service takes")
    body = b"".join(chunks)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, "upload"
    async with Request(request.scope, _replay(body)).form() as form:  # closes the parts' spooled files
        upload = form.get("image") or next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None or not hasattr(upload, "read"):
            raise Refused(422, "multipart upload without a file (send the image as the field `image`)")
        return await upload.read(), upload.filename or "upload"


def _replay(body):
    """An ASGI `receive` that hands over `body` as the whole request body, then a disconnect: a
    Request built on the original scope with it parses the form from the bytes `_upload` has
    already read (the original request's stream is spent)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    return receive
