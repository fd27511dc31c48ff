"""Share a model on the Hugging Face Hub: the transeg checkpoint, its recipe and a generated model card.

    transeg.save_pretrained("runs/b0", "b0-card/")            # a folder as the Hub repo will hold it
    transeg.push_to_hub("runs/b0", "me/segformer-b0-shapes")  # the same, committed to the Hub
    model = transeg.load("me/segformer-b0-shapes")            # read back as it is: nothing converted

What a repo holds (REPO_FILES): `model.safetensors` (the one transeg checkpoint, metadata inside),
`config.yaml` (the run's recipe, where there is a run), `README.md` (the model card) and `images/` (the
training curves, the per-class IoU chart and the prediction grid the card shows), and `runs/` (a run's
TensorBoard traces, where it reported to TensorBoard: the Hub shows them in its metrics tab). The card's YAML front
matter is what the Hub reads: `library_name: transeg` (how `transeg.load` and `transeg push` recognise a
transeg repo), `pipeline_tag: image-segmentation`, `license`, `datasets` and a `model-index` of the
metrics the run measured. A model that was never evaluated says so in its card and reports no number.

The run's figures come from its folder (engine/run.py, engine/trackers.py): `eval.json` (the last
evaluation: every metric and per-class IoU), `log.jsonl` (the curves), `val_iou.png`, `predictions.png`.

Uploads go through `huggingface_hub`: HF_ENDPOINT, HF_TOKEN (or the token `hf auth login` saved) and
HF_HUB_OFFLINE behave as Hub users know them. Limits, checked before anything is sent:
    MAX_WEIGHTS_BYTES   50 GB per file: the Hub's own limit for one file
    MAX_IMAGE_BYTES     10 MB per image of the card (charts are ~100 kB)
    MAX_CARD_BYTES      1 MB of card text; past MAX_TABLE_ROWS classes the IoU table lists the lowest and
                        highest and says how many it left out (the chart and eval.json hold every class)
    MAX_TRACES_BYTES    100 MB of TensorBoard traces; more are left out, and the card says so
"""
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from . import checkpoint, hub
from .errors import TransegError
from .files import atomic_write, output_folder
from .registry import get_family, get_variant
from .segmentor import Segmentor
from .version import __version__

WEIGHTS = "model.safetensors"
BEST = "best.safetensors"        # a run's best checkpoint: its card reports the evaluation that made it the best
RECIPE = "config.yaml"
CARD = "README.md"
IMAGES = {"curves": "images/curves.png", "iou": "images/val_iou.png", "grid": "images/predictions.png"}
REPO_FILES = (WEIGHTS, RECIPE, CARD, *IMAGES.values())
EVAL_FILE = "eval.json"          # written into the run folder at each evaluation (engine/trackers.py)
GRID_FILE = "predictions.png"    # the same
LIBRARY = "transeg"
MAX_WEIGHTS_BYTES = 50 * 10**9
MAX_IMAGE_BYTES = 10 * 10**6
MAX_CARD_BYTES = 1 << 20
MAX_TRACES_BYTES = 100 * 10**6
TRACES = "runs"                  # where the Hugging Face Trainer puts them too
MAX_TABLE_ROWS = 60
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# the card's metrics under the names the Hub's model-index (and the `evaluate` library) uses
METRICS = (("mIoU", "mean_iou", "mIoU"), ("mAcc", "mean_accuracy", "mAcc"), ("aAcc", "overall_accuracy", "aAcc"))


# ------------------------------------------------------------------------------------------ what is shared
class Source:
    """What is shared: a model (a Segmentor in memory, or a checkpoint file) and, for a training run, its folder.
    `weights`: the checkpoint file (None for a model in memory); `run`: the run folder or None."""

    def __init__(self, model_or_run, model=None):
        self.model, self.weights, self.run, self.best = model, None, None, False
        self.in_memory = model is not None or isinstance(model_or_run, Segmentor)  # saved from memory, not copied
        if isinstance(model_or_run, Segmentor):
            self.model = model_or_run
            return
        path = Path(model_or_run).expanduser()
        if path.is_dir():
            self.run = path
            self.weights = path / WEIGHTS
            if model is None and not self.weights.is_file():
                raise TransegError(f"{path}: a run with no model ({WEIGHTS} is written at its first checkpoint); "
                                   f"train it until ckpt_interval, or give a checkpoint file")
        elif path.is_file():
            self.weights = path
            if path.name in (WEIGHTS, BEST) and (path.parent / RECIPE).is_file():
                self.run = path.parent  # a run's own model.safetensors or best.safetensors: its figures go with it
                self.best = path.name == BEST
        else:
            raise TransegError(f"{path}: no such run folder or checkpoint file")
        if self.model is None:
            self.model = checkpoint.load(self.weights)

    def evaluation(self):
        """The run's last evaluation (eval.json), or None: a model never evaluated reports no number. For a run's
        best.safetensors, the evaluation that made it the best (its log record: the scalars, no per-class IoU)."""
        if self.best:
            return self._best_record()
        path = self.run / EVAL_FILE if self.run else None
        if path is None or not path.is_file():
            return None
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TransegError(f"{path}: unreadable ({e}); delete it and the card reports no evaluation") from None
        return found if isinstance(found, dict) and isinstance(found.get("mIoU"), (int, float)) else None

    def _best_record(self):
        """The log record of the evaluation with the highest best_metric (the one best.safetensors holds)."""
        key = self.recipe().get("best_metric") or "mIoU"
        evaluated = [r for r in self.records() if _finite(r.get(key)) and _finite(r.get("mIoU"))]
        if not evaluated:
            return None
        best = max(evaluated, key=lambda r: r[key])  # (the first of equal ones: best.safetensors is replaced on a gain)
        return {**best, "protocol": self.model.protocol.describe(), "best_metric": key}

    def records(self):
        """log.jsonl's records (the curves), [] without a run."""
        path = self.run / "log.jsonl" if self.run else None
        if path is None or not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a killed run left half-written
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                records.append(record)
        return records

    def recipe(self):
        """The run's config.yaml as a dict ({} without a run)."""
        path = self.run / RECIPE if self.run else None
        if path is None or not path.is_file():
            return {}
        try:
            found = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise TransegError(f"{path}: unreadable ({str(e).splitlines()[0]}); fix or delete it") from None
        return found if isinstance(found, dict) else {}

    def iteration(self):
        """The iteration the weights are from (the run's train_state.pt), or None."""
        state = self.run / "train_state.pt" if self.run else None
        if state is None or not state.is_file() or self.weights is None:
            return None
        import torch

        try:
            return int(torch.load(state, map_location="cpu", weights_only=True, mmap=True)["iter"])
        except Exception:  # a damaged state: the card then says nothing about the iteration
            return None


# ------------------------------------------------------------------------------------------- the card
def _dataset(meta):
    """(the name `datasets:` lists or None, the name the card shows). A benchmark given as NAME:PATH (ade20k,
    cityscapes, ...) is listed by its name; a plain folder or the synthetic set is named in the card only."""
    spec = str(meta.get("dataset") or "unknown")
    name, sep, _ = spec.partition(":")
    if spec.startswith("synthetic"):
        return None, "the built-in synthetic shapes (transeg)"
    if sep and re.match(r"^[a-z][\w-]*$", name):
        return name, name
    if meta.get("dataset") is None:
        return None, "an unnamed dataset"
    return None, f"a local dataset ({Path(spec).name or spec})"


def _front_matter(model, repo_name, result, license_):
    """The YAML the Hub reads: library, task, license, datasets and the model-index of measured metrics."""
    dataset_id, dataset_name = _dataset(model.meta)
    front = {"library_name": LIBRARY, "pipeline_tag": "image-segmentation", "license": license_ or "unknown",
             "tags": ["transeg", "semantic-segmentation", get_variant(model.meta["variant"]).family]}
    if dataset_id:
        front["datasets"] = [dataset_id]
    if result is not None:
        metrics = [{"type": kind, "value": round(100 * result[key], 2), "name": shown}
                   for key, kind, shown in METRICS if _finite(result.get(key))]
        front["model-index"] = [{"name": repo_name, "results": [{
            "task": {"type": "image-segmentation", "name": "Semantic Segmentation"},
            "dataset": {"type": dataset_id or "custom", "name": dataset_name, "split": "validation"},
            "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def _pct(v):
    return f"{100 * v:.2f}" if _finite(v) else "n/a"


def _cell(text):
    """A class name as a Markdown table cell: no pipe, no line break, no HTML."""
    return re.sub(r"[|\r\n<>`]", " ", str(text))[:80]


def _iou_table(classes, result):
    """Per-class IoU (and accuracy) as Markdown rows; past MAX_TABLE_ROWS the lowest and highest half each."""
    ious, accs = result.get("IoU") or [], result.get("Acc") or []
    rows = [(name, ious[i] if i < len(ious) else None, accs[i] if i < len(accs) else None)
            for i, name in enumerate(classes)]
    lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
    if len(rows) > MAX_TABLE_ROWS:
        ranked = sorted(rows, key=lambda r: r[1] if _finite(r[1]) else -1)
        half = MAX_TABLE_ROWS // 2
        rows = ranked[:half] + [None] + ranked[-half:]
    for row in rows:
        lines.append(f"| ... {len(classes) - MAX_TABLE_ROWS} classes left out (eval.json and the chart hold all) | | |"
                     if row is None else f"| {_cell(row[0])} | {_pct(row[1])} | {_pct(row[2])} |")
    return lines


def _model_section(model):
    variant = get_variant(model.meta["variant"])
    family = get_family(variant.family)
    params = sum(p.numel() for p in model.parameters())
    lines = ["## Model", "",
             f"- architecture: **{variant.name}** ({family.title}); paper: {family.paper}",
             f"- {params / 1e6:.2f} M parameters, {model.num_classes} classes",
             f"- test protocol (stored in the checkpoint, applied by `predict` and `eval`): {model.protocol.describe()}"]
    if variant.paper.miou:
        reported = ", ".join(f"{d} {v}" for d, v in variant.paper.miou.items())
        lines.append(f"- the paper's single-scale mIoU for {variant.name}: {reported}"
                     + (f" ({variant.paper.reference})" if variant.paper.reference else ""))
    return lines


def _evaluation_section(model, result, weights_iter):
    if result is None:
        return ["## Evaluation", "",
                "This model has not been evaluated: this card reports no metric. Measure it with "
                "`transeg eval MODEL --data DATA`.", ""]
    at = result.get("iter")
    when = f" at iteration {at}" if isinstance(at, int) else ""
    if isinstance(at, int) and weights_iter is not None and weights_iter != at:
        when += f" (the weights here are from iteration {weights_iter}, trained after that evaluation)"
    _, dataset_name = _dataset(model.meta)
    lines = ["## Evaluation", "",
             f"Measured by transeg{when} on the validation split of {dataset_name}, protocol: "
             f"{result.get('protocol', model.protocol.describe())}.", "",
             "| metric | value (%) |", "|---|---:|"]
    lines += [f"| {key} | {_pct(result.get(key))} |" for key in ("mIoU", "mAcc", "aAcc", "mDice", "fwIoU")
              if key in result]
    if result.get("best_metric"):
        lines += ["", f"These weights are the run's best by {result['best_metric']} (best.safetensors); the per-class "
                      f"IoU of this evaluation was not kept (`transeg eval` measures it).", ""]
        return lines
    lines += ["", "### Per-class IoU", ""] + _iou_table(model.classes, result) + [""]
    return lines


def _training_section(recipe, records, images, traces=None):
    lines = ["## Training", ""]
    if recipe:
        keys = [k for k in ("model", "data", "iters", "batch_size", "global_batch", "optimizer", "lr", "crop_size",
                            "amp", "pretrained") if recipe.get(k) is not None]
        lines += [f"Recipe: [`{RECIPE}`]({RECIPE}) (train again with `transeg train {RECIPE} --out runs/again`): "
                  + ", ".join(f"{k} `{_cell(recipe[k])}`" for k in keys) + ".", ""]
    else:
        lines += ["No training run was given: the checkpoint alone was shared.", ""]
    losses = [r for r in records if _finite(r.get("loss"))]
    if losses:
        lines += [f"Final training loss {losses[-1]['loss']:.4f} at iteration {losses[-1]['iter']}.", ""]
    shown = (("curves", "training curves"), ("iou", "per-class IoU"), ("grid", "predictions on validation images"))
    for key, alt in shown:
        if key in images:
            lines += [f"![{alt}]({IMAGES[key]})", ""]
    if traces:
        lines += [traces, ""]
    return lines


def _aligned(pairs):
    """Code lines with their comments in one column."""
    width = max(len(code) for code, _ in pairs) + 4
    return [f"{code.ljust(width)}# {comment}" for code, comment in pairs]


def model_card(model, repo_id, result=None, recipe=None, records=(), images=(), weights_iter=None, license_=None,
               traces=None):
    """The README.md of a transeg repo: front matter, how to use it, the model, its evaluation (or that there
    was none), its training. `images`: which of IMAGES the repo holds (the card shows only those); `traces`: the
    sentence about the run's TensorBoard traces, if any."""
    repo_name = repo_id.rsplit("/", 1)[-1]
    lines = [_front_matter(model, repo_name, result, license_), f"# {repo_name}", "",
             f"A **{model.meta['variant']}** semantic segmentation model for {model.num_classes} classes, shared with "
             f"transeg {__version__}.", "",
             "## Use it", "", "```python", "import transeg"] + _aligned(
                 [(f'model = transeg.load("{repo_id}")', "read as it is: one .safetensors file, nothing converted"),
                  ('seg = model.predict("photo.jpg")', "seg.labels [H, W], seg.overlay(), seg.shares()")]) + ["```", "",
             f"From the command line: `transeg predict {repo_id} photo.jpg --out preds/`; fine-tune it on your data: "
             f"`transeg train --pretrained {repo_id} --data my_data/` (another class count gets a new classifier).", ""]
    lines += _model_section(model) + [""]
    lines += _evaluation_section(model, result, weights_iter)
    lines += _training_section(recipe or {}, list(records), set(images), traces)
    lines += ["## Classes", "", ", ".join(_cell(c) for c in model.classes[:MAX_TABLE_ROWS * 4])
              + (" ..." if model.num_classes > MAX_TABLE_ROWS * 4 else ""), ""]
    text = "\n".join(lines)
    if len(text.encode()) > MAX_CARD_BYTES:
        raise TransegError(f"{repo_id}: the model card would be {len(text.encode()):,} bytes, over the limit of "
                           f"{MAX_CARD_BYTES:,} (share.MAX_CARD_BYTES); shorten the class names")
    return text


# ---------------------------------------------------------------------------------------- the folder
def _images(source, model, folder):
    """The card's pictures written under `folder`: curves from log.jsonl, the run's IoU chart and prediction
    grid. Returns the keys of IMAGES written."""
    from .charts import curves_chart

    written = []
    records = source.records()
    if records:
        chart = curves_chart(records, keys=("loss", "mIoU"), title=f"{model.meta['variant']} on "
                                                                   f"{_dataset(model.meta)[1]}")
        path = folder / IMAGES["curves"]
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda tmp: chart.save(tmp, format="PNG"))
        written.append("curves")
    for key, name in (("iou", "val_iou.png"), ("grid", GRID_FILE)):
        found = source.run / name if source.run else None
        if found is not None and found.is_file() and not source.best and source.evaluation() is not None:
            size = found.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise TransegError(f"{found}: {size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,} for a card image "
                                   f"(share.MAX_IMAGE_BYTES)")
            (folder / IMAGES[key]).parent.mkdir(exist_ok=True)
            shutil.copyfile(found, folder / IMAGES[key])
            written.append(key)
    return written


def _is_transeg_card(path):
    try:
        return _card_library(path.read_text(errors="replace")[:65536]) == LIBRARY
    except OSError:
        return False


def _card_library(text):
    """The library_name of a card's front matter, or None."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        front = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return front.get("library_name") if isinstance(front, dict) else None


def _check_folder(folder, source):
    """`folder` may receive the repo's files: a new or empty folder, or one a previous save_pretrained wrote
    (its README.md is a transeg card); never the run folder itself, never over someone else's files."""
    folder = output_folder(folder)
    if source.run is not None and folder.resolve() == source.run.resolve():
        raise TransegError(f"{folder}: the run folder itself; save the shareable copy to a folder of its own, "
                           f"e.g. {folder / 'hub'}")
    clash = [name for name in (*REPO_FILES, TRACES) if (folder / name).exists()]
    if clash and not _is_transeg_card(folder / CARD):
        raise TransegError(f"{folder}: holds {', '.join(clash)}, which are not from transeg's save_pretrained; "
                           f"nothing was written: choose an empty folder")
    return folder


def save_pretrained(model_or_run, folder, repo_id=None, license=None, model=None):
    """Write what a Hub repo of this model holds into `folder`: model.safetensors, config.yaml (a run's recipe),
    README.md (the model card) and images/. `model_or_run`: a Segmentor, a checkpoint file or a run folder;
    `repo_id`: the id the card's load lines use (default: the folder's name under "USER/"); `license`: the
    card's license (default "unknown": say which, the Hub shows it); `model`: the model in memory for a run
    still training (its weights rather than the run's last checkpoint). Returns the list of files written."""
    source = Source(model_or_run, model=model)
    folder = _check_folder(Path(folder), source)
    return _save(source, folder, repo_id or f"USER/{folder.resolve().name}", license)


def _save(source, folder, repo_id, license_):
    model = source.model
    if source.in_memory:
        checkpoint.save(model, folder / WEIGHTS)
    else:
        size = source.weights.stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            raise TransegError(f"{source.weights}: {size / 1e9:.1f} GB, over the Hub's {MAX_WEIGHTS_BYTES / 1e9:.0f} GB "
                               f"per file (share.MAX_WEIGHTS_BYTES)")
        shutil.copyfile(source.weights, folder / WEIGHTS)
    if source.run is not None and (source.run / RECIPE).is_file():
        shutil.copyfile(source.run / RECIPE, folder / RECIPE)
    images = _images(source, model, folder)
    traces, said = _traces(source, folder)
    weights_iter = None if source.in_memory or source.best else source.iteration()
    text = model_card(model, repo_id, result=source.evaluation(), recipe=source.recipe(), records=source.records(),
                      images=images, weights_iter=weights_iter, license_=license_, traces=said)
    atomic_write(folder / CARD, lambda tmp: Path(tmp).write_text(text))
    return [name for name in REPO_FILES if (folder / name).is_file()] + traces


def _traces(source, folder):
    """The run's TensorBoard traces (RUN/tb/**/*tfevents*) copied under `folder`/runs/: (their repo paths, the
    card's sentence about them). Over MAX_TRACES_BYTES they are left out and the sentence says so."""
    tb = source.run / "tb" if source.run is not None else None
    found = sorted(p for p in tb.rglob("*tfevents*") if p.is_file()) if tb is not None and tb.is_dir() else []
    if not found:
        return [], None
    total = sum(p.stat().st_size for p in found)
    if total > MAX_TRACES_BYTES:
        return [], (f"The run's TensorBoard traces ({total / 1e6:.0f} MB) are not in this repo: over the limit of "
                    f"{MAX_TRACES_BYTES / 1e6:.0f} MB (share.MAX_TRACES_BYTES).")
    names = []
    for p in found:
        name = f"{TRACES}/{source.run.name}/{p.relative_to(tb).as_posix()}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, folder / name)
        names.append(name)
    return names, f"TensorBoard traces of the run: `{TRACES}/` (the Hub's Training metrics tab shows them)."


# ------------------------------------------------------------------------------------------------ push
def check_repo_id(repo_id):
    """`repo_id` is OWNER/NAME as the Hub spells them, else one line."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise TransegError(f"{repo_id!r}: not a Hugging Face repo id; give OWNER/NAME, e.g. me/segformer-b0-shapes "
                           "(letters, digits, '-', '_', '.'; 96 characters each at most)")
    return repo_id


def _token():
    from huggingface_hub import get_token

    return get_token()


HUB = "https://huggingface.co"
_NO_TOKEN = "{repo_id}: {endpoint} needs a token to push: set HF_TOKEN to a write token (or run `hf auth login`)"


def _http_failure(e, repo_id, endpoint, token):
    """One line for an HTTP error of the Hub."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        if token is None:
            return _NO_TOKEN.format(repo_id=repo_id, endpoint=endpoint)
        return f"{repo_id}: {endpoint} refused the token (HTTP 401); set HF_TOKEN to a valid write token"
    if status == 403:
        return (f"{repo_id}: the token may not write to {repo_id.split('/')[0]} (HTTP 403); use a write token of "
                f"that user or organisation")
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return f"{repo_id}: the push to {endpoint} failed ({first})"


def _check_existing(api, repo_id, revision, force):
    """Refuse a repo that holds another library's files (unless `force`): the push would mix its files with
    transeg's or replace them. An empty repo, or one whose card says library_name: transeg, is fine."""
    from huggingface_hub import errors

    try:
        info = api.model_info(repo_id, revision=revision)
    except errors.RevisionNotFoundError:
        info = api.model_info(repo_id)  # a new branch: what it branches from
    files = [s.rfilename for s in (info.siblings or []) if s.rfilename not in (".gitattributes", CARD)]
    library = info.library_name or getattr(info.card_data, "library_name", None)
    if files and library != LIBRARY and not force:
        what = f"a {library} model" if library else "files of another library"
        raise TransegError(f"{repo_id}: already holds {what} ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''}); "
                           f"push to another repo id, or add --force to commit transeg's files beside them")


def push_to_hub(model_or_run, repo_id, private=False, revision=None, message=None, force=False, license=None,
                model=None, log=print):
    """Commit `model_or_run` (a Segmentor, a checkpoint file or a run folder) with its card to the Hub repo
    `repo_id`, created if missing (private if asked; an existing repo keeps its visibility). `revision`: a
    branch, created from main if missing; `force`: commit into a repo holding another library's files.
    Returns the URL of the commit. Refusals are one line each, before anything is uploaded: a repo id that
    is not one, no model, HF_HUB_OFFLINE, no token where the endpoint needs one, another library's repo."""
    import httpx2
    from huggingface_hub import HfApi, errors

    check_repo_id(repo_id)
    if hub.offline():
        raise TransegError(f"{repo_id}: HF_HUB_OFFLINE is set; pushing needs the network (unset it, or use "
                           f"save_pretrained to write the repo's files to a folder)")
    endpoint, token = hub.endpoint(), _token()
    if token is None and endpoint == HUB:  # (the Hub always asks for one; another endpoint is asked, below)
        raise TransegError(_NO_TOKEN.format(repo_id=repo_id, endpoint=endpoint))
    source = Source(model_or_run, model=model)  # a run without a model: refused before the network
    with tempfile.TemporaryDirectory(prefix="transeg-push-") as tmp:
        _save(source, Path(tmp), repo_id, license)
        api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY, library_version=__version__)
        variant = source.model.meta["variant"]
        message = message or f"transeg: {variant}" + (f" ({source.run.name})" if source.run else "")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            _check_existing(api, repo_id, revision, force)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision, commit_message=message)
        except errors.HfHubHTTPError as e:
            raise TransegError(_http_failure(e, repo_id, endpoint, token)) from None
        except (httpx2.HTTPError, OSError) as e:
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise TransegError(f"{repo_id}: cannot reach {endpoint} ({why})") from None
        except ValueError as e:  # huggingface_hub's own checks, e.g. the Hub's verdict on the card's metadata
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise TransegError(f"{repo_id}: the push was refused before any upload ({why})") from None
    log(f"pushed {variant} to {endpoint}/{repo_id}" + (f" (branch {revision})" if revision else "")
        + f": {info.commit_url}")
    return info.commit_url
