"""The zoo: a name or a Hub repo id to a ready model, with no internet. A local HTTP server on 127.0.0.1
serves fixture repos in the Hub's layout (HF_ENDPOINT points at it) and plain URLs, and can corrupt,
truncate or die halfway, drip, stall, lie about its length, send without end or redirect anywhere: every
such download ends, within small limits set per test, in one line naming the URL. Logits are checked
against the fixture's own model (HF's SegFormer)."""
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import transeg
from transeg import hub, zoo
from transeg.errors import TransegError
from transeg.protocol import Protocol

COMMIT = "a" * 40


class Files(BaseHTTPRequestHandler):
    """GET/HEAD of `server.files[path]`. Hub paths (/ORG/REPO/resolve/REV/FILE) answer with the headers
    huggingface_hub reads (X-Repo-Commit; a .safetensors file as LFS: X-Linked-Etag = its sha256).
    `server.cut[path] = n`: the next GET sends the full Content-Length but only n bytes, then closes.
    `server.hostile[path] = fn`: every GET (and HEAD, where fn takes `head`) is answered by fn(handler, data,
    start) instead: the hostile servers below."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _find(self):
        m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", self.path)
        key = f"{m.group(1)}/{m.group(2)}" if m else self.path
        return key, self.server.files.get(key), m is not None

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        key, data, on_hub = self._find()
        self.server.requests.append((self.command, key, self.headers.get("Range")))
        hostile = self.server.hostile.get(key)
        if hostile is not None and (body or getattr(hostile, "head", False)):
            rng = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
            try:
                hostile(self, data, int(rng.group(1)) if rng else 0)
            except OSError:  # the client hung up: what a limit does
                pass
            self.close_connection = True
            return
        if data is None:
            self.send_response(404)
            if on_hub:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and body:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        if on_hub:
            self.send_header("X-Repo-Commit", COMMIT)
            sha = hashlib.sha256(data).hexdigest()
            if key.endswith(".safetensors"):
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.end_headers()
        if not body:
            return
        cut = self.server.cut.pop(key, None)
        self.wfile.write(data[start:start + cut] if cut is not None else data[start:])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.daemon_threads, httpd.block_on_close = True, False
    httpd.files, httpd.cut, httpd.requests, httpd.hostile = {}, {}, [], {}
    httpd.stop = threading.Event()  # ends every stall and drip at teardown
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch, server):
    """A fresh transeg cache and Hugging Face cache per test; the Hub endpoint is the local server."""
    import huggingface_hub.constants

    monkeypatch.setenv("TRANSEG_HOME", str(tmp_path / "transeg"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "transeg"


@pytest.fixture(scope="module")
def hf_segformer(tmp_path_factory):
    """HF's SegformerForSemanticSegmentation (B0 shape, seeded, 150 classes) and its save_pretrained files."""
    from test_segformer import _random_hf

    hf = _random_hf(150)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


def _publish(server, repo, files):
    for name, data in files.items():
        server.files[f"{repo}/{name}"] = data


def _logits_match(model, hf):
    """The HF SegFormer conversion bound: 1e-4 (HF's LayerNorm eps 1e-5 vs the authors' 1e-6, see
    tests/test_segformer.py)."""
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(pixel_values=x).logits - model(x)).abs().max().item() <= 1e-4


def test_a_hub_repo_id_loads_once_then_from_the_cache_offline(server, hf_segformer, monkeypatch, capsys):
    """`transeg.load("org/repo")`: config.json + model.safetensors fetched through huggingface_hub,
    converted once; the second load makes no request at all and works with HF_HUB_OFFLINE=1."""
    hf, files = hf_segformer
    _publish(server, "someone/segformer-b0-demo", files)
    model = transeg.load("someone/segformer-b0-demo", progress=False)
    assert model.meta["variant"] == "segformer-b0" and model.meta["zoo"] == "someone/segformer-b0-demo"
    assert model.meta["classes"][:2] == [hf.config.id2label[0], hf.config.id2label[1]]
    assert _logits_match(model, hf)
    gets = [r for r in server.requests if r[0] == "GET"]
    assert sorted(k for _, k, _ in gets) == ["someone/segformer-b0-demo/config.json",
                                             "someone/segformer-b0-demo/model.safetensors"]
    server.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = transeg.load("someone/segformer-b0-demo", progress=False)
    assert server.requests == [] and _logits_match(again, hf)


def test_a_zoo_name_gets_its_rows_protocol_and_a_repo_without_safetensors_its_bin(server, hf_segformer, monkeypatch,
                                                                                    tmp_path):
    """A zoo row on the Hub: model.safetensors missing (404 EntryNotFound), pytorch_model.bin taken;
    the row's test protocol (the authors' sliding windows) replaces the converter's default."""
    hf, files = hf_segformer
    weights = io.BytesIO()
    torch.save(hf.state_dict(), weights)  # (transformers 5 writes safetensors only)
    _publish(server, "vendor/b0-city", {"config.json": files["config.json"], "pytorch_model.bin": weights.getvalue()})
    protocol = Protocol(mode="slide", crop=(1024, 1024), stride=(768, 768), scale=(2048, 1024))
    row = zoo.Release("segformer-b0-demo", "segformer-b0", "segformer-hf", "ade20k", "1024x1024", "hub",
                      "vendor/b0-city", ("model.safetensors", "pytorch_model.bin"), protocol=protocol)
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    model = transeg.load("segformer-b0-demo", progress=False)
    assert model.protocol == protocol and model.meta["zoo"] == "segformer-b0-demo" and _logits_match(model, hf)
    # the same repo by its id resolves to the row (and its cached conversion): no second download
    server.requests.clear()
    assert transeg.load("vendor/b0-city", progress=False).protocol == protocol and server.requests == []


def test_an_imagenet_mit_from_the_hub_becomes_backbone_weights(server, monkeypatch):
    """nvidia/mit-b* is HF's SegformerForImageClassification (`segformer.encoder.*` + `classifier.*`): kept
    in the cache as the encoder's weights in the authors' names, which `backbone_weights` loads. The last
    stage's features equal HF's (bound 1e-4: HF's LayerNorm eps 1e-5 vs the authors' 1e-6)."""
    import safetensors.torch
    import transformers

    from transeg.convert import load_backbone_weights

    torch.manual_seed(0)
    hf = transformers.SegformerForImageClassification(transformers.SegformerConfig(num_labels=1000)).eval()
    buffer = safetensors.torch.save({k: v.contiguous() for k, v in hf.state_dict().items()})
    _publish(server, "vendor/mit-b0", {"model.safetensors": buffer})
    row = zoo.Release("mit-b0-demo", "segformer-b0", "backbone", "imagenet", "224x224", "hub", "vendor/mit-b0",
                      ("model.safetensors",), backbone=True)
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    model = load_backbone_weights(transeg.create_model("segformer-b0", num_classes=19).eval(),
                                  zoo.fetch(row.name, progress=False, log=lambda *a: None))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.segformer(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        assert (model.backbone(x)[-1] - theirs).abs().max().item() <= 1e-4


def _official_b0(tmp_path):
    from helpers import _official_segformer

    return _official_segformer(tmp_path / "b0.pth").read_bytes()


def _url_row(server, data, sha256=None, extra=()):
    return zoo.Release("segformer-b0-url", "segformer-b0", "segformer", "ade20k", "512x512", "url",
                       f"{server.url}/weights/b0.pth", extra, sha256=sha256)


def test_a_plain_url_is_checked_converted_once_and_not_kept_twice(server, tmp_path, monkeypatch, cache):
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    path = zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert path == cache / "models" / "segformer-b0-url.safetensors"
    assert transeg.load(row.name).meta["variant"] == "segformer-b0"
    # the raw .pth is gone once converted; no .part, no temporary left anywhere in the cache
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert left == ["models/segformer-b0-url.safetensors"], left  # (no .lock beside any file either)
    assert row.checksum == "publisher"


def test_a_corrupted_download_is_refused_and_nothing_is_left_under_its_name(server, tmp_path, monkeypatch, cache):
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data[:-10] + b"x" * 10
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    with pytest.raises(TransegError, match=r"b0\.pth: the download's sha256 is [0-9a-f]{16}\.\.\., not the expected "
                                           rf"{hashlib.sha256(data).hexdigest()[:16]}.*try again; or download"):
        zoo.fetch(row.name, progress=False)
    assert not [p for p in cache.rglob("*") if p.suffix in (".pth", ".part", ".safetensors")]


def test_a_server_that_dies_halfway_is_resumed_from_where_it_stopped(server, tmp_path, monkeypatch, cache, capsys):
    """The first GET sends 40% of the file and closes. With one attempt allowed: one line, the partial file
    kept; the next fetch asks for `Range: bytes=<that many>-` and completes; the sha256 of the whole matches.
    With the default attempts the same fetch resumes by itself, saying so in one line."""
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    server.cut["/weights/b0.pth"] = cut = int(len(data) * 0.4)
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    monkeypatch.setenv("TRANSEG_DOWNLOAD_ATTEMPTS", "1")
    with pytest.raises(TransegError, match=rf"closed after {cut:,} of {len(data):,} bytes; gave up after 1 attempt "
                                           r"\(TRANSEG_DOWNLOAD_ATTEMPTS\) .*next try resumes"):
        zoo.fetch(row.name, progress=False)
    assert (cache / "downloads" / row.name / "b0.pth.part").stat().st_size == cut
    server.requests.clear()
    zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert [r for r in server.requests if r[0] == "GET"] == [("GET", "/weights/b0.pth", f"bytes={cut}-")]
    assert transeg.load(row.name).meta["variant"] == "segformer-b0"
    # within one fetch: attempt 2 resumes, one line says so
    monkeypatch.delenv("TRANSEG_DOWNLOAD_ATTEMPTS")
    monkeypatch.setattr(hub, "RETRY_PAUSE_S", 0.05)
    zoo.target(row.name).unlink()
    server.cut["/weights/b0.pth"] = cut
    server.requests.clear()
    capsys.readouterr()
    zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert [r for r in server.requests if r[0] == "GET"] == [("GET", "/weights/b0.pth", None),
                                                             ("GET", "/weights/b0.pth", f"bytes={cut}-")]
    assert capsys.readouterr().err.splitlines() == [
        f"transeg: {row.location}: the connection closed after {cut:,} of {len(data):,} bytes; retrying (2 of 3)"]


def test_an_unreachable_server_keeps_the_partial_file_and_says_how_to_give_it_by_hand(server, tmp_path, monkeypatch):
    data = _official_b0(tmp_path)
    row = zoo.Release("segformer-b0-gone", "segformer-b0", "segformer", "ade20k", "512x512", "url",
                      "http://127.0.0.1:9/weights/b0.pth")  # port 9 (discard): nothing listens
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    with pytest.raises(TransegError, match=r"127\.0\.0\.1:9/weights/b0\.pth: cannot connect \(.*refused.*\); or "
                                           r"download .* by hand and run `transeg pull segformer-b0-gone --file PATH`"):
        zoo.fetch(row.name, progress=False)
    # given by hand: converted, its checksum recorded for any later copy
    (tmp_path / "b0.pth").write_bytes(data)
    zoo.fetch(row.name, file=tmp_path / "b0.pth", progress=False, log=lambda *a: None)
    assert hub.Checksums().get("segformer-b0-gone/b0.pth") == hashlib.sha256(data).hexdigest()


def test_a_checksum_recorded_on_the_first_download_is_checked_ever_after(server, tmp_path, monkeypatch, cache):
    """No publisher hash: the first download's sha256 is recorded; after the cache's model is deleted,
    a server now serving other bytes under the same URL is refused."""
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    row = _url_row(server, data)
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    assert row.checksum == "recorded on first download"
    zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert json.loads((cache / "checksums.json").read_text()) == {"segformer-b0-url/b0.pth":
                                                                  hashlib.sha256(data).hexdigest()}
    zoo.target(row.name).unlink()
    server.files["/weights/b0.pth"] = data[:-1] + bytes([data[-1] ^ 1])  # one bit differs
    with pytest.raises(TransegError, match="the download's sha256 is .* not the expected"):
        zoo.fetch(row.name, progress=False)


def test_a_release_hosted_on_a_drive_asks_for_the_file_and_checks_it(tmp_path, monkeypatch):
    data = _official_b0(tmp_path)
    row = zoo.Release("segformer-b0-drive", "segformer-b0", "segformer", "ade20k", "512x512", "manual",
                      "https://drive.google.com/drive/folders/EXAMPLE")
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    with pytest.raises(TransegError, match=r"segformer-b0-drive: the authors host it where a program cannot download "
                                           r"from \(https://drive\.google\.com/drive/folders/EXAMPLE\); download it "
                                           r"there and give the file: `transeg pull segformer-b0-drive --file PATH`"):
        transeg.load(row.name)
    (tmp_path / "mine.pth").write_bytes(data)
    zoo.fetch(row.name, file=tmp_path / "mine.pth", progress=False, log=lambda *a: None)
    assert transeg.load(row.name).meta["zoo"] == "segformer-b0-drive"
    (tmp_path / "other.pth").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(TransegError, match=r"other\.pth: sha256 .* is not the segformer-b0-drive release's"):
        zoo.fetch(row.name, file=tmp_path / "other.pth", progress=False)


def test_offline_with_a_cold_cache_is_one_line_that_says_what_to_fetch(hf_segformer, server, monkeypatch):
    _publish(server, "someone/cold", hf_segformer[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TransegError, match=r"^someone/cold: config\.json is not in the Hugging Face cache and "
                                           r"HF_HUB_OFFLINE is set; fetch it once online \(`transeg pull someone/cold`\)$"):
        transeg.load("someone/cold")
    # a zoo row also says how to give the file by hand
    row = zoo.Release("segformer-b0-cold", "segformer-b0", "segformer-hf", "ade20k", "512x512", "hub", "someone/cold",
                      ("model.safetensors",))
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    with pytest.raises(TransegError, match=r"or download http://127\.0\.0\.1:\d+/someone/cold/resolve/main/"
                                           r"model\.safetensors by hand and run `transeg pull segformer-b0-cold --file"):
        transeg.load(row.name)
    assert server.requests == []


def test_two_processes_fetching_one_file_download_it_once(server, tmp_path, monkeypatch):
    """Two threads (each its own open file, so flock excludes them as it does processes) fetch the same
    name: one downloads and converts, the other waits and reads the result: one GET in all."""
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    results = []
    threads = [threading.Thread(target=lambda: results.append(zoo.fetch(row.name, progress=False,
                                                                        log=lambda *a: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [r for r in server.requests if r[0] == "GET"] == [("GET", "/weights/b0.pth", None)]


@pytest.mark.parametrize("spec,message", [
    ("runs/a/model.safetensors", r"runs/a/model\.safetensors: no such checkpoint file$"),
    ("tests/model", r"tests/model: no such checkpoint file$"),  # tests/ is a folder here: a path, not a repo id
    ("segfromer-b0-ade20k", (r"'segfromer-b0-ade20k': no such checkpoint file, zoo name or Hugging Face repo id "
                            r"\(did you mean segformer-b0-ade20k")),
])
def test_a_mistyped_name_or_path_is_one_line_and_never_a_download(server, spec, message):
    with pytest.raises(TransegError, match=message):
        transeg.load(spec)
    assert server.requests == []


def test_a_hub_repo_of_another_kind_is_named(server):
    server.files["someone/bert/config.json"] = json.dumps({"model_type": "bert"}).encode()
    with pytest.raises(TransegError, match=r"someone/bert: a 'bert' model; transeg reads Hub repos of "
                                           r"eomt, eomt_dinov3, segformer"):
        transeg.load("someone/bert")


def test_pull_fetches_once_and_predict_takes_the_name(server, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from transeg.cli import main

    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    assert main(["pull", row.name]) == 0
    out = capsys.readouterr().out
    assert f"{row.name} -> {zoo.target(row.name)}: segformer-b0, 150 classes, 3,752,694 params" in out
    Image.new("RGB", (64, 48), (120, 60, 30)).save(tmp_path / "photo.jpg")
    server.requests.clear()
    assert main(["predict", row.name, str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "preds")]) == 0
    assert server.requests == [] and (tmp_path / "preds" / "photo_mask.png").is_file()
    # a mistyped name: one line with the nearest names, exit 2
    assert main(["pull", "segformer-b0-ur1"]) == 2
    assert "did you mean segformer-b0-url" in capsys.readouterr().err


def test_pull_names_the_repo_and_the_file_it_converts(server, hf_segformer, tmp_path, monkeypatch, capsys):
    """`transeg pull` says what it converts: the Hub repo and file of a zoo row (not the snapshot folder, which
    is named by a commit hash), the repo and file of a repo id, a plain URL's file, the file given by hand."""
    from transeg.cli import main

    hf, files = hf_segformer
    weights = io.BytesIO()
    torch.save(hf.state_dict(), weights)
    _publish(server, "vendor/b0", {"config.json": files["config.json"], "pytorch_model.bin": weights.getvalue()})
    _publish(server, "someone/b0", files)
    row = zoo.Release("segformer-b0-demo", "segformer-b0", "segformer-hf", "ade20k", "512x512", "hub", "vendor/b0",
                      ("model.safetensors", "pytorch_model.bin"))
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    url = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, url.name, url)
    manual = zoo.Release("segformer-b0-drive", "segformer-b0", "segformer", "ade20k", "512x512", "manual",
                         "https://drive.google.com/drive/folders/EXAMPLE")
    monkeypatch.setitem(zoo.RELEASES, manual.name, manual)
    lines = []
    for argv in ([row.name], ["someone/b0"], [url.name], [manual.name, "--file", str(tmp_path / "b0.pth")]):
        assert main(["pull", *argv]) == 0, argv
        lines += [line for line in capsys.readouterr().out.splitlines() if "converting" in line]
    assert lines == [("segformer-b0-demo: converting vendor/b0/pytorch_model.bin and its config.json to a transeg "
                      "checkpoint"),
                     "someone/b0: converting someone/b0/model.safetensors and its config.json to a transeg checkpoint",
                     "segformer-b0-url: converting b0.pth to a transeg checkpoint",
                     f"segformer-b0-drive: converting {tmp_path / 'b0.pth'} to a transeg checkpoint"]
    assert not any(COMMIT[:16] in line for line in lines)


def test_models_pretrained_fits_the_terminal(monkeypatch, capsys):
    """`transeg models --pretrained` (250 columns in full) within COLUMNS: at 200 the model and checksum
    columns are left out, at 80 all but name, mIoU and from, whose cells wrap; each time the footer says
    which. Without a terminal or COLUMNS (a file, a pipe) the rows stay whole."""
    from transeg.cli import ZOO_DROP, main

    def table(columns):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", str(columns))
        assert main(["models", "--pretrained"]) == 0
        return capsys.readouterr().out.splitlines()

    full = table(None)
    assert max(map(len, full)) > 200 and full[0].split() == list(zoo.COLUMNS)
    for columns, kept in ((200, ["name", "dataset", "crop", "mIoU", "from", "size", "licence"]),
                          (80, ["name", "mIoU", "from"])):
        lines = table(columns)
        assert max(map(len, lines)) <= columns, (columns, max(lines, key=len))
        assert lines[0].split() == kept
        names = [line.split()[0] for line in lines[1:lines.index("")] if not line.startswith(" ")]
        assert names == list(zoo.RELEASES)  # one row per release, in order; wrapped cells continue below it
        left = [c for c in ZOO_DROP if c not in kept]  # in the order they are left out
        assert f"Left out to fit {columns} columns: {', '.join(left)}" in " ".join(lines)
    # a wrapped cell reads back whole: the longest source of the zoo
    lines = table(80)
    start = next(i for i, line in enumerate(lines) if line.startswith("eomt-dinov2-l16-cityscapes "))
    column = lines[0].index("from")
    cell = lines[start][column:] + "".join(line[column:] for line in lines[start + 1:start + 3]
                                             if line.startswith(" " * column))
    assert cell == "hf.co/tue-mps/cityscapes_semantic_eomt_large_1024"


def test_models_pretrained_lists_the_zoo_with_its_columns(capsys, monkeypatch):
    from transeg.cli import main

    monkeypatch.delenv("COLUMNS", raising=False)  # (rows whole: stdout is no terminal here)
    assert main(["models", "--pretrained", "--family", "semask"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == list(zoo.COLUMNS)
    row = next(line for line in lines if line.startswith("semask-swin-l-mask2former-ade20k "))
    # the SeMask paper's 56.41 / 57.52, a Google Drive file given by hand, its checksum recorded then
    assert "56.41 / 57.52" in row and "by hand from drive.google.com" in row and "recorded on first download" in row
    assert sum(line.startswith("semask-") for line in lines) == 14


def test_fine_tuning_starts_from_a_zoo_name_with_a_new_classifier(server, tmp_path, monkeypatch):
    """`--pretrained NAME` (the `pretrained` key): the release's 150-class model onto 3-class data keeps every
    weight but SegFormer's 1x1 classifier. `backbone_weights` takes ImageNet releases only."""
    from types import SimpleNamespace

    from transeg.engine.config import TrainConfig, validate
    from transeg.engine.trainer import build_model

    data = _official_b0(tmp_path)
    server.files["/weights/b0.pth"] = data
    row = _url_row(server, data, sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    classes = SimpleNamespace(classes=["a", "b", "c"], palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    lines = []
    model = build_model(validate(TrainConfig(pretrained=row.name), machine=True), classes, log=lines.append)
    assert model.num_classes == 3 and model.meta["variant"] == "segformer-b0"
    assert lines[0].startswith(f"{row.name}: 150 classes, the data has 3: a new classifier for the 3 classes")
    source = transeg.load(row.name).state_dict()
    assert torch.equal(model.state_dict()["backbone.block4.1.mlp.fc2.weight"], source["backbone.block4.1.mlp.fc2.weight"])
    with pytest.raises(TransegError, match=rf"backbone_weights={row.name}: a whole segmentation model, not ImageNet "
                                           rf"backbone weights; start from it with pretrained={row.name}"):
        build_model(validate(TrainConfig(model="segformer-b0", backbone_weights=row.name), machine=True), classes)
    with pytest.raises(TransegError, match=r"backbone_weights=mit-b9-imagenet: no such file \(give .*, an ImageNet "
                                           r"release of the zoo"):
        validate(TrainConfig(model="segformer-b0", backbone_weights="mit-b9-imagenet"), machine=True)


# ----------------------------------------------------------------------------- bounded downloads
def _head(h, status=200, length=None, *extra):
    h.send_response(status)
    if length is not None:
        h.send_header("Content-Length", str(length))
    for name, value in extra:
        h.send_header(name, value)
    h.end_headers()


def _ranged(h, data, start):
    _head(h, 206 if start else 200, len(data) - start, ("Accept-Ranges", "bytes"))


def drip(every, step=1):
    """`step` bytes every `every` seconds, with an honest Content-Length."""
    def answer(h, data, start):
        _ranged(h, data, start)
        for i in range(start, len(data), step):
            h.wfile.write(data[i:i + step])
            h.wfile.flush()
            if h.server.stop.wait(every):
                return
    return answer


def stall_after(n):
    """n bytes, then silence (until the test ends)."""
    def answer(h, data, start):
        _ranged(h, data, start)
        h.wfile.write(data[start:start + n])
        h.wfile.flush()
        h.server.stop.wait(30)
    return answer


def silent(h, data, start):
    """Accepts the connection and never answers."""
    h.server.stop.wait(30)


def lying_length(h, data, start):
    """Announces the whole rest of the file and sends half of it, every time."""
    _ranged(h, data, start)
    h.wfile.write(data[start:start + (len(data) - start) // 2])


def endless(h, data, start):
    """No Content-Length and no end."""
    _head(h, 200, None, ("Connection", "close"))
    while not h.server.stop.is_set():
        h.wfile.write(b"\0" * 65536)


def claims(n):
    def answer(h, data, start):
        _head(h, 200, n)
    return answer


def status(code):
    def answer(h, data, start):
        _head(h, code, 0)
    answer.head = True
    return answer


def redirect(location):
    """A 302 to `location`, HEAD included (with the headers huggingface_hub takes its metadata from)."""
    def answer(h, data, start):
        _head(h, 302, 0, ("Location", location.replace("CLOSED", str(_closed_port()))), ("X-Repo-Commit", COMMIT),
              ("ETag", '"e"'), ("X-Linked-Size", "200000"))
    answer.head = True
    return answer


def _closed_port():
    """A port on 127.0.0.1 where nothing listens (a connection is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_limits(monkeypatch):
    """Limits small enough that every hostile server is stopped within a few seconds."""
    for name, value in {"TRANSEG_DOWNLOAD_TIMEOUT": "0.5", "TRANSEG_DOWNLOAD_MIN_RATE": "1",
                        "TRANSEG_DOWNLOAD_DEADLINE": "6", "TRANSEG_DOWNLOAD_ATTEMPTS": "2",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub, "RETRY_PAUSE_S", 0.05)


def _pull_fails(argv, capsys, seconds):
    """`transeg pull ...`: exit 2 within `seconds`, its error one line; the only other lines say it retries.
    Returns the error line."""
    from transeg.cli import main

    capsys.readouterr()
    began = time.monotonic()
    assert main(["pull", *argv]) == 2
    took = time.monotonic() - began
    err = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip() and not re.search(r"%\||B/s\]", line)]
    errors = [line for line in err if line.startswith("transeg: error: ")]  # ("%|": a progress bar)
    assert len(errors) == 1 and all(line.startswith("transeg: ") and "; retrying (" in line
                                    for line in err if line not in errors), err
    assert took < seconds, (took, errors)
    return errors[0].removeprefix("transeg: error: ")


DATA = bytes(range(256)) * 782  # 200,192 bytes


# name: (hostile GET answer, extra settings, stated size MB, the line after "URL: ", the .part kept, seconds)
PLAIN = {
    "drips": (drip(0.05), {}, None, (r"[\d.]+ KB/s over the last [\d.]+ s, below the minimum of 1 KB/s "
                                    r"\(TRANSEG_DOWNLOAD_MIN_RATE\) \(\d+ bytes kept in .*b0\.pth\.part; the next try "
                                    r"resumes\)"), True, 4),
    "slow past the deadline": (drip(0.05, 2000), {"TRANSEG_DOWNLOAD_DEADLINE": "1.5"}, None,
                               (r"not done within the deadline of 1\.5 s \(TRANSEG_DOWNLOAD_DEADLINE\) \([\d,]+ bytes "
                               r"kept"), True, 4),
    "stalls after 1000 bytes": (stall_after(1000), {}, None,
                                (r"no data for 0\.5 s after 2,000 bytes \(TRANSEG_DOWNLOAD_TIMEOUT\); gave up after 2 "
                                r"attempts \(TRANSEG_DOWNLOAD_ATTEMPTS\) \(2,000 bytes kept"), True, 4),
    "never answers": (silent, {}, None, r"cannot connect \(no answer within 0\.5 s \(TRANSEG_DOWNLOAD_TIMEOUT\)\); or download",
                      False, 3),
    "lies about its length": (lying_length, {}, None, (r"the connection closed after 150,144 of 200,192 bytes; gave up "
                                                     r"after 2 attempts .*150,144 bytes kept"), True, 4),
    "sends without end": (endless, {"TRANSEG_DOWNLOAD_MAX_MB": "0.5"}, None,
                          r"more than 500,000 bytes arrived, over the limit \(TRANSEG_DOWNLOAD_MAX_MB=0\.5\); or download", False, 4),
    "announces more than the release states": (claims(50_000_000), {}, 1.0,
                                               (r"the server announces 50\.0 MB, over the limit of 11\.2 MB "
                                               r"\(segformer-b0-url states 1 MB; the limit is that plus 25% and 10 MB\); or"),
                                               False, 3),
    "sends more than the global limit": (endless, {"TRANSEG_DOWNLOAD_MAX_MB": "0.3"}, 100.0,
                                         r"more than 300,000 bytes arrived", False, 4),
    "answers 503": (status(503), {}, None, r"the server answered HTTP 503 .*; gave up after 2 attempts", False, 3),
    "answers 404": (status(404), {}, None, r"the server answered HTTP 404 Not Found; or download", False, 3),
    "redirects to file://": (redirect("file:///etc/passwd"), {}, None, (r"the server answered HTTP 302 Found - "
                                                                       r"Redirection to url 'file:///etc/passwd' is not"), False, 3),
    "redirects to a closed port": (redirect("http://127.0.0.1:CLOSED/b0.pth"), {}, None,
                                   r"cannot connect \(.*[Rr]efused", False, 3),
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_a_hostile_plain_url_ends_in_one_line_within_its_limits(case, server, monkeypatch, small_limits, cache, capsys):
    """Each hostile server: `transeg pull` exits 2 within seconds with one line naming the URL and what
    happened; the partial file is kept only where the server resumes (and never over the size limit);
    no checksum is recorded and no lock file is left."""
    answer, settings, size_mb, line, kept, seconds = PLAIN[case]
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    server.files["/weights/b0.pth"] = DATA
    server.hostile["/weights/b0.pth"] = answer
    row = zoo.Release("segformer-b0-url", "segformer-b0", "segformer", "ade20k", "512x512", "url",
                      f"{server.url}/weights/b0.pth", size_mb=size_mb)
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    error = _pull_fails([row.name], capsys, seconds)
    assert re.match(re.escape(row.location) + ": " + line, error), error
    parts = list(cache.rglob("*.part"))
    assert bool(parts) == kept and not list(cache.rglob("*.lock")) and not (cache / "checksums.json").exists()


def test_a_refused_connection_fails_at_once_without_retrying(monkeypatch, small_limits, capsys):
    monkeypatch.setenv("TRANSEG_DOWNLOAD_ATTEMPTS", "5")
    row = zoo.Release("segformer-b0-refused", "segformer-b0", "segformer", "ade20k", "512x512", "url",
                      f"http://127.0.0.1:{_closed_port()}/b0.pth")
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    error = _pull_fails([row.name], capsys, 1.5)
    assert re.match(re.escape(row.location) + r": cannot connect \(.*[Rr]efused.*\); or download", error), error


HUB = {
    "drips": ("model.safetensors", drip(0.05), {}, r"[\d.]+ KB/s over the last [\d.]+ s, below the minimum of 1 KB/s", 4),
    "stalls after 1000 bytes": ("model.safetensors", stall_after(1000), {},
                                (r"no data for 0\.5 s after [\d,]+ bytes \(TRANSEG_DOWNLOAD_TIMEOUT\); gave up after 2 "
                                r"attempts"), 6),
    "lies about its length": ("model.safetensors", lying_length, {},
                              r"the connection closed after [\d,]+ bytes; gave up after 2 attempts", 6),
    "announces more than the limit": ("model.safetensors", claims(50_000_000), {"TRANSEG_DOWNLOAD_MAX_MB": "1"},
                                      (r"the server announces 50\.0 MB, over the limit of 1\.0 MB "
                                      r"\(TRANSEG_DOWNLOAD_MAX_MB=1\)$"), 3),
    "sends without end": ("model.safetensors", endless, {"TRANSEG_DOWNLOAD_MAX_MB": "0.1"},
                          r"more than 100,000 bytes arrived, over the limit \(TRANSEG_DOWNLOAD_MAX_MB=0\.1\)$", 4),
    "slow past the deadline": ("model.safetensors", drip(0.05, 2000), {"TRANSEG_DOWNLOAD_DEADLINE": "1.5"},
                               r"not done within the deadline of 1\.5 s", 4),
    "answers 503": ("config.json", status(503), {}, r"the server answered HTTP 503; gave up after 2 attempts", 4),
    "redirects to file://": ("config.json", redirect("file:///etc/passwd"), {},
                             r"redirected to \S*/etc/passwd, not an http\(s\) URL$", 3),
    "redirects to a closed port": ("config.json", redirect("http://127.0.0.1:CLOSED/config.json"), {},
                                   r"cannot connect to 127\.0\.0\.1 \(.*[Rr]efused", 4),
}


@pytest.mark.parametrize("case", list(HUB))
def test_a_hostile_hub_ends_in_one_line_within_its_limits(case, server, hf_segformer, monkeypatch, small_limits,
                                                          tmp_path, capsys):
    """The same through huggingface_hub (`transeg pull org/repo`): its retries replaced by the bounded ones,
    its log lines by one retry line, and its temporary `.incomplete` file gone."""
    filename, answer, settings, line, seconds = HUB[case]
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    _publish(server, "someone/hostile", {"config.json": hf_segformer[1]["config.json"], "model.safetensors": DATA})
    server.hostile[f"someone/hostile/{filename}"] = answer
    error = _pull_fails(["someone/hostile"], capsys, seconds)
    url = f"{server.url}/someone/hostile/resolve/main/{filename}"
    assert re.match(re.escape(url) + ": " + line, error), error
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.name.endswith(".incomplete")]


@pytest.mark.parametrize("endpoint,line", [
    ("http://127.0.0.1:CLOSED", (r"http://127\.0\.0\.1:\d+/someone/repo/resolve/main/config\.json: cannot connect to "
                                r"127\.0\.0\.1 \(.*[Rr]efused")),
    ("huggingface.co", r"HF_ENDPOINT='huggingface\.co': not an http\(s\) URL"),
    ("ftp://mirror.example", r"HF_ENDPOINT='ftp://mirror\.example': not an http\(s\) URL"),
    ("http://", r"HF_ENDPOINT='http://': not an http\(s\) URL"),
])
def test_an_unreachable_or_malformed_hub_endpoint_is_one_line_at_once(endpoint, line, monkeypatch, small_limits,
                                                                       capsys):
    monkeypatch.setenv("HF_ENDPOINT", endpoint.replace("CLOSED", str(_closed_port())))
    monkeypatch.setenv("TRANSEG_DOWNLOAD_ATTEMPTS", "5")
    assert re.match(line, _pull_fails(["someone/repo"], capsys, 1.5))


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_pull_from_an_unreachable_hub_prints_one_line_and_exits_2(tmp_path):
    """In a process of its own, default limits and huggingface_hub's own logging: a refused connection is
    one line on stderr, at once (no retry lines, no traceback)."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "TRANSEG_HOME": str(tmp_path / "t"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-c", "import sys; from transeg.cli import main; sys.exit(main())",
                          "pull", "someone/repo"], check=False, env=env, capture_output=True, text=True, timeout=50)
    assert run.returncode == 2, run.stderr
    assert re.fullmatch(r"transeg: error: http://127\.0\.0\.1:\d+/someone/repo/resolve/main/config\.json: cannot "
                        r"connect to 127\.0\.0\.1 \(.*\)\n", run.stderr), run.stderr
    assert time.monotonic() - began < 30


@pytest.mark.parametrize("name,value", [
    ("TRANSEG_DOWNLOAD_DEADLINE", "soon"), ("TRANSEG_DOWNLOAD_DEADLINE", "-1"), ("TRANSEG_DOWNLOAD_TIMEOUT", "nan"),
    ("TRANSEG_DOWNLOAD_MIN_RATE", "-5"), ("TRANSEG_DOWNLOAD_ATTEMPTS", "0"), ("TRANSEG_DOWNLOAD_ATTEMPTS", "1.5"),
    ("TRANSEG_DOWNLOAD_MAX_MB", "inf"),
])
def test_a_bad_limit_setting_is_one_line_naming_it(name, value, server, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    server.files["/weights/b0.pth"] = DATA
    row = zoo.Release("segformer-b0-url", "segformer-b0", "segformer", "ade20k", "512x512", "url",
                      f"{server.url}/weights/b0.pth")
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    assert _pull_fails([row.name], capsys, 5).startswith(f"{name}={value!r}: not a ")
    assert server.requests == []


def _home_file(tmp_path):
    (tmp_path / "home").write_text("x")
    return tmp_path / "home"


def _home_dangling(tmp_path):
    (tmp_path / "home").symlink_to(tmp_path / "gone")
    return tmp_path / "home"


@pytest.mark.parametrize("make,line", [
    (_home_file, r"TRANSEG_HOME=.*/home: a file, not a folder; set TRANSEG_HOME to a folder you can write$"),
    (_home_dangling, r"TRANSEG_HOME=.*/home: a link to .*/gone, which does not exist; set TRANSEG_HOME"),
    (lambda tmp: _home_file(tmp) / "sub", r"TRANSEG_HOME=.*/home/sub: cannot be made \(Not a directory\)"),
])
def test_a_cache_that_cannot_be_written_is_one_line_naming_transeg_home(make, line, tmp_path, monkeypatch, capsys,
                                                                          hf_segformer, server):
    _publish(server, "someone/repo", hf_segformer[1])
    monkeypatch.setenv("TRANSEG_HOME", str(make(tmp_path)))
    assert re.match(line, _pull_fails(["someone/repo"], capsys, 10))


def test_a_missing_transeg_home_is_made(tmp_path, monkeypatch, hf_segformer, server):
    _publish(server, "someone/repo", hf_segformer[1])
    monkeypatch.setenv("TRANSEG_HOME", str(tmp_path / "not" / "yet"))
    assert transeg.load("someone/repo", progress=False).meta["zoo"] == "someone/repo"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_transeg_home_is_one_line(tmp_path, monkeypatch, capsys, hf_segformer, server):
    _publish(server, "someone/repo", hf_segformer[1])
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setenv("TRANSEG_HOME", str(tmp_path / "ro"))
    assert re.match(r"TRANSEG_HOME=.*/ro: not writable", _pull_fails(["someone/repo"], capsys, 10))


@pytest.mark.parametrize("config,line", [
    (b"{not json", r"config\.json: not valid JSON \(Expecting property name"),
    (b"[1, 2]", r"config\.json: expected a JSON object \(the model's settings\), got a list$"),
    (b"[" * 100_000 + b"]" * 100_000, r"config\.json: JSON nested 100000 levels deep; a config\.json nests at most 32$"),
    (b'"segformer"', r"config\.json: expected a JSON object \(the model's settings\), got a str$"),
    (json.dumps({"model_type": "segformer", "id2label": {"1": "a", "2": "b"}}).encode(),
     r"config\.json: id2label's 2 ids must be 0\.\.1; 0 is missing \(ids given: 1\.\.2\)$"),
    (json.dumps({"model_type": "segformer", "id2label": {"0": "a", "x": "b"}}).encode(),
     r"config\.json: id2label key 'x' is not a class id"),
    (json.dumps({"model_type": "segformer", "id2label": ["a", "b"]}).encode(),
     r"config\.json: id2label must map class ids to names, got a list$"),
    (json.dumps({"model_type": ["segformer"]}).encode(), r"a None model; transeg reads Hub repos of"),
])
def test_a_broken_config_json_is_one_line_at_pull(config, line, server, capsys):
    server.files["someone/broken/config.json"] = config
    assert re.match(r"someone/broken: " + line, _pull_fails(["someone/broken"], capsys, 10))


@pytest.mark.parametrize("spec", ["https://host.example/x.safetensors", "http://127.0.0.1:9/models/b0.pth",
                                  "s3://bucket/key.safetensors", "https://host.example/org/repo"])
def test_a_url_given_as_a_checkpoint_is_named_as_given(spec, server):
    with pytest.raises(TransegError, match=rf"^{re.escape(spec)}: a URL; transeg takes a checkpoint file here"):
        transeg.load(spec)
    assert server.requests == []


def test_no_lock_file_is_left_beside_a_download_or_the_checksums(server, tmp_path, monkeypatch, cache):
    server.files["/weights/b0.pth"] = data = _official_b0(tmp_path)
    row = _url_row(server, data)  # no publisher hash: the checksum is recorded (checksums.json locked too)
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["checksums.json",
                                                                       "segformer-b0-url.safetensors"]


# ----------------------------------------------------------------------------- the table itself
def test_every_release_names_a_registered_variant_and_a_reader():
    from transeg.convert import FORMATS
    from transeg.registry import VARIANTS

    compared = 0
    for r in zoo.RELEASES.values():
        assert r.variant in VARIANTS, r.name
        assert r.fmt in FORMATS or (r.backbone and r.fmt == "backbone"), r.name
        assert r.host in ("hub", "url", "manual") and r.location, r.name
        assert r.host != "url" or r.location.startswith("https://"), r.name
        assert r.host != "hub" or (r.files and re.match(r"^[\w.-]+/[\w.-]+$", r.location)), r.name
        assert r.backbone == (r.dataset == "imagenet"), r.name
        # the mIoU shown beside a release is the paper's the registry carries for that variant and dataset
        # (EDAFormer's per-dataset table was not retrievable: neither the registry nor the zoo states one)
        paper = VARIANTS[r.variant].paper.miou.get(r.dataset.replace("coco_stuff", "cocostuff"))
        assert r.backbone or r.miou or r.fmt == "edaformer", r.name
        if paper is not None and r.name == f"{r.variant.removesuffix('-coco10k').removesuffix('-pc')}-" \
                                           f"{r.dataset.replace('_', '-')}":
            assert r.miou == paper, r.name
            compared += 1
    assert compared == 42  # SegFormer 12, Segmenter 7 (ADE20K), SegViT 7, SeMask 14, EoMT 2 (DINOv2 and DINOv3 ADE20K):
    # every row with a paper number


def test_every_release_tests_as_its_recipe_says():
    """A zoo row's test protocol is the one its recipe in configs/ states (the same paper table row)."""
    from transeg.engine.config import load_config

    configs = Path(__file__).parent.parent / "configs"
    checked = 0
    for r in zoo.RELEASES.values():
        if r.backbone or r.protocol is None:
            continue
        h, w = r.crop.split("x")  # recipes name a square crop by its side: segformer-b0_cityscapes-768_160k
        tag = f"{r.dataset.replace('_', '-')}-{h if h == w else r.crop}"
        recipes = sorted((configs / r.variant.split("-")[0]).glob(f"{r.variant}_{tag}_*.yaml"))
        if not recipes:
            continue
        cfg = load_config(recipes[0])
        assert (r.protocol.mode, r.protocol.scale) == (cfg.test_mode, tuple(cfg.test_scale)), r.name
        if r.protocol.mode == "slide":
            assert (r.protocol.crop, r.protocol.stride) == (tuple(cfg.test_crop), tuple(cfg.test_stride)), r.name
        checked += 1
    assert checked == 15  # SegFormer: B0-B5 on ADE20K and Cityscapes, and B0 at three smaller Cityscapes crops


def test_every_release_has_its_datasets_class_count():
    """A segmentation release predicts its dataset's classes, as transeg.data's tables count them: ADE20K 150,
    Cityscapes 19, COCO-Stuff 171, Pascal Context 60 (background counted) or 59. Where a variant is the
    release's own (EoMT's Cityscapes model, SegViT's COCO-Stuff and Pascal Context ones), its paper's class
    count and the count `transeg models` shows its params and GFLOPs at are that count too (the Cityscapes
    EoMT row said 150)."""
    from transeg.data import DATASETS
    from transeg.flops import variant_table
    from transeg.registry import VARIANTS

    expected = {"ade20k": 150, "cityscapes": 19, "coco_stuff164k": 171, "coco_stuff10k": 171, "pascal_context": 60}
    rows = {r["model"]: r for r in variant_table(count_flops=False)}
    own = 0
    for r in zoo.RELEASES.values():
        if r.backbone:
            assert zoo.release_classes(r) is None, r.name
            continue
        k = zoo.release_classes(r)
        assert k == expected[r.dataset] == len(DATASETS[zoo.DATASET_TABLES[r.dataset]].class_names), r.name
        paper = VARIANTS[r.variant].paper
        counted = {int(key.split("@")[1]) for key in paper.gflops}
        stated = paper.official_classes is not None or counted - {150}  # a variant stated at its dataset's count
        datasets = {x.dataset for x in zoo.RELEASES.values() if x.variant == r.variant and not x.backbone}
        if stated and datasets == {r.dataset}:
            assert paper.official_classes in (None, k) and rows[r.variant]["classes"] == k, r.name
            own += 1
    assert own >= 3  # eomt-dinov2-l16-cityscapes, segvit-vit-l16-coco10k, -pc, ...
    city = rows["eomt-dinov2-l16-cityscapes"]
    assert city["classes"] == 19 and round(city["params_m"] * 1e6) == VARIANTS[city["model"]].paper.official_params


def test_a_release_whose_head_has_another_class_count_is_refused(server, hf_segformer, monkeypatch):
    """A Cityscapes row whose file holds a 150-class head is not the release: one line, nothing cached."""
    _, files = hf_segformer
    _publish(server, "vendor/b0-city", files)
    row = zoo.Release("segformer-b0-city-demo", "segformer-b0", "segformer-hf", "cityscapes", "1024x1024", "hub",
                      "vendor/b0-city", ("model.safetensors",))
    monkeypatch.setitem(zoo.RELEASES, row.name, row)
    with pytest.raises(TransegError, match=r"holds a 150-class head, not the 19 classes of cityscapes "
                                           r"\(segformer-b0-city-demo\)"):
        zoo.fetch(row.name, progress=False, log=lambda *a: None)
    assert not zoo.target(row.name).exists()


def test_the_readme_lists_every_release_as_the_table_says():
    """README's zoo table is `zoo.table()` row for row (regenerate it from there when a row changes)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    rows = [f"| `{r[0]}` | " + " | ".join(r[1:]) + " |" for r in zoo.table()]
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README's zoo table differs from zoo.table() in {len(missing)} rows, e.g. {missing[:2]}"
