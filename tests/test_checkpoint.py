"""transeg.checkpoint: our .safetensors format (save/load, NaN weights, metadata checks) and safe loading of .pth files."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transeg
from conftest import TINY
from helpers import _error, _one_line
from transeg.cli import main


def _nan_ckpt(tmp_path, tiny_ckpt):
    path = tmp_path / "nan.safetensors"
    state = load_file(str(tiny_ckpt))
    state["decode_head.linear_pred.weight"][1, 2] = float("nan")
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        save_file(state, str(path), metadata=f.metadata())
    return path


@pytest.mark.parametrize("verb", ["eval", "predict", "load"])
def test_nan_weights_are_refused(tmp_path, capsys, tiny_ckpt, verb):
    """A checkpoint with one NaN weight evaluated to "mIoU 7.93" and exported with "max |diff| 0.0"; now
    every reader refuses it with one line naming the file and the tensor."""
    path = _nan_ckpt(tmp_path, tiny_ckpt)
    message = "nan.safetensors: tensor decode_head.linear_pred.weight holds 1 NaN/inf value(s)"
    if verb == "load":
        with pytest.raises(transeg.TransegError, match=message.replace("(", r"\(").replace(")", r"\)")):
            transeg.load(path)
        return
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    argv = {"eval": ["eval", str(path), "--data", "synthetic:size=32,n=2", "--limit", "1"],
            "predict": ["predict", str(path), str(image), "--out", str(tmp_path / "o")]}[verb]
    assert main(argv) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_a_model_with_nan_weights_is_not_saved(tmp_path):
    model = transeg.create_model("segformer-b0", num_classes=3, **TINY)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(transeg.TransegError, match=r"bad.safetensors: not saved: tensor .* holds 1 NaN/inf"):
        transeg.save(model, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def _with_metadata(tiny_ckpt, tmp_path, edit):
    """A copy of the tiny checkpoint whose transeg metadata is `edit(dict)` (a dict, or a raw string)."""
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta = f.metadata()
    value = edit(json.loads(meta["transeg"]))
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(tiny_ckpt)), str(path),
              metadata={**meta, "transeg": value if isinstance(value, str) else json.dumps(value)})
    return path


def _set(key, value):
    return lambda m: {**m, key: value}


def _args(**changes):
    return lambda m: {**m, "model_args": {**m["model_args"], **changes}}


BAD_METADATA = [
    ("not JSON", lambda m: '{"variant": "segformer-b0", ', "bad transeg metadata: not JSON"),
    ("a JSON list", lambda m: [m], "bad transeg metadata: expected a JSON object, got list"),
    ("no variant", lambda m: {k: v for k, v in m.items() if k != "variant"}, "bad transeg metadata: no 'variant'"),
    ("unknown variant", _set("variant", "segformer-b9"), "unknown model 'segformer-b9'"),
    ("palette entry", _set("palette", [[0, 0, 0], [0, 0], [1, 1, 1]]),
     "'palette' entry 1 must be [r, g, b] (3 whole numbers), got [0, 0]"),
    ("palette of names", _set("palette", "red, green, blue"), "'palette' must be a list of 3 [r, g, b] colours"),
    ("palette too short", _set("palette", [[0, 0, 0]]), "'palette' must be a list of 3 [r, g, b] colours"),
    ("classes", _set("classes", "abc"), "'classes' must be a list of 3 class names"),
    ("mean", _set("mean", [1, 2]), "'mean' must be 3 numbers"),
    ("model_args a list", _set("model_args", [1, 2]), "'model_args' must be an object"),
    ("unknown argument", _args(colour="red"), "model_args do not fit segformer-b0: unknown argument(s) ['colour']"),
    ("argument of the wrong type", _args(embed_dims="wide"), "model_args do not fit segformer-b0 ("),
    ("huge embed_dims", _args(embed_dims=[10**8, 16, 24, 32]),
     "its metadata describes a segformer-b0 of at least 14,700,000,000 weights but the file holds 53,500"),
    ("embed_dims that do not fit", _args(embed_dims=[8, 16, 24, 40]),
     "its metadata describes a segformer-b0 that does not fit the file's tensors (23 misshapen: "
     "backbone.patch_embed4.proj.weight (32, 24, 3, 3) vs (40, 24, 3, 3)"),
    ("a billion layers", _args(depths=[10**9, 1, 1, 1]), "depths=[1000000000, 1, 1, 1] asks for more layers than"),
    ("test protocol", _set("test", {"mode": "zigzag"}), "test protocol: mode must be 'whole' or 'slide'"),
]


@pytest.mark.parametrize("case,edit,message", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file(tmp_path, capsys, tiny_ckpt, case, edit, message):
    """Metadata a file cannot be rebuilt from gave tracebacks (JSONDecodeError, KeyError, TypeError from
    a constructor) or, for huge sizes, tried to allocate terabytes (59 GB for the first tensor here);
    now one line naming the file, from its header and a build stopped before it allocates more than
    the file holds; the file is unchanged."""
    path = _with_metadata(tiny_ckpt, tmp_path, edit)
    before = path.read_bytes()
    started = time.perf_counter()
    assert main(["eval", str(path)]) == 2
    line = _one_line(capsys, message)
    assert line.startswith(f"transeg: error: {path}: ")
    assert path.read_bytes() == before and time.perf_counter() - started < 20


# a foreign file that is no checkpoint: torch's unpickler fails on garbage in any way (KeyError on a text
# file, UnpicklingError whose text advises weights_only=False on random bytes); each is one line that does
# not blame code execution and gives no such advice
@pytest.mark.parametrize("content,message", [
    (b"hello world, this is a text file\n", "not a PyTorch checkpoint (its bytes do not unpickle"),
    (bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)), "not a PyTorch checkpoint (its bytes"),
    (b"PK\x03\x04garbage", "not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip archive"),
])
def test_convert_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content, message):
    src = tmp_path / "b0.pth"
    src.write_bytes(content)
    line = _error(capsys, main(["convert", str(src), str(tmp_path / "b0.safetensors"), "--from", "segformer"]))
    assert f"{src}: {message}" in line and "would run code" not in line and "weights_only` set to `False" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.pth"]


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    """A .pth whose pickle calls os.system: `transeg convert` and `backbone_weights` refuse it with one
    line naming the file and the global it wanted, the command never runs, nothing is written."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": _Payload(marker)}}, evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors"), "--from", "segformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pth: refused: loading it would run code" in err[0] and "system" in err[0]
    from transeg.convert import load_backbone_weights

    with pytest.raises(transeg.TransegError, match="evil.pth: refused: loading it would run code"):
        load_backbone_weights(transeg.create_model("segformer-b0", num_classes=3, **TINY), evil)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # the same file unpickled naively would have run the command (so the test checks something real)
    with open(evil, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()



# -- issue 30: what `convert` writes, `load` accepts; config.json and zip .pth files read within bounds ----------

def _official_with(path, change):
    """The official SegFormer-B0 .pth (tests/helpers) with `change(obj)` applied to its {"state_dict", "meta"}."""
    from helpers import _official_segformer

    _official_segformer(path)
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)
    return path


def _whole_numbers(obj):
    obj["state_dict"] = {k: v.round().to(torch.int32) if v.is_floating_point() else v for k, v in obj["state_dict"].items()}


def _no_classes(obj):
    obj["state_dict"]["decode_head.linear_pred.weight"] = obj["state_dict"]["decode_head.linear_pred.weight"][:0]
    obj["state_dict"]["decode_head.linear_pred.bias"] = obj["state_dict"]["decode_head.linear_pred.bias"][:0]


def _nan(obj):
    obj["state_dict"]["decode_head.linear_fuse.conv.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("change,fragment", [
    (_whole_numbers, "(int32, not floating-point)"),                                       # the case
    (lambda o: o["state_dict"].update({k: v.to(torch.bool) for k, v in o["state_dict"].items() if k.endswith(".bias")}),
     "(bool, not floating-point)"),
    (_no_classes, "its head has 0 classes"),                                               # the case
    (lambda o: o.update(meta={"CLASSES": list(range(150))}), "class names"),              # numbers, not names
    (lambda o: o.update(meta={"CLASSES": [None] * 150}), "class names"),
    (lambda o: o.update(meta={"CLASSES": [""] * 150}), "class names"),                    # empty names
    (lambda o: o.update(meta={"CLASSES": ["a"] * 150, "PALETTE": [["red"]] * 150}), "'palette' entry 0"),
    (_nan, "NaN/inf"),
], ids=["int32-weights", "bool-biases", "zero-classes", "numeric-names", "null-names", "empty-names", "palette-words",
        "nan-weight"])
def test_convert_refuses_what_load_would_refuse(tmp_path, capsys, change, fragment):
    """`transeg convert` runs load's checks before it writes: one line naming the source, exit 2, nothing written."""
    src, dst = _official_with(tmp_path / "seg.pth", change), tmp_path / "out.safetensors"
    line = _error(capsys, main(["convert", str(src), str(dst), "--from", "segformer"]))
    assert str(src) in line and fragment in line, line
    assert not dst.exists()


def test_load_refuses_whole_number_weights(tmp_path, capsys):
    """A transeg file whose floating-point weights were stored as integers is refused by `load` too."""
    path = tmp_path / "m.safetensors"
    transeg.save(transeg.create_model("segformer-b0", num_classes=3, **TINY), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["decode_head.linear_pred.weight"] = state["decode_head.linear_pred.weight"].to(torch.int64)
    save_file(state, path, metadata=meta)
    with pytest.raises(transeg.TransegError, match=r"linear_pred\.weight \(int64, not floating-point\)"):
        transeg.load(path)


def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not valid JSON"),                                                        # the cases
    ("[1, 2]", "expected a JSON object"),
    (_deep(100_000), "nested 100000 levels deep"),
    ('{"id2label": {"1": "a", "2": "b"}}', "0 is missing"),
    # cases of our own
    ('{"a": ' + _deep(40) + "}", "nested 41 levels deep"),
    ('{"s": "' + "[" * 5000 + '"}', "id2label"),   # brackets inside a string are no nesting: read, then the id2label check
    ("\xff\xfe{}", "not a UTF-8"),
    ("null", "expected a JSON object"),
    ('{"id2label": ["a", "b"]}', "must map class ids to names"),
    ('{"id2label": {"zero": "a"}}', "is not a class id"),
    ('{"id2label": {"-1": "a"}}', "is not a class id"),
    ('{"id2label": {"0": "a", "00": "b"}}', "is not a class id"),
    ('{"id2label": {"0": 7}}', "must be a class name"),
    ('{"id2label": {"0": ""}}', "must be a class name"),
    ('{"id2label": {"0": {"name": "a"}}}', "must be a class name"),
])
@pytest.mark.parametrize("fmt", ["segformer-hf", "eomt"])
def test_convert_reads_config_json_within_bounds(tmp_path, capsys, text, fragment, fmt):
    """A damaged or hostile config.json beside Hugging Face weights is one line naming it (exit 2), before the
    weights are read (here: a weights file that is not even one)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    (folder / "model.safetensors").write_bytes(b"not weights")
    if fragment == "id2label":  # the config is fine: what fails is the weights file, read after it
        fragment = "model.safetensors"
    line = _error(capsys, main(["convert", str(folder), str(tmp_path / "o.safetensors"), "--from", fmt]))
    assert fragment in line and ("config.json" in line or fragment == "model.safetensors"), line
    assert not (tmp_path / "o.safetensors").exists()


def test_config_json_larger_than_its_bound_is_refused_from_its_size(tmp_path):
    """A config.json over 4 MiB (made sparse here: small on disk) is refused from its size, unread."""
    from transeg.convert.hf_config import MAX_CONFIG_BYTES, read_config

    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(transeg.TransegError, match="more than a config.json holds"):
        read_config(path)


def test_id2label_must_fit_the_head():
    from transeg.convert.hf_config import class_names

    assert class_names({"id2label": {"1": "b", "0": "a"}}, 2, "c") == ["a", "b"]
    assert class_names({}, 2, "c") is None
    with pytest.raises(transeg.TransegError, match="names 3 classes but the weights' head has 2"):
        class_names({"id2label": {"0": "a", "1": "b", "2": "c"}}, 2, "c")


def _zip_pth(path, entries):
    """A zip in torch.save's layout whose entries [(name, unpacked bytes)] are zeros, deflated (small on disk)."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        for name, size in entries:
            with archive.open(name, "w", force_zip64=True) as f:
                chunk = bytes(2**20)
                for start in range(0, size, len(chunk)):
                    f.write(chunk[:min(len(chunk), size - start)])
    return path


@pytest.mark.parametrize("entries", [
    [("archive/data/0", 80 * 2**20)],                                  # one tensor's storage unpacking to 80 MB
    [(f"archive/data/{i}", 2**20) for i in range(70)],                 # many small ones adding up
], ids=["one-entry", "many-entries"])
def test_zip_bomb_pth_is_refused_from_its_header(tmp_path, monkeypatch, entries):
    """A .pth of a few hundred KB declaring more unpacked bytes than 2x its size + 64 MiB is refused before
    torch.load reads anything (torch.load is made to fail the test if it is reached)."""
    from transeg import checkpoint

    path = _zip_pth(tmp_path / "bomb.pth", entries)
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(transeg.TransegError, match="zip bomb"):
        checkpoint.load_foreign(path)


def test_real_pth_files_fit_the_unpacked_bound(tmp_path):
    """torch.save's own files (stored, not compressed) pass the bound, large tensors included."""
    from transeg.checkpoint import load_foreign

    torch.save({"w": torch.zeros(3 * 2**20), "meta": {"CLASSES": ["a"]}}, tmp_path / "ok.pth")
    assert load_foreign(tmp_path / "ok.pth")["w"].numel() == 3 * 2**20
