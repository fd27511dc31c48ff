"""A run's checkpoints: train_state.pt (what --resume continues from: model, optimizer, scheduler, grad
scaler, random state, counters and the log window in progress) and model.safetensors beside it (the
weights as every verb loads them). best.safetensors is written by the evaluation (`validation.py`)."""
import shlex

import torch

from ..checkpoint import save
from ..errors import TransegError
from ..files import atomic_write
from .config import FIELDS, show
from .optim import sync_lr

STATE_FILE = "train_state.pt"
# Settings --resume may change: they do not change what the run computed so far, only how long it goes on
# (iters: longer, or shorter down to where it is; the poly schedule then runs over the new length from the
# current iteration on, see `resume_schedule`), how often it evaluates, saves and logs, where and how fast it
# computes, and how it tests. global_batch may be restated: the batch_size it gives is compared. Every other
# key (model, data, augmentation, optimizer, schedule shape, loss, seed, ...) must be the run's own.
RESUME_FREE = ("iters", "eval_interval", "ckpt_interval", "log_interval", "workers", "device", "amp", "compile",
               "tensorboard", "out", "global_batch", "test_mode", "test_scale", "test_crop", "test_stride",
               "size_divisor", "min_short_side", "ms_scales", "ms_flip", "early_stop", "report_to", "push_to",
               "push_every")
RESUME_KEYS = tuple(k for k in FIELDS if k not in RESUME_FREE)  # settings a resumed run must share with its run


def check_resume(out, resume):
    """Whether the run in `out` resumes (resume="auto": when there is one to resume), or one line saying
    why it cannot start: the cheap refusals, before any data or model is built."""
    state_path = out / STATE_FILE
    if not resume and state_path.exists():
        raise TransegError(f"{out}: already holds a training run; continue it with --resume (with a larger --iters to "
                           f"train it longer) or choose another --out (--pretrained {out / 'model.safetensors'} "
                           f"fine-tunes from its weights)")
    if resume == "auto":
        resume = state_path.is_file()
    if resume and not state_path.is_file():
        raise TransegError(f"{state_path}: nothing to resume (no training state in {out})")
    return resume


def resume_command(out):
    return f"transeg train {shlex.quote(str(out / 'config.yaml'))} --resume"


def save_checkpoint(out, model, optimizer, scheduler, scaler, *, done, best, stale, cfg, loss_window, eval_pending,
                    device):
    """model.safetensors, then train_state.pt (atomically) of the run at iteration `done`. best: the best
    value of cfg.best_metric so far (stored under "best_miou", the key every train state
    uses, whichever metric it holds); stale: evaluations since it last improved (for early_stop); loss_window: (sum,
    count) of the log window in progress; eval_pending: an evaluation due at `done` was cut short."""
    save(model, out / "model.safetensors")
    running, running_n = loss_window
    state = {"iter": done, "best_miou": best, "stale": stale, "config": cfg.to_dict(), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": {"torch": torch.get_rng_state()},
             # the log window in progress, so that a resumed run logs the means an uninterrupted one does
             "loss_sum": running.detach().cpu().clone(), "loss_count": running_n,
             # an evaluation due at `done` that an interruption cut short: --resume runs it first
             "eval_pending": eval_pending}
    if device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(device)
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def read_state(state_path, device):
    """The training state in `state_path`, or one line saying it is damaged and what to do instead."""
    out = state_path.parent
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a training state")
        missing = [k for k in ("iter", "best_miou", "config", "model", "optimizer", "scheduler", "scaler", "rng")
                   if k not in state]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if not isinstance(state["iter"], int) or not isinstance(state["config"], dict):
            raise ValueError("bad iteration or config entry")
    except Exception as e:  # torch.load says a damaged zip, a truncated pickle ... in several exception types
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise TransegError(_damaged_state(state_path, out, reason)) from None
    return state


def restore(state, state_path, model, optimizer, scheduler, scaler, device, running):
    """Load `state` into the model, optimizer, scheduler, grad scaler and random generators; returns the
    log window in progress, (loss sum as `running`, count): zero for states saved before it was kept."""
    running_n = 0
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state["scaler"]:  # empty: saved without fp16 (amp may change on resume)
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        if "loss_sum" in state:  # states saved before it was kept start the window afresh
            running = state["loss_sum"].to(device=device, dtype=running.dtype).reshape(())
            running_n = int(state["loss_count"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TransegError(_damaged_state(state_path, state_path.parent, str(e).splitlines()[0][:160])) from None
    return running, running_n


def resume_schedule(before, cfg, start, eval_pending, optimizer, scheduler, log):
    """A resume with another `iters` than the run's (`before`, its saved config): the learning rate
    follows the poly schedule over the new length from iteration `start` on, said through `log` (None:
    not this rank). Returns whether the run, cut to where it is, still owes the evaluation due at its
    new end."""
    if before.get("iters", cfg.iters) == cfg.iters:
        return False
    old_lr = optimizer.param_groups[0]["lr"]
    new_lr = sync_lr(optimizer, scheduler)
    if log is not None:
        log(f"iters {before['iters']} -> {cfg.iters}: from iteration {start} on, the learning rate follows the "
            f"poly schedule over {cfg.iters} iterations (lr {old_lr:.3g} -> {new_lr:.3g} here); the first "
            f"{start} iterations keep the {before['iters']}-iteration schedule they were trained with")
    # a run cut to where it is: no step is left, but the evaluation due at its (new) end is
    due_before = start % before.get("eval_interval", cfg.eval_interval) == 0 or start == before["iters"]
    return start == cfg.iters and not due_before and not eval_pending


def _damaged_state(state_path, out, reason):
    weights = out / "model.safetensors"
    restart = (f"restart from its last weights with --set pretrained={weights} and another --out (optimizer and "
               f"schedule start over), or " if weights.is_file() else "")
    return (f"{state_path}: damaged training state ({reason}); --resume cannot continue it: {restart}start afresh "
            f"with another --out")


def check_resume_settings(state_path, before, cfg, at):
    """Refuse, in one line, a --resume whose settings change what the run computed so far (RESUME_KEYS),
    or whose `iters` ends it before the iteration it is at. Keys the saved config lacks (added to transeg
    after the run was saved) are not compared."""
    now = cfg.to_dict()
    changed = [k for k in RESUME_KEYS if k in before and before[k] != now.get(k)]
    fine_tune = f"--pretrained {state_path.parent / 'model.safetensors'} and another --out"
    if changed:
        raise TransegError(
            f"{state_path}: cannot resume with changed settings {changed}: "
            + ", ".join(f"{k}={show(now.get(k))} (the run used {show(before[k])})" for k in changed)
            + f"; --resume may change only {', '.join(RESUME_FREE[:7])} and the test settings; to train on with "
              f"other settings, start a new run from its weights with {fine_tune}")
    if cfg.iters < at:
        raise TransegError(f"{state_path}: iters={cfg.iters}: the run is at iteration {at} already; --resume with "
                           f"--iters {at} or more (or start a new run from its weights with {fine_tune})")
