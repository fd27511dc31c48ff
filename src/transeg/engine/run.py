"""The run folder (--out) and what training writes in it besides checkpoints:

    .lock          held while a run trains here (`RunLock`); holds the holder's pid and host
    config.yaml    the run's settings, as `--resume` reads them
    log.jsonl      one record per log window and per evaluation; on --resume cut back to the checkpoint
    eval.json, predictions.png, trackers.json, tb/   written by the trackers' hook (trackers.py)
"""
import contextlib
import json
import os
import socket
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from ..errors import TransegError
from ..files import _strerror, atomic_write
from .checkpoints import STATE_FILE

LOCK_FILE = ".lock"
LOG_FILE = "log.jsonl"
_LOCKED_HERE = set()  # run folders this process trains in (its own second run is refused naming this process)


class RunLock:
    """Holds an exclusive lock on DIR/.lock while a run trains in DIR; a second process is refused at
    once with one line naming the folder and the process that holds it.

    A `filelock.FileLock` (flock on POSIX): the kernel drops it when the process dies (SIGKILL included),
    so nothing is ever left stuck. A flock belongs to the open file, which fork() shares, but filelock
    closes its descriptor in forked children: the DataLoader's worker processes, which outlive a killed
    trainer by up to 5 s, do not hold it, so a torchrun restart can take it at once. No soft-lock
    fallback: on a filesystem without locks the run trains unlocked rather than not at all (a soft lock
    a killed run left would stay). The holder writes its pid and host into the file for the refusal.
    A run that ends (finished, failed or interrupted) removes the file while it still holds the lock:
    a process that opened the file before it was removed and takes the lock after it was released finds it
    unlinked and locks a new file instead (filelock checks the locked file's link count), so removing it
    races with no one. Only a killed run leaves the file, unlocked. A folder the run created and left
    empty goes too."""

    def __init__(self, out):
        self.out = Path(out)
        self.lock = None

    def __enter__(self):
        out = self.out
        created = _make_folder(out)
        self.key = os.path.realpath(out)
        if self.key in _LOCKED_HERE:
            raise TransegError(f"{out}: a training run is already using this folder (this process, pid {os.getpid()}); "
                               f"wait for it to end or choose another --out")
        self.lock, self.created = _lock(out / LOCK_FILE), created
        self.identity = _identity(out / LOCK_FILE)
        _LOCKED_HERE.add(self.key)
        return self

    def __exit__(self, *exc):
        _LOCKED_HERE.discard(self.key)
        with contextlib.suppress(OSError):
            if _same_file(self.out / LOCK_FILE, self.identity):
                (self.out / LOCK_FILE).unlink()  # while locked: see the class's docstring
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()  # a run that stopped before writing anything leaves no folder behind
        if self.lock is not None:
            self.lock.release()
        return False


def _identity(path):
    """(device, inode) of `path`, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _same_file(path, identity):
    """`path` is still the file this run locked (not one another process created after it was removed)."""
    return identity is not None and _identity(path) == identity


def _make_folder(out):
    """Create the run folder (and its parents); True if it was not there. A folder that cannot be one
    or cannot be written in is one line, before any work."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TransegError(f"{out}: is a file, not a folder; choose another --out") from None
    except OSError as e:
        raise TransegError(f"{out}: cannot write here ({_strerror(e)}); choose another --out") from None
    return created


def _lock(path):
    """The lock on `path`, taken without waiting; None on a filesystem without locks."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise TransegError(f"{path.parent}: cannot write here ({_strerror(e)}); choose another --out") from None
    lock = FileLock(path, timeout=0, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:  # (an OSError too: first)
        raise TransegError(f"{path.parent}: a training run is already using this folder ({_holder(path)}); wait for "
                           f"it to end or stop it, or choose another --out") from None
    except OSError:
        return None  # a filesystem without locks (ENOLCK, ENOSYS, ...): train unlocked rather than not at all
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, the refusal names no pid
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
    return lock


def _holder(path):
    """"pid N on HOST", as the holder of the lock on `path` wrote it."""
    try:
        with open(path, "rb") as f:
            return f.read(200).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


class RunFolder:
    """config.yaml and log.jsonl of the run in `out` (written by rank 0 alone). Nothing is written before `start`."""

    def __init__(self, out):
        self.out = Path(out)
        self.log_path = self.out / LOG_FILE
        self.started, self.file = False, None

    def start(self, cfg, resume, start, redo_eval):
        """Write the run's files. Called once the run really starts (its first finished step, or the
        evaluation a resumed run owes): a start that fails (bad data, a model that does not fit the
        device, ...) leaves config.yaml, log.jsonl and an earlier run's log as they were. A resumed run's
        log is cut back to iteration `start` (see `truncate_log`)."""
        self.started = True
        out, log_path = self.out, self.log_path
        if resume:
            truncate_log(log_path, start, redo_eval=redo_eval)
            remove_stale_temporaries(out)
        elif log_path.is_file() and log_path.stat().st_size:
            # a run killed before its first checkpoint: nothing to continue, so this run starts over, with a log
            # of its own (appending would give each iteration twice); the old one is kept aside
            with _writing(out / "log.previous.jsonl"):
                os.replace(log_path, out / "log.previous.jsonl")
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        with _writing(log_path):
            self.file = log_path.open("a")

    def write(self, record):
        """Append `record` ({"iter": N, key: number, ...}) to log.jsonl."""
        with _writing(self.log_path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        with contextlib.suppress(OSError):
            if self.file is not None:
                self.file.close()

    def records(self):
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def _writing(path):
    """A full disk or a read-only folder while writing `path` (appended to, so not written atomically):
    one line naming it, not a traceback."""
    try:
        yield
    except OSError as e:
        then = ", then continue with --resume" if (path.parent / STATE_FILE).is_file() else ""
        raise TransegError(f"{path}: could not be written ({e.strerror or e}); free some space or choose another "
                           f"--out{then}") from None


def _record_iter(line):
    """The iteration of a log line, or None for a line a killed run left half-written."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


def truncate_log(path, last_iter, redo_eval=False):
    """Drop records an interrupted run wrote after its last checkpoint (they are about to be redone),
    and any line it was killed in the middle of writing; `redo_eval`: also the evaluation record of
    `last_iter` (its evaluation was cut short and is about to be redone)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if (it := _record_iter(line)) is not None
                and (it < last_iter or it == last_iter and not (redo_eval and '"mIoU"' in line))]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def remove_stale_temporaries(out):
    """Temp files of atomic writes a killed run left behind (`.NAME.XXXX.tmp`); the files they were
    replacing are intact."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
