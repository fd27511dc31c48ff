"""The training loop.

Reproducible and resumable by construction: sample k of the run (k counts samples over the whole
schedule) is dataset item perm(seed, epoch)[k mod N] augmented with numpy rng([seed, k]), so the
data never depends on worker count, process order or where a run was interrupted; the only other
randomness (dropout, drop path) comes from torch's global generator, saved with every checkpoint.

`train` sets a run up and drives it; what it drives lives beside it in the engine package:
    run.py          the run folder: its lock, config.yaml, log.jsonl (cut back on --resume)
    trackers.py     report_to (TensorBoard, W&B, MLflow), eval.json and predictions.png, push_to the Hub
    checkpoints.py  train_state.pt and model.safetensors: saved, read back, resumed
    validation.py   evaluation during training: its record, charts, best.safetensors, early_stop's count
    samples.py      the training samples and their loader (workers: auto sized from the machine), the checks of
                    the data, class_weight auto
    distributed.py  torchrun: the process group, each process's batch, DDP / SyncBatchNorm / compile
    model.py        the model a run starts from (fresh, or fine-tuned from a checkpoint)
    interrupts.py   Ctrl-C, deferred to the end of an optimizer step
    pace.py         one line in the log when the steps run much slower than the run has shown they can
"""
import contextlib
import gc
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm import tqdm

from ..checkpoint import first_nonfinite
from ..device import native_bf16, paths_for, resolve_device, restore_backends, training_backends
from ..errors import TransegError
from ..flops import count_params
from ..layers.fusion import restore_fused, set_fused
from .checkpoints import (STATE_FILE, check_resume, check_resume_settings, read_state, restore, resume_command,
                          resume_schedule, save_checkpoint)
from .config import TrainConfig, resolve
from .distributed import init_distributed, per_process_batch, rank_and_world, wrap
from .interrupts import Interrupts
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .pace import Pace
from .run import RunFolder, RunLock
from .samples import Batches, check_labelled, class_weights_of, data_workers, train_loader, train_samples
from .trackers import Report
from .validation import Validation, write_curves



def train(cfg: TrainConfig, resume=False, stop_at=None, progress=True, log=print):
    """Train per `cfg`; returns the last evaluation result. `stop_at`: stop (with a checkpoint) after
    that many iterations, as if interrupted — the run can then be resumed. resume="auto" continues
    the run in cfg.out when there is one and starts it otherwise (for torchrun --max-restarts).
    The run folder is locked while this runs (`RunLock`): a second run into it is refused.
    Ctrl-C saves a checkpoint where the run is and logs the command that continues it.
    Under torchrun, a process group this call creates is also destroyed by it: left to interpreter
    exit, its teardown sometimes aborts (SIGABRT, "terminate called without an active exception")
    and fails a finished run."""
    created = init_distributed()
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        # rank 0 writes the run folder, so rank 0 locks it: on one node or several (a folder on a shared
        # filesystem, or rank 0's own), and a torchrun restart takes it again once the killed group is gone
        with RunLock(cfg.out) if rank == 0 else contextlib.nullcontext():
            return _Training(cfg, resume, stop_at, progress, log).run()
    finally:
        if created:
            # the run's objects (the DDP model and its reducer) hold on to the group through reference
            # cycles: free them while the group exists, or their destructors run at interpreter exit against a
            # destroyed group and abort the process ("terminate called without an active exception")
            gc.collect()
            dist.destroy_process_group()


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


class _Training:
    """One run, set up by the constructor (the cheap refusals first, then the device, the data, the model
    and what steps it, the state a resume continues, the loader) and trained by `run`. This process is
    rank `rank` of `world`; rank 0 (`main`) alone writes the run folder.

    start: the iteration the run starts or resumes at; end: where this call stops (cfg.iters or stop_at);
    completed: optimizer steps finished (what the model, optimizer, scheduler and RNG now hold); saved_at:
    the iteration train_state.pt holds (None: no checkpoint yet); evaluated: the last iteration whose
    evaluation finished; eval_pending: a resumed run owes the evaluation of `start`, cut short by an
    interruption; final_eval: a resume that cut the run to where it is owes the evaluation of its new end.
    running, running_n: the loss of the log window the run is in (sum over micro-batches, their count);
    timed_n, t0: the micro-batches timed in it, since when."""

    def __init__(self, cfg, resume, stop_at, progress, log):
        self.rank, self.world = rank_and_world()
        self.main, self.progress, self.log = self.rank == 0, progress, log
        self.out = Path(cfg.out)
        self.state_path = self.out / STATE_FILE
        self.resume = check_resume(self.out, resume)  # the cheap refusals first, before any data or model is built
        self.device = resolve_device(cfg.device)
        self.paths = paths_for(self.device)  # how this device computes: the training form, cuDNN, TF32
        self.amp_dtype = _amp(cfg, self.device)
        self.report = Report(cfg, self.out, self.main, self.world)  # a missing tracker is refused before any work
        torch.manual_seed(cfg.seed)
        self.cfg = cfg = self._data(cfg)
        self._build()
        self.start, self.eval_pending, self.final_eval = 0, False, False
        self.running, self.running_n = torch.zeros((), device=self.device), 0
        if self.resume:
            best, stale = self._resume()
        else:
            best, stale = -1.0, 0
            if self.main and (self.out / "log.jsonl").is_file() and (self.out / "log.jsonl").stat().st_size:
                log(f"{self.out} held a run stopped before its first checkpoint: starting afresh (its log is kept "
                    f"as log.previous.jsonl)")
        self.model, self.net, self.forward_loss = wrap(self.model, cfg, self.device, self.world,
                                                       self.paths.training_form,
                                                       getattr(self.train_set, "ignore_index", 255))
        self.end = cfg.iters if stop_at is None else min(stop_at, cfg.iters)
        samples = train_samples(cfg, self.train_set, self.model)
        self.workers, self.workers_line = data_workers(cfg, samples, self.start, self.rank, self.world, self.device)
        self.loader = train_loader(cfg, samples, self.start, self.end, self.rank, self.world, self.device, self.workers)
        self.validation = Validation(cfg, self._val_part(), self.model.protocol, self.device, self.amp_dtype,
                                     self.out, self.main, best, stale)
        if self.main:
            self._announce()
        self.bar = tqdm(total=self.end, initial=self.start, desc="train", disable=not (progress and self.main),
                        dynamic_ncols=True)
        self.folder = RunFolder(self.out)
        self.timed_n, self.t0 = 0, time.perf_counter()
        self.pace = Pace(log if self.main else (lambda *a: None), torch.get_num_threads())  # says a slowed run once
        self.saved_at = self.start if self.resume else None
        self.completed = self.start
        self.evaluated = None if self.eval_pending else self.start
        self.batches = None

    # ---------------------------------------------------------------------------------------- set-up
    def _data(self, cfg):
        """The training and validation sets, checked; returns cfg resolved against the training set."""
        from ..data import build_dataset

        if cfg.global_batch:
            cfg = per_process_batch(cfg, self.world)
        self.train_set = build_dataset(cfg.data, "train")
        self.val_set = build_dataset(cfg.data, "val")
        check_labelled(self.train_set, "training", cfg.data)
        check_labelled(self.val_set, "validation", cfg.data)
        cfg = resolve(cfg, self.train_set)
        return class_weights_of(cfg, self.train_set, self.out / "config.yaml" if self.resume else None,
                                self.progress and self.main, self.log if self.main else (lambda *a: None))

    def _build(self):
        """The model, its optimizer, learning-rate schedule and grad scaler."""
        cfg = self.cfg
        self.model = build_model(cfg, self.train_set, log=self.log if self.main else None).to(self.device)
        set_fused(self.model, self.paths.training_form == "fused")  # the same function; the device's faster form
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                         custom_keys=cfg.custom_keys, nesterov=cfg.nesterov,
                                         split_encoder=bool(cfg.two_stage_warmup))
        self.scheduler = build_scheduler(self.optimizer, cfg.iters, cfg.power, cfg.min_lr_ratio, cfg.warmup_iters,
                                         cfg.warmup_ratio, cfg.two_stage_warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _resume(self):
        """Load train_state.pt into the run; returns its (best, stale) for the evaluations to go on from."""
        cfg, state_path = self.cfg, self.state_path
        state = read_state(state_path, self.device)
        before = state["config"]
        check_resume_settings(state_path, before, cfg, state["iter"])
        self.running, self.running_n = restore(state, state_path, self.model, self.optimizer, self.scheduler,
                                               self.scaler, self.device, self.running)
        self.start, best, self.eval_pending = state["iter"], state["best_miou"], bool(state.get("eval_pending"))
        stale = int(state.get("stale", 0))
        if self.main:
            self.log(f"resuming {self.out} at iteration {self.start}/{cfg.iters}")
        self.final_eval = resume_schedule(before, cfg, self.start, self.eval_pending, self.optimizer, self.scheduler,
                                          self.log if self.main else None)
        return best, stale

    def _val_part(self):
        """This process's share of the validation set."""
        if self.world == 1:
            return self.val_set
        return Subset(self.val_set, range(self.rank, len(self.val_set), self.world))

    def _announce(self):
        cfg, model, train_set = self.cfg, self.model, self.train_set
        amp = f", amp {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else ""
        self.log(f"training {model.meta.get('variant', cfg.model)} ({count_params(model) / 1e6:.2f}M params) on "
                 f"{model.meta['dataset']} ({len(train_set)} train / {len(self.val_set)} val images, "
                 f"{len(train_set.classes)} classes), {cfg.iters} iterations x "
                 f"{cfg.batch_size * cfg.accum_steps * self.world} images, device {self.device}"
                 + amp + f"; eval: {model.protocol.describe()}")
        if self.workers_line:
            self.log(self.workers_line)

    # ------------------------------------------------------------------------------------ the run
    def run(self):
        """Train from `start` to `end`; returns the last evaluation result (None if there was none)."""
        interrupts = Interrupts(enabled=self.world == 1)
        self.backends = training_backends(self.paths)  # process-wide switches: put back when the run ends
        try:
            with interrupts:
                self._owed()
                self._steps(interrupts)
        except KeyboardInterrupt:
            self.bar.close()
            if self.main:
                self.folder.close()
                self._interrupted(interrupts.in_step)
                self.report.finish()
            raise
        except BaseException:
            self.bar.close()  # so the error prints on its own line, not after the progress bar
            if self.main:
                self.folder.close()
                self.report.finish()
            raise
        finally:
            restore_backends(self.backends)
            if self.batches is not None:
                self.batches.close()
        return self._finish()

    def _owed(self):
        """What a resumed run owes before its next step: the log window and the evaluation its new end
        closes (final_eval), or the evaluation an interruption cut short (eval_pending)."""
        if self.final_eval and self.running_n:
            self.begin()
            self.log_window(self.start)  # the window the new end closes, as a run of this length logs it
        if self.eval_pending or self.final_eval:
            self.evaluate_at(self.start)
            self.t0 = time.perf_counter()
        if self.final_eval and self.main:
            self.checkpoint(self.start)  # the state now records the run's new end

    def _steps(self, interrupts):
        cfg = self.cfg
        self.batches = Batches(self.loader)
        self.net.train()
        for it in range(self.start, self.end):
            self.pace.begin()
            image, label = next(self.batches)
            with interrupts.step():
                self.model.set_iteration(it)  # contracts.IterationHook: parts that follow the schedule (it: steps done)
                self._step(image, label)
                done = self.completed = it + 1
                self.begin()
                self.bar.update(1)
                # at the run's end, not where stop_at or Ctrl-C cut it: the window goes on after --resume
                if done % cfg.log_interval == 0 or done == cfg.iters:
                    self.log_window(done)
            self.pace.end()  # (the evaluation and checkpoint after a step are not timed)
            if self._after_step(done):
                break

    def _step(self, image, label):
        """One optimizer step over cfg.accum_steps micro-batches, the first of them (image, label)."""
        cfg = self.cfg
        for micro in range(cfg.accum_steps):
            if micro:
                image, label = next(self.batches)
            self._micro_step(image, label, sync=micro == cfg.accum_steps - 1 or self.world == 1)
        if cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _micro_step(self, image, label, sync):
        """Forward and backward of one micro-batch; `sync`: all-reduce the gradients (the last of a step)."""
        cfg, device, amp_dtype = self.cfg, self.device, self.amp_dtype
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        with (self.net.no_sync() if not sync else contextlib.nullcontext()), \
                torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = self.forward_loss(image, label)
            self.scaler.scale(loss / cfg.accum_steps).backward()
        self.running += loss.detach()
        self.running_n += 1
        self.timed_n += 1

    def _after_step(self, done):
        """The evaluation and the checkpoint due after step `done`; True when early_stop ends the run here."""
        cfg, validation = self.cfg, self.validation
        if done % cfg.eval_interval == 0 or done == cfg.iters:
            self.evaluate_at(done)
        stop = bool(cfg.early_stop) and validation.stale >= cfg.early_stop and done < cfg.iters
        if self.main and (done % cfg.ckpt_interval == 0 or done == self.end or stop):
            self.checkpoint(done)
        if stop:
            self.log(f"early stop at iteration {done}/{cfg.iters}: {cfg.best_metric} has not improved on "
                     f"{100 * validation.best:.2f} for {validation.stale} evaluations (early_stop={cfg.early_stop}); "
                     "best.safetensors holds the best model")
        return stop

    def _interrupted(self, in_step):
        """Ctrl-C: say where the run is and how to continue it; a checkpoint first where the last one is
        older than the last finished step."""
        completed, saved_at, command = self.completed, self.saved_at, resume_command(self.out)
        if in_step:  # stopped at once inside a step: the model is between two iterations' states
            self.log(f"interrupted in iteration {completed + 1}, which is lost; {self.where()}"
                     + (f"; continue with: {command}" if saved_at is not None else ""))
        elif completed == saved_at or (completed == 0 and saved_at is None):
            self.log(f"interrupted; {self.where()}" + (f"; continue with: {command}" if saved_at is not None
                                                      else " (no iteration had finished)"))
        else:
            self.checkpoint(completed)  # where the run is, as the periodic checkpoint would have saved it
            self.log(f"interrupted at iteration {completed}/{self.cfg.iters}: saved {self.state_path}; continue "
                     f"with: {command}")

    def _finish(self):
        """The end of a run that was not interrupted: curves.png, or a line when there was nothing to train."""
        self.bar.close()
        result, cfg = self.validation.result, self.cfg
        if not self.main:
            return result
        self.folder.close()
        self.report.finish()  # the tracker runs end here; a push where push_to asks comes after curves.png
        if self.resume and self.start >= self.end and not (self.eval_pending or self.final_eval):
            self.log(f"{self.out}: the run is at iteration {self.start}/{cfg.iters}: nothing left to train"
                     + (f"; to train it longer, --resume with --iters above {self.start}" if self.start == cfg.iters
                        else ""))
            return result
        write_curves(self.out, self.folder.records(), cfg, self.model)
        self.report.finish(done=self.end if self.end == cfg.iters else None, log=self.log)
        return result

    # ------------------------------------------------------- what the steps, evaluations and Ctrl-C share
    def begin(self):
        """Write the run folder's files once the run really starts (see `RunFolder.start`)."""
        if self.main and not self.folder.started:
            self.folder.start(self.cfg, self.resume, self.start, redo_eval=self.eval_pending)
            self.report.start(self.cfg, self.resume, self.start)

    def where(self):
        return (f"the last checkpoint, iteration {self.saved_at}, is {self.state_path}" if self.saved_at is not None
                else "no checkpoint was written yet")

    def again(self):
        return "--resume" if self.saved_at is not None else "start again"

    def check_weights(self, done):
        bad = first_nonfinite(self.model.state_dict())
        if bad:
            raise TransegError(f"weights became NaN/inf by iteration {done} ({bad[0]}); {self.where()}; lower lr or "
                               f"use amp=no, then {self.again()}")

    def evaluate_at(self, done):
        self.begin()
        self.check_weights(done)  # a broken model must not become best.safetensors
        with self.evaluating():
            self.validation(self.model, self.net, done, self.folder, self.bar)
        self.report.evaluated(done, self.validation.result, self.model, self.val_set, log=self.bar.write)
        self.evaluated = done

    @contextlib.contextmanager
    def evaluating(self):
        """The model in the device's inference form, and the switches as they were before the run (no TF32 in an
        evaluation: its float32 stays float32), for an evaluation within the run."""
        fused = set_fused(self.model, self.paths.inference_form == "fused")
        during = restore_backends(self.backends)
        try:
            yield
        finally:
            restore_backends(during)
            restore_fused(fused)

    def checkpoint(self, done):
        """model.safetensors and train_state.pt of the run at iteration `done` (rank 0)."""
        cfg = self.cfg
        self.begin()
        self.check_weights(done)
        # an evaluation due at `done` that an interruption cut short: --resume runs it first
        pending = self.evaluated != done and (done % cfg.eval_interval == 0 or done == cfg.iters)
        save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.scaler, done=done,
                        best=self.validation.best, stale=self.validation.stale, cfg=cfg,
                        loss_window=(self.running, self.running_n), eval_pending=pending, device=self.device)
        self.saved_at = done

    def log_window(self, done):
        """The log record of the window ending at `done`: mean loss over its micro-batches, lr, speed."""
        cfg = self.cfg
        mean_loss = (self.running / self.running_n).item()  # the one host sync per log interval
        if not math.isfinite(mean_loss):
            raise TransegError(f"loss became {mean_loss} by iteration {done}; {self.where()}; lower lr or "
                               f"use amp=no, then {self.again()}")
        record = {"iter": done, "loss": round(mean_loss, 5), "lr": self.optimizer.param_groups[0]["lr"]}
        if self.timed_n:  # none for the window a run cut short by --resume --iters ends with
            record["sec_per_iter"] = round((time.perf_counter() - self.t0) / self.timed_n * cfg.accum_steps, 4)
        self.running.zero_()
        self.running_n, self.timed_n, self.t0 = 0, 0, time.perf_counter()
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
        if self.main:
            self.folder.write(record)
            self.report.log(record)
