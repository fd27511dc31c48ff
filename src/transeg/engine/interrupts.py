"""Ctrl-C (SIGINT) during training: where it stops the run (`Interrupts`), and the DataLoader workers
that leave it to the trainer (`ignore_sigint`)."""
import contextlib
import signal
import sys
import threading
import time


class Interrupts:
    """Ctrl-C (SIGINT) during training. Inside an optimizer step (forward, backward, update and its log
    record) it is deferred to the step's end, so a checkpoint never holds a half-updated model, half
    updated BatchNorm statistics or a random state from the middle of an iteration; anywhere else (data
    loading, evaluation, checkpointing) it stops at once, the state being that of the last finished
    step. A second Ctrl-C, a second or more after the first, stops at once even inside a step. Only
    installed in the main thread of a single process: under torchrun the ranks receive the signal at
    different points of an iteration and could only stop consistently by agreeing over a collective
    each iteration; there Ctrl-C stops at once and the last periodic checkpoint is what --resume uses."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.in_step, self.pending, self.previous = False, None, None

    def __enter__(self):
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.in_step and (self.pending is None or now - self.pending < 1.0):
            if self.pending is None:
                self.pending = now
                print("\ntranseg: stopping after this iteration, then saving (Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self):
        self.in_step = True
        yield
        self.in_step = False
        if self.pending is not None:
            raise KeyboardInterrupt


def ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the trainer: by default a worker exits on it, and the step the
    trainer is finishing before it saves would then fail for want of its next batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
