"""`transeg serve`: the model behind an HTTP API and a page to look through (the `serve` extra:
pip install "transeg[serve]"). `create_app(model)` is the ASGI app for any server; `serve(...)` runs it
with every bound of limits.py in force."""


def serve(model, host="127.0.0.1", port=8000, device="auto", dtype="auto", compile="auto", backend="auto", log=None,
          max_batch=None, window_ms=5.0, max_pending=64, max_upload_mb=20.0, max_megapixels=40.0,
          max_inflight_megapixels=None, max_inflight_upload_mb=None, header_timeout=10.0, body_timeout=60.0,
          max_connections=None, allowed_hosts=None, allowed_origins=()):
    """Load `model` (anything `transeg.load` takes, or an .onnx file from `transeg export`, run by onnxruntime:
    `backend`, see transeg.deploy.backend) once, warm it up, and serve it with uvicorn until
    interrupted. dtype and compile "auto": the device's serving choices (`device.Paths`: native bf16 and the
    compiled path on a CUDA GPU, fp32 eager on a CPU); the warm-up runs each batch bucket up to max_batch (compiling
    it, at the protocol's size for a small image), and `log` hears of each graph compiled. Every setting is checked, and host:port bound, before the model loads and before
    "serving ... on" is printed: a bad one is one TransegError naming its flag.

    The bounds (limits.py says where each acts):
      max_upload_mb (20) and max_megapixels (40): one request's body and image.
      max_inflight_megapixels (2x max_megapixels) and max_inflight_upload_mb (8x max_upload_mb): all requests
        in flight together; beyond them 503 with Retry-After, so memory is bounded by these, not by the
        number of clients.
      header_timeout (10 s) for a request head, body_timeout (60 s) for its whole body: 408 and closed.
      max_connections (512, or the open-file limit less 64 if lower): beyond it the connection that waited
        longest for its client is closed, else the newcomer gets 503.
      allowed_hosts (the loopback names and `host` when it is an address; "*" any): other Host headers 400.
      allowed_origins (none: same origin only; "*" any): a POST from another page's origin 403.
      max_batch (8 on a GPU, 1 on a CPU), window_ms (5), max_pending (64): the batcher (batcher.py)."""
    from ..errors import TransegError
    from .limits import LOOPBACK, bind, check_settings

    settings = check_settings(port, max_upload_mb, max_megapixels, max_inflight_megapixels, max_inflight_upload_mb,
                              header_timeout, body_timeout, max_connections, window_ms, max_pending, max_batch)
    try:
        import uvicorn

        from .app import create_app
        from .limits import guarded_protocol
    except ImportError as e:
        raise TransegError(f"transeg serve needs the serve extra ({e.name} is missing): "
                           "pip install 'transeg[serve]'") from None
    import numpy as np

    from ..compiled import batch_bucket
    from ..deploy.backend import load_model

    if allowed_hosts is None:
        allowed_hosts = LOOPBACK + ((host,) if host not in ("0.0.0.0", "::", "") else ())
    sock = bind(host, port)
    try:
        net = load_model(model, backend).optimize_for_inference(dtype, compile=compile, device=device, log=log)
        if settings["max_batch"] is None:
            # Batching pays on a GPU, where batch-1 inference is bound by kernel launches; on a CPU a batch
            # costs the sum of its images, so it gains nothing there (BENCHMARKS.md: Serving under load).
            settings["max_batch"] = 8 if next(net.parameters()).device.type == "cuda" else 1
        # fail here, not on the first request; and compile each batch bucket the batcher can form now, not while
        # requests wait (17-55 s a graph on a GPU)
        warm = np.zeros((256, 256, 3), np.uint8)
        for batch in sorted({batch_bucket(n) for n in range(1, settings["max_batch"] + 1)}):
            net.predict([warm] * batch, batch_size=batch)
    except BaseException:
        sock.close()
        raise
    protocol = guarded_protocol(settings.pop("header_timeout"), settings["body_timeout"],
                                settings.pop("max_connections"))
    app = create_app(net, allowed_hosts=tuple(allowed_hosts), allowed_origins=tuple(allowed_origins), **settings)
    # uvicorn runs our h11 protocol subclass (head deadline, connection cap) on the socket bound above;
    # keep-alive connections idle past the head deadline are closed by it, and a shutdown waits at most 5 s.
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                            timeout_keep_alive=min(5, header_timeout), timeout_graceful_shutdown=5)
    print(f"serving {net.meta['variant']} ({model}) on http://{host}:{port}/  (API: /docs; Ctrl-C stops)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
