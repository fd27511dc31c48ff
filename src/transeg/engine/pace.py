"""Training pace: one line in the log when training runs much slower than this machine has shown it can.

Calibration (the choice made here): the run itself. Its steps are timed in windows of at least
`WINDOW_SECONDS` of step time (data loading included; evaluations and checkpoints between steps are not
timed), and the fastest window so far is the pace this machine gives this run: the real step (model, batch,
data, threads) measured, where a matmul probe at start would predict it from a rate that says little about
a small model's step. It costs two clock reads a step. A window `SLOWDOWN` times slower than that is "much
slower than expected": the log says so once, with the likely cause (the load average against the cores:
other processes on them) and the README's `--threads` advice.

What it cannot see: a machine already busy when the run starts gives no faster window to compare with
(the README's Quick start and `transeg bench`'s noise warning cover that case); a run shorter than two
windows is never judged.
"""
import os
import time

SLOWDOWN = 2.0  # a window this many times slower than the fastest one warns
WINDOW_SECONDS = 30.0  # step time a window holds before it is judged (a minute-long run has two)
WINDOW_STEPS = 5  # and steps: a window of 2 slow steps is noise


class Pace:
    """Times the steps of a run (`begin` / `end` around each, everything a step waits for included) and
    calls `log` once with `slow_message` when a window is `SLOWDOWN` times slower than the fastest
    before it. `threads`: the run's torch threads (for the message); `clock`, `load` (os.getloadavg()[0])
    and `cores` are there for tests."""

    def __init__(self, log, threads, clock=time.perf_counter, load=None, cores=None):
        self.log, self.threads, self.clock = log, threads, clock
        self.load = load or (lambda: os.getloadavg()[0])
        self.cores = cores or os.cpu_count() or 1
        self.best = None  # seconds per step of the fastest window so far
        self.seconds, self.steps, self.started, self.warned = 0.0, 0, None, False

    def begin(self):
        self.started = self.clock()

    def end(self):
        if self.started is None or self.warned:
            return
        self.seconds += self.clock() - self.started
        self.steps += 1
        self.started = None
        if self.seconds < WINDOW_SECONDS or self.steps < WINDOW_STEPS:
            return
        pace = self.seconds / self.steps
        self.seconds, self.steps = 0.0, 0
        if self.best is not None and pace >= SLOWDOWN * self.best:
            self.warned = True
            self.log(slow_message(pace, self.best, self._load(), self.cores, self.threads))
        self.best = pace if self.best is None else min(self.best, pace)

    def _load(self):
        try:
            return self.load()
        except OSError:  # (no load average on this system)
            return None


def slow_message(pace, best, load, cores, threads):
    """The warning: how much slower, the likely cause, and what to do."""
    said = (f"transeg: warning: training slowed to {pace:.3g} s per iteration, {pace / best:.1f}x its fastest in "
            f"this run ({best:.3g} s): ")
    if load is None:
        cause = "the cores may be busy with other processes"
    elif load > cores:
        cause = (f"other processes are using the cores (load average {load:.1f} on {cores} cores, this run's "
                 f"{threads} threads included)")
    else:
        cause = (f"the load average ({load:.1f} on {cores} cores) shows no other process on them: the machine may be "
                 "throttled (heat, power), swapping, or waiting on the data")
    return (said + cause + ". Two programs that each use every core slow each other down many times over: give "
            "each fewer threads, e.g. --threads 1, or OMP_NUM_THREADS=1 for every program")
