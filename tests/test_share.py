"""Sharing (transeg.share, `transeg push`): a loopback stand-in for the Hub on 127.0.0.1 implements the endpoints
huggingface_hub uses to create a repo, branch, validate a card, preupload and commit files (every file answered
as "regular", so its bytes come base64 in the commit: no LFS or Xet server is needed), and serves the files back
as the Hub does (resolve/, model info). A tiny trained run is pushed, its card read back, the repo loaded by id in
another process; each refusal is one line."""
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import yaml

import transeg
from conftest import TINY, TINY_DATA
from helpers import _error
from transeg.cli import main
from transeg.engine import TrainConfig, train
from transeg.errors import TransegError
from transeg.share import IMAGES, model_card

TOKEN = "hf_loopback_write_token"


class Hub(BaseHTTPRequestHandler):
    """The Hub's API as huggingface_hub 2.4 calls it for create_repo, model_info, create_branch, upload_folder
    (validate-yaml, preupload, commit) and hf_hub_download (HEAD/GET resolve/). State: server.repos =
    {repo_id: {"private": bool, "branches": {name: {path: bytes}}, "commits": {name: [oid, ...]}}}. Writes need
    `Authorization: Bearer TOKEN` (401 otherwise, as the Hub answers a missing token); server.log lists
    (method, path) of every request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=None, head=False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Length": str(len(data)), "Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status, code, message):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorised(self):
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        self.server.log.append(("GET", self.path))
        m = re.match(r"^/api/models/([^/]+/[^/?]+)(?:/revision/([^/?]+))?(?:\?.*)?$", self.path)
        if m:
            return self._info(m.group(1), m.group(2) or "main")
        self._resolve(head=False)

    def do_POST(self):
        self.server.log.append(("POST", self.path))
        body = self._body()
        if self.path == "/api/validate-yaml":
            return self._validate(json.loads(body)["content"])
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid username or password.")
        if self.path == "/api/repos/create":
            return self._create(json.loads(body))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^/?]+)", self.path)
        if not m or m.group(1) not in self.server.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        repo, action, rev = self.server.repos[m.group(1)], m.group(2), m.group(3)
        if action == "branch":
            if rev in repo["branches"]:
                return self._error(409, "Conflict", "Reference already exists")
            repo["branches"][rev] = dict(repo["branches"]["main"])
            repo["commits"][rev] = list(repo["commits"]["main"])
            return self._send(200, {})
        if rev not in repo["branches"]:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]})
        self._commit(m.group(1), repo, rev, body)

    def _create(self, payload):
        repo_id = f"{payload.get('organization') or 'me'}/{payload['name']}"
        if repo_id in self.server.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"},
                              {"X-Error-Code": "Conflict"})
        self.server.repos[repo_id] = {"private": payload.get("visibility") == "private" or bool(payload.get("private")),
                                      "branches": {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}},
                                      "commits": {"main": [hashlib.sha1(repo_id.encode()).hexdigest()]}}
        self._send(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _validate(self, content):
        front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            yaml.safe_load(front.group(1))
            if self.server.refuse_cards:
                raise yaml.YAMLError("model-index: refused by this test")
        except (AttributeError, yaml.YAMLError) as e:
            return self._send(400, {"errors": [{"message": f"invalid metadata: {e}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id, repo, rev, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        files = repo["branches"][rev]
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]  # regular files only
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                           + str(len(repo["commits"][rev])).encode()).hexdigest()
        repo["commits"][rev].append(oid)
        self.server.commits.append((repo_id, rev, lines[0]["value"]["summary"], sorted(p["value"]["path"]
                                                                                      for p in lines[1:])))
        self._send(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    def _info(self, repo_id, rev):
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorised()):
            return self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
        if rev not in repo["branches"]:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        files = repo["branches"][rev]
        card = _front(files.get("README.md", b"").decode())
        self._send(200, {"id": repo_id, "sha": repo["commits"][rev][-1], "private": repo["private"],
                         "library_name": card.get("library_name"), "cardData": card or None,
                         "siblings": [{"rfilename": name} for name in sorted(files)]})

    def _resolve(self, head):
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
        repo = self.server.repos.get(m.group(1)) if m else None
        if repo is None or (repo["private"] and not self._authorised()):
            return self._error(404, "RepoNotFound", "Repository not found")
        rev = m.group(2)
        if rev not in repo["branches"]:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        data = repo["branches"][rev].get(m.group(3))
        if data is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["commits"][rev][-1]},
                              head=head)
        self._send(200, data, {"X-Repo-Commit": repo["commits"][rev][-1], "Accept-Ranges": "bytes",
                               "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream"}, head=head)


def _front(text):
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in on 127.0.0.1 as HF_ENDPOINT, with HF_TOKEN set and fresh transeg and Hugging Face caches."""
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.daemon_threads, server.block_on_close = True, False
    server.repos, server.log, server.commits, server.refuse_cards = {}, [], [], False
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("TRANSEG_HOME", str(tmp_path / "transeg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SegFormer trained 4 iterations on the synthetic set, evaluated and checkpointed at 4: its run folder."""
    out = tmp_path_factory.mktemp("share") / "run"
    cfg = TrainConfig(model="segformer-b0", model_args=TINY, data=TINY_DATA, iters=4, batch_size=2, lr=1e-3,
                      warmup_iters=0, eval_interval=4, ckpt_interval=4, log_interval=1, workers=0, device="cpu",
                      out=str(out))
    train(cfg, progress=False, log=lambda *_: None)
    return out


def _labels(model, image):
    return np.asarray(model.predict(image).labels)


def test_a_run_is_pushed_with_a_card_the_hub_reads_and_images_it_shows(hub, run):
    """One commit of 6 files: model.safetensors, config.yaml, README.md and the 3 images. The card's front matter
    parses as YAML: library transeg, task image-segmentation, and a model-index whose mIoU / mAcc / aAcc are the
    run's own evaluation (eval.json, fractions) in percent to 2 decimals; every image the card links is in the repo."""
    url = transeg.push_to_hub(run, "me/tiny-shapes", log=lambda *_: None)
    assert url.startswith(f"{hub.url}/me/tiny-shapes/commit/")
    files = hub.repos["me/tiny-shapes"]["branches"]["main"]
    assert sorted(files) == sorted([".gitattributes", "README.md", "config.yaml", "model.safetensors",
                                    *IMAGES.values()])
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    front = _front(card)
    measured = json.loads((run / "eval.json").read_text())
    assert front["library_name"] == "transeg" and front["pipeline_tag"] == "image-segmentation"
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {k: round(100 * measured[k], 2) for k in ("mIoU", "mAcc", "aAcc")}
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert sorted(linked) == sorted(IMAGES.values()) and all(files[p].startswith(b"\x89PNG") for p in linked)
    assert 'transeg.load("me/tiny-shapes")' in card and "model.predict(" in card
    assert [c[:2] for c in hub.commits] == [("me/tiny-shapes", "main")]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_another_process_loads_the_pushed_repo_by_id_and_predicts_the_same_labels(hub, run, tmp_path):
    """transeg.load("me/tiny-shapes") in a fresh process (its own caches, the stand-in as HF_ENDPOINT) reads the
    pushed checkpoint as it is: the labels of a 48x64 random image equal the local checkpoint's, all 3072 pixels;
    nothing was converted (0 .safetensors files in its transeg cache: it reads the Hugging Face cache's)."""
    transeg.push_to_hub(run, "me/tiny-shapes", log=lambda *_: None)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    code = ("import sys, numpy as np, transeg; m = transeg.load('me/tiny-shapes', progress=False); "
            "np.save(sys.argv[1], np.asarray(m.predict(np.load(sys.argv[2])).labels))")
    env = {**os.environ, "TRANSEG_HOME": str(tmp_path / "other"), "HF_HOME": str(tmp_path / "other-hf"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "remote.npy"), str(tmp_path / "image.npy")],
                          env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    local = _labels(transeg.load(run / "model.safetensors"), image)
    remote = np.load(tmp_path / "remote.npy")
    assert remote.shape == (48, 64) and (remote == local).all()
    assert not list((tmp_path / "other").rglob("*.safetensors"))


def test_load_reads_a_transeg_repo_as_it_is_and_offline_afterwards(hub, run, monkeypatch):
    """In-process: the loaded model's state equals the run's checkpoint tensor for tensor; with HF_HUB_OFFLINE=1 the
    second load makes no request (0 new entries in the server's log) and gives the same weights."""
    transeg.push_to_hub(run, "me/tiny-shapes", log=lambda *_: None)
    local = transeg.load(run / "model.safetensors").state_dict()
    model = transeg.load("me/tiny-shapes", progress=False)
    assert all(torch.equal(v, local[k]) for k, v in model.state_dict().items())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.log)
    again = transeg.load("me/tiny-shapes", progress=False)
    assert len(hub.log) == before and all(torch.equal(v, local[k]) for k, v in again.state_dict().items())


def test_pretrained_repo_id_fine_tunes_from_the_pushed_weights(hub, run, tmp_path):
    """pretrained=me/tiny-shapes (`--pretrained`): the config takes the repo id (its checks with the machine's pass),
    and the model a run starts from (engine.model.build_model, what train() builds) holds the pushed weights
    exactly: every tensor equal to the run's checkpoint's (6 classes on the 6-class synthetic set: no new
    classifier)."""
    from transeg.data import build_dataset
    from transeg.engine.config import validate
    from transeg.engine.model import build_model

    transeg.push_to_hub(run, "me/tiny-shapes", log=lambda *_: None)
    cfg = validate(TrainConfig(pretrained="me/tiny-shapes", data=TINY_DATA, device="cpu", out=str(tmp_path / "t")),
                   machine=True)
    started = build_model(cfg, build_dataset(TINY_DATA, "train")).state_dict()
    pushed = transeg.load(run / "model.safetensors").state_dict()
    assert started.keys() == pushed.keys() and all(torch.equal(started[k], v) for k, v in pushed.items())


def test_a_runs_best_checkpoint_reports_the_evaluation_that_made_it_the_best(tmp_path, run):
    """best.safetensors of the run (evaluated once, at 4): its card's model-index holds that evaluation's mIoU /
    mAcc / aAcc from log.jsonl, says the per-class IoU was not kept, and shows the curves only (the run's IoU chart
    and grid are of its last evaluation, not necessarily this one): 1 image."""
    written = transeg.save_pretrained(run / "best.safetensors", tmp_path / "best", repo_id="me/best")
    card = (tmp_path / "best" / "README.md").read_text()
    logged = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "mIoU" in r][-1]
    metrics = {m["name"]: m["value"] for m in _front(card)["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {k: round(100 * logged[k], 2) for k in ("mIoU", "mAcc", "aAcc")}
    assert "the per-class IoU of this evaluation was not kept" in card
    assert [w for w in written if w.startswith("images/")] == [IMAGES["curves"]]


def test_a_model_never_evaluated_says_so_and_reports_no_number(tmp_path):
    """A checkpoint with no run: the card has no model-index (0 numbers) and says it was not evaluated; no images."""
    model = transeg.create_model("segformer-b0", num_classes=3, classes=["a", "b", "c"], **TINY)
    written = transeg.save_pretrained(model, tmp_path / "card", repo_id="me/unevaluated")
    card = (tmp_path / "card" / "README.md").read_text()
    assert written == ["model.safetensors", "README.md"]
    assert "model-index" not in _front(card) and "has not been evaluated" in card
    assert "![" not in card


def test_push_revision_and_message_reach_the_hub_and_a_transeg_repo_takes_a_second_push(hub, run):
    """Two pushes: main, then branch `exp` with message "longer": 2 commits; the branch holds the new card."""
    assert main(["push", str(run), "me/tiny-shapes"]) == 0
    assert main(["push", str(run), "me/tiny-shapes", "--revision", "exp", "--message", "longer"]) == 0
    assert [(c[1], c[2]) for c in hub.commits] == [("main", "transeg: segformer-b0 (run)"), ("exp", "longer")]
    assert "README.md" in hub.repos["me/tiny-shapes"]["branches"]["exp"]


@pytest.mark.parametrize("case,message", [
    ("no token", "needs a token to push: set HF_TOKEN"),
    ("no token for the Hub itself", "https://huggingface.co needs a token to push: set HF_TOKEN"),
    ("bad repo id", "not a Hugging Face repo id; give OWNER/NAME"),
    ("no model", "a run with no model"),
    ("foreign repo", "already holds a transformers model (config.json"),
    ("offline", "HF_HUB_OFFLINE is set; pushing needs the network"),
    ("card refused", "the push was refused before any upload (Invalid metadata in README.md. - invalid metadata"),
])
def test_push_refusals_are_one_line(hub, run, tmp_path, monkeypatch, capsys, case, message):
    """Each refusal: exit 2, one `transeg: error:` line, and no commit reaches the stand-in (0 commits). Without a
    token the official endpoint is refused before any request; another endpoint is asked and its 401 said."""
    repo, source = "me/tiny-shapes", run
    if case == "no token":  # the stand-in answers 401, as the Hub does
        monkeypatch.delenv("HF_TOKEN")
    elif case == "no token for the Hub itself":  # refused before any request: nothing reaches the network
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    elif case == "bad repo id":
        repo = "not a repo"
    elif case == "no model":
        source = tmp_path / "empty-run"
        source.mkdir()
        (source / "config.yaml").write_text("model: segformer-b0\n")
    elif case == "foreign repo":
        hub.repos[repo] = {"private": False, "commits": {"main": ["b" * 40]}, "branches": {"main": {
            "config.json": b"{}", "model.safetensors": b"x",
            "README.md": b"---\nlibrary_name: transformers\n---\n# a SegFormer\n"}}}
    elif case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "card refused":  # the Hub's /api/validate-yaml answers 400 with its errors
        hub.refuse_cards = True
    line = _error(capsys, main(["push", str(source), repo]))
    assert message in line, line
    assert hub.commits == []


def test_force_commits_beside_another_librarys_files(hub, run):
    """--force: the foreign repo gets transeg's commit (1 commit); its config.json stays."""
    hub.repos["me/mixed"] = {"private": False, "commits": {"main": ["b" * 40]}, "branches": {"main": {
        "config.json": b"{}", "README.md": b"---\nlibrary_name: transformers\n---\n"}}}
    assert main(["push", str(run), "me/mixed", "--force"]) == 0
    assert len(hub.commits) == 1 and "config.json" in hub.repos["me/mixed"]["branches"]["main"]


def test_save_pretrained_never_writes_over_someone_elses_files(tmp_path, run):
    """A folder holding a README.md that is not a transeg card is refused, its bytes unchanged; the run folder
    itself is refused too."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    with pytest.raises(TransegError, match="not from transeg's save_pretrained"):
        transeg.save_pretrained(run, folder)
    assert (folder / "README.md").read_text() == "# my notes\n"
    with pytest.raises(TransegError, match="the run folder itself"):
        transeg.save_pretrained(run, run)


def test_a_card_of_many_classes_keeps_its_table_short():
    """150 classes (ADE20K's count): the IoU table lists MAX_TABLE_ROWS = 60 (the 30 lowest and 30 highest) and
    says 90 were left out. Trained on --data ade20k:/data/ade, the card lists the dataset by its name (its path
    stays out) and the model-index names it too."""
    model = transeg.create_model("segformer-b0", num_classes=150, **TINY)
    model.meta["dataset"] = "ade20k:/data/ade"
    result = {"mIoU": 0.5, "mAcc": 0.6, "aAcc": 0.7, "IoU": [i / 150 for i in range(150)], "Acc": [0.5] * 150}
    card = model_card(model, "me/ade", result=result)
    front = _front(card)
    assert front["datasets"] == ["ade20k"] and "/data/ade" not in card
    assert front["model-index"][0]["results"][0]["dataset"]["type"] == "ade20k"
    rows = [line for line in card.splitlines() if re.match(r"^\| \S.* \| [\d.]+ \| [\d.]+ \|$", line)]
    assert len(rows) == 60 and "90 classes left out" in card
