"""Downloads and the cache behind the zoo (`zoo.py`).

Hugging Face Hub files go through `huggingface_hub`, so `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and
`HF_HUB_OFFLINE` behave as users of the Hub know them; a file stored in LFS is checked against the
sha256 the Hub stores it under. Plain URLs go through `download_url`: a progress bar, resume of a
partial file (HTTP Range), the sha256 checked before the file is used, a lock so two processes never
fetch the same file at once, and nothing half-written under the final name.

Every download, plain URL or Hub file, is bounded, so a slow, silent, lying or endless server ends in one
line naming the URL and what happened (the CLI exits 2), never a hang or a traceback. The limits, read
from the environment on each download:

    TRANSEG_DOWNLOAD_DEADLINE   7200   seconds for one file, all its attempts together
    TRANSEG_DOWNLOAD_TIMEOUT      30   seconds a connection may stay silent (connecting or between bytes);
                                       also the window the minimum rate is averaged over
    TRANSEG_DOWNLOAD_MIN_RATE     10   KB/s (1 KB = 1000 bytes): a transfer slower than this over a window
                                       is stopped (a server dripping bytes never trips the silence timeout)
    TRANSEG_DOWNLOAD_ATTEMPTS      3   tries of one file; a connection dropped or stalled after the answer
                                       began, or an HTTP 408/429/5xx, is retried (resuming where it
                                       stopped), with one line that names the URL; a plain URL that refuses
                                       the connection or never begins its answer is not retried
    TRANSEG_DOWNLOAD_MAX_MB    10000   MB (1e6 bytes) one file may hold, checked against the announced
                                       size and again while the bytes arrive; a release that states its
                                       size is held to that size plus 25% (and 10 MB), whichever is lower

Huggingface_hub's own retries and log lines are replaced by these (its HTTP client is given a transport
that applies them for the time of the call). A partial download is kept (DEST.part) only where the server
resumes (it answered a Range or says `Accept-Ranges: bytes`); a file over the size limit is deleted.
Hub files are downloaded by huggingface_hub into a temporary file it deletes on failure.

The cache is `$TRANSEG_HOME`, else `$XDG_CACHE_HOME/transeg`, else `~/.cache/transeg`:
    models/NAME.safetensors       a release converted once to a transeg checkpoint (what loads read)
    models/hub/OWNER--REPO.safetensors   the same for a Hugging Face repo id
    downloads/NAME/FILE           a plain-URL download while it is converted (.part while it arrives)
    checksums.json                sha256 recorded on the first download of files no publisher hashes
"""
import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import TransegError

CHUNK = 1 << 20
MB = 1_000_000

# name -> (default, unit, smallest allowed); read per download so a test or a shell can change them
SETTINGS = {
    "TRANSEG_DOWNLOAD_DEADLINE": (7200.0, "seconds", 0.0),
    "TRANSEG_DOWNLOAD_TIMEOUT": (30.0, "seconds", 0.0),
    "TRANSEG_DOWNLOAD_MIN_RATE": (10.0, "KB/s", None),
    "TRANSEG_DOWNLOAD_ATTEMPTS": (3, "", 1),
    "TRANSEG_DOWNLOAD_MAX_MB": (10000.0, "MB", 0.0),
}
RELEASE_MARGIN = (1.25, 10 * MB)  # a release's stated size x 1.25 + 10 MB: sizes are stated rounded
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_PAUSE_S = 1.0  # the wait before attempt 2; doubled for each later one, at most 8x


def cache_dir() -> Path:
    if os.environ.get("TRANSEG_HOME"):
        return Path(os.environ["TRANSEG_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "transeg"


def writable_cache() -> Path:
    """`cache_dir()`, made if missing; one line naming the setting when it is a file, a dangling link or
    a folder this process cannot write."""
    folder = cache_dir()
    where = (f"TRANSEG_HOME={os.environ['TRANSEG_HOME']}" if os.environ.get("TRANSEG_HOME")
             else f"the cache {folder}")
    fix = "set TRANSEG_HOME to a folder you can write"
    if folder.is_symlink() and not folder.exists():
        raise TransegError(f"{where}: a link to {os.readlink(folder)}, which does not exist; {fix}")
    if folder.exists() and not folder.is_dir():
        raise TransegError(f"{where}: a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TransegError(f"{where}: cannot be made ({e.strerror or e}); {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TransegError(f"{where}: not writable; {fix}")
    return folder


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (the Hub's own switch) keeps every download off, plain URLs included; read per call."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on PATH.lock for the time of the block: a second process waits, then finds the
    work done. A `filelock.FileLock` (flock on POSIX): the kernel frees it when its holder dies, so a
    killed download never leaves it stuck. The lock file is removed by its holder before the release
    (filelock retries a waiter whose file was removed meanwhile), so none is left beside the file."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = FileLock(lock)
        held.acquire()
    except OSError as e:
        raise TransegError(f"{lock.parent}: cannot write there ({e.strerror or e}); set TRANSEG_HOME to a folder "
                           "you can write") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        held.release()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bar(total, name, initial, progress):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not progress, leave=False)


# ----------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    deadline: float       # seconds for one file, every attempt included
    timeout: float        # seconds of silence; also the window the rate is averaged over
    min_rate: float       # bytes/s
    attempts: int
    max_bytes: int
    max_why: str          # which setting gave max_bytes (said when it is exceeded)


def _setting(name):
    default, unit, least = SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if isinstance(default, int) else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (least is not None and value < least) or (least is None and value < 0):
        raise TransegError(f"{name}={text!r}: not a {'whole ' if isinstance(default, int) else ''}number "
                           f"{'>= ' + str(least) if least else '>= 0'}{' ' + unit if unit else ''} (default {default:g})")
    return value


def limits(size_mb=None, name="") -> Limits:
    """The limits of one download from the environment (SETTINGS); `size_mb`: the size a release states,
    which caps the file at that size plus RELEASE_MARGIN where that is below TRANSEG_DOWNLOAD_MAX_MB."""
    global_mb = _setting("TRANSEG_DOWNLOAD_MAX_MB")
    max_bytes, why = int(global_mb * MB), f"TRANSEG_DOWNLOAD_MAX_MB={global_mb:g}"
    if size_mb:
        stated = int(size_mb * MB * RELEASE_MARGIN[0] + RELEASE_MARGIN[1])
        if stated < max_bytes:
            max_bytes, why = stated, f"{name} states {size_mb:g} MB; the limit is that plus 25% and 10 MB"
    return Limits(_setting("TRANSEG_DOWNLOAD_DEADLINE"), _setting("TRANSEG_DOWNLOAD_TIMEOUT"),
                  _setting("TRANSEG_DOWNLOAD_MIN_RATE") * 1000, _setting("TRANSEG_DOWNLOAD_ATTEMPTS"), max_bytes, why)


class Stop(Exception):
    """A download that must end now (out of time, too slow, too big, out of attempts, cannot connect);
    the message says what happened, the caller names the URL."""

    def __init__(self, what, keep=True):
        super().__init__(what)
        self.keep = keep  # False: the partial file is useless (too big): delete it


def _say(line):
    print(f"transeg: {line}", file=sys.stderr, flush=True)


def _size(n):
    return f"{n:,} bytes" if n < MB else f"{n / MB:,.1f} MB"


class Transfer:
    """The state of one file's download against its Limits: the clock, the attempts, the rate and the size."""

    def __init__(self, url, bounds: Limits):
        self.url, self.bounds = url, bounds
        self.start = time.monotonic()
        self.attempt = 0
        self.failure = None   # why the last request failed: the next one is a new attempt
        self.refused = None   # the connection was refused: no retry

    def remaining(self):
        return self.bounds.deadline - (time.monotonic() - self.start)

    def io_timeout(self):
        """The silence allowed for the next socket operation: the timeout, or what is left of the deadline."""
        left = self.remaining()
        if left <= 0:
            raise self.out_of_time()
        return max(min(self.bounds.timeout, left), 0.001)

    def out_of_time(self):
        return Stop(f"not done within the deadline of {self.bounds.deadline:g} s (TRANSEG_DOWNLOAD_DEADLINE)")

    def begin(self, failure=None):
        """Start an attempt; `failure`: why the last one failed (said on the one retry line)."""
        self.attempt += 1
        if self.attempt > self.bounds.attempts:
            tries = f"{self.bounds.attempts} attempt{'s' * (self.bounds.attempts > 1)}"
            raise Stop(f"{failure}; gave up after {tries} (TRANSEG_DOWNLOAD_ATTEMPTS)")
        if self.remaining() <= 0:
            raise self.out_of_time()
        if failure is not None:
            _say(f"{self.url}: {failure}; retrying ({self.attempt} of {self.bounds.attempts})")
        self.mark, self.mark_bytes, self.got = time.monotonic(), 0, 0

    def pause(self):
        """The wait before attempt 2, 3, ...: RETRY_PAUSE_S, twice that, ... at most 8x, never past the deadline."""
        time.sleep(max(0.0, min(RETRY_PAUSE_S * min(2.0 ** (self.attempt - 1), 8.0), self.remaining())))

    def check_total(self, total):
        if total is not None and total > self.bounds.max_bytes:
            raise Stop(f"the server announces {_size(total)}, over the limit of {_size(self.bounds.max_bytes)} "
                       f"({self.bounds.max_why})", keep=False)

    def arrived(self, n, size):
        """`n` more bytes arrived in this attempt; the file now holds `size`."""
        self.got += n
        if size > self.bounds.max_bytes:
            raise Stop(f"more than {_size(self.bounds.max_bytes)} arrived, over the limit ({self.bounds.max_why})",
                       keep=False)
        now = time.monotonic()
        if now - self.start > self.bounds.deadline:
            raise self.out_of_time()
        window = now - self.mark
        if window >= self.bounds.timeout and window > 0:
            rate = (self.got - self.mark_bytes) / window
            if rate < self.bounds.min_rate:
                raise Stop(f"{rate / 1000:.3g} KB/s over the last {window:.3g} s, below the minimum of "
                           f"{self.bounds.min_rate / 1000:g} KB/s (TRANSEG_DOWNLOAD_MIN_RATE)")
            self.mark, self.mark_bytes = now, self.got


def check_url(url, what="URL"):
    """An http(s) URL with a host, else one line."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransegError(f"{url}: not an http(s) {what}")


# ----------------------------------------------------------------------------- plain URLs
class _Retry(Exception):
    """A failure another attempt may get past (a dropped connection, a stall, HTTP 408/429/5xx)."""


def download_url(url, dest, sha256=None, progress=True, give_by_hand="", bounds: Limits | None = None) -> Path:
    """Fetch `url` to `dest` (kept if already there and matching `sha256`, whole or a prefix of it). The bytes
    arrive in DEST.part, which a later attempt or call resumes; `dest` appears only complete and checked.
    `bounds`: the Limits (default `limits()`). `give_by_hand`: the sentence that tells the user how to give
    the file instead, appended to every failure."""
    dest = Path(dest)
    hint = f"; {give_by_hand}" if give_by_hand else ""
    check_url(url)
    with file_lock(dest):
        if dest.is_file() and (sha256 is None or sha256_of(dest).startswith(sha256)):
            return dest
        if offline():
            raise TransegError(f"{url}: not downloaded (HF_HUB_OFFLINE is set and the file is not in the cache {dest.parent})"
                               f"{hint}")
        part = dest.with_name(dest.name + ".part")
        transfer = Transfer(url, bounds or limits())
        state = {"resumable": part.is_file()}  # a part left by an earlier call: it resumed before
        failure = None
        while True:
            try:
                transfer.begin(failure)
                _get(url, part, transfer, state, progress, dest.name)
                break
            except _Retry as e:
                failure = str(e)
                transfer.pause()
            except Stop as e:
                kept = part.stat().st_size if part.is_file() else 0
                if kept and (not e.keep or not state["resumable"]):
                    part.unlink()
                    kept = 0
                resume = f" ({kept:,} bytes kept in {part}; the next try resumes)" if kept else ""
                raise TransegError(f"{url}: {e}{resume}{hint}") from None
        found = sha256_of(part) if sha256 is not None else None  # (without one, the caller records it: hashed once)
        if sha256 is not None and not found.startswith(sha256):  # (a publisher may give a prefix: deit-...-d0272ac0.pth)
            part.unlink()
            raise TransegError(f"{url}: the download's sha256 is {found[:16]}..., not the expected {sha256[:16]}...; "
                               f"the file was deleted, try again{hint}")
        os.replace(part, dest)
        return dest


def _get(url, part, transfer, state, progress, name):
    """One attempt: GET `url` (from where `part` ends) into `part`. Returns when the file is whole; raises
    _Retry or Stop."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "transeg", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=transfer.io_timeout())
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is whole
            return
        if e.code in RETRY_STATUS:
            raise _Retry(f"the server answered HTTP {e.code} {e.reason}") from None
        raise Stop(f"the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer within {transfer.bounds.timeout:g} s (TRANSEG_DOWNLOAD_TIMEOUT)"
        raise Stop(f"cannot connect ({reason})") from None
    with response:
        final = response.geturl()
        if final != url:
            check_url(final, "URL (a redirect)")
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        state["resumable"] = response.status == 206 or response.headers.get("Accept-Ranges", "").lower() == "bytes"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.strip().isdigit() else None
        transfer.check_total(total)
        size = have
        sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
        try:
            with open(part, "ab" if have else "wb") as f, _bar(total, name, have, progress) as bar:
                while True:
                    if sock is not None:
                        sock.settimeout(transfer.io_timeout())
                    chunk = response.read1(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                    transfer.arrived(len(chunk), size)
                    if total is not None and size >= total:
                        break
        except TimeoutError:
            if transfer.remaining() <= 0:
                raise transfer.out_of_time() from None
            raise _Retry(f"no data for {transfer.bounds.timeout:g} s after {size:,} bytes "
                         "(TRANSEG_DOWNLOAD_TIMEOUT)") from None
        except (http.client.HTTPException, ConnectionError) as e:
            raise _Retry(f"the connection broke after {size:,} bytes ({type(e).__name__})") from None
    if total is not None and size != total:
        raise _Retry(f"the connection closed after {size:,} of {total:,} bytes")


# ----------------------------------------------------------------------------- Hugging Face Hub
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HUB_LOCK = threading.Lock()  # huggingface_hub's HTTP client is process-wide: one bounded Hub call at a time


def _stream_class():
    import httpx2

    class BoundedStream(httpx2.SyncByteStream):
        """A response body that counts its bytes against the Transfer (size, rate, deadline)."""

        def __init__(self, inner, transfer, offset):
            self.inner, self.transfer, self.offset = inner, transfer, offset

        def __iter__(self):
            size = self.offset
            try:
                for chunk in self.inner:
                    size += len(chunk)
                    self.transfer.arrived(len(chunk), size)
                    yield chunk
            except httpx2.TimeoutException:
                if self.transfer.remaining() <= 0:
                    raise self.transfer.out_of_time() from None
                self.transfer.failure = (f"no data for {self.transfer.bounds.timeout:g} s after {size:,} bytes "
                                         "(TRANSEG_DOWNLOAD_TIMEOUT)")
                raise
            except (httpx2.RemoteProtocolError, httpx2.NetworkError):
                self.transfer.failure = f"the connection closed after {size:,} bytes"
                raise

        def close(self):
            self.inner.close()

    return BoundedStream


def _transport_class():
    import httpx2

    BoundedStream = _stream_class()

    class BoundedTransport(httpx2.BaseTransport):
        """Every request of one Hub call goes through here: each gets the silence timeout (never past the
        deadline); a request after a failure is a new attempt (counted, said in one line); a refused
        connection ends the call at its first retry; a GET body is counted against the size, rate and
        deadline. Stop is not an httpx2 error, so huggingface_hub's retry loops let it through."""

        def __init__(self, transfer):
            self.inner = httpx2.HTTPTransport()  # (one per client: huggingface_hub closes its client on errors)
            self.transfer = transfer

        def handle_request(self, request):
            transfer = self.transfer
            if request.url.path.startswith("/api/"):  # huggingface_hub's own look-ups (not the file): a short timeout
                seconds = min(transfer.io_timeout(), 5.0)
                request.extensions = {**request.extensions, "timeout": dict.fromkeys(("connect", "read", "write", "pool"),
                                                                                     seconds)}
                return self.inner.handle_request(request)
            if request.url.scheme not in ("http", "https"):
                raise Stop(f"redirected to {request.url}, not an http(s) URL")
            if transfer.refused is not None:  # (huggingface_hub looked in its cache first, then retries: do not)
                raise Stop(f"cannot connect to {request.url.host} ({transfer.refused})")
            if transfer.failure is not None:
                failure, transfer.failure = transfer.failure, None
                transfer.begin(failure)
            seconds = transfer.io_timeout()
            request.extensions = {**request.extensions,
                                  "timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}}
            try:
                response = self.inner.handle_request(request)
            except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
                transfer.refused = str(e) or type(e).__name__
                raise
            except httpx2.TimeoutException:
                transfer.failure = f"no answer within {transfer.bounds.timeout:g} s (TRANSEG_DOWNLOAD_TIMEOUT)"
                raise
            if response.status_code in RETRY_STATUS:
                transfer.failure = f"the server answered HTTP {response.status_code}"
                wait = response.headers.get("Retry-After", "")
                if wait.strip().isdigit() and int(wait) + 1 > transfer.remaining():
                    response.close()
                    raise Stop(f"the server answered HTTP {response.status_code} and asks for a wait of {wait} s, "
                               f"past the deadline (TRANSEG_DOWNLOAD_DEADLINE)")
                if transfer.attempt >= transfer.bounds.attempts:
                    response.close()
                    raise Stop(f"{transfer.failure}; gave up after {transfer.attempt} attempts "
                               "(TRANSEG_DOWNLOAD_ATTEMPTS)")
            elif request.method == "GET" and response.status_code in (200, 206):
                offset = 0
                if response.status_code == 206 and (m := re.match(r"bytes=(\d+)-", request.headers.get("Range", ""))):
                    offset = int(m.group(1))
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                length = response.headers.get("Content-Length", "")
                transfer.check_total(int(total) if total.isdigit() else
                                     offset + int(length) if length.isdigit() else None)
                response.stream = BoundedStream(response.stream, transfer, offset)
            return response

        def close(self):
            self.inner.close()

    return BoundedTransport


@contextlib.contextmanager
def _bounded_hub(transfer):
    """huggingface_hub's HTTP client, for the time of the block, is one with the BoundedTransport; its
    logger is quiet (the transport says the one retry line)."""
    import logging

    import httpx2
    from huggingface_hub.utils import _http
    from huggingface_hub.utils import logging as hf_logging

    transport = _transport_class()
    transfer.begin()

    def client():
        return httpx2.Client(transport=transport(transfer), event_hooks={"request": [_http.hf_request_event_hook]},
                             follow_redirects=True, timeout=None)

    logger = hf_logging.get_logger()
    with _HUB_LOCK:
        before, level = _http._GLOBAL_CLIENT_FACTORY, logger.level
        _http.set_client_factory(client)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
            _http.set_client_factory(before)


def hub_file(repo_id, filename, revision=None, progress=True, give_by_hand="", bounds: Limits | None = None):
    """Path of `filename` from the Hub repo `repo_id`, from the Hugging Face cache or downloaded into it;
    None when the repo has no such file. A file the Hub keeps in LFS is stored under its sha256 (the
    Hub's own checksum): the bytes are checked against it. `bounds`: the Limits (default `limits()`).
    `give_by_hand`: how to give the file instead, said when it cannot be fetched."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    base = endpoint()
    url = f"{base}/{repo_id}/resolve/{revision or 'main'}/{filename}"
    hint = f"; {give_by_hand}" if give_by_hand else ""
    try:
        with _bounded_hub(Transfer(url, bounds or limits())):
            # endpoint and offline read per call (huggingface_hub reads them once, at import)
            path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline(),
                                                   endpoint=base, library_name="transeg")
    except Stop as e:
        raise TransegError(f"{url}: {e}{hint}") from None
    except errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
        why = "HF_HUB_OFFLINE is set" if offline() else f"{base} cannot be reached"
        raise TransegError(f"{repo_id}: {filename} is not in the Hugging Face cache and {why}; fetch it once online "
                           f"(`transeg pull {repo_id}`){hint}") from None
    except errors.EntryNotFoundError:
        return None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise TransegError(f"{repo_id}: no such model repository on {base} (a private or gated one needs "
                           "HF_TOKEN)") from None
    except (errors.HfHubHTTPError, httpx2.HTTPError, httpx2.InvalidURL, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise TransegError(f"{url}: download failed ({first}){hint}") from None
    blob = Path(path).resolve().name
    if _SHA256.match(blob) and sha256_of(path) != blob:
        raise TransegError(f"{path}: its sha256 differs from the Hub's ({blob[:16]}...): the cached file is damaged; "
                           f"delete it and fetch again")
    return Path(path)


def endpoint():
    """HF_ENDPOINT (default https://huggingface.co), checked to be an http(s) URL."""
    value = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransegError(f"HF_ENDPOINT={value!r}: not an http(s) URL (e.g. https://huggingface.co, the default when "
                           "it is unset)")
    return value.rstrip("/")


class Checksums:
    """sha256 recorded on the first download of a file no publisher hashes, checked on every later one
    (cache/checksums.json; a key per release file)."""

    def __init__(self, path=None):
        self.path = Path(path) if path else cache_dir() / "checksums.json"

    def get(self, key):
        return self._read().get(key)

    def record(self, key, sha256):
        with file_lock(self.path):
            table = self._read()
            table[key] = sha256
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)

    def _read(self):
        try:
            table = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            raise TransegError(f"{self.path}: unreadable ({e}); delete it to record checksums afresh") from None
        if not isinstance(table, dict):
            raise TransegError(f"{self.path}: not a table of checksums; delete it to record checksums afresh")
        return table
