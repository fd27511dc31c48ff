"""Downloads and the cache behind the zoo (`zoo.py`).

Hugging Face Hub files go through `huggingface_hub`, so `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and
`HF_HUB_OFFLINE` behave as users of the Hub know them; a file stored in LFS is checked against the
sha256 the Hub stores it under. Plain URLs go through `download_url`: a progress bar, resume of a
partial file (HTTP Range), the sha256 checked before the file is used, a lock so two processes never
fetch the same file at once, and nothing half-written under the final name.

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
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from filelock import FileLock

from .errors import TransegError

CHUNK = 1 << 20
TIMEOUT_S = 30  # per socket operation: a server that stops answering fails the download instead of hanging it


def cache_dir() -> Path:
    if os.environ.get("TRANSEG_HOME"):
        return Path(os.environ["TRANSEG_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "transeg"


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (the Hub's own switch) keeps every download off, plain URLs included; read per call."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on PATH.lock for the time of the block: a second process waits, then finds the
    work done. A `filelock.FileLock` (flock on POSIX): the kernel frees it when its holder dies, so a
    killed download never leaves it stuck."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        yield


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


def download_url(url, dest, sha256=None, progress=True, give_by_hand="") -> Path:
    """Fetch `url` to `dest` (kept if already there and matching `sha256`, whole or a prefix of it). The bytes arrive in DEST.part,
    which a later call resumes; `dest` appears only complete and checked. `give_by_hand`: the sentence
    that tells the user how to give the file instead, appended to every failure."""
    dest = Path(dest)
    hint = f"; {give_by_hand}" if give_by_hand else ""
    with file_lock(dest):
        if dest.is_file() and (sha256 is None or sha256_of(dest).startswith(sha256)):
            return dest
        if offline():
            raise TransegError(f"{url}: not downloaded (HF_HUB_OFFLINE is set and the file is not in the cache {dest.parent})"
                               f"{hint}")
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "transeg", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
                if have and response.status != 206:  # the server ignored the range: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else None
                with open(part, "ab" if have else "wb") as f, _bar(total, dest.name, have, progress) as bar:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the partial file is whole
                total = have
            else:
                raise TransegError(f"{url}: the server answered HTTP {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            kept = part.stat().st_size if part.is_file() else 0
            resume = f" ({kept:,} bytes kept in {part}; the next try resumes)" if kept else ""
            raise TransegError(f"{url}: download failed ({reason}){resume}{hint}") from None
        size = part.stat().st_size
        if total is not None and size != total:
            raise TransegError(f"{url}: the connection closed after {size:,} of {total:,} bytes ({part} is kept; the "
                               f"next try resumes){hint}")
        found = sha256_of(part)
        if sha256 is not None and not found.startswith(sha256):  # (a publisher may give a prefix: deit-...-d0272ac0.pth)
            part.unlink()
            raise TransegError(f"{url}: the download's sha256 is {found[:16]}..., not the expected {sha256[:16]}...; "
                               f"the file was deleted, try again{hint}")
        os.replace(part, dest)
        return dest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hub_file(repo_id, filename, revision=None, progress=True, give_by_hand=""):
    """Path of `filename` from the Hub repo `repo_id`, from the Hugging Face cache or downloaded into it;
    None when the repo has no such file. A file the Hub keeps in LFS is stored under its sha256 (the
    Hub's own checksum): the bytes are checked against it. `give_by_hand`: how to give the file instead,
    said when it cannot be fetched."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        # endpoint and offline read per call (huggingface_hub reads them once, at import)
        path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline(),
                                               endpoint=endpoint(), library_name="transeg")
    except errors.LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
        why = "HF_HUB_OFFLINE is set" if offline() else f"{endpoint()} cannot be reached"
        hint = f"; {give_by_hand}" if give_by_hand else ""
        raise TransegError(f"{repo_id}: {filename} is not in the Hugging Face cache and {why}; fetch it once online "
                           f"(`transeg pull {repo_id}`){hint}") from None
    except errors.EntryNotFoundError:
        return None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise TransegError(f"{repo_id}: no such model repository on {endpoint()} (a private or gated one needs "
                           "HF_TOKEN)") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise TransegError(f"{repo_id}: download of {filename} failed ({str(e).splitlines()[0][:200]})") from None
    blob = Path(path).resolve().name
    if _SHA256.match(blob) and sha256_of(path) != blob:
        raise TransegError(f"{path}: its sha256 differs from the Hub's ({blob[:16]}...): the cached file is damaged; "
                           f"delete it and fetch again")
    return Path(path)


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


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
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise TransegError(f"{self.path}: unreadable ({e}); delete it to record checksums afresh") from None
