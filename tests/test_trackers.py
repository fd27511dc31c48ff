"""Watching a run (transeg.engine.trackers): report_to TensorBoard, W&B (offline) and MLflow (a SQLite store) get
the losses, learning rates and speed at every log_interval, every metric and per-class IoU and the prediction grid
at each evaluation; a resumed run appends to the same tracker run; push_every pushes while training. Each test reads
back what the tracker wrote, with the tracker's own reader where it has one."""
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest

import transeg
from conftest import CLASSES, TINY, TINY_DATA
from helpers import _error
from test_share import hub  # noqa: F401 (the loopback Hub fixture)
from transeg.cli import main
from transeg.engine import TrainConfig, train
from transeg.errors import TransegError

QUIET = dict(progress=False, log=lambda *_: None)


def _cfg(out, **kw):
    """4 iterations, logged every iteration, evaluated and checkpointed every 2."""
    base = dict(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=4, batch_size=2, lr=1e-3, warmup_iters=0,
                eval_interval=2, ckpt_interval=2, log_interval=1, workers=0, device="cpu", out=str(out))
    return TrainConfig(**{**base, **kw})


def test_tensorboard_holds_the_run_and_push_every_pushes_while_it_trains(hub, tmp_path):  # noqa: F811
    """report_to [tensorboard], push_to me/live with push_every 1; 4 iterations, evaluated at 2 and 4. TensorBoard:
    train/loss, train/lr and train/images_per_sec at steps 1..4 (log_interval 1), val/mIoU (eval.json's at 4) and
    val/IoU/<class> at 2 and 4, val/predictions as an image at 2 and 4; the run folder holds eval.json (iteration
    4, 6 class IoUs) and predictions.png. The Hub: 2 commits, "iteration 2" and "iteration 4" (the end of the run
    does not push iteration 4 twice), the last card holding eval.json's mIoU, the repo the TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(out, report_to=["tensorboard"], push_to="me/live", push_every=1), **QUIET)
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731
    assert steps("train/loss") == [1, 2, 3, 4] and steps("train/lr") == [1, 2, 3, 4]
    assert steps("train/images_per_sec") == [1, 2, 3, 4] and steps("val/mIoU") == [2, 4]
    measured = json.loads((out / "eval.json").read_text())
    assert measured["iter"] == 4 and len(measured["IoU"]) == 6
    iou_tags = [t for t in events.Tags()["scalars"] if t.startswith("val/IoU/")]
    assert iou_tags and all(t.split("/")[-1] in CLASSES and steps(t) == [2, 4] for t in iou_tags)
    assert abs(events.Scalars("val/mIoU")[-1].value - measured["mIoU"]) < 1e-6
    assert [e.step for e in events.Images("val/predictions")] == [2, 4]
    assert (out / "predictions.png").read_bytes().startswith(b"\x89PNG")
    assert [c[2] for c in hub.commits] == ["transeg: iteration 2", "transeg: iteration 4"]
    files = hub.repos["me/live"]["branches"]["main"]
    card = files["README.md"].decode()
    assert f"value: {round(100 * measured['mIoU'], 2)}" in card
    # the TensorBoard traces go along under runs/ (the Hub's metrics tab reads them): the run's one events file
    assert [p for p in files if p.startswith("runs/")] == [f"runs/run/{p.name}" for p in (out / "tb").glob("*tfevents*")]
    assert "TensorBoard traces of the run: `runs/`" in card


def _wandb_records(path):
    """The records of a W&B transaction log (.wandb: a LevelDB-style log of protobuf records, 32 KiB blocks, a 7-byte
    file header and a 7-byte header per fragment: checksum, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _wandb_history(run_dir):
    """(run id, [history rows as {key: value}]) of one offline run folder."""
    records = _wandb_records(next(Path(run_dir).glob("run-*.wandb")))
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return run_id, rows


@pytest.fixture
def memory_tmp(tmp_path):
    """A temporary folder in memory (/dev/shm) where there is one, else tmp_path: creating MLflow's SQLite store
    runs some 50 schema migrations, each synced to disk; 10.8 s on this machine's disk, 5.8 s in memory."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="transeg-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # (inside mlflow's SQL store)
def test_wandb_offline_and_mlflow_sqlite_hold_the_run_and_a_resume_appends_to_the_same_runs(memory_tmp, monkeypatch):
    """report_to [wandb, mlflow], stopped at iteration 2 and resumed to 4 (evaluations at 2 and 4).
    W&B offline (no network, no telemetry): both offline runs carry the one id kept in trackers.json; their history
    rows hold train/loss at steps 1, 2 then 3, 4, val/mIoU and val/IoU/<class> at 2 and 4, and the prediction grid
    as an image-file at 2 and 4 whose PNG is in the run's media.
    MLflow, against a SQLite store beside the run folder (the default: RUN/../mlflow.db): one run (its id kept in
    trackers.json, 1 run in the experiment) whose histories are train/loss at steps 1..4, val/mIoU at 2, 4 (the last
    equal to eval.json's) and val/IoU/<class> at 2, 4; the grid logged as 2 images; the config as config.yaml and as
    params; the run FINISHED."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false", "WANDB_X_DISABLE_STATS": "true",
                       "WANDB_X_DISABLE_META": "true", "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(memory_tmp / "cfg"),
                       "WANDB_CACHE_DIR": str(memory_tmp / "cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = memory_tmp / "runs" / "run"
    train(_cfg(out, report_to=["wandb", "mlflow"]), stop_at=2, **QUIET)
    train(_cfg(out, report_to=["wandb", "mlflow"]), resume=True, **QUIET)
    kept = json.loads((out / "trackers.json").read_text())
    measured = json.loads((out / "eval.json").read_text())
    _check_wandb(out, kept["wandb"])
    _check_mlflow(memory_tmp, out, kept["mlflow"], measured)


def _check_wandb(out, kept):
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    histories = [_wandb_history(r) for r in runs]
    assert [h[0] for h in histories] == [kept, kept]
    rows = [row for _, h in histories for row in h]
    steps = lambda key: [r["_step"] for r in rows if key in r]  # noqa: E731
    assert steps("train/loss") == [1, 2, 3, 4] and steps("val/mIoU") == [2, 4]
    assert steps("val/predictions/path") == [2, 4]
    iou_keys = {k for r in rows for k in r if k.startswith("val/IoU/")}
    assert iou_keys and all(steps(k) == [2, 4] for k in iou_keys)
    images = [Path(runs[i]) / "files" / r["val/predictions/path"] for i, (_, h) in enumerate(histories)
              for r in h if "val/predictions/path" in r]
    assert len(images) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in images)


def _check_mlflow(tmp_path, out, kept, measured):
    from mlflow.tracking import MlflowClient

    uri, run_id = kept
    assert uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]  # noqa: E731
    assert [s for s, _ in history("train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in history("val/mIoU")] == [2, 4]
    assert abs(history("val/mIoU")[-1][1] - measured["mIoU"]) < 1e-9
    run = client.get_run(run_id)
    iou_keys = [k for k in run.data.metrics if k.startswith("val/IoU/")]
    assert iou_keys and all([s for s, _ in history(k)] == [2, 4] for k in iou_keys)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "segformer-b0"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(images) == 2 and all("predictions" in p for p in images)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_tracker_not_installed_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """--report-to wandb without the wandb package (hidden from import): exit 2, one line naming the extra, and no
    run folder made (no data read, no model built)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    code = main(["train", "--data", TINY_DATA, "--out", str(out), "--iters", "1", "--device", "cpu",
                 "--report-to", "wandb", "--set", f"model_args={json.dumps(TINY)}"])
    line = _error(capsys, code)
    assert "report_to: wandb needs the wandb package: pip install 'transeg[wandb]'" in line
    assert not out.exists()


def test_mlflows_file_store_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """MLFLOW_TRACKING_URI=./mlruns (MLflow's deprecated file store): exit 2, one line giving a SQLite URI, and no run
    folder made."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    out = tmp_path / "run"
    line = _error(capsys, main(["train", "--data", TINY_DATA, "--out", str(out), "--iters", "1", "--device", "cpu",
                                "--report-to", "mlflow", "--set", f"model_args={json.dumps(TINY)}"]))
    assert "MLflow's plain file store is deprecated" in line and "sqlite:///" in line and not out.exists()


@pytest.mark.parametrize("sets,message", [
    (["report_to=[comet]"], "report_to=[comet]: 'comet' is not a tracker transeg reports to (tensorboard, wandb, mlflow)"),
    (["push_every=2"], "push_every pushes the run to push_to: set push_to=OWNER/NAME too"),
    (["push_to=not-a-repo"], "push_to=not-a-repo: not a Hugging Face repo id; give OWNER/NAME"),
])
def test_tracker_and_push_settings_are_checked_by_the_config(capsys, sets, message):
    """Each is one line (exit 2) from the config's rules, before any data or model."""
    line = _error(capsys, main(["train", "--set", *sets, "iters=1"]))
    assert message in line, line


def test_a_push_that_fails_while_training_is_one_line_and_the_run_goes_on(hub, tmp_path, monkeypatch):  # noqa: F811
    """push_to with no HF_TOKEN (the stand-in answers 401): the push the end of a run makes (Report.finish, what the
    trainer calls) fails without raising, so the run ends as it would; one log line says why and how to push later;
    0 commits."""
    from transeg.engine.trackers import Report

    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "run"
    transeg.save(transeg.create_model("segformer-b0", num_classes=6, classes=CLASSES, **TINY), out / "model.safetensors")
    (out / "config.yaml").write_text("model: segformer-b0\n")
    lines = []
    Report(_cfg(out, push_to="me/live"), out, main=True).finish(done=4, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("push to me/live failed, training goes on")
    assert "needs a token to push" in lines[0] and f"transeg push {out} me/live" in lines[0] and hub.commits == []


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # (inside mlflow's SQL store)
def test_a_tracker_that_cannot_start_is_one_line_and_the_others_are_closed(tmp_path, monkeypatch):
    """report_to [tensorboard, mlflow] with an MLflow store inside a file (no folder can be made there): starting the
    trackers (what a fresh run's first step does) is one line naming mlflow and the way on (the same command again: no
    train_state.pt exists yet for --resume), not a traceback;
    TensorBoard, started first, is closed by finish (its events file reads back: the config text at step 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from transeg.engine.trackers import Report

    (tmp_path / "a-file").write_text("not a folder\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    out = tmp_path / "run"
    cfg = _cfg(out, report_to=["tensorboard", "mlflow"])
    report = Report(cfg, out, main=True)
    with pytest.raises(TransegError, match=r"report_to: mlflow could not start .*then run the same command again$"):
        report.start(cfg, resume=False, start_iter=0)
    report.finish()
    assert "config/text_summary" in EventAccumulator(str(out / "tb")).Reload().Tags()["tensors"]


def test_a_tracker_that_cannot_start_says_resume_only_when_the_run_was_resuming(tmp_path):
    """A fresh run has no train_state.pt yet, so `--resume` would answer "nothing to resume": its line says to run the
    same command again; a resumed run's says --resume. 2 starts (resume False / True), one message each."""
    from transeg.engine.trackers import Report

    class Failing:
        name = "mlflow"

        def start(self, out, config, run_id, start_iter):
            raise OSError("store unreachable")

        def finish(self):
            pass

    out = tmp_path / "run"
    cfg = _cfg(out)
    for resume, way in ((False, "then run the same command again"), (True, "then --resume")):
        report = Report(cfg, out, main=True)
        report.trackers = [Failing()]
        with pytest.raises(TransegError) as e:
            report.start(cfg, resume=resume, start_iter=2 if resume else 0)
        assert str(e.value).endswith(way) and "(store unreachable)" in str(e.value), str(e.value)
        assert ("--resume" in str(e.value)) == resume
