"""Watching a run: the trackers a training run reports to (`report_to: [tensorboard, wandb, mlflow]`), and what
each evaluation leaves in the run folder for them and for `transeg push`.

One small interface, `Tracker`: start (or resume) a tracker run, log scalars, log an evaluation's metrics, log
an image, finish. The back-ends:

    tensorboard   events in RUN/tb (the `tensorboard` extra); `tensorboard --logdir RUN/tb`
    wandb         Weights & Biases (the `wandb` extra): project $WANDB_PROJECT (default transeg), run name = the
                  run folder's name; WANDB_MODE=offline writes RUN/wandb/ only (`wandb sync` uploads it later)
    mlflow        MLflow (the `mlflow` extra): $MLFLOW_TRACKING_URI, default a SQLite store beside the run
                  folder (sqlite:///RUN/../mlflow.db, artifacts in RUN/../mlartifacts; `mlflow ui
                  --backend-store-uri sqlite:///runs/mlflow.db`); experiment $MLFLOW_EXPERIMENT_NAME (default
                  transeg). MLflow's plain file store is deprecated and refuses by default, hence SQLite.

What each gets: the config at the start; train/loss, train/lr, train/sec_per_iter and train/images_per_sec at
every log_interval; val/<metric> (every scalar metric) and val/IoU/<class> at each evaluation, with the
prediction grid (image | prediction | truth of the first GRID_SAMPLES validation images) as an image.

Each evaluation also writes, whatever the trackers, RUN/eval.json (every metric and the per-class IoU) and
RUN/predictions.png (the grid): the model card reads them. The tracker runs' ids are kept in RUN/trackers.json,
so `--resume` appends to the same tracker runs. A W&B run resumed offline logs only steps after the last one it
holds (W&B's rule), so the steps an interrupted run logged after its last checkpoint are not logged twice there.

`push_to: OWNER/NAME` pushes the run to the Hugging Face Hub (transeg.share) at the end of training, and with
`push_every: N` also at every Nth evaluation (iteration multiple of N x eval_interval) while it trains: the model
as it is then, with its card. A push that fails says so in one line and training goes on.
"""
import json
import os
import re
import time
from pathlib import Path

import yaml

from ..errors import TransegError
from ..files import atomic_write

TRACKERS_FILE = "trackers.json"
EVAL_FILE = "eval.json"
GRID_FILE = "predictions.png"
GRID_SAMPLES = 4
SCALAR_METRICS = ("mIoU", "mAcc", "aAcc", "mDice", "mFscore", "mPrecision", "mRecall", "fwIoU")


def _key(text):
    """A metric name every tracker takes (MLflow allows letters, digits, _ - . / and space)."""
    return re.sub(r"[^\w\-. /]", "_", str(text))[:250]


class Tracker:
    """What a run reports to. `start` returns the id that resumes the same tracker run (stored in trackers.json)."""
    name = ""
    extra = ""

    def available(self, out: Path):
        """Import the back-end's package and check what can be checked before the run (one line naming the extra
        when it is missing, or the setting to change)."""

    def start(self, out: Path, config: dict, run_id, start_iter: int):
        raise NotImplementedError

    def scalars(self, values: dict, step: int):
        raise NotImplementedError

    def metrics(self, result: dict, classes, step: int):
        """Every scalar metric of an evaluation as val/<metric>, and the per-class IoU as val/IoU/<class>."""
        values = {f"val/{k}": result[k] for k in SCALAR_METRICS if isinstance(result.get(k), float)}
        values.update({f"val/IoU/{_key(name)}": iou for name, iou in zip(classes, result.get("IoU", []))
                       if iou == iou})  # (NaN: a class absent from labels and predictions has no IoU)
        self.scalars(values, step)

    def image(self, key: str, image, step: int):
        raise NotImplementedError

    def finish(self):
        pass


def _missing(name, package, extra):
    return TransegError(f"report_to: {name} needs the {package} package: pip install 'transeg[{extra}]'")


class TensorBoard(Tracker):
    name, extra = "tensorboard", "tensorboard"

    def available(self, out):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise _missing(self.name, "tensorboard", self.extra) from None

    def start(self, out, config, run_id, start_iter):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events after its checkpoint (about to be redone) are hidden, as in log.jsonl
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start_iter if run_id else None)
        if not run_id:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        return "tb"

    def scalars(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, key, image, step):
        import numpy as np

        self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def finish(self):
        self.writer.close()


class WandB(Tracker):
    name, extra = "wandb", "wandb"

    def available(self, out):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise _missing(self.name, "wandb", self.extra) from None

    def start(self, out, config, run_id, start_iter):
        import wandb

        self.wandb = wandb
        # (the user's WANDB_* settings apply: WANDB_MODE=offline, WANDB_ENTITY, WANDB_DISABLE_GIT, ...)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "transeg", dir=str(out), name=out.name,
                              id=run_id, resume="allow", config=config)
        return self.run.id

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def image(self, key, image, step):
        self.run.log({key: self.wandb.Image(image)}, step=step)

    def finish(self):
        self.run.finish()


class MLflow(Tracker):
    name, extra = "mlflow", "mlflow"

    def available(self, out):
        try:
            import mlflow  # noqa: F401
            import sqlalchemy  # noqa: F401 (the SQLite store)
        except ImportError:
            raise _missing(self.name, "mlflow", self.extra) from None
        uri = self.uri(out)
        if "://" not in uri or uri.startswith("file:"):
            raise TransegError(f"MLFLOW_TRACKING_URI={uri}: MLflow's plain file store is deprecated and refuses by "
                               f"default; use a database, e.g. sqlite:///runs/mlflow.db (unset it: transeg uses "
                               f"sqlite:///{Path(out).resolve().parent / 'mlflow.db'})")

    def start(self, out, config, run_id, start_iter):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # (its 'creating database tables' lines)
        uri, run_id = run_id if isinstance(run_id, list) else (self.uri(out), None)
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "transeg"
            found = self.client.get_experiment_by_name(name)
            artifacts = (Path(out).resolve().parent / "mlartifacts").as_uri()
            experiment = found.experiment_id if found else self.client.create_experiment(name, artifacts)
            run_id = self.client.create_run(experiment, run_name=out.name, tags={"transeg.run": str(out)}).info.run_id
            flat = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool)) or v is None}
            self.client.log_batch(run_id, params=[_param(k, v) for k, v in flat.items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.client.log_dict(run_id, config, "config.yaml")
        self.run_id = run_id
        return [uri, run_id]

    @staticmethod
    def uri(out):
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve().parent / 'mlflow.db'}"

    def scalars(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), float(v), now, step) for k, v in values.items()])

    def image(self, key, image, step):
        self.client.log_image(self.run_id, image.convert("RGB"), key=_key(key), step=step)

    def finish(self):
        self.client.set_terminated(self.run_id, "FINISHED")


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


BACKENDS = {b.name: b for b in (TensorBoard, WandB, MLflow)}


def tracker_names(cfg):
    """The trackers `cfg` asks for (report_to, and the older `tensorboard: true`), each once, in order."""
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to or [])
    if cfg.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return list(dict.fromkeys(names))


class Report:
    """The hook the training loop calls (rank 0 only does anything): `start` once the run really starts, `log`
    for every log record, `evaluated` after each evaluation, `finish` at the end. The trackers' packages are
    imported by the constructor, so a missing one is one line before any work."""

    def __init__(self, cfg, out, main, world=1):
        self.cfg, self.out, self.main, self.world = cfg, Path(out), main, world
        self.trackers = [BACKENDS[n]() for n in tracker_names(cfg)] if main else []
        for tracker in self.trackers:
            tracker.available(self.out)
        if main and cfg.push_to:
            from ..share import check_repo_id

            check_repo_id(cfg.push_to)
        self.started, self.pushed_at = False, None

    def start(self, cfg, resume, start_iter):
        """Start (or, on --resume, reopen) each tracker run with `cfg` (the run's resolved config); their ids go
        to trackers.json."""
        if not self.main or self.started:
            return
        self.cfg, self.started = cfg, True
        path = self.out / TRACKERS_FILE
        ids = {}
        if resume and path.is_file():
            try:
                ids = json.loads(path.read_text())
            except (OSError, ValueError):
                ids = {}
        config = self.cfg.to_dict()
        kept, wanted, self.trackers = {}, self.trackers, []
        for tracker in wanted:  # (those started before one that fails are finished by `finish`)
            kept[tracker.name] = _started(tracker, self.out, config, ids.get(tracker.name), start_iter, resume)
            self.trackers.append(tracker)
        if kept:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({**ids, **kept}, indent=1) + "\n"))

    def log(self, record):
        """A log window's record (iter, loss, lr, sec_per_iter) as train/ scalars, with images per second."""
        if not self.trackers:
            return
        values = {f"train/{k}": v for k, v in record.items() if k != "iter"}
        if record.get("sec_per_iter"):
            images = self.cfg.batch_size * self.cfg.accum_steps * self.world  # per optimizer step, all processes
            values["train/images_per_sec"] = images / record["sec_per_iter"]
        for tracker in self.trackers:
            tracker.scalars(values, record["iter"])

    def evaluated(self, done, result, model, val_set, log=print):
        """eval.json and predictions.png of the evaluation at iteration `done`, to the trackers too; a push to the
        Hub where push_every asks for one."""
        if not self.main:
            return
        record = {"iter": done, "classes": list(model.classes), "dataset": model.meta.get("dataset"),
                  **{k: v for k, v in result.items() if k not in ("confusion",)}}
        atomic_write(self.out / EVAL_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
        grid = prediction_grid(model, val_set)
        atomic_write(self.out / GRID_FILE, lambda tmp: grid.save(tmp, format="PNG"))
        for tracker in self.trackers:
            tracker.metrics(result, model.classes, done)
            tracker.image("val/predictions", grid, done)
        every = self.cfg.push_every
        if self.cfg.push_to and every and (done // self.cfg.eval_interval) % every == 0:
            self.push(model, done, log)

    def push(self, model, done, log):
        """The run to cfg.push_to, with `model` (the weights as they are now; None: the run's last checkpoint); a
        failure is one line, not the end of the run."""
        from ..share import push_to_hub

        try:
            push_to_hub(self.out, self.cfg.push_to, model=model, message=f"transeg: iteration {done}", log=log)
            self.pushed_at = done
        except TransegError as e:
            log(f"push to {self.cfg.push_to} failed, training goes on ({e}); push later with "
                f"`transeg push {self.out} {self.cfg.push_to}`")

    def finish(self, done=None, log=print):
        """Close the tracker runs; `done`: the run finished at that iteration: push it where push_to asks (unless
        pushed at `done` already). None: the run stopped on an error or Ctrl-C (nothing is pushed)."""
        trackers, self.trackers = (self.trackers if self.started else []), []
        for tracker in trackers:  # (only those that started)
            tracker.finish()
        if self.main and done is not None and self.cfg.push_to and self.pushed_at != done:
            self.push(None, done, log)


def _started(tracker, out, config, run_id, start_iter, resume=False):
    """tracker.start, its failure (no login, a store that cannot be reached or written) as one line. The way on:
    --resume where the run was resuming; a fresh run has saved no train_state.pt yet (--resume would answer
    "nothing to resume"), so it is the same command again."""
    try:
        return tracker.start(out, config, run_id, start_iter)
    except TransegError:
        raise
    except Exception as e:  # each back-end fails in types of its own (wandb.Error, MlflowException, OSError ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        again = "then --resume" if resume else "then run the same command again"
        raise TransegError(f"report_to: {tracker.name} could not start ({first}); fix it, or drop {tracker.name} "
                           f"from report_to, {again}") from None


def prediction_grid(model, dataset, count=GRID_SAMPLES):
    """image | prediction | truth of the first `count` items of `dataset`, predicted in eval mode."""
    from ..inference import dataset_samples
    from ..viz import prediction_grid as grid

    was = model.training
    model.eval()
    try:
        samples = dataset_samples(model, dataset, model.protocol, count=count)
    finally:
        model.train(was)
    return grid(samples, model.classes, model.meta.get("palette"))
