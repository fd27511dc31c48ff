"""`transeg serve`: the model behind an HTTP API and a page to look through (the `serve` extra:
pip install "transeg[serve]"). `create_app(model)` is the ASGI app for any server; `serve(...)` runs it."""


def serve(model, host="127.0.0.1", port=8000, device="auto", dtype=None, compile=False, **limits):
    """Load `model` (anything `transeg.load` takes) once, warm it up, and serve it with uvicorn until
    interrupted. `limits`: see `app.Service` (max_batch, window_ms, max_pending, max_upload_bytes, max_pixels)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        from ..errors import TransegError

        raise TransegError(f"transeg serve needs the serve extra ({e.name} is missing): "
                           "pip install 'transeg[serve]'") from None
    import numpy as np

    from .. import load

    net = load(model).optimize_for_inference(dtype, compile=compile, device=device)
    if limits.get("max_batch") is None:
        # Batching pays on a GPU, where batch-1 inference is bound by kernel launches; on a CPU a batch
        # costs the sum of its images, so it gains nothing there (BENCHMARKS.md: Serving under load).
        limits["max_batch"] = 8 if next(net.parameters()).device.type == "cuda" else 1
    net.predict(np.zeros((256, 256, 3), np.uint8))  # fail here, not on the first request (and compile once)
    app = create_app(net, **limits)
    print(f"serving {net.meta['variant']} ({model}) on http://{host}:{port}/  (API: /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
