"""The bounds that keep `transeg serve` within its memory, time and file descriptors whatever its
clients do. Each is a `transeg serve` flag; a request past one is answered with one JSON line.

    --max-upload-mb               body bytes one request may send (413 above)
    --max-megapixels              pixels of one image, read from its header before decoding (413 above)
    --max-inflight-megapixels     pixels of all images being decoded and run at once (503 + Retry-After above)
    --max-inflight-upload-mb      body bytes held for all requests at once (503 + Retry-After above)
    --header-timeout              seconds a connection may take to send a request head (408, closed)
    --body-timeout                seconds the whole body may take after its head (408, closed)
    --max-connections             open connections; below the open-file limit, so /healthz keeps answering
    --allowed-hosts               Host names answered (loopback names by default): DNS rebinding gets 400
    --allowed-origins             page origins that may POST (same origin only by default): others get 403

Where they act: the HTTP connection (head timeout, connection cap: `guarded_protocol`, a subclass of
uvicorn's h11 protocol, because a request head that never completes never reaches any ASGI code); the
ASGI call (Host, Origin, body deadline: `Guard`, in front of the app for any server); the app (sizes
and the in-flight budgets: `Budget`, taken in app.py).
"""
import asyncio
import errno
import json
import math
import socket
import threading
import time

from ..errors import TransegError

# A connection that has waited this long for its client (head or body) may be closed to make room for a
# new one when all --max-connections are open: legitimate clients send a head in one packet, so under a
# slow-client flood it is the flood that is evicted and /healthz still gets in.
EVICT_AFTER_S = 1.0
FD_RESERVE = 64            # descriptors left for the model, logs and the runtime beside the connections
DEFAULT_MAX_CONNECTIONS = 512
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class Refused(Exception):
    """A request the service answers with `status` and a one-line `message` ({"error": message})."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Budget:
    """A quantity shared by the requests in flight (pixels decoded and run, body bytes held) that none
    may take past `limit`: `take(n)` is False instead of waiting, so overload is refused at once."""

    def __init__(self, limit):
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def take(self, n):
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n):
        with self._lock:
            self.used -= n


def trim_memory():
    """Hand freed heap pages back to the kernel (glibc's malloc_trim; elsewhere nothing). The CLI has
    malloc keep freed memory for speed (device.keep_freed_memory); the service calls this when a burst
    is over, so its resident memory returns to what it was before the burst."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------ settings
def _number(flag, value, integer=False, minimum=0.0, strict=True):
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
        or (value <= minimum if strict else value < minimum) or (integer and value != int(value))
    if bad:
        kind = "a whole number" if integer else "a number"
        raise TransegError(f"{flag} {value}: must be {kind} {'above' if strict else 'at least'} {minimum:g}")
    return int(value) if integer else float(value)


def open_file_limit():
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_settings(port, max_upload_mb, max_megapixels, max_inflight_megapixels, max_inflight_upload_mb,
                   header_timeout, body_timeout, max_connections, window_ms, max_pending, max_batch):
    """The settings as the service uses them (bytes, pixels, seconds), or one TransegError naming the
    flag: every value is checked before anything is bound, loaded or printed."""
    _number("--port", port, integer=True, minimum=1, strict=False)
    if port > 65535:
        raise TransegError(f"--port {port}: a port is 1 to 65535")
    upload = _number("--max-upload-mb", max_upload_mb)
    pixels = _number("--max-megapixels", max_megapixels)
    inflight = _number("--max-inflight-megapixels", 2 * pixels if max_inflight_megapixels is None
                       else max_inflight_megapixels)
    held = _number("--max-inflight-upload-mb", 8 * upload if max_inflight_upload_mb is None else max_inflight_upload_mb)
    if inflight < pixels:
        raise TransegError(f"--max-inflight-megapixels {inflight:g} is below --max-megapixels {pixels:g}: "
                           "an image of the largest size could never be admitted")
    if held < upload:
        raise TransegError(f"--max-inflight-upload-mb {held:g} is below --max-upload-mb {upload:g}: "
                           "an upload of the largest size could never be admitted")
    files = open_file_limit()
    ceiling = files - FD_RESERVE
    if max_connections is None:
        max_connections = max(1, min(DEFAULT_MAX_CONNECTIONS, ceiling))
    connections = _number("--max-connections", max_connections, integer=True)
    if connections > ceiling:
        raise TransegError(f"--max-connections {connections}: this process may open {files} files (ulimit -n); "
                           f"keep it at most {ceiling} or raise the limit")
    return {"max_upload_bytes": int(upload * 1e6), "max_pixels": int(pixels * 1e6),
            "max_inflight_pixels": int(inflight * 1e6), "max_inflight_upload_bytes": int(held * 1e6),
            "header_timeout": _number("--header-timeout", header_timeout),
            "body_timeout": _number("--body-timeout", body_timeout), "max_connections": connections,
            "window_ms": _number("--window-ms", window_ms, minimum=0, strict=False),
            "max_pending": _number("--max-pending", max_pending, integer=True),
            "max_batch": None if max_batch is None else _number("--max-batch", max_batch, integer=True)}


def bind(host, port):
    """A listening socket on host:port, or one TransegError (a port in use, a host this machine does not
    have): bound before the model loads and before "serving ... on" is printed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise TransegError(f"--host {host}: not an address to listen on ({getattr(e, 'strerror', None) or e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        what = "in use (another server?); choose another --port" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise TransegError(f"cannot listen on {host}:{port}: {what}") from None
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------------------------------------ the connection
def _answer(transport, status, message, retry=False):
    """Write a whole one-line JSON response and close: for a connection whose request never completed
    (no ASGI cycle to answer through)."""
    from http import HTTPStatus

    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{'retry-after: 1' + chr(13) + chr(10) if retry else ''}\r\n")
    transport.write(head.encode() + body)
    transport.close()


def guarded_protocol(header_timeout, body_timeout, max_connections):
    """uvicorn's h11 protocol with a deadline on the request head, a backstop deadline on the body, and
    at most `max_connections` open at once. h11 is chosen over httptools (when installed) so that the
    phase of a request is read from one state machine (`their_state`): IDLE = waiting for a head, SEND_BODY
    = waiting for the body, anything else = the app's turn (no client deadline)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedProtocol(H11Protocol):
        phase, since, timer = None, 0.0, None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._follow()
            live = [c for c in self.connections if not c.transport.is_closing()]
            if len(live) > max_connections and not _evict(live, self):
                _answer(transport, 503, f"too many connections: this service holds {max_connections} at once "
                        "(--max-connections); retry in a second", retry=True)

        def data_received(self, data):
            super().data_received(data)
            self._follow()

        def on_response_complete(self):
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc):
            self._stop()
            super().connection_lost(exc)

        def _stop(self):
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def _follow(self):
            """Start the deadline of the phase the connection has just entered."""
            if self.transport.is_closing():
                return self._stop()
            state = self.conn.their_state
            phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else "app"
            if phase == self.phase:
                return
            self._stop()
            self.phase, self.since = phase, time.monotonic()
            if phase == "head":
                self.timer = self.loop.call_later(header_timeout, self.late, "head")
            elif phase == "body":  # the app answers 408 at body_timeout (Guard); this closes what it did not read
                self.timer = self.loop.call_later(body_timeout + 1.0, self.late, "body")

        def late(self, phase, message=None):
            if self.phase != phase or self.transport.is_closing():
                return
            partial = bool(self.conn.trailing_data[0])
            if phase == "head" and partial:
                _answer(self.transport, 408, message or f"the request head did not arrive within {header_timeout:g} s "
                        "(--header-timeout)")
            else:  # an idle keep-alive connection, or a body nothing reads: closed without a word
                self.transport.close()

    return GuardedProtocol


def _evict(live, newcomer):
    """Close the connection that has waited longest (over EVICT_AFTER_S) for its client; False if none has."""
    now = time.monotonic()
    waiting = [c for c in live if c is not newcomer and c.phase in ("head", "body") and now - c.since > EVICT_AFTER_S]
    if not waiting:
        return False
    oldest = min(waiting, key=lambda c: c.since)
    oldest.late(oldest.phase, "closed to make room for another connection: the request head was too slow")
    if not oldest.transport.is_closing():
        oldest.transport.close()
    return True


# ------------------------------------------------------------------------------------------------ the request
def _hostname(host):
    """The name of a Host header without its port ("[::1]:8000" -> "::1")."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware in front of the app: Host must be an allowed name (a DNS-rebinding page reaches the
    service under its own name), a write from a browser page must come from the same origin or an allowed
    one, HEAD is answered as GET without the body, and the request body must arrive within `body_timeout`
    of the head (408, connection closed)."""

    SAFE = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app, allowed_hosts=LOOPBACK, allowed_origins=(), body_timeout=60.0):
        self.app, self.body_timeout = app, body_timeout
        self.hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins if o.strip()}

    def refusal(self, scope):
        """(status, message) for a request this service does not answer, else None."""
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get(b"host")
        if host is not None and "*" not in self.hosts and _hostname(host).lower() not in self.hosts:
            return 400, (f"Host {host!r} is not a name this service answers to (allowed: {', '.join(sorted(self.hosts))}; "
                         "--allowed-hosts adds names)")
        origin = headers.get(b"origin")
        if origin is None or scope["method"] in self.SAFE or "*" in self.origins:
            return None
        same = host is not None and origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())
        if not same and origin.lower().rstrip("/") not in self.origins:
            return 403, (f"a {scope['method']} from the page at {origin!r} is refused: cross-origin writes need "
                         "--allowed-origins")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused:
            body = json.dumps({"error": refused[1]}).encode()
            await send({"type": "http.response.start", "status": refused[0], "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        if scope["method"] == "HEAD":  # the server leaves out the body of a HEAD answer
            scope = {**scope, "method": "GET"}
        await self.app(scope, self._deadline(receive), send)

    def _deadline(self, receive):
        end, done = time.monotonic() + self.body_timeout, False

        async def timed():
            nonlocal done
            if done:  # the body is in: waiting for a disconnect has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(end - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body did not arrive within {self.body_timeout:g} s of its head "
                              "(--body-timeout)", {"Connection": "close"}) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed
