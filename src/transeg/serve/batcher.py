"""Dynamic batching on the device: concurrent requests that can share a forward pass run together.

One worker thread owns the model. A request is a `Job` (decoded image + how to run it); jobs with
the same key (image size, ISR setting, whether the confidence is wanted) that arrive within
`window_s` of the first one form a batch of at most `max_batch`. At most `max_pending` jobs are
admitted at once (queued or running): beyond that `submit` raises `Overloaded`, so overload is
answered at once instead of growing memory.
"""
import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field


class Overloaded(Exception):
    """More jobs admitted than `max_pending`."""


@dataclass
class Job:
    image: object                       # HxWx3 uint8 array
    isr: tuple = ()                     # ((part, ratios), ...): hashable ISR setting, () = as trained
    confidence: bool = False
    future: Future = field(default_factory=Future)

    @property
    def key(self):
        return self.image.shape, self.isr, self.confidence


class Batcher:
    """`submit(job)` -> a Future of `run(jobs)`'s entry for that job. `run(jobs)` is called in the worker
    thread with up to `max_batch` jobs sharing one key and returns one result per job; an exception
    it raises is set on every job of the batch (the worker carries on)."""

    def __init__(self, run, max_batch=8, window_s=0.005, max_pending=64):
        self.run, self.max_batch, self.window_s, self.max_pending = run, max_batch, window_s, max_pending
        self._queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="transeg-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self):
        return self._pending

    def submit(self, job):
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"{self._pending} requests are already waiting")
            self._pending += 1
        self._queue.put(job)
        return job.future

    def _collect(self, held):
        """The next batch: the oldest job, then jobs of its key, from those held back first, then from
        the queue until the window closes or the batch is full. Others are held for later batches."""
        first = held.popleft() if held else self._queue.get()
        batch = [first]
        for job in list(held):
            if len(batch) < self.max_batch and job.key == first.key:
                held.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            (batch if job.key == first.key else held).append(job)
        return batch

    def _work(self):
        held = collections.deque()
        while True:
            batch = self._collect(held)
            try:
                results = self.run(batch)
                for job, result in zip(batch, results):
                    job.future.set_result(result)
            except Exception as e:  # noqa: BLE001 (a failed batch must not stop the worker)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                with self._lock:
                    self._pending -= len(batch)
