"""The training loop.

Reproducible and resumable by construction: sample k of the run (k counts samples over the whole
schedule) is dataset item perm(seed, epoch)[k mod N] augmented with numpy rng([seed, k]), so the
data never depends on worker count, process order or where a run was interrupted; the only other
randomness (dropout, drop path) comes from torch's global generator, saved with every checkpoint.
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..checkpoint import first_nonfinite, load, save
from ..files import atomic_write
from ..device import native_bf16, resolve_device
from ..errors import TransegError
from ..flops import count_params
from ..protocol import Protocol
from ..registry import create_model
from .config import FIELDS, TrainConfig, resolve, show
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, sync_lr

STATE_FILE = "train_state.pt"
# Settings --resume may change: they do not change what the run computed so far, only how long it goes on
# (iters: longer, or shorter down to where it is; the poly schedule then runs over the new length from the
# current iteration on, see `_resume_schedule`), how often it evaluates, saves and logs, where and how fast it
# computes, and how it tests. global_batch may be restated: the batch_size it gives is compared. Every other
# key (model, data, augmentation, optimizer, schedule shape, loss, seed, ...) must be the run's own.
RESUME_FREE = ("iters", "eval_interval", "ckpt_interval", "log_interval", "workers", "device", "amp", "compile",
               "tensorboard", "out", "global_batch", "test_mode", "test_scale", "test_crop", "test_stride",
               "size_divisor", "min_short_side", "ms_scales", "ms_flip", "early_stop")
RESUME_KEYS = tuple(k for k in FIELDS if k not in RESUME_FREE)  # settings a resumed run must share with its run


class TrainSamples(Dataset):
    """Index k -> (image, label) of the k-th training sample of the run (see module docstring)."""

    def __init__(self, dataset, transform, seed):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self._perms = {}

    def __len__(self):
        return 2**62  # indexed by the global sample counter, never iterated directly

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.dataset))}
        return self._perms[epoch]

    def __getitem__(self, k):
        epoch, pos = divmod(k, len(self.dataset))
        sample = self.dataset[int(self._perm(epoch)[pos])]
        return self.transform(sample["image"], sample["label"], np.random.default_rng([self.seed, k]))


def _sample_ids(start_micro, end_micro, batch, rank, world):
    """Global sample counters this process consumes, micro-batch by micro-batch."""
    for j in range(start_micro, end_micro):
        base = (j * world + rank) * batch
        yield from range(base, base + batch)


def _amp(cfg, device):
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "no"
    if amp == "no":
        return None
    if amp not in ("bf16", "fp16"):
        raise TransegError(f"amp must be no, auto, bf16 or fp16, got {cfg.amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise TransegError("amp fp16 needs a CUDA device; use amp=bf16 on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _init_distributed():
    """Initialise the process group when launched by torchrun and not done already; True if it did."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store and env.get("GROUP_WORLD_SIZE") == "1":
        # torchrun keeps one key-value store across --max-restarts, so a restarted group would read
        # the dead group's addresses (gloo: connection refused or a hang; nccl: a stale unique id).
        # One agent means one restart count for every worker: keys per attempt.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"transeg/attempt_{attempt}", store),
                                rank=rank, world_size=world)
        return True
    dist.init_process_group(backend)
    if agent_store and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) and dist.get_rank() == 0:
        # several agents keep their own restart counts, so the fix above cannot apply
        print("transeg: torchrun --max-restarts over several nodes reuses its store across restarts; "
              "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that a restarted group can connect",
              file=sys.stderr, flush=True)
    return True


def per_process_batch(cfg, world):
    """cfg with batch_size = global_batch / (world x accum_steps): a recipe states the paper's total
    batch and runs unchanged on 1 process or under torchrun on 8."""
    share, rest = divmod(cfg.global_batch, world * cfg.accum_steps)
    if rest or not share:
        raise TransegError(f"global_batch {cfg.global_batch} does not split over {world} process(es) x "
                           f"{cfg.accum_steps} accumulation step(s); change accum_steps or the process count")
    return dataclasses.replace(cfg, batch_size=share)


def build_model(cfg, train_set, log=None):
    """The model a run starts from: `cfg.pretrained`'s (fine-tuning: every weight from that checkpoint; a
    new classifier where the data has another number of classes, said in one line through `log`) or a
    fresh `cfg.model`."""
    classes, palette = list(train_set.classes), list(train_set.palette)
    if cfg.pretrained:
        model = load(cfg.pretrained)
        if model.num_classes != len(classes):
            model = _new_classifier(model, cfg.pretrained, len(classes), log)
        model.meta.update(classes=classes, palette=[list(c) for c in palette])
    else:
        model = create_model(cfg.model, num_classes=len(classes), classes=classes, palette=palette, **cfg.model_args)
    if cfg.backbone_weights:
        from ..convert import load_backbone_weights
        from ..zoo import backbone_weights
        load_backbone_weights(model, backbone_weights(cfg.backbone_weights))
    model.meta["dataset"] = cfg.data or "synthetic"
    model.protocol = Protocol(mode=cfg.test_mode, scale=cfg.test_scale, size_divisor=cfg.size_divisor,
                              crop=cfg.test_crop, stride=cfg.test_stride, min_short_side=cfg.min_short_side,
                              ms_scales=cfg.ms_scales, ms_flip=cfg.ms_flip)
    return model


def _new_classifier(source, path, num_classes, log=None):
    """`source` (a loaded checkpoint) rebuilt for `num_classes` classes: every tensor whose shape does not
    depend on the class count is copied, the others (the classifier) start from their fresh initialisation."""
    meta = source.meta
    args = {k: v for k, v in meta.get("model_args", {}).items() if k != "num_classes"}
    model = create_model(meta["variant"], num_classes=num_classes, **args)
    fresh, weights = model.state_dict(), source.state_dict()
    kept = {k: v for k, v in weights.items() if k in fresh and fresh[k].shape == v.shape}
    new = [k for k in fresh if k not in kept]
    model.load_state_dict({**fresh, **kept})
    model.meta.update({k: v for k, v in meta.items() if k not in ("model_args", "classes", "palette")})
    if log is not None:
        more = f" (+{len(new) - 4} more)" if len(new) > 4 else ""
        log(f"{path}: {source.num_classes} classes, the data has {num_classes}: a new classifier for the "
            f"{num_classes} classes starts afresh ({', '.join(new[:4])}{more}); every other weight comes from {path}")
    return model


def train(cfg: TrainConfig, resume=False, stop_at=None, progress=True, log=print):
    """Train per `cfg`; returns the last evaluation result. `stop_at`: stop (with a checkpoint) after
    that many iterations, as if interrupted — the run can then be resumed. resume="auto" continues
    the run in cfg.out when there is one and starts it otherwise (for torchrun --max-restarts).
    The run folder is locked while this runs (`RunLock`): a second run into it is refused.
    Ctrl-C saves a checkpoint where the run is and logs the command that continues it.
    Under torchrun, a process group this call creates is also destroyed by it: left to interpreter
    exit, its teardown sometimes aborts (SIGABRT, "terminate called without an active exception")
    and fails a finished run."""
    created = _init_distributed()
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        # rank 0 writes the run folder, so rank 0 locks it: on one node or several (a folder on a shared
        # filesystem, or rank 0's own), and a torchrun restart takes it again once the killed group is gone
        with RunLock(cfg.out) if rank == 0 else contextlib.nullcontext():
            return _train(cfg, resume, stop_at, progress, log)
    finally:
        if created:
            dist.destroy_process_group()


LOCK_FILE = ".lock"


def _reason(e):
    """"read-only file system": an OSError's strerror, lower case first, as the other verbs say it."""
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]
_LOCKED_HERE = set()  # run folders this process trains in (POSIX locks never conflict within one process)


class RunLock:
    """Holds an exclusive lock on DIR/.lock while a run trains in DIR; a second process is refused
    with one line naming the folder and the process that holds it.

    A POSIX record lock (fcntl.lockf), not flock: the kernel drops it when the process dies (SIGKILL
    included), so nothing is ever left stuck, and unlike flock it is not inherited by fork(): the
    DataLoader's worker processes, which outlive a killed trainer by up to 5 s, do not hold it, so a
    torchrun restart can take it at once. (A POSIX lock is released when the process closes any
    descriptor of the file, so the file is opened once and never read by the holder.) The file
    stays (removing a lock file races with a process about to lock it), except in a folder the run
    created and left empty, which goes too."""

    def __init__(self, out):
        self.out = Path(out)
        self.fd = None

    def __enter__(self):
        out = self.out
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise TransegError(f"{out}: is a file, not a folder; choose another --out") from None
        except OSError as e:
            raise TransegError(f"{out}: cannot write here ({_reason(e)}); choose another --out") from None
        self.key = os.path.realpath(out)
        if self.key in _LOCKED_HERE:
            raise TransegError(f"{out}: a training run is already using this folder (this process, pid {os.getpid()}); "
                               f"wait for it to end or choose another --out")
        try:
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TransegError(f"{out}: cannot write here ({_reason(e)}); choose another --out") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise TransegError(f"{out}: a training run is already using this folder ({holder}); wait for it to "
                                   f"end or stop it, or choose another --out") from None
            # a filesystem without locks (ENOLCK, EOPNOTSUPP): train unlocked rather than not at all
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, the message names no pid
        self.fd, self.created = fd, created
        _LOCKED_HERE.add(self.key)
        return self

    def __exit__(self, *exc):
        _LOCKED_HERE.discard(self.key)
        with contextlib.suppress(OSError):
            if self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
                # a run that stopped before writing anything leaves no folder behind (unlinked while locked)
                (self.out / LOCK_FILE).unlink()
                self.out.rmdir()
        os.close(self.fd)  # releases the lock
        return False


class _Interrupts:
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


def _ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the trainer: by default a worker exits on it, and the step the
    trainer is finishing before it saves would then fail for want of its next batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_command(out):
    return f"transeg train {shlex.quote(str(out / 'config.yaml'))} --resume"


def _read_state(state_path, device):
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


def _damaged_state(state_path, out, reason):
    weights = out / "model.safetensors"
    restart = (f"restart from its last weights with --set pretrained={weights} and another --out (optimizer and "
               f"schedule start over), or " if weights.is_file() else "")
    return (f"{state_path}: damaged training state ({reason}); --resume cannot continue it: {restart}start afresh "
            f"with another --out")


def _check_resume_settings(state_path, before, cfg, at):
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


class _Batches:
    """next() over a DataLoader, with a dataset's own one-line error kept as it is. An exception in a
    worker process comes back re-raised as its type with torch's text around it ("Caught TransegError in
    DataLoader worker process 0." and the worker's traceback); the message the dataset wrote is the
    traceback's last entry, so that is what the error says, as `transeg data check` and `eval` do."""

    PREFIX = f"{TransegError.__module__}.{TransegError.__qualname__}: "

    def __init__(self, loader):
        self.it = iter(loader)

    def __iter__(self):
        return self

    def close(self):
        """Stop the worker processes now. Left to the garbage collector (the loader is in the reference
        cycle of the error being raised), the queues are finalised first and the workers never hear
        the stop: each is waited for 5 s and then terminated."""
        shutdown = getattr(self.it, "_shutdown_workers", None)  # the multi-process iterator's own clean-up
        if shutdown is not None:
            shutdown()

    def __next__(self):
        try:
            return next(self.it)
        except TransegError as e:
            text = str(e)
            if "DataLoader worker process" not in text or f"\n{self.PREFIX}" not in text:
                raise
            raise TransegError(text.rsplit(f"\n{self.PREFIX}", 1)[1].strip()) from None


def _nothing_labelled(dataset):
    """True when no item of `dataset` has a labelled pixel. Stops at the first labelled one, so a
    normal dataset costs one mask read; only a dataset that is all ignore is read through. Folder
    datasets are scanned by their masks alone (no image decoding)."""
    ignore = getattr(dataset, "ignore_index", 255)
    samples, lut = getattr(dataset, "samples", None), getattr(dataset, "lut", None)
    if hasattr(dataset, "read_mask") and samples is not None and lut is not None:
        for i, (_, mask_path) in enumerate(samples):
            raw = dataset.read_mask(mask_path)
            if (lut[raw] != ignore).any():
                return False
            if hasattr(dataset, "valid") and not dataset.valid[raw].all():
                dataset[i]  # values outside the classes: the dataset's own error names the file and the value
        return True
    return all(not (dataset[i]["label"] != ignore).any() for i in range(len(dataset)))


def _class_weights(cfg, train_set, saved_config, progress, log):
    """`class_weight: auto` in cfg.loss -> numbers: from the training set's labelled pixels per class (the
    scan `transeg data check` makes), or, on a resume, the numbers the run was started with (config.yaml)."""
    from ..data import class_weights
    from ..losses.pixel import check_terms

    if not cfg.loss or not any(t.get("class_weight") == "auto" for t in cfg.loss):
        check_terms(cfg.loss or [{"type": "ce"}], num_classes=len(train_set.classes))
        return cfg
    saved = None
    if saved_config is not None and Path(saved_config).is_file():
        saved = (yaml.safe_load(Path(saved_config).read_text()) or {}).get("loss")
    if saved and len(saved) == len(cfg.loss):
        weights = [s.get("class_weight") for s in saved]
    else:
        from ..data import summarize

        summary = (train_set.check(progress=progress, decode_images=False) if hasattr(train_set, "check")
                   else summarize(train_set, progress))
        auto = class_weights(summary["class_pixels"])
        log("class_weight auto (ENet's 1/ln(1.02 + share), mean 1 over the training pixels): "
            + ", ".join(f"{name} {w:.3g}" for name, w in zip(train_set.classes, auto)))
        weights = [auto] * len(cfg.loss)
    terms = [{**t, "class_weight": w} if t.get("class_weight") == "auto" else t for t, w in zip(cfg.loss, weights)]
    return dataclasses.replace(cfg, loss=check_terms(terms, num_classes=len(train_set.classes)))


def _check_labelled(dataset, split, spec):
    if _nothing_labelled(dataset):
        where = getattr(dataset, "mask_dir", None) or f"--data {spec or 'synthetic'}"
        ignore = getattr(dataset, "ignore_index", 255)
        how = (f"every mask value is 0 or {ignore}, both ignored under reduce_zero_label"
               if getattr(dataset, "reduce_zero_label", False) else f"every mask is {ignore} (ignore)")
        raise TransegError(f"{where}: no labelled pixel in the {split} set: {how}; training would learn nothing and "
                           f"evaluation measure nothing. Mask values are class indices 0..K-1 in the order of the "
                           f"class list (`transeg data check` shows what the masks hold)")


def _train(cfg, resume, stop_at, progress, log):
    from ..data import TrainTransform, build_dataset
    from ..charts import confusion_chart, curves_chart, iou_chart

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main = rank == 0
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    # the cheap refusals first, before any data or model is built
    if not resume and state_path.exists():
        raise TransegError(f"{out}: already holds a training run; continue it with --resume (with a larger --iters to "
                           f"train it longer) or choose another --out (--pretrained {out / 'model.safetensors'} "
                           f"fine-tunes from its weights)")
    if resume == "auto":
        resume = state_path.is_file()
    if resume and not state_path.is_file():
        raise TransegError(f"{state_path}: nothing to resume (no training state in {out})")
    device = resolve_device(cfg.device)
    amp_dtype = _amp(cfg, device)
    if main and cfg.tensorboard:
        _tensorboard_class()  # a missing extra is refused before any work
    torch.manual_seed(cfg.seed)

    if cfg.global_batch:
        cfg = per_process_batch(cfg, world)
    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val")
    _check_labelled(train_set, "training", cfg.data)
    _check_labelled(val_set, "validation", cfg.data)
    cfg = resolve(cfg, train_set)
    cfg = _class_weights(cfg, train_set, out / "config.yaml" if resume else None, progress and main,
                         log if main else (lambda *a: None))
    model = build_model(cfg, train_set, log=log if main else None).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, custom_keys=cfg.custom_keys,
                                nesterov=cfg.nesterov, split_encoder=bool(cfg.two_stage_warmup))
    scheduler = build_scheduler(optimizer, cfg.iters, cfg.power, cfg.min_lr_ratio, cfg.warmup_iters, cfg.warmup_ratio,
                                cfg.two_stage_warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # best: the best value of cfg.best_metric so far (stored as "best_miou", its name when mIoU was the only
    # choice, so that older states resume); stale: evaluations since it last improved (for early_stop)
    start, best, stale, eval_pending, final_eval = 0, -1.0, 0, False, False
    # the running loss of the log window the run is in (sum over micro-batches, their count): a resumed run
    # logs the same window means as an uninterrupted one
    running = torch.zeros((), device=device)
    running_n = 0
    if resume:
        state = _read_state(state_path, device)
        before = state["config"]
        _check_resume_settings(state_path, before, cfg, state["iter"])
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
            raise TransegError(_damaged_state(state_path, out, str(e).splitlines()[0][:160])) from None
        start, best, eval_pending = state["iter"], state["best_miou"], bool(state.get("eval_pending"))
        stale = int(state.get("stale", 0))
        if main:
            log(f"resuming {out} at iteration {start}/{cfg.iters}")
        if before.get("iters", cfg.iters) != cfg.iters:
            old_lr = optimizer.param_groups[0]["lr"]
            new_lr = sync_lr(optimizer, scheduler)
            if main:
                log(f"iters {before['iters']} -> {cfg.iters}: from iteration {start} on, the learning rate follows the "
                    f"poly schedule over {cfg.iters} iterations (lr {old_lr:.3g} -> {new_lr:.3g} here); the first "
                    f"{start} iterations keep the {before['iters']}-iteration schedule they were trained with")
            # a run cut to where it is: no step is left, but the evaluation due at its (new) end is
            due_before = start % before.get("eval_interval", cfg.eval_interval) == 0 or start == before["iters"]
            final_eval = start == cfg.iters and not due_before and not eval_pending
    elif main and (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size:
        log(f"{out} held a run stopped before its first checkpoint: starting afresh (its log is kept as "
            f"log.previous.jsonl)")

    net = model
    if world > 1:
        if cfg.sync_bn:
            if device.type != "cuda":
                raise TransegError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net.compile()  # in place: the state dict keeps its names, checkpoints are unchanged

    transform = TrainTransform(crop_size=tuple(cfg.crop_size), scale=tuple(cfg.scale), ratio_range=tuple(cfg.ratio_range),
                               cat_max_ratio=cfg.cat_max_ratio, photometric=cfg.photometric,
                               mean=model.meta["mean"], std=model.meta["std"],
                               ignore_index=getattr(train_set, "ignore_index", 255))
    end = cfg.iters if stop_at is None else min(stop_at, cfg.iters)
    loader = DataLoader(TrainSamples(train_set, transform, cfg.seed), batch_size=cfg.batch_size,
                        sampler=list(_sample_ids(start * cfg.accum_steps, end * cfg.accum_steps, cfg.batch_size, rank, world)),
                        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.workers > 0 else None,
                        worker_init_fn=_ignore_sigint if cfg.workers > 0 else None,
                        generator=torch.Generator())  # keeps the DataLoader off the global RNG (exact resume)
    val_part = Subset(val_set, range(rank, len(val_set), world)) if world > 1 else val_set

    protocol = model.protocol
    if main:
        log(f"training {model.meta.get('variant', cfg.model)} ({count_params(model) / 1e6:.2f}M params) on "
            f"{model.meta['dataset']} ({len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes), "
            f"{cfg.iters} iterations x {cfg.batch_size * cfg.accum_steps * world} images, device {device}"
            + (f", amp {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else "") + f"; eval: {protocol.describe()}")
    bar = tqdm(total=end, initial=start, desc="train", disable=not (progress and main), dynamic_ncols=True)
    log_file = writer = None
    timed_n, t0, result = 0, time.perf_counter(), None
    started = False

    def begin():
        """The run folder's files are written once the run really starts (its first finished step, or the
        evaluation a resumed run owes): a start that fails (bad data, a model that does not fit the
        device, ...) leaves config.yaml, log.jsonl and an earlier run's log as they were."""
        nonlocal started, log_file, writer
        if started or not main:
            return
        started = True
        log_path = out / "log.jsonl"
        if resume:
            _truncate_log(log_path, start, redo_eval=eval_pending)
            _remove_stale_temporaries(out)
        elif log_path.is_file() and log_path.stat().st_size:
            # a run killed before its first checkpoint: nothing to continue, so this run starts over, with a log
            # of its own (appending would give each iteration twice); the old one is kept aside
            with _writing(out / "log.previous.jsonl"):
                os.replace(log_path, out / "log.previous.jsonl")
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        with _writing(log_path):
            log_file = log_path.open("a")
        writer = _tensorboard(out) if cfg.tensorboard else None

    saved_at = start if resume else None
    completed = start  # optimizer steps finished: what the model, optimizer, scheduler and RNG now hold
    evaluated = None if eval_pending else start  # the last iteration whose evaluation finished

    def where():
        return (f"the last checkpoint, iteration {saved_at}, is {state_path}" if saved_at is not None
                else "no checkpoint was written yet")

    def again():
        return "--resume" if saved_at is not None else "start again"

    def check_weights(done):
        bad = first_nonfinite(model.state_dict())
        if bad:
            raise TransegError(f"weights became NaN/inf by iteration {done} ({bad[0]}); {where()}; lower lr or use "
                               f"amp=no, then {again()}")

    def evaluate_at(done):
        nonlocal result, best, stale, evaluated
        begin()
        check_weights(done)  # a broken model must not become best.safetensors
        result = evaluate(model, val_part, protocol, device, amp_dtype, progress=False)
        net.train()
        if main:
            with _writing(out / "log.jsonl"):
                keys = dict.fromkeys(("mIoU", "mAcc", "aAcc", cfg.best_metric))  # (ordered, once each)
                _write(log_file, writer, {"iter": done, **{k: round(result[k], 5) for k in keys}})
            bar.write(f"iter {done}: mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
                      f"aAcc {100 * result['aAcc']:.2f}")
            chart = iou_chart(result, model.classes, model.meta["palette"], title=f"{cfg.model} iter {done}")
            atomic_write(out / "val_iou.png", lambda tmp: chart.save(tmp, format="PNG"))
            matrix = confusion_chart(result, model.classes, title=f"{cfg.model} iter {done}: validation confusion")
            atomic_write(out / "confusion.png", lambda tmp: matrix.save(tmp, format="PNG"))
            if result[cfg.best_metric] > best:
                save(model, out / "best.safetensors")
        # every rank keeps the count (the result is all-reduced), so all stop together
        stale = 0 if result[cfg.best_metric] > best else stale + 1
        best = max(best, result[cfg.best_metric])
        evaluated = done

    def checkpoint(done):
        nonlocal saved_at
        begin()
        check_weights(done)
        save(model, out / "model.safetensors")
        state = {"iter": done, "best_miou": best, "stale": stale, "config": cfg.to_dict(), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": {"torch": torch.get_rng_state()},
                 # the log window in progress, so that a resumed run logs the means an uninterrupted one does
                 "loss_sum": running.detach().cpu().clone(), "loss_count": running_n,
                 # an evaluation due at `done` that an interruption cut short: --resume runs it first
                 "eval_pending": evaluated != done and (done % cfg.eval_interval == 0 or done == cfg.iters)}
        if device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(device)
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        saved_at = done

    def log_window(done):
        """The log record of the window ending at `done`: mean loss over its micro-batches, lr, speed."""
        nonlocal running_n, timed_n, t0
        mean_loss = (running / running_n).item()  # the one host sync per log interval
        if not math.isfinite(mean_loss):
            raise TransegError(f"loss became {mean_loss} by iteration {done}; {where()}; lower lr or "
                               f"use amp=no, then {again()}")
        record = {"iter": done, "loss": round(mean_loss, 5), "lr": optimizer.param_groups[0]["lr"]}
        if timed_n:  # none for the window a run cut short by --resume --iters ends with
            record["sec_per_iter"] = round((time.perf_counter() - t0) / timed_n * cfg.accum_steps, 4)
        running.zero_()
        running_n, timed_n, t0 = 0, 0, time.perf_counter()
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
        if main:
            with _writing(out / "log.jsonl"):
                _write(log_file, writer, record)

    interrupts = _Interrupts(enabled=world == 1)
    batches = None
    try:
        with interrupts:
            if final_eval and running_n:
                begin()
                log_window(start)  # the window the new end closes, as a run of this length logs it
            if eval_pending or final_eval:
                evaluate_at(start)
                t0 = time.perf_counter()
            if final_eval and main:
                checkpoint(start)  # the state now records the run's new end
            batches = _Batches(loader)
            net.train()
            for it in range(start, end):
                image, label = next(batches)
                with interrupts.step():
                    for micro in range(cfg.accum_steps):
                        if micro:
                            image, label = next(batches)
                        image = image.to(device, non_blocking=True)
                        label = label.to(device, non_blocking=True)
                        sync = micro == cfg.accum_steps - 1 or world == 1
                        with (net.no_sync() if not sync else contextlib.nullcontext()), \
                                torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                            loss = model.loss(net(image), label, ignore_index=getattr(train_set, "ignore_index", 255),
                                              reduction=cfg.loss_reduction, ohem=cfg.ohem, terms=cfg.loss)["loss"]
                            scaler.scale(loss / cfg.accum_steps).backward()
                        running += loss.detach()
                        running_n += 1
                        timed_n += 1
                    if cfg.clip_grad_norm:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    done = completed = it + 1
                    begin()
                    bar.update(1)
                    # at the run's end, not where stop_at or Ctrl-C cut it: the window goes on after --resume
                    if done % cfg.log_interval == 0 or done == cfg.iters:
                        log_window(done)
                if done % cfg.eval_interval == 0 or done == cfg.iters:
                    evaluate_at(done)
                stop = bool(cfg.early_stop) and stale >= cfg.early_stop and done < cfg.iters
                if main and (done % cfg.ckpt_interval == 0 or done == end or stop):
                    checkpoint(done)
                if stop:
                    log(f"early stop at iteration {done}/{cfg.iters}: {cfg.best_metric} has not improved on "
                        f"{100 * best:.2f} for {stale} evaluations (early_stop={cfg.early_stop}); best.safetensors "
                        "holds the best model")
                    break
    except KeyboardInterrupt:
        bar.close()
        if main:
            _close(log_file, writer)
            if interrupts.in_step:  # stopped at once inside a step: the model is between two iterations' states
                log(f"interrupted in iteration {completed + 1}, which is lost; {where()}"
                    + (f"; continue with: {_resume_command(out)}" if saved_at is not None else ""))
            elif completed == saved_at or (completed == 0 and saved_at is None):
                log(f"interrupted; {where()}" + (f"; continue with: {_resume_command(out)}" if saved_at is not None
                                                 else " (no iteration had finished)"))
            else:
                checkpoint(completed)  # where the run is, as the periodic checkpoint would have saved it
                log(f"interrupted at iteration {completed}/{cfg.iters}: saved {state_path}; continue with: "
                    f"{_resume_command(out)}")
        raise
    except BaseException:
        bar.close()  # so the error prints on its own line, not after the progress bar
        if main:
            _close(log_file, writer)
        raise
    finally:
        if batches is not None:
            batches.close()
    bar.close()
    if main:
        _close(log_file, writer)
        if resume and start >= end and not (eval_pending or final_eval):
            log(f"{out}: the run is at iteration {start}/{cfg.iters}: nothing left to train"
                + (f"; to train it longer, --resume with --iters above {start}" if start == cfg.iters else ""))
            return result
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        chart = curves_chart(records, keys=("loss", "mIoU"), title=f"{cfg.model} on {model.meta['dataset']}")
        atomic_write(out / "curves.png", lambda tmp: chart.save(tmp, format="PNG"))
    return result


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


def _close(log_file, writer):
    with contextlib.suppress(OSError):
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()


def _write(log_file, writer, record):
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    if writer is not None:
        for key, value in record.items():
            if key != "iter":
                writer.add_scalar(key, value, record["iter"])


def _tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TransegError("tensorboard=true needs the tensorboard extra: pip install 'transeg[tensorboard]'") from None
    return SummaryWriter


def _tensorboard(out):
    return _tensorboard_class()(str(out / "tb"))


def _record_iter(line):
    """The iteration of a log line, or None for a line a killed run left half-written."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


def _truncate_log(path, last_iter, redo_eval=False):
    """Drop records an interrupted run wrote after its last checkpoint (they are about to be redone),
    and any line it was killed in the middle of writing; `redo_eval`: also the evaluation record of
    `last_iter` (its evaluation was cut short and is about to be redone)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if (it := _record_iter(line)) is not None
                and (it < last_iter or it == last_iter and not (redo_eval and '"mIoU"' in line))]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def _remove_stale_temporaries(out):
    """Temp files of atomic writes a killed run left behind (`.NAME.XXXX.tmp`); the files they were
    replacing are intact."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
