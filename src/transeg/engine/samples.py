"""The training data as the step loop takes it: sample k of the run (k counts samples over the whole
schedule) is dataset item perm(seed, epoch)[k mod N] augmented with numpy rng([seed, k]), so the data
never depends on worker count, process order or where a run was interrupted. Also the checks of the
data made before training (a dataset with no labelled pixel) and `class_weight: auto`."""
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from ..data import TrainTransform
from ..errors import TransegError
from .interrupts import ignore_sigint


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


def sample_ids(start_micro, end_micro, batch, rank, world):
    """Global sample counters this process consumes, micro-batch by micro-batch."""
    for j in range(start_micro, end_micro):
        base = (j * world + rank) * batch
        yield from range(base, base + batch)


def train_samples(cfg, train_set, model):
    """The run's samples (`TrainSamples`), augmented per cfg and normalised with the model's mean and std."""
    transform = TrainTransform(crop_size=tuple(cfg.crop_size), scale=tuple(cfg.scale), ratio_range=tuple(cfg.ratio_range),
                               cat_max_ratio=cfg.cat_max_ratio, photometric=cfg.photometric,
                               mean=model.meta["mean"], std=model.meta["std"],
                               ignore_index=getattr(train_set, "ignore_index", 255))
    return TrainSamples(train_set, transform, cfg.seed)


def train_loader(cfg, samples, start, end, rank, world, device, workers):
    """The DataLoader of this process's micro-batches of `samples` from iteration `start` to `end`, made by
    `workers` processes (0: this one)."""
    return DataLoader(samples, batch_size=cfg.batch_size,
                      sampler=list(sample_ids(start * cfg.accum_steps, end * cfg.accum_steps, cfg.batch_size, rank, world)),
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_sigint if workers > 0 else None,
                      generator=torch.Generator())  # keeps the DataLoader off the global RNG (exact resume)


# What a GPU consumes: one H200 trains SegFormer-B0 on 16 crops of 512x512 in 72.9 ms fp32 and ~60 ms in bf16
# (../shared/perf/gpu-h200.md), 58-70 Mpixels/s; the workers are sized to augment 64 Mpixels/s of crops. A bigger
# model or a slower GPU needs fewer, and gets the same: the surplus workers wait on a full prefetch queue.
DEVICE_PIXELS_PER_S = 64e6
MAX_WORKERS = 8  # beyond this, start-up and memory (each worker holds a copy of the dataset object) outweigh it
CPU_MAX_WORKERS = 2


def auto_workers(cores, rate, device_type, crop, threads):
    """The data workers `workers: auto` starts: `rate` = crops/s one process augments (measured, `augmentation_rate`;
    not needed on a CPU), `crop` = (h, w), `cores` = the cores this process may use, `threads` = its compute threads
    (torch's).

    GPU (any device but the CPU): enough workers to augment DEVICE_PIXELS_PER_S, at least one (augmenting in the main
    process would stall the launches), at most MAX_WORKERS and the cores but one (the main process launches kernels).
    CPU: the compute threads are the device; a worker running beside them pre-empts one, and every other waits for
    it at the next barrier, so workers get only the cores the compute threads leave free, at most CPU_MAX_WORKERS:
    a CPU trains at tens of crops/s (the quick start, B0 at 128x128 on 2 cores: ~35/s), which one process augments
    several times over (~400/s here), and 2 cores trained fastest with none (the quick start's choice, 69bceb4)."""
    if device_type == "cpu":
        return max(0, min(CPU_MAX_WORKERS, cores - threads))
    spare = min(MAX_WORKERS, cores - 1)
    if spare < 1:
        return 0
    need = math.ceil(DEVICE_PIXELS_PER_S / (max(rate, 1e-9) * crop[0] * crop[1]))
    return max(1, min(need, spare))


def usable_cores():
    """The cores this process may use (its CPU affinity, where the system has one), shared with the other training
    processes torchrun started on this node (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def augmentation_rate(samples, ids, seconds=1.0, most=8, clock=time.perf_counter):
    """Crops/s that this process makes of `samples` (read + augment), from the first of `ids` (the run's own first
    samples), timed for at most `seconds` or `most` samples, the first of them not counted (lazy set-up: caches,
    imports). Reads nothing the run does not read, and the data never depends on it (sample k is fixed by k)."""
    times, spent = [], 0.0
    for k in ids:
        start = clock()
        samples[k]
        times.append(clock() - start)
        spent += times[-1]
        if len(times) >= most or spent >= seconds:
            break
    timed = times[1:] or times
    return len(timed) / max(sum(timed), 1e-9)


def data_workers(cfg, samples, start, rank, world, device):
    """(workers, the line that says how they were chosen, or None): cfg.workers as given, or `auto_workers`."""
    if cfg.workers != "auto":
        return cfg.workers, None
    cores, threads = usable_cores(), torch.get_num_threads()
    plural = "" if cores == 1 else "s"
    if device.type == "cpu":  # the rule needs no rate there: no second of every run spent measuring it
        workers = auto_workers(cores, None, device.type, cfg.crop_size, threads)
        return workers, (f"data: {workers} worker{'' if workers == 1 else 's'} ({cores} core{plural}, {threads} compute "
                         f"thread{'' if threads == 1 else 's'}; workers: auto)")
    rate = augmentation_rate(samples, sample_ids(start * cfg.accum_steps, start * cfg.accum_steps + 8, cfg.batch_size,
                                                 rank, world))
    workers = auto_workers(cores, rate, device.type, cfg.crop_size, threads)
    return workers, (f"data: augmentation {rate:,.0f} images/s in one process; {workers} worker"
                     f"{'' if workers == 1 else 's'} ({cores} core{plural}; workers: auto)")


class Batches:
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


def check_labelled(dataset, split, spec):
    """One line when the `split` set has no labelled pixel at all (`spec`: the --data it came from)."""
    if _nothing_labelled(dataset):
        where = getattr(dataset, "mask_dir", None) or f"--data {spec or 'synthetic'}"
        ignore = getattr(dataset, "ignore_index", 255)
        how = (f"every mask value is 0 or {ignore}, both ignored under reduce_zero_label"
               if getattr(dataset, "reduce_zero_label", False) else f"every mask is {ignore} (ignore)")
        raise TransegError(f"{where}: no labelled pixel in the {split} set: {how}; training would learn nothing and "
                           f"evaluation measure nothing. Mask values are class indices 0..K-1 in the order of the "
                           f"class list (`transeg data check` shows what the masks hold)")


def class_weights_of(cfg, train_set, saved_config, progress, log):
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
